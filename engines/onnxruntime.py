"""The ONNX Runtime backend: one `OrtEngine` per stage of an artifact folder.

Sessions are created once, tuned for latency (all graph optimizations, intra-op
threads = physical cores, sequential execution), and checked at load against the
manifest's tensor specs, so a mismatched graph fails with a clear message at load
rather than deep inside a run.

Cold start. Optimizing a full-size SD U-Net takes 20-30 s on a small CPU machine,
every time a session is created. With `cache=True` (the default) the optimized graph
is saved once under `<artifact>/.sdrt-cache/ort/` and later sessions load it with
optimizations disabled. An entry is keyed by everything that changes the optimized
graph: the ONNX file's hash (from the manifest), the ONNX Runtime version, the
providers, and the CPU model (ORT's CPU layout transforms are specific to the
vector width of the machine that optimized the graph). Entries are written into a
temporary folder and renamed into place, so an interrupted write never leaves a
half-written cache entry; a read-only artifact folder simply runs uncached.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from .base import Engine
from . import files
from .errors import ArtifactError, BackendUnavailable, InvalidInput, InvalidType
from .manifest import FileRecord, check_files, file_record
from . import weightmap
from .onnx_files import check_external_data, with_overridable
from .options import check_bool, check_threads, option
from .specs import Stage, StageSpec, check_io

try:
    import onnxruntime as ort
except ModuleNotFoundError:  # pragma: no cover - onnxruntime is a runtime dependency
    # Only "not installed": an ImportError from a failed initialization (a broken
    # install, or Ctrl-C landing in the import) must not read as "not installed".
    ort = None

NAME = "onnxruntime"
SUMMARY = "ONNX Runtime: every machine, the exact reference path (CPU; CUDA with onnxruntime-gpu)"
EXTRA = None   # a core dependency

CACHE_DIR = Path(".sdrt-cache") / "ort"
CACHE_TEMP_PREFIX = ".tmp-"
ENTRY_RECORDS = "files.json"

# Short provider names accepted from the CLI and the API.
PROVIDER_ALIASES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
}

# ONNX tensor element types as ORT reports them on session inputs/outputs.
_ORT_TYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(int32)": "int32",
    "tensor(int64)": "int64",
}


@dataclass(frozen=True)
class Options:
    providers: tuple[str, ...] | None = option(
        None, "ONNX Runtime provider: cpu (default) or cuda (needs onnxruntime-gpu), or a full provider name",
        flag="--provider", metavar="NAME")
    threads: int | None = option(None, "CPU threads (default: one per physical core)", type=int, metavar="N")
    cache: bool = option(True, "keep what loading makes (optimized graphs, compiled models) under "
                               "ARTIFACT_DIR/.sdrt-cache/, so the next load is fast", type=bool)
    spinning: bool = option(False, "let idle threads busy-wait between ops (lower latency on a dedicated "
                                   "machine only)", type=bool)

    def __post_init__(self) -> None:
        providers = self.providers
        if isinstance(providers, str):
            providers = (providers,)
        elif isinstance(providers, list):
            providers = tuple(providers)
        if providers is not None and not (isinstance(providers, tuple) and all(isinstance(p, str) for p in providers)):
            raise InvalidType(f"providers must be strings, got {self.providers!r}")
        object.__setattr__(self, "providers", providers)
        check_threads(self.threads)
        check_bool("cache", self.cache)
        check_bool("spinning", self.spinning)


def unavailable() -> str | None:
    return None if ort is not None else "onnxruntime is not installed (pip install onnxruntime)"


class OrtEngine(Engine):
    """One stage as an ONNX Runtime session. Inputs are checked by `Engine.__call__`.

    Changed weights (a LoRA) run on another session of the same graph in which the
    stage's recorded parameters (engines/weightmap.py) are "overridable initializers":
    also listed as graph inputs, so each call can feed new values, and the stored ones
    are used where none is fed (`_Overridable`: two fixed sets of such weights). ONNX
    Runtime cannot pre-pack or re-lay-out such weights, so the exported weights keep
    running on the first, fully optimized session, and going back to them is exact by
    construction. The other session is made on first use and maps the same weight file
    (benchmarks/lora_switch.py measures what it costs).
    """

    backend_title = "ONNX Runtime"

    def __init__(self, spec: StageSpec, session: "ort.InferenceSession", load_seconds: float = 0.0,
                 cached: bool = False, overridable: "_Overridable | None" = None):
        super().__init__(spec)
        self.session = session
        self.load_seconds = load_seconds
        self.cached = cached          # True when the optimized graph came from the cache
        self._output_names = [t.name for t in spec.outputs]
        self._last: float | None = None
        self._overridable = overridable
        self._sessions: dict[int, "ort.InferenceSession"] = {}   # tier -> session
        self._active: "ort.InferenceSession | None" = None
        self._weights: dict[str, np.ndarray] = {}

    def set_weights(self, weights: Mapping[str, np.ndarray]) -> None:
        if not weights:
            self._weights, self._active = {}, None
            return
        if self._overridable is None:
            raise BackendUnavailable(f"{self.spec.stage.value}: this stage's weights cannot be changed")
        tier = self._overridable.tier(weights)
        if tier not in self._sessions:
            self._sessions[tier] = self._overridable.open(tier)
        session = self._sessions[tier]
        expected = {i.name: (tuple(i.shape), _ORT_TYPES.get(i.type, i.type))
                    for i in session.get_overridable_initializers()}
        for name, value in weights.items():
            want = expected.get(name)
            if want is None:
                raise InvalidInput(f"{self.spec.stage.value}: {name!r} is not one of the weights a LoRA can change")
            if not isinstance(value, np.ndarray) or value.shape != want[0] or value.dtype != np.dtype(want[1]):
                got = (getattr(value, "shape", None), str(getattr(value, "dtype", type(value).__name__)))
                raise InvalidInput(f"{self.spec.stage.value}: weight {name!r} must be {want[1]} {want[0]}, got "
                                   f"{got[1]} {got[0]}")
        self._weights, self._active = dict(weights), session

    def _run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.session is None:
            raise InvalidInput(f"{self.spec.stage.value} engine is closed")
        session, feeds = self.session, dict(inputs)
        if self._weights:
            session = self._active
            feeds.update(self._weights)
        start = time.perf_counter()
        outputs = session.run(self._output_names, feeds)
        self._last = time.perf_counter() - start
        return dict(zip(self._output_names, outputs))

    def last_time(self) -> float | None:
        """Seconds inside ONNX Runtime's run in the last call: the input checks and the
        caller's array work are host time, not engine time (sdrt bench's host_step)."""
        return self._last

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers() if self.session is not None else []

    def close(self) -> None:
        self.session = None
        self._sessions, self._active, self._weights = {}, None, {}


def resolve_providers(providers: Sequence[str] | str | None) -> list[str]:
    """Turn `None`, "cpu", "cuda" or full ORT names into an ORT provider list.

    CPU is always appended as the fallback for ops a GPU provider does not cover.
    """
    if ort is None:
        raise BackendUnavailable("onnxruntime is not installed: pip install onnxruntime")
    if providers is None:
        providers = ["cpu"]
    elif isinstance(providers, str):
        providers = [providers]
    if not all(isinstance(p, str) for p in providers):
        raise InvalidType(f"providers must be strings, got {providers!r}")
    names: list[str] = []
    for p in providers:
        name = PROVIDER_ALIASES.get(p.lower(), p)
        if not name.endswith("ExecutionProvider"):
            known = ", ".join(PROVIDER_ALIASES)
            raise InvalidInput(f"unknown ONNX Runtime provider {p!r}: use {known} or a full provider name")
        if name not in names:
            names.append(name)
    available = ort.get_available_providers()
    for name in names:
        if name not in available:
            hint = " (install onnxruntime-gpu with a matching CUDA)" if name == "CUDAExecutionProvider" else ""
            raise BackendUnavailable(
                f"ONNX Runtime provider {name} is not available here{hint}; available: {', '.join(available)}")
    if "CPUExecutionProvider" not in names:
        names.append("CPUExecutionProvider")
    return names


def session_options(threads: int | None, optimize: bool, spinning: bool = False) -> "ort.SessionOptions":
    opts = ort.SessionOptions()
    opts.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                     else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    # One request at a time: sequential execution with all cores inside each op is
    # what minimizes latency for a chain of big convolutions and matmuls.
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # 0 lets ORT use one thread per physical core, which beats hyper-threads here.
    opts.intra_op_num_threads = threads or 0
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3   # errors only: ORT's warnings about unused initializers are noise
    if not spinning:
        # Idle worker threads sleep instead of busy-waiting between ops. Spinning saves
        # microseconds per op on an idle machine but collapses when the cores are shared:
        # tiny SD 1.5, 25 steps, 2 threads, load ~5 on 2 cores: 0.15-0.18 s without
        # spinning, 0.35-0.68 s with it. Full-size ops are long enough not to notice.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return opts


def open_engines(folder: str | os.PathLike[str], manifest: Any, options: Options = Options(),
                 stages: Sequence[Stage] | None = None) -> dict[Stage, Engine]:
    """Open the stages of an artifact folder (all of them unless `stages` is given).
    `options` (see `Options`): providers, threads, the optimized-graph cache, spinning."""
    folder = Path(folder)
    names = resolve_providers(options.providers)
    specs = manifest.specs
    engines: dict[Stage, Engine] = {}
    for stage in stages or manifest.stages:
        start = time.perf_counter()
        session, cached = _open_session(folder, stage, manifest, names, options.threads, options.cache,
                                        options.spinning)
        _check_session(session, specs[stage], folder / stage.onnx_file)
        overridable = None
        if stage in weightmap.COMPONENTS:
            overridable = _Overridable(folder, stage, names, options.threads, options.spinning)
        engines[stage] = OrtEngine(specs[stage], session, time.perf_counter() - start, cached, overridable)
    return engines


class _Overridable:
    """The sessions of one stage whose recorded parameters can be fed per call.

    Two tiers, each a fixed set of weights, so the same LoRAs always run on the same
    session (the same kernels, the same bits): 0, the matrix weights (Linear layers and
    1x1 convolutions: what LoRAs train); 1, every recorded parameter (LoCon's 3x3
    convolutions too). A weight ONNX Runtime may be fed is one it cannot pre-pack, so
    tier 0 keeps the resnets' convolution weights constant for the common LoRAs."""

    def __init__(self, folder: Path, stage: Stage, providers: list[str], threads: int | None, spinning: bool):
        self.folder, self.stage, self.providers, self.threads, self.spinning = folder, stage, providers, threads, spinning
        self._tiers: list[frozenset[str]] | None = None

    def tiers(self) -> list[frozenset[str]]:
        if self._tiers is None:
            recorded = weightmap.read(self.folder)
            if recorded is None or self.stage not in recorded.stages:
                raise ArtifactError(f"{self.folder} has no record of which graph weight holds which model parameter "
                                    f"({weightmap.WEIGHT_MAP}: exported by an older sdrt); export the model again to "
                                    f"change weights at run time")
            targets = recorded.stages[self.stage].params.values()
            matrix = frozenset(t.initializer for t in targets
                               if len(t.shape) == 2 or (len(t.shape) == 4 and t.shape[2:] == (1, 1)))
            self._tiers = [matrix, frozenset(t.initializer for t in targets)]
        return self._tiers

    def tier(self, weights: Mapping[str, Any]) -> int:
        tiers = self.tiers()
        return next((i for i, names in enumerate(tiers) if names.issuperset(weights)), len(tiers) - 1)

    def open(self, tier: int) -> "ort.InferenceSession":
        model = with_overridable(self.folder / self.stage.onnx_file, sorted(self.tiers()[tier]))
        opts = session_options(self.threads, optimize=True, spinning=self.spinning)
        # The graph comes as bytes: its external weights are found in the artifact folder.
        opts.add_session_config_entry("session.model_external_initializers_file_folder_path", str(self.folder))
        try:
            # Without the NCHWc layout transform: with overridable weights in the graph it
            # made the full-size SD 1.5 U-Net take 57 s to open and 5.0 s per call (2.6x
            # the exported weights'); without it, 0.25 s and 2.56 s against 2.14 s
            # (benchmarks/lora_switch.py, 256x256, 2 cores).
            return ort.InferenceSession(model, sess_options=opts, providers=self.providers,
                                        disabled_optimizers=["NchwcTransformer"])
        except Exception as e:  # ORT's own exception types
            raise ArtifactError(f"{self.folder / self.stage.onnx_file}: ONNX Runtime cannot load it with overridable "
                                f"weights ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


def _open_session(folder: Path, stage: Stage, manifest: Any, providers: list[str], threads: int | None,
                  cache: bool, spinning: bool) -> tuple["ort.InferenceSession", bool]:
    model = folder / stage.onnx_file
    if not cache:
        return _session(model, session_options(threads, optimize=True, spinning=spinning), providers), False
    entry = folder / CACHE_DIR / f"{stage.value}-{_cache_key(manifest, stage, providers)}"
    cached_model = entry / stage.onnx_file
    if cached_model.is_file():
        try:
            _check_entry(entry)
            return _session(cached_model, session_options(threads, optimize=False, spinning=spinning), providers), True
        except ArtifactError:
            shutil.rmtree(entry, ignore_errors=True)   # a damaged entry: rebuild it below
    try:
        return _session_saving_optimized(model, entry, stage, threads, providers, spinning), False
    except (OSError, ArtifactError):
        # Read-only or full disk: the cache is an optimization, never a reason to fail.
        # ONNX Runtime reports a failed write of the optimized graph as a failed load
        # (ArtifactError from _session); loading without saving either works or raises
        # the model's real fault.
        return _session(model, session_options(threads, optimize=True, spinning=spinning), providers), False


def _session_saving_optimized(model: Path, entry: Path, stage: Stage, threads: int | None,
                              providers: list[str], spinning: bool) -> "ort.InferenceSession":
    """Create the session with full optimization, saving the optimized graph as `entry`."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_entries(entry.parent, stage, keep=entry.name)
    with files.temp_folder(entry.parent, prefix=CACHE_TEMP_PREFIX) as tmp:
        opts = session_options(threads, optimize=True, spinning=spinning)
        opts.optimized_model_filepath = str(tmp / stage.onnx_file)
        # Weights go to a side file so graphs over protobuf's 2 GB limit can be saved.
        opts.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                      f"{stage.onnx_file}.data")
        opts.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        session = _session(model, opts, providers)
        files.fsync_tree(tmp)
        _record_entry(tmp)
        with contextlib.suppress(OSError):
            os.replace(tmp, entry)   # atomic; fails harmlessly if a concurrent loader won
        return session


def _record_entry(entry: Path) -> None:
    """Record each cached file's size and SHA-256, and stamp them as just hashed: a
    cached graph is loaded instead of the manifest-checked one, so a bit flipped in it
    must be caught the same way, not silently change every image."""
    records = {f.name: file_record(entry, f.name) for f in sorted(entry.iterdir()) if f.is_file()}
    files.atomic_write_json(entry / ENTRY_RECORDS, {k: v.to_json() for k, v in records.items()})
    check_files(entry, records)   # writes the stamps, so the next load does not re-hash


def _check_entry(entry: Path) -> None:
    """Sizes always, hashes unless stamped (engines.manifest.check_files); ArtifactError if damaged."""
    try:
        data = json.loads((entry / ENTRY_RECORDS).read_text(encoding="utf-8"))
        records = {str(k): FileRecord(str(v["sha256"]), int(v["size"])) for k, v in data.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
        raise ArtifactError(f"{entry}: cache entry without a readable {ENTRY_RECORDS} ({e})") from None
    check_files(entry, records)


def _remove_stale_entries(cache: Path, stage: Stage, keep: str) -> None:
    # Entries of an older export or ORT version are never read again.
    for p in cache.glob(f"{stage.value}-*"):
        if p.name != keep:
            shutil.rmtree(p, ignore_errors=True)
    for p in cache.glob(CACHE_TEMP_PREFIX + "*"):
        if time.time() - p.stat().st_mtime > 3600:   # left by an interrupted load
            shutil.rmtree(p, ignore_errors=True)


def _cache_key(manifest: Any, stage: Stage, providers: list[str]) -> str:
    record = manifest.files.get(stage.onnx_file)
    data = manifest.files.get(stage.data_file) if stage.data_file else None
    facts = {
        "onnx": record.sha256 if record else "",
        "data": data.sha256 if data else "",
        "ort": ort.__version__,
        "providers": providers,
        "cpu": _cpu_model(),
        "python": sys.implementation.cache_tag,
    }
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:16]


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            lines = f.read().splitlines()
        model = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), "")
        flags = next((ln.split(":", 1)[1].split() for ln in lines if ln.startswith(("flags", "Features"))), [])
        # The vector extensions decide ORT's NCHWc block size and kernels.
        vector = sorted(f for f in flags if f.startswith(("avx", "sse4", "fma", "amx", "asimd", "sve")))
        return f"{platform.machine()} {model} {' '.join(vector)}"
    except OSError:
        return f"{platform.machine()} {platform.processor()}"


def _session(model: Path, opts: "ort.SessionOptions", providers: list[str]) -> "ort.InferenceSession":
    check_external_data(model)  # weights must come from inside the model's folder (see onnx_files)
    try:
        return ort.InferenceSession(str(model), sess_options=opts, providers=providers)
    except Exception as e:  # ORT raises its own exception types (Fail, InvalidGraph, ...)
        if isinstance(e, OSError):
            raise
        raise ArtifactError(f"{model}: ONNX Runtime cannot load it ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''})") from None


def _check_session(session: "ort.InferenceSession", spec: StageSpec, model: Path) -> None:
    """The graph's I/O must be exactly the manifest's specs (names, dtypes, static shapes)."""
    def io(values: Any) -> dict[str, tuple[tuple[Any, ...], str]]:
        return {v.name: (tuple(v.shape), _ORT_TYPES.get(v.type, v.type)) for v in values}
    check_io(spec, io(session.get_inputs()), io(session.get_outputs()), str(model), "export the model again")