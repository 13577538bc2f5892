"""The TensorRT engine cache inside an artifact folder: `ARTIFACT_DIR/engines/`.

A serialized TensorRT engine (a "plan") is valid only for the exact graph, precision,
TensorRT version and GPU model it was built for. Each plan therefore has a JSON
sidecar recording those key parts, so that a mismatch can be explained in words
("built for TensorRT 10.3.0 / sm_87 Orin; this is 11.4.0 / sm_90 H100") and
`sdrt build` knows what to rebuild, while a current engine is left alone.

Crash safety: the sidecar is removed before a rebuild starts, the plan is written
atomically, and the sidecar (with the plan's size and SHA-256) is written last. A
plan without a matching sidecar, or whose bytes do not match it, never loads.

This module is plain Python: no TensorRT, no CUDA. The running TensorRT version and
GPU come in as a `Platform`, so it is tested here with fake plans and platforms.
"""

from __future__ import annotations

import enum
import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

from . import files
from .errors import ArtifactError
from .specs import Precision, Stage

ENGINE_DIR = "engines"
SIDECAR_FORMAT = "sdrt-engine"
SIDECAR_VERSION = 1
TIMING_CACHE_NAME = "timing.cache"


@dataclass(frozen=True)
class Platform:
    """What a plan is tied to besides its graph: TensorRT's version and the GPU model."""

    tensorrt: str              # trt.__version__, e.g. "10.3.0.30"
    gpu: str                   # device name, e.g. "Orin" or "NVIDIA H100 80GB HBM3"
    compute_capability: str    # "8.7"

    @property
    def sm(self) -> str:
        return "sm_" + self.compute_capability.replace(".", "")

    def describe(self) -> str:
        return f"TensorRT {self.tensorrt} / {self.sm} {self.gpu}"


@dataclass(frozen=True)
class EngineKey:
    """Everything that makes a plan invalid when it changes."""

    stage: Stage
    precision: Precision
    onnx_sha256: str           # over the graph and its external data (see onnx_digest)
    platform: Platform

    @property
    def digest(self) -> str:
        data = {"stage": self.stage.value, "precision": self.precision.value,
                "onnx": self.onnx_sha256, **asdict(self.platform)}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


class Status(enum.Enum):
    CURRENT = "current"        # valid for this graph, TensorRT and GPU: reuse
    MISSING = "missing"        # never built (or the sidecar is gone)
    STALE = "stale"            # built for another graph, precision, TensorRT or GPU
    DAMAGED = "damaged"        # plan truncated, replaced or unreadable sidecar


@dataclass(frozen=True)
class CacheCheck:
    status: Status
    reason: str                # one line, for the user

    @property
    def current(self) -> bool:
        return self.status is Status.CURRENT


@dataclass(frozen=True)
class BuildInfo:
    """How a plan was built: recorded for the user, not part of the key."""

    workspace_bytes: int
    opt_level: int
    seconds: float
    extra: Mapping[str, Any] = field(default_factory=dict)


def built_refittable(folder: str | Path, stage: Stage) -> bool:
    """Whether the stage's recorded engine was built with `sdrt build --refittable`."""
    try:
        meta = json.loads(sidecar_path(folder, stage).read_text(encoding="utf-8"))
        return bool(meta["build"].get("refittable", False))
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError):
        return False


def engine_dir(folder: str | Path) -> Path:
    return Path(folder) / ENGINE_DIR


def plan_path(folder: str | Path, stage: Stage) -> Path:
    return engine_dir(folder) / f"{Stage(stage).value}.plan"


def sidecar_path(folder: str | Path, stage: Stage) -> Path:
    return engine_dir(folder) / f"{Stage(stage).value}.plan.json"


def onnx_digest(manifest: Any, stage: Stage) -> str:
    """One hash for a stage's graph: the manifest's SHA-256 of the .onnx and its data file."""
    parts = []
    for name in (stage.onnx_file, stage.data_file):
        if name:
            record = manifest.files.get(name)
            if record is None:
                raise ArtifactError(f"manifest has no file record for {name}; export the model again")
            parts.append(f"{name}:{record.sha256}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def expected_key(manifest: Any, stage: Stage, platform: Platform) -> EngineKey:
    return EngineKey(Stage(stage), manifest.precisions[Stage(stage)], onnx_digest(manifest, stage), platform)


def check(folder: str | Path, key: EngineKey, verify_hash: bool = True) -> CacheCheck:
    """Is there a plan for `key` in `folder`, complete and current? Never raises."""
    plan, sidecar = plan_path(folder, key.stage), sidecar_path(folder, key.stage)
    name = key.stage.value
    if not sidecar.is_file():
        return CacheCheck(Status.MISSING, f"{name}: no engine built yet")
    try:
        meta = json.loads(sidecar.read_text(encoding="utf-8"))
        if meta.get("format") != SIDECAR_FORMAT or meta.get("format_version") != SIDECAR_VERSION:
            raise ValueError(f"format {meta.get('format')!r} v{meta.get('format_version')!r}")
        built = Platform(**meta["platform"])
        built_key = EngineKey(Stage(meta["stage"]), Precision(meta["precision"]), str(meta["onnx_sha256"]), built)
        size, sha = int(meta["plan_size"]), str(meta["plan_sha256"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
        return CacheCheck(Status.DAMAGED, f"{name}: unreadable engine record {sidecar.name} ({e})")
    if built_key != key:
        return CacheCheck(Status.STALE, f"{name}: {explain_mismatch(built_key, key)}")
    if not plan.is_file():
        return CacheCheck(Status.DAMAGED, f"{name}: engine file {plan.name} is missing")
    actual = plan.stat().st_size
    if actual != size:
        return CacheCheck(Status.DAMAGED, f"{name}: engine file is {actual} bytes, its record says {size} "
                                          f"(interrupted build or replaced file)")
    if verify_hash and files.sha256_file(plan) != sha:
        return CacheCheck(Status.DAMAGED, f"{name}: engine file content does not match its record")
    return CacheCheck(Status.CURRENT, f"{name}: engine is current ({key.platform.describe()})")


def explain_mismatch(built: EngineKey, now: EngineKey) -> str:
    """Say in words why a plan cannot be used here."""
    reasons = []
    if built.platform != now.platform:
        reasons.append(f"engine built for {built.platform.describe()}; this is {now.platform.describe()}")
    if built.precision != now.precision:
        reasons.append(f"engine is {built.precision.value}, the exported graph is {now.precision.value}")
    if built.onnx_sha256 != now.onnx_sha256:
        reasons.append("the ONNX graph changed since the engine was built (re-exported)")
    if built.stage != now.stage:
        reasons.append(f"engine record is for stage {built.stage.value}")
    return "; ".join(reasons) or "engine record does not match"


def load_plan(folder: str | Path, key: EngineKey) -> bytes:
    """The plan bytes for `key`, or an ArtifactError saying why not and what to run."""
    result = check(folder, key, verify_hash=False)
    if not result.current:
        raise ArtifactError(f"{result.reason}: run `sdrt build {folder}`")
    data = plan_path(folder, key.stage).read_bytes()
    # Hash the bytes actually read, so a file changed after the check cannot slip through.
    meta = json.loads(sidecar_path(folder, key.stage).read_text(encoding="utf-8"))
    if hashlib.sha256(data).hexdigest() != meta["plan_sha256"]:
        raise ArtifactError(f"{key.stage.value}: engine file content does not match its record: "
                            f"run `sdrt build {folder}`")
    return data


def forget(folder: str | Path, stage: Stage) -> None:
    """Remove a stage's sidecar: its plan, if any, is no longer valid."""
    sidecar_path(folder, stage).unlink(missing_ok=True)


def store_plan(folder: str | Path, key: EngineKey, plan: bytes | memoryview, info: BuildInfo) -> Path:
    """Write the plan atomically, then its sidecar (the sidecar makes it valid).
    The old sidecar goes first: between the two writes the stage has no valid engine."""
    forget(folder, key.stage)
    view = memoryview(plan).cast("B")
    path = plan_path(folder, key.stage)
    files.atomic_write_bytes(path, view)
    meta = {
        "format": SIDECAR_FORMAT,
        "format_version": SIDECAR_VERSION,
        "stage": key.stage.value,
        "precision": key.precision.value,
        "onnx_sha256": key.onnx_sha256,
        "platform": asdict(key.platform),
        "plan_size": view.nbytes,
        "plan_sha256": hashlib.sha256(view).hexdigest(),
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "build": {"workspace_bytes": info.workspace_bytes, "opt_level": info.opt_level,
                  "seconds": round(info.seconds, 1), **dict(info.extra)},
    }
    files.atomic_write_json(sidecar_path(folder, key.stage), meta)
    return path


def read_timing_cache(path: Path) -> bytes:
    """The saved timing cache, or b"" (TensorRT starts a fresh one) if there is none."""
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        return b""


def write_timing_cache(path: Path, data: bytes | memoryview) -> None:
    files.atomic_write_bytes(path, memoryview(data).cast("B"))
