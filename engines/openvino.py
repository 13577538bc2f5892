"""The OpenVINO backend: one `OvEngine` per stage, compiled for the CPU from the
artifact's own ONNX files.

Only OpenVINO's runtime API is used (`Core.compile_model` on the ONNX path); never
`openvino.tools`, `ovc` or `convert_model`, which carry telemetry. `openvino` is
imported when engines open, so `sdrt --help` and the other backends never load it.

Compilation: static shapes, `PERFORMANCE_HINT: LATENCY` (one request at a time, all
cores inside each op), `INFERENCE_NUM_THREADS` from `threads`, and the inference
precision from `precision`. OpenVINO's CPU plugin would run bf16 by default on a CPU
with native bf16 (AVX512_BF16, AMX); sdrt pins f32 unless asked, because its default
is the exact path (pixels within 1e-4 of ONNX Runtime's, tests/test_openvino_engine.py).
bf16 and f16 are accepted only where the CPU lists them in OPTIMIZATION_CAPABILITIES,
so a request is never silently emulated or ignored.

Cold start: OpenVINO's model cache (`CACHE_DIR`) keeps each compiled model, so a
second load skips reading and compiling the ONNX. Its blobs live under
`<artifact>/.sdrt-cache/openvino/<stage>-<key>/`, where the key holds the stage's
ONNX and weight hashes from the manifest and the OpenVINO version: compiling from a
path, OpenVINO keys its blob by the path and the compile settings, not by the file's
bytes, so a re-export in place must land in another folder. A read-only or full
artifact folder runs uncached; the cache never makes a load fail.
"""

from __future__ import annotations

import enum
import hashlib
import importlib.util
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from .base import Engine
from .errors import ArtifactError, BackendUnavailable, InvalidInput
from .onnx_files import check_external_data
from .options import check_bool, check_threads, option
from .specs import Stage, StageSpec, check_io

NAME = "openvino"
SUMMARY = "OpenVINO: the fastest CPU engine (x86 and ARM CPUs), compiled models cached beside the artifact"
EXTRA = "openvino"

CACHE_DIR = Path(".sdrt-cache") / "openvino"
DEVICE = "CPU"


class InferencePrecision(str, enum.Enum):
    """OpenVINO's INFERENCE_PRECISION_HINT values, and the CPU capability each needs."""

    F32 = "f32"
    BF16 = "bf16"
    F16 = "f16"

    @property
    def capability(self) -> str | None:
        return {"bf16": "BF16", "f16": "FP16"}.get(self.value)


@dataclass(frozen=True)
class Options:
    threads: int | None = option(None, "CPU threads (default: OpenVINO's, one per physical core)",
                                 type=int, metavar="N")
    precision: InferencePrecision = option(
        InferencePrecision.F32, "inference precision: f32 (default, exact), or bf16 / f16 where the CPU runs them "
                                "natively (faster; pixels differ)",
        choices=[p.value for p in InferencePrecision])
    cache: bool = option(True, "keep compiled models under ARTIFACT_DIR/.sdrt-cache/openvino/ and reuse them",
                         type=bool)

    def __post_init__(self) -> None:
        check_threads(self.threads)
        try:
            precision = InferencePrecision(self.precision)
        except ValueError:
            raise InvalidInput(f"precision must be one of {', '.join(p.value for p in InferencePrecision)}, "
                               f"got {self.precision!r}") from None
        object.__setattr__(self, "precision", precision)
        check_bool("cache", self.cache)


def unavailable() -> str | None:
    if importlib.util.find_spec("openvino") is None:
        return "openvino is not installed (pip install 'sdrt[openvino]')"
    return None


def import_openvino() -> Any:
    try:
        import openvino
    except ImportError as e:
        raise BackendUnavailable(f"openvino is not installed or cannot load ({e}): "
                                 f"pip install 'sdrt[openvino]'") from None
    return openvino


class OvEngine(Engine):
    """One stage as an OpenVINO compiled model with one infer request."""

    backend_title = "OpenVINO"   # compiled models have constant weights: LoRAs need a recompile (not done)

    def __init__(self, spec: StageSpec, compiled: Any, load_seconds: float = 0.0, cached: bool = False):
        super().__init__(spec)
        self.compiled = compiled
        self._request = compiled.create_infer_request()
        self.load_seconds = load_seconds
        self.cached = cached      # True when the compiled model came from the cache
        self._outputs = [(t.name, compiled.output(t.name)) for t in spec.outputs]
        self._last: float | None = None

    def _run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._request is None:
            raise InvalidInput(f"{self.spec.stage.value} engine is closed")
        start = time.perf_counter()
        # share_inputs: the checked arrays are read in place (no copy in); the
        # request's output tensors are reused by the next call, hence the copies out.
        results = self._request.infer(dict(inputs), share_inputs=True)
        self._last = time.perf_counter() - start
        return {name: np.array(results[port], copy=True) for name, port in self._outputs}

    def last_time(self) -> float | None:
        """Seconds inside OpenVINO's infer in the last call."""
        return self._last

    def close(self) -> None:
        self._request = None
        self.compiled = None


def open_engines(folder: str | os.PathLike[str], manifest: Any, options: Options = Options(),
                 stages: Sequence[Stage] | None = None) -> dict[Stage, Engine]:
    """Compile the stages of an artifact folder (all of them unless `stages` is given)
    for the CPU; see `Options` and the module docstring."""
    ov = import_openvino()
    folder = Path(folder)
    core = ov.Core()
    check_precision(core, options.precision)
    config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": options.precision.value}
    if options.threads is not None:
        config["INFERENCE_NUM_THREADS"] = options.threads
    engines: dict[Stage, Engine] = {}
    for stage in stages or manifest.stages:
        start = time.perf_counter()
        compiled, cached = _compile(ov, core, folder, stage, manifest, config, options.cache)
        _check_compiled(compiled, manifest.specs[stage], folder / stage.onnx_file)
        engines[stage] = OvEngine(manifest.specs[stage], compiled, time.perf_counter() - start, cached)
    return engines


def check_precision(core: Any, precision: InferencePrecision) -> None:
    """bf16/f16 only where the CPU runs them natively: elsewhere OpenVINO would emulate
    or quietly ignore the hint, and the user asked for speed."""
    needed = precision.capability
    if needed is None:
        return
    capabilities = [str(c) for c in core.get_property(DEVICE, "OPTIMIZATION_CAPABILITIES")]
    if needed not in capabilities:
        raise InvalidInput(f"precision {precision.value}: this CPU does not run {needed} natively (its OpenVINO "
                           f"capabilities: {', '.join(capabilities)}); use precision f32")


def _compile(ov: Any, core: Any, folder: Path, stage: Stage, manifest: Any, config: dict[str, Any],
             cache: bool) -> tuple[Any, bool]:
    model = folder / stage.onnx_file
    check_external_data(model)   # weights must come from inside the model's folder (see onnx_files)
    entry = _cache_entry(folder, stage, manifest, ov) if cache else None
    if entry is not None:
        try:
            compiled = _compile_file(core, model, {**config, "CACHE_DIR": str(entry)})
            return compiled, bool(compiled.get_property("LOADED_FROM_CACHE"))
        except ArtifactError:
            pass   # the model's own fault is raised again below, uncached; a cache fault is not one
    return _compile_file(core, model, config), False


def _cache_entry(folder: Path, stage: Stage, manifest: Any, ov: Any) -> Path | None:
    """The stage's cache folder, made if need be; None where it cannot be written
    (read-only or full artifact folder): the load then runs uncached."""
    entry = folder / CACHE_DIR / f"{stage.value}-{_cache_key(manifest, stage, ov)}"
    try:
        entry.mkdir(parents=True, exist_ok=True)
        probe = entry / f".probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError:
        return None
    for old in entry.parent.glob(f"{stage.value}-*"):   # an older export's or OpenVINO's: never read again
        if old != entry:
            shutil.rmtree(old, ignore_errors=True)
    return entry


def _cache_key(manifest: Any, stage: Stage, ov: Any) -> str:
    record = manifest.files.get(stage.onnx_file)
    data = manifest.files.get(stage.data_file) if stage.data_file else None
    facts = {"onnx": record.sha256 if record else "", "data": data.sha256 if data else "",
             "openvino": str(ov.get_version())}
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:16]


def _compile_file(core: Any, model: Path, config: dict[str, Any]) -> Any:
    try:
        return core.compile_model(str(model), DEVICE, config)
    except Exception as e:   # OpenVINO raises RuntimeError (or its own types) for any failure
        if isinstance(e, (OSError, KeyboardInterrupt)):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ArtifactError(f"{model}: OpenVINO cannot compile it ({type(e).__name__}: {first})") from None


def _check_compiled(compiled: Any, spec: StageSpec, model: Path) -> None:
    """The compiled model's I/O must be exactly the manifest's specs (names, dtypes, static shapes)."""
    wanted = {t.name for t in list(spec.inputs) + list(spec.outputs)}

    def io(ports: Any) -> dict[str, tuple[tuple[Any, ...], str]]:
        out = {}
        for port in ports:
            # A tensor may carry several names (OpenVINO merges a graph input with the
            # Cast that follows it): the spec's name where it is one of them.
            names = port.get_names()
            name = next((n for n in sorted(names) if n in wanted), port.get_any_name())
            shape = port.get_partial_shape()
            dims = tuple(d.get_length() if d.is_static else "?" for d in shape) if shape.rank.is_static else ("?",)
            out[name] = (dims, np.dtype(port.get_element_type().to_dtype()).name)
        return out
    check_io(spec, io(compiled.inputs), io(compiled.outputs), str(model), "export the model again")
