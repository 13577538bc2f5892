"""Which model parameter each ONNX initializer of an artifact holds: `weights.json`.

The exporter traces a torch module, and the trace names its weights as it likes: a
convolution keeps its parameter's name (`unet.conv_in.weight`), but a Linear layer
becomes a MatMul on a transposed copy named `onnx::MatMul_3382`. Whatever changes
weights after export needs the link back to the model's own names: a LoRA names the
layers it changes the way diffusers and transformers name parameters, and TensorRT's
refitter and ONNX Runtime's overridable initializers address weights by initializer
name. The exporter records the link, matched by value (export/weightmap.py), in one
file per artifact:

    {"format": 1, "stages": {"unet": {"component": "unet", "params": {
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight":
            {"initializer": "onnx::MatMul_3382", "transposed": true, "shape": [320, 320]}, ...}}}}

`shape` is the parameter's (torch layout); a transposed initializer holds its 2-D
transpose. A parameter name is the module's own `named_parameters()` name, and a text
encoder's carries no `text_model.` level (transformers 5 dropped it; 4.x names are
recorded without it too), so one name works whichever transformers wrote the file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from . import files
from .errors import ArtifactError
from .specs import Stage

WEIGHT_MAP = "weights.json"
FORMAT = 1
# The diffusers component whose parameters a stage holds (the shallow DeepCache U-Net
# holds a subset of the U-Net's).
COMPONENTS = {Stage.TEXT_ENCODER: "text_encoder", Stage.TEXT_ENCODER_2: "text_encoder_2",
              Stage.UNET: "unet", Stage.UNET_SHALLOW: "unet"}


@dataclass(frozen=True)
class Target:
    initializer: str            # the ONNX initializer's name
    transposed: bool            # the initializer holds the 2-D parameter transposed (a MatMul weight)
    shape: tuple[int, ...]      # the parameter's shape, torch layout

    def to_json(self) -> dict[str, Any]:
        return {"initializer": self.initializer, "transposed": self.transposed, "shape": list(self.shape)}


@dataclass(frozen=True)
class StageWeights:
    component: str                  # "unet", "text_encoder", "text_encoder_2"
    params: Mapping[str, Target]    # parameter name -> where the graph holds it


@dataclass(frozen=True)
class WeightMap:
    stages: Mapping[Stage, StageWeights]

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "stages": {
            s.value: {"component": w.component, "params": {p: t.to_json() for p, t in sorted(w.params.items())}}
            for s, w in self.stages.items()}}

    def targets(self) -> dict[str, dict[str, tuple[int, ...]]]:
        """{component: {parameter: shape}}: what a LoRA may change in this artifact."""
        out: dict[str, dict[str, tuple[int, ...]]] = {}
        for weights in self.stages.values():
            out.setdefault(weights.component, {}).update({p: t.shape for p, t in weights.params.items()})
        return out


def write(folder: str | os.PathLike[str], weight_map: WeightMap) -> None:
    files.atomic_write_json(Path(folder) / WEIGHT_MAP, weight_map.to_json())


def read(folder: str | os.PathLike[str]) -> WeightMap | None:
    """The artifact's weight map, or None for an artifact exported before sdrt recorded
    one. Its size and hash were checked against the manifest when the artifact opened."""
    path = Path(folder) / WEIGHT_MAP
    if not path.is_file():
        return None
    data = files.read_json_object(path, ArtifactError, "weight map")
    try:
        if data.get("format") != FORMAT:
            raise ValueError(f"format {data.get('format')!r}, this sdrt reads {FORMAT}")
        stages = {}
        for name, entry in data["stages"].items():
            params = {str(p): Target(str(t["initializer"]), bool(t["transposed"]), tuple(int(d) for d in t["shape"]))
                      for p, t in entry["params"].items()}
            stages[Stage(name)] = StageWeights(str(entry["component"]), params)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ArtifactError(f"{path}: not a weight map sdrt can read ({e}); export the model again") from None
    return WeightMap(stages)
