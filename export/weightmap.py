"""Record which ONNX initializer holds which model parameter (engines/weightmap.py).

The TorchScript exporter renames what it transposes (a Linear weight becomes the
MatMul constant `onnx::MatMul_N`, holding the weight's transpose), and clean-up keeps
those names. So parameters are matched to initializers by value: every parameter's
bytes are hashed, and its transpose's when it is 2-D, before tracing; after clean-up
every float initializer's bytes are hashed, and equal hashes (with equal shapes) link
the two. This is what NVIDIA's TensorRT demo does to refit LoRA weights too (it
compares weight hashes of the ONNX graph and the torch state dict).

Two parameters with identical values (rare outside zero-initialised layers) share
one initializer after the exporter's deduplication; both are recorded, and whoever
changes one must change both alike (runtime/loras.py refuses otherwise).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from onnx.external_data_helper import ExternalDataInfo, uses_external_data

from sdrt.engines.specs import Stage
from sdrt.engines.weightmap import COMPONENTS, StageWeights, Target

Key = tuple[tuple[int, ...], str]   # (shape, hash of the bytes)


def _key(array: np.ndarray) -> Key:
    array = np.ascontiguousarray(array)
    return tuple(array.shape), hashlib.blake2b(array.tobytes(), digest_size=16).hexdigest()


def param_name(stage: Stage, name: str) -> str:
    """A parameter's recorded name: the module's own, less transformers 4's `text_model.`."""
    if stage in (Stage.TEXT_ENCODER, Stage.TEXT_ENCODER_2) and name.startswith("text_model."):
        return name[len("text_model."):]
    return name


def fingerprints(module: torch.nn.Module, stage: Stage) -> dict[Key, list[tuple[str, bool]]]:
    """{(shape, hash): [(parameter name, transposed)]} for every float32 parameter of
    `module` (the diffusers/transformers component, before tracing), and for the
    transpose of every 2-D one."""
    found: dict[Key, list[tuple[str, bool]]] = {}
    with torch.no_grad():
        for name, param in module.named_parameters():
            if param.dtype != torch.float32:
                continue
            array = param.detach().cpu().numpy()
            found.setdefault(_key(array), []).append((param_name(stage, name), False))
            if array.ndim == 2:
                found.setdefault(_key(array.T), []).append((param_name(stage, name), True))
    return found


def initializer_keys(path: Path) -> dict[str, Key]:
    """{initializer name: (shape, hash)} for every float32 initializer of the ONNX
    file at `path`, one tensor in memory at a time (a 3.4 GB U-Net is never loaded whole)."""
    model = onnx.load(str(path), load_external_data=False)
    keys = {}
    for tensor in model.graph.initializer:
        if tensor.data_type != onnx.TensorProto.FLOAT:
            continue
        if uses_external_data(tensor):
            info = ExternalDataInfo(tensor)
            with open(path.parent / info.location, "rb") as f:
                f.seek(info.offset or 0)
                data = f.read(info.length) if info.length else f.read()
            array = np.frombuffer(data, dtype="<f4").reshape(tuple(tensor.dims))
        else:
            array = numpy_helper.to_array(tensor)
        keys[tensor.name] = _key(array)
    return keys


def match(stage: Stage, params: dict[Key, list[tuple[str, bool]]], initializers: dict[str, Key]) -> StageWeights:
    """Link each parameter that a graph initializer holds to that initializer. A
    parameter the clean-up folded into something else (the position embedding's
    lookup, a constant the trace computed from it) has no entry: nothing can change it
    after export."""
    linked: dict[str, Target] = {}
    for initializer, key in sorted(initializers.items()):
        for name, transposed in params.get(key, ()):
            shape = key[0][::-1] if transposed else key[0]
            # A square weight equal to its own transpose would match both ways; the
            # untransposed reading is the trace's and wins.
            if name not in linked or (linked[name].transposed and not transposed):
                linked[name] = Target(initializer, transposed, tuple(shape))
    return StageWeights(COMPONENTS[stage], linked)


def after_conversion(weights: StageWeights, path: Path) -> StageWeights:
    """The record after fp16 conversion (export/precision.py), which converts a weight in
    place under its own name, or keeps it and adds a `<name>/fp16` copy where some of
    its consumers stay fp32; parameters whose initializer is gone are dropped."""
    names = {t.name for t in onnx.load(str(path), load_external_data=False).graph.initializer}
    kept: dict[str, Target] = {}
    for param, target in weights.params.items():
        if target.initializer in names and f"{target.initializer}/fp16" not in names:
            kept[param] = target
    return StageWeights(weights.component, kept)


def link_stage(stage: Stage) -> bool:
    """Whether a stage's parameters are recorded: those a LoRA can change."""
    return stage in COMPONENTS

