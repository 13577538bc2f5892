"""Timing generation per stage on an artifact folder: the library behind `sdrt bench`
(cli/bench.py) and the statistics `benchmarks/` shares.

Warm-up runs first (first calls pay for lazy allocation and caches), then N measured
generations. Every figure comes from the pipeline's own `Timings`, which record the
engine's time for each stage call and the wall time of each denoising step, so the
host overhead of a step (scheduler math, CFG split and combine, input checks) is
measured as step wall time minus engine time, not guessed.

Only NumPy and the standard library are used here: the bench must measure the runtime
as users run it, without torch in the process. The statistics helpers are shared with
`benchmarks/side_by_side.py`, so both report the same figures the same way.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.metadata
import os
import platform
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from sdrt.engines import registry
from sdrt.engines.errors import AlreadyExists, InvalidInput, InvalidType

SCHEMA = "sdrt-bench"
SCHEMA_VERSION = 1
DEFAULT_PROMPT = "a photograph of an astronaut riding a horse"
MAX_STEPS = 1000
MAX_RUNS = 10_000

# Figure name -> what it measures; the order of the printed table and of the JSON.
FIGURES = {
    "text_encoder": "text encoder, one call per generation",
    "unet_step": "U-Net engine time, one call per denoising step",
    "host_step": "host work per step: step wall time minus U-Net engine time",
    "step": "denoising step wall time (U-Net + scheduler + host)",
    "vae_decoder": "VAE decoder, one call per generation",
    "other": "rest of a generation: tokenizer, latents, image conversion",
    "end_to_end": "one generation, prompt to image, measured around the call",
}


# ---------------------------------------------------------------------------------
# Statistics (shared with benchmarks/)


def percentile(samples: Sequence[float], q: float) -> float:
    """Linear-interpolation percentile (NumPy's default), so p50 is the usual median."""
    return float(np.percentile(np.asarray(samples, dtype=np.float64), q))


def summarize(samples_s: Iterable[float]) -> dict[str, float | int]:
    """Median, p90, p99, min, max and count of durations in seconds, reported in ms.

    With few samples p99 is close to the max; `n` says how many there were.
    """
    a = np.asarray(list(samples_s), dtype=np.float64) * 1e3
    if a.size == 0:
        return {"n": 0}
    return {
        "n": int(a.size),
        "median_ms": float(np.median(a)),
        "p90_ms": float(np.percentile(a, 90)),
        "p99_ms": float(np.percentile(a, 99)),
        "min_ms": float(a.min()),
        "max_ms": float(a.max()),
        "p10_ms": float(np.percentile(a, 10)),
    }


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 0
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        ram = None
    return {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "usable_cpus": usable,
        "ram_bytes": ram,
        "os": platform.platform(),
        "python": platform.python_version(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def package_versions(names: Sequence[str]) -> dict[str, str | None]:
    """Installed versions, read from package metadata (no import, so no side effects)."""
    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def _busy_warning() -> str | None:
    """Other work on the machine skews every figure; say so rather than report quietly."""
    info = machine_info()
    load, cpus = info["load_average"], info["usable_cpus"] or 1
    if load and load[0] > 0.5 * cpus:
        return (f"warning: load average {load[0]:.1f} on {cpus} CPUs before starting: other work is "
                f"running, so these figures will be slower and noisier than on an idle machine")
    return None


# ---------------------------------------------------------------------------------
# The bench


@dataclass(frozen=True)
class BenchConfig:
    artifact_dir: Path
    backend: str = registry.DEFAULT     # a backend name, or auto
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)   # the backend's options, by name
    steps: int | None = None        # None: the artifact's default (25; 4 for an LCM model)
    scheduler: str | None = None
    runs: int = 10
    warmup: int = 2
    prompt: str = DEFAULT_PROMPT
    guidance: float | None = None   # None: the artifact's default (7.5; 1 on --no-cfg; LCM 8.5)
    seed: int = 0
    cache_interval: int = 1         # DeepCache: the full U-Net every N steps (1: off)
    json_path: Path | None = None
    force: bool = False

    def validate(self) -> "BenchConfig":
        registry.check_options(registry.parse(self.backend), self.options)
        for name, value, low, high in (("steps", 1 if self.steps is None else self.steps, 1, MAX_STEPS),
                                       ("runs", self.runs, 1, MAX_RUNS),
                                       ("warmup", self.warmup, 0, MAX_RUNS)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise InvalidType(f"{name} must be an integer, got {value!r}")
            if not low <= value <= high:
                raise InvalidInput(f"{name} {value} is out of range: use {low} to {high}")
        if self.json_path is not None and self.json_path.exists() and not self.force:
            raise AlreadyExists(f"{self.json_path} exists: pass --force to overwrite it")
        return self


def run_bench(config: BenchConfig, progress: Callable[[str], None] = lambda m: None) -> dict[str, Any]:
    """Load the pipeline, warm up, time `config.runs` generations; return every figure."""
    config.validate()
    from sdrt.runtime.artifact import Artifact
    from sdrt.runtime.pipeline import Pipeline  # imports the backend: keep `sdrt --help` fast

    busy = _busy_warning()
    if busy:
        progress(busy)
    t0 = time.perf_counter()
    artifact = Artifact.open(config.artifact_dir)
    # The settings are checked, and the artifact's defaults resolved, before engines load.
    settings = artifact.request(config.prompt, steps=config.steps, guidance=config.guidance,
                                scheduler=config.scheduler, seed=config.seed,
                                cache_interval=config.cache_interval).config
    progress(f"loading {config.artifact_dir} on {config.backend}")
    pipe = Pipeline.load(artifact, backend=config.backend, **config.options)
    load_s = time.perf_counter() - t0
    if pipe.backend_reason:
        progress(pipe.backend_reason)
    progress(f"loaded in {load_s:.2f} s")
    gpu = _GpuMemory(getattr(registry.module(pipe.backend), "device_memory_used", None))

    def generate(i: int):
        t = time.perf_counter()
        result = pipe(config.prompt, steps=settings.steps, guidance=settings.guidance,
                      scheduler=config.scheduler, seed=config.seed + i, cache_interval=config.cache_interval)
        return result, time.perf_counter() - t

    for i in range(config.warmup):
        _, wall = generate(i)
        progress(f"warm-up {i + 1}/{config.warmup}: {wall * 1e3:.1f} ms")
    samples: dict[str, list[float]] = {name: [] for name in FIGURES}
    for i in range(config.runs):
        result, wall = generate(config.warmup + i)
        gpu.sample()
        add_generation(samples, result.timings, wall)
        progress(f"run {i + 1}/{config.runs}: {wall * 1e3:.1f} ms")

    manifest = pipe.manifest if hasattr(pipe, "manifest") else None
    shape = getattr(manifest, "shape", None)
    batch = shape.batch if shape is not None else 1
    figures = {name: summarize(values) for name, values in samples.items()}
    median_e2e = figures["end_to_end"]["median_ms"] / 1e3
    close = getattr(pipe, "close", None)
    if callable(close):
        close()
    return {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "versions": package_versions(["sdrt", "numpy", "onnxruntime", "onnxruntime-gpu", "openvino", "tensorrt"]),
        "backend": pipe.backend,
        "backend_options": {k: getattr(v, "value", v) for k, v in config.options.items()},
        "settings": {
            "artifact_dir": str(config.artifact_dir),
            "steps": settings.steps,
            "scheduler": config.scheduler or getattr(pipe, "default_scheduler", None),
            "runs": config.runs,
            "warmup": config.warmup,
            "prompt": config.prompt,
            "guidance": settings.guidance,
            "seed": config.seed,
            "cache_interval": config.cache_interval,
            **({"height": shape.height, "width": shape.width, "batch": shape.batch, "cfg": shape.cfg}
               if shape is not None else {}),
            **({"precisions": {s.value: p.value for s, p in manifest.precisions.items()}}
               if manifest is not None else {}),
        },
        "load_s": load_s,
        "figures": figures,
        "images_per_second": batch / median_e2e if median_e2e > 0 else None,
        "memory": {"peak_rss_bytes": peak_rss_bytes(), "peak_gpu_bytes": gpu.peak},
    }


def add_generation(samples: dict[str, list[float]], timings: Any, wall_s: float) -> None:
    """Append one generation's `Timings` (seconds) to the per-figure sample lists."""
    steps, unet = list(timings.steps), list(timings.unet)
    if len(steps) != len(unet):
        raise InvalidInput(f"timings hold {len(steps)} steps but {len(unet)} U-Net calls")
    samples["text_encoder"].append(timings.text_encoder)
    samples["unet_step"].extend(unet)
    samples["host_step"].extend(s - u for s, u in zip(steps, unet))
    samples["step"].extend(steps)
    samples["vae_decoder"].append(timings.vae_decoder)
    samples["other"].append(wall_s - timings.text_encoder - sum(steps) - timings.vae_decoder)
    samples["end_to_end"].append(wall_s)


class _GpuMemory:
    """Peak GPU memory in use on the device, on a backend that reports it (its module's
    `device_memory_used`; None elsewhere). CUDA keeps no per-process peak, so TensorRT's
    is cudaMemGetInfo's used bytes (total - free, all processes on the device) sampled
    after loading and after every generation: the engines' buffers are allocated once
    at load, so the samples see the steady state."""

    def __init__(self, query: Callable[[], int] | None):
        self.peak: int | None = None
        self._query = query
        self.sample()

    def sample(self) -> None:
        if self._query is not None:
            used = self._query()
            self.peak = used if self.peak is None else max(self.peak, used)


# ---------------------------------------------------------------------------------
# Output


def format_table(report: dict[str, Any]) -> str:
    s = report["settings"]
    shape = f"{s.get('width', '?')}x{s.get('height', '?')}, batch {s.get('batch', '?')}"
    lines = [
        f"sdrt bench: {s['artifact_dir']} on {report['backend']} ({shape}, {s['steps']} steps, "
        f"scheduler {s['scheduler']}, {s['runs']} runs after {s['warmup']} warm-up"
        f"{', DeepCache interval ' + str(s['cache_interval']) if s.get('cache_interval', 1) > 1 else ''})",
        f"machine: {report['machine']['cpu']}, {report['machine']['usable_cpus']} CPUs",
        "",
        f"{'figure':<14}{'median ms':>12}{'p90 ms':>12}{'p99 ms':>12}{'min ms':>12}{'n':>7}",
    ]
    for name, f in report["figures"].items():
        if f.get("n"):
            lines.append(f"{name:<14}{f['median_ms']:>12.3f}{f['p90_ms']:>12.3f}"
                         f"{f['p99_ms']:>12.3f}{f['min_ms']:>12.3f}{f['n']:>7}")
    ips = report["images_per_second"]
    mem = report["memory"]
    gpu = "n/a" if mem["peak_gpu_bytes"] is None else f"{mem['peak_gpu_bytes'] / 2**20:.0f} MiB"
    lines += [
        "",
        f"images/s: {ips:.3f}" if ips else "images/s: n/a",
        f"load: {report['load_s']:.2f} s; peak RSS: {mem['peak_rss_bytes'] / 2**20:.0f} MiB; peak GPU memory: {gpu}",
    ]
    return "\n".join(lines)
