"""Checking a stage against a reference on the same random inputs: export's check
(each ONNX graph in ONNX Runtime against its torch module) and `sdrt build`'s (each
TensorRT engine against ONNX Runtime). NumPy only; ONNX Runtime imported when run.

The rule is `max_abs <= atol + rtol * max|reference|`: an absolute floor plus a bound
relative to the output's scale. Per-element relative error is reported against the
same scale (max_abs / max|reference|), because elementwise |a-b|/|b| is meaningless
where the reference crosses zero. Full-size random-weight VAEs produce pixel values in
the tens, where an fp32 error of 1e-4 absolute is not achievable but 1e-5 of scale is.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from .specs import (CLIP_SKIP, CONTROL_SCALES, CONTROLNET_COND, ENCODER_ATTENTION_MASK, INPUT_IDS, TIME_IDS,
                    TIMESTEP_COND, TOKEN_EMBEDDINGS, DType,
                    ModelFacts, Precision, Stage, StageSpec)

# fp32: graph and torch differ only by kernel order and fused ops.
FP32_TOLERANCE = (1e-4, 1e-4)  # (atol, rtol of output scale)


def verify_tolerance(stage: Stage, precision: Precision) -> tuple[float, float]:
    """(atol, rtol) for the check `max|got - want| <= atol + rtol * max|want|`: export's
    (ONNX Runtime CPU against the fp32 torch module) and `sdrt build`'s (TensorRT
    against ONNX Runtime, always at the fp16 bound: TensorRT may run fp32 matmuls in TF32).

    fp32: kernel order only. fp16, measured: the tiny models' max|diff| is 1.5e-3..4.8e-3
    at output scales 1.3..3.5 (max_rel <= 2.7e-3); the full-size SD 1.5 architecture
    (random weights) 1.6e-3 at scale 1.5 for the U-Net. The bound, 1e-2 + 1e-2 * scale,
    leaves room for real checkpoints' larger activations and is still far below what a
    wrong graph (an O(1) error) or fp16 overflow (inf) produces.
    """
    Stage(stage)
    return FP32_TOLERANCE if Precision(precision) is Precision.FP32 else (1e-2, 1e-2)


@dataclass(frozen=True)
class StageCheck:
    stage: Stage
    precision: Precision
    max_abs: float
    scale: float      # max |reference|
    atol: float
    rtol: float

    @property
    def passed(self) -> bool:
        return bool(np.isfinite(self.max_abs)) and self.max_abs <= self.bound

    @property
    def bound(self) -> float:
        return self.atol + self.rtol * self.scale

    @property
    def max_rel(self) -> float:
        if self.scale > 0:
            return self.max_abs / self.scale
        return 0.0 if self.max_abs == 0 else float("inf")

    def to_json(self) -> dict[str, Any]:
        return {"max_abs": self.max_abs, "max_rel": self.max_rel,
                "scale": self.scale,
                "tolerance": {"atol": self.atol, "rtol": self.rtol, "bound": self.bound},
                "precision": self.precision.value, "passed": self.passed}


def random_inputs(spec: StageSpec, facts: ModelFacts, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs in the range each stage sees in a real run."""
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for t in spec.inputs:
        if t.name == CLIP_SKIP:
            out[t.name] = rng.integers(0, facts.max_clip_skip + 1, size=t.shape).astype(np.int32)
        elif t.name == ENCODER_ATTENTION_MASK:
            # Each prompt uses a random number of the context's chunks, the rest masked.
            chunks = t.shape[1] // facts.text_max_length
            used = rng.integers(1, chunks + 1, size=t.shape[0]) * facts.text_max_length
            out[t.name] = (np.arange(t.shape[1])[None, :] < used[:, None]).astype(np.float32)
        elif t.name == TIMESTEP_COND:
            # A guidance embedding: sines and cosines (see runtime guidance_embedding).
            out[t.name] = np.sin(rng.uniform(-10, 10, size=t.shape)).astype(np.float32)
        elif t.name == TIME_IDS:
            # SDXL's (original h, w, crop top, left, target h, w), or the refiner's
            # (original h, w, crop top, left, aesthetic score): pixel sizes, offsets, a score.
            tail = [1024, 1024] if t.shape[1] == 6 else [6.0]
            out[t.name] = np.tile(np.array([1024, 1024, 0, 0, *tail], np.float32), (t.shape[0], 1))
            out[t.name][:, :2] = rng.integers(256, 2048, size=(t.shape[0], 2))
        elif t.dtype is DType.INT32:
            # Random token ids (CLIP attends causally; every position matters).
            out[t.name] = rng.integers(0, 49408, size=t.shape).astype(np.int32)
            slots = next((s.shape[0] for s in spec.inputs if s.name == TOKEN_EMBEDDINGS), 0)
            if t.name == INPUT_IDS and slots:
                # Textual inversion: a few positions per prompt take embedding vectors.
                n = min(slots, 4)
                out[t.name][:, 1:1 + n] = facts.text_vocab_size + rng.integers(0, slots, size=(t.shape[0], n))
        elif t.name == TOKEN_EMBEDDINGS:
            # Embedding vectors at the scale of CLIP's token embeddings.
            out[t.name] = (0.02 * rng.standard_normal(t.shape)).astype(np.float32)
        elif spec.stage in (Stage.UNET, Stage.UNET_SHALLOW, Stage.CONTROLNET) and t.name == "timestep":
            out[t.name] = np.array([rng.uniform(1, 999)], dtype=np.float32)  # fractional, like Euler's
        elif t.name == CONTROLNET_COND:
            out[t.name] = rng.uniform(0, 1, size=t.shape).astype(np.float32)   # control images' pixels
        elif t.name == CONTROL_SCALES:
            out[t.name] = rng.uniform(0, 2, size=t.shape).astype(np.float32)   # conditioning scales
        elif spec.stage is Stage.VAE_ENCODER:
            out[t.name] = rng.uniform(-1, 1, size=t.shape).astype(np.float32)   # preprocessed pixels
        elif spec.stage is Stage.VAE_DECODER:
            # The runtime divides N(0, 1)-scaled latents by the scaling factor.
            out[t.name] = (rng.standard_normal(t.shape) / facts.vae_scaling_factor).astype(np.float32)
        else:
            out[t.name] = rng.standard_normal(t.shape).astype(np.float32)
    return out


def run_onnx(path: Path, inputs: Mapping[str, np.ndarray], full_optimization: bool = True) -> dict[str, np.ndarray]:
    """One ONNX Runtime CPU call. `full_optimization=False` keeps ORT to its basic
    graph rewrites: for one call on the 3.4 GB SD U-Net, the full level's weight
    re-layout took ~10 s of session set-up, more than it saved on the run (measured
    on 2 cores; the VAE's 512 px convolutions, in contrast, run faster with it)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if not full_optimization:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, dict(inputs))))


def compare(stage: Stage, precision: Precision, got: Mapping[str, np.ndarray], want: Mapping[str, np.ndarray],
            tolerance: tuple[float, float]) -> StageCheck:
    max_abs, scale = 0.0, 0.0
    for name, ref in want.items():
        diff = np.abs(got[name].astype(np.float64) - ref.astype(np.float64))
        max_abs = max(max_abs, float(diff.max()) if np.all(np.isfinite(diff)) else float("inf"))
        scale = max(scale, float(np.abs(ref).max()))
    return StageCheck(stage, precision, max_abs, scale, tolerance[0], tolerance[1])


def table(checks: list[StageCheck]) -> str:
    return table_from_json({c.stage.value: c.to_json() for c in checks})


def table_from_json(verification: Mapping[str, Any]) -> str:
    """The verification table, from the manifest's `verification` record."""
    lines = [f"{'stage':<16}{'precision':<11}{'max abs':>11}{'max rel':>11}{'bound':>11}  result"]
    for stage, v in verification.items():
        lines.append(f"{stage:<16}{v['precision']:<11}{v['max_abs']:>11.3g}{v['max_rel']:>11.3g}"
                     f"{v['tolerance']['bound']:>11.3g}  {'ok' if v['passed'] else 'FAILED'}")
    return "\n".join(lines)
