"""LoRAs per call, on an artifact's engines, without re-reading or re-exporting it.

A LoRA changes a weight W by scale * delta (runtime/lora.py reads the file's layers
and computes each delta as peft's merge does). The export recorded which ONNX
initializer holds which parameter, and whether transposed (engines/weightmap.py), so
the merged weight W + sum(scale_i * delta_i) is computed here from the exported W,
read from the artifact's own files each time, and handed to the engines
(`Engine.set_weights`); no LoRA hands them `{}`, which restores the exported weights
exactly. Merging from the stored W every time, never from the current weights, is
what makes switching exact: base, then LoRA A, then B, then base again gives the
same bits as fresh loads (the residue of A in B, or of B in the base, that a refit
from the current weights leaves behind, cannot happen).

This is diffusers' `fuse_lora` (W += lora_scale * delta, in the weight's dtype), the
whole of what a LoRA does to the result; its unfused path (`set_adapters` scales,
computing x W + scale * (x A) B each call) differs from it only by float rounding.
"""

from __future__ import annotations

import math
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from sdrt.engines import weightmap
from sdrt.engines.base import Engine
from sdrt.engines.errors import ArtifactError, InvalidInput, InvalidType, MissingFile
from sdrt.engines.onnx_files import read_initializers
from sdrt.engines.specs import Stage


# Parsed LoRA files kept between calls (keyed by path, size and modification time):
# switching back and forth between a few LoRAs re-reads none of them.
_PARSED_KEEP = 8


@dataclass(frozen=True)
class LoraChoice:
    """One LoRA of a call: its file and the scale it is applied at."""

    path: str
    scale: float = 1.0

    @property
    def name(self) -> str:
        """The file's stem, as AUTOMATIC1111 names a LoRA (`<lora:NAME:0.8>`)."""
        return Path(self.path).stem


def parse_loras(value: Any) -> tuple[LoraChoice, ...]:
    """The `loras=` argument: None, a path, a (path, scale) pair, or a list of those.
    A path must name an existing file; a scale must be a finite number."""
    if value is None:
        return ()
    if isinstance(value, (str, os.PathLike, LoraChoice)) or (isinstance(value, tuple) and len(value) == 2
                                                               and not isinstance(value[1], (str, os.PathLike))):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise InvalidType(f"loras must be a list of paths or (path, scale) pairs, got {type(value).__name__}")
    out = []
    for item in value:
        path, scale = (item.path, item.scale) if isinstance(item, LoraChoice) else (item, 1.0)
        if isinstance(item, (tuple, list)):
            if len(item) != 2:
                raise InvalidInput(f"a LoRA is a path or a (path, scale) pair, got {item!r}")
            path, scale = item
        if not isinstance(path, (str, os.PathLike)):
            raise InvalidType(f"a LoRA path must be a string or path, got {type(path).__name__}")
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
            raise InvalidInput(f"LoRA scale must be a finite number, got {scale!r} for {path}")
        path = os.fspath(path)
        if not Path(path).is_file():
            raise MissingFile(f"LoRA {path} does not exist" if not Path(path).exists() else f"LoRA {path} is not a file")
        out.append(LoraChoice(path, float(scale)))
    return tuple(out)


class LoraWeights:
    """The LoRAs currently applied to one pipeline's engines. Not thread-safe on its
    own: the Pipeline calls it under its lock."""

    def __init__(self, folder: Path, engines: Mapping[Stage, Engine]):
        self.folder = Path(folder)
        self.engines = engines
        self.current: tuple[LoraChoice, ...] = ()
        self._map: weightmap.WeightMap | None = None
        self._parsed: dict[tuple[str, int, int], Any] = {}
        self._parsed_lock = threading.Lock()

    @property
    def weight_map(self) -> weightmap.WeightMap:
        if self._map is None:
            found = weightmap.read(self.folder)
            if found is None:
                raise ArtifactError(f"{self.folder} was exported by an older sdrt, without the record of which graph "
                                    f"weight holds which parameter ({weightmap.WEIGHT_MAP}); export it again to "
                                    f"use LoRAs")
            self._map = found
        return self._map

    def read(self, choices: tuple[LoraChoice, ...]) -> list[Any]:
        """Parse (or take from the cache) each chosen file, checked against this artifact
        (runtime/lora.py's `Lora` records)."""
        from .lora import read_lora

        out = []
        for choice in choices:
            stat = os.stat(choice.path)
            key = (os.path.realpath(choice.path), stat.st_size, stat.st_mtime_ns)
            with self._parsed_lock:
                lora = self._parsed.get(key)
            if lora is None:
                lora = read_lora(choice.path, self.weight_map.targets())
                with self._parsed_lock:
                    self._parsed[key] = lora
                    while len(self._parsed) > _PARSED_KEEP:
                        self._parsed.pop(next(iter(self._parsed)))
            out.append(lora)
        return out

    def apply(self, choices: tuple[LoraChoice, ...]) -> None:
        """Make the engines run with exactly these LoRAs (none: the exported weights)."""
        if choices == self.current:
            return
        stages = [s for s in self.engines if s in weightmap.COMPONENTS]
        if not choices:
            for stage in stages:
                self.engines[stage].set_weights({})
            self.current = ()
            return
        merged = self.merged_weights(choices)
        try:
            for stage in stages:
                self.engines[stage].set_weights(merged.get(stage, {}))
        except BaseException:
            for stage in stages:   # never leave some stages with the new LoRAs and some without
                self.engines[stage].set_weights({})
            self.current = ()
            raise
        self.current = choices

    def merged_weights(self, choices: tuple[LoraChoice, ...]) -> dict[Stage, dict[str, np.ndarray]]:
        return merged_weights(self.folder, self.weight_map, list(zip(self.read(choices), (c.scale for c in choices))),
                              list(self.engines))


def merged_weights(folder: Path, weight_map: weightmap.WeightMap, loras: list[tuple[Any, float]],
                   stages: list[Stage]) -> dict[Stage, dict[str, np.ndarray]]:
    """{stage: {initializer: exported value + sum of scale * delta}}, in the graph's
    layout and dtype, for every initializer the LoRAs (runtime/lora.py records, each
    with its scale) change among `stages` of the artifact at `folder`.

    Each update is one rank-r product accumulated into a float32 copy of the exported
    weight: the scales multiply the small `up` factor, and a transposed weight (a
    MatMul's) gets down^T @ up^T, which is contiguous in its layout. On the full-size
    SD 1.5 U-Net this is several times faster than forming each delta and adding its
    transpose (strided) to a converted copy, and it differs from peft's
    `(up @ down) * scaling` by float rounding only."""
    layers: dict[tuple[str, str], list[tuple[Any, float]]] = {}
    for lora, scale in loras:
        for layer in lora.layers:
            layers.setdefault((layer.component, layer.param), []).append((layer, scale))
    out: dict[Stage, dict[str, np.ndarray]] = {}
    for stage in stages:
        weights = weight_map.stages.get(stage)
        if weights is None:
            continue
        changed = {p: found for (c, p), found in layers.items() if c == weights.component and p in weights.params}
        if not changed:
            continue
        _check_shared(stage, weights, changed)
        exported = read_initializers(Path(folder) / stage.onnx_file,
                                     {weights.params[p].initializer for p in changed})
        stage_out = {}
        for param, contributions in changed.items():
            target = weights.params[param]
            base = exported[target.initializer]
            acc = base if base.dtype == np.float32 else base.astype(np.float32)
            if not acc.flags.writeable:
                acc = acc.copy()
            flat = acc.reshape(acc.shape[0], -1)
            for layer, scale in contributions:
                rank = layer.down.shape[0]
                up = layer.up.reshape(layer.up.shape[0], rank) * np.float32(scale * layer.scale)
                down = layer.down.reshape(rank, -1)
                if target.transposed:
                    flat += down.T @ up.T
                else:
                    flat += up @ down
            stage_out[target.initializer] = acc if base.dtype == np.float32 else acc.astype(base.dtype)
        out[stage] = stage_out
    return out


def _check_shared(stage: Stage, weights: weightmap.StageWeights, changed: Mapping[str, Any]) -> None:
    """Parameters with equal values share one initializer after the exporter's
    deduplication (see export/weightmap.py): a LoRA cannot change one of them alone."""
    by_initializer: dict[str, list[str]] = {}
    for param, target in weights.params.items():
        by_initializer.setdefault(target.initializer, []).append(param)
    for param in changed:
        others = [o for o in by_initializer[weights.params[param].initializer] if o != param]
        if others:
            raise InvalidInput(f"the LoRA changes {param}, which the {stage.value} graph holds in one weight with "
                               f"{others[0]} (their exported values are equal), so it cannot be applied to this "
                               f"export")
