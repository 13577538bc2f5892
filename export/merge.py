"""`sdrt export --lora FILE:SCALE`: LoRAs merged into the exported weights.

The export runs as usual, then the LoRAs are merged into the graphs' weights with
the same code and the same record as a per-call LoRA (runtime/loras.py,
engines/weightmap.py), so a merged artifact gives the images a per-call LoRA at the
same scale gives, and runs at the speed of a plain artifact. Weights in the external
data file are rewritten in place (same size, same offset); a graph with inline
weights (the text encoders) is rewritten whole, through a temporary file. The
manifest, written after this, hashes the merged files and records the LoRAs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from sdrt.engines import files
from sdrt.engines.onnx_files import external_data_refs
from sdrt.engines.specs import Stage
from sdrt.engines.weightmap import WeightMap


def merge_loras(out_dir: Path, weight_map: WeightMap, loras: tuple[tuple[Path, float], ...],
                stages: tuple[Stage, ...]) -> list[dict[str, Any]]:
    """Merge `loras` ((file, scale) pairs) into the stages exported in `out_dir`.
    Returns the manifest's record of them (name, file, scale, SHA-256)."""
    from sdrt.runtime.lora import read_lora
    from sdrt.runtime.loras import merged_weights, parse_loras

    choices = parse_loras(list(loras))
    targets = weight_map.targets()
    read = [(read_lora(c.path, targets), c.scale) for c in choices]
    merged = merged_weights(out_dir, weight_map, read, list(stages))
    for stage, weights in merged.items():
        _write_weights(out_dir / stage.onnx_file, weights)
    return [{"name": c.name, "file": Path(c.path).name, "scale": c.scale, "sha256": files.sha256_file(c.path)}
            for c in choices]


def _write_weights(model_path: Path, weights: dict[str, np.ndarray]) -> None:
    external = {ref.tensor: ref for ref in external_data_refs(model_path)}
    inline = {name: value for name, value in weights.items() if name not in external}
    for name, value in weights.items():
        ref = external.get(name)
        if ref is None:
            continue
        data = np.ascontiguousarray(value).astype(value.dtype.newbyteorder("<"), copy=False).tobytes()
        if ref.length is not None and ref.length != len(data):
            raise RuntimeError(f"{model_path}: weight {name!r} holds {ref.length} bytes, the merged one {len(data)}")
        with open(model_path.parent / ref.location, "r+b") as f:
            f.seek(ref.offset)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    if inline:
        model = onnx.load(str(model_path), load_external_data=False)
        for tensor in model.graph.initializer:
            if tensor.name in inline:
                tensor.CopyFrom(numpy_helper.from_array(inline[tensor.name], tensor.name))
        with files.atomic_path(model_path) as tmp:
            onnx.save_model(model, str(tmp))
