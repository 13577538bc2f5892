"""`sdrt build`: one TensorRT engine per stage of an artifact folder, cached in
`ARTIFACT_DIR/engines/` (see engines/cache.py), then checked against ONNX Runtime.

Engines are strongly typed, so each one has the precision its ONNX file states
(export/precision.py wrote it); static shapes need no optimization profile. A persistent
timing cache makes rebuilds (another stage, a re-export) take a fraction of the
first build. Only the TensorRT API present in 10.3 through 11.x is used.

Verification runs the engine and ONNX Runtime (CPU) on the same random inputs and
prints export's error table (engines/verify.py). Both sides run the same graph; the
bound is the fp16 one for every stage, because TensorRT may run an fp32 graph's
matmuls and convolutions in TF32 (10-bit mantissa, like fp16), which it allows by
default. Needs no torch: it lives with the engines and imports neither export nor
the runtime, so a runtime-only install (a Jetson board) can build.

Not run on real hardware during development (TensorRT cannot be installed on the
development machines); the build flow is tested with a stand-in `tensorrt` module.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from . import cache, weightmap
from .errors import ArtifactError, InvalidInput
from .manifest import Manifest, load_manifest
from .onnx_files import check_external_data
from .progress import Progress
from .specs import Precision, Stage

MAX_OPT_LEVEL = 5


@dataclass(frozen=True)
class BuildConfig:
    artifact_dir: Path
    workspace_gb: float = 4.0               # TensorRT's scratch-memory limit while building
    opt_level: int = 3                      # builder optimization level: 0 (fast build) .. 5 (slow build)
    timing_cache: Path | None = None        # None: ARTIFACT_DIR/engines/timing.cache
    force: bool = False                     # rebuild even current engines
    stages: tuple[Stage, ...] = ()         # empty: every stage of the artifact
    verify: bool = True
    device: int = 0
    # Refittable engines for the stages a LoRA can change (text encoders, U-Net): their
    # weights can be replaced after loading (TensorRT's Refitter; `generate --lora`).
    refittable: bool = False

    def validate(self) -> "BuildConfig":
        w = self.workspace_gb
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not 0 < w <= 1024:
            raise InvalidInput(f"workspace must be more than 0 and at most 1024 GB, got {w!r}")
        o = self.opt_level
        if isinstance(o, bool) or not isinstance(o, int) or not 0 <= o <= MAX_OPT_LEVEL:
            raise InvalidInput(f"optimization level must be an integer from 0 to {MAX_OPT_LEVEL}, got {o!r}")
        if isinstance(self.device, bool) or not isinstance(self.device, int) or self.device < 0:
            raise InvalidInput(f"device must be a GPU index (0, 1, ...), got {self.device!r}")
        return self

    @property
    def workspace_bytes(self) -> int:
        return int(self.workspace_gb * (1 << 30))

    @property
    def timing_cache_path(self) -> Path:
        return self.timing_cache or cache.engine_dir(self.artifact_dir) / cache.TIMING_CACHE_NAME


def parse_stages(names: Sequence[str] | None) -> tuple[Stage, ...]:
    """Stage names from the command line; empty means every stage of the artifact."""
    stages = []
    for name in names or ():
        try:
            stage = Stage(name)
        except ValueError:
            raise InvalidInput(f"unknown stage {name!r}: choose from {', '.join(s.value for s in Stage)}") from None
        if stage not in stages:
            stages.append(stage)
    return tuple(stages)


@dataclass
class BuildReport:
    built: list[Stage] = field(default_factory=list)
    reused: list[Stage] = field(default_factory=list)
    checks: list[Any] = field(default_factory=list)     # engines.verify.StageCheck

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)


def requested_stages(manifest: Manifest, config: BuildConfig) -> tuple[Stage, ...]:
    """The stages to build: those asked for, each of which the artifact must have."""
    if not config.stages:
        return manifest.stages
    absent = [s.value for s in config.stages if not manifest.has(s)]
    if absent:
        raise InvalidInput(f"this artifact has no {', '.join(absent)} stage: its stages are "
                           f"{', '.join(s.value for s in manifest.stages)}")
    return config.stages


def decide(folder: Path, manifest: Manifest, platform: cache.Platform, config: BuildConfig
           ) -> dict[Stage, cache.CacheCheck]:
    """What each requested stage needs: CURRENT stages are reused unless --force."""
    return {s: cache.check(folder, cache.expected_key(manifest, s, platform))
            for s in requested_stages(manifest, config)}


def build_engines(config: BuildConfig, progress: Progress | None = None) -> BuildReport:
    from . import cuda
    from .tensorrt import current_platform, import_tensorrt

    config = config.validate()
    progress = progress or Progress()
    folder = Path(config.artifact_dir)
    manifest = load_manifest(folder)
    requested_stages(manifest, config)   # a stage the artifact lacks fails before TensorRT loads
    trt = import_tensorrt()
    cuda.set_device(config.device)
    platform = current_platform(trt, config.device)
    progress.say(f"building for {platform.describe()} in {cache.engine_dir(folder)}")
    cache.engine_dir(folder).mkdir(parents=True, exist_ok=True)
    from .files import remove_temp_files
    removed = remove_temp_files(cache.engine_dir(folder))   # left by a killed build
    if removed:
        progress.say(f"removed {len(removed)} temporary file(s) left by an interrupted build")

    report = BuildReport()
    for stage, state in decide(folder, manifest, platform, config).items():
        refit = config.refittable and stage in weightmap.COMPONENTS
        if state.current and not config.force:
            if not (refit and not cache.built_refittable(folder, stage)):
                progress.say(f"{state.reason}: not rebuilt (--force rebuilds it)")
                report.reused.append(stage)
                continue
            progress.say(f"{stage.value}: the engine is not refittable: rebuilding (--refittable)")
        elif state.status is not cache.Status.MISSING:
            progress.say(f"{state.reason}: rebuilding")
        elif cache.plan_path(folder, stage).is_file():
            progress.say(f"{stage.value}: engine file without its record (left by an interrupted build): rebuilding")
        key = cache.expected_key(manifest, stage, platform)
        start = time.perf_counter()
        with progress.step(f"{stage.value}: building {key.precision.value} engine "
                           f"(optimization level {config.opt_level}, workspace {config.workspace_gb:g} GB)"), \
                progress.heartbeat(f"{stage.value}: still building"):
            plan = build_plan(trt, folder / stage.onnx_file, dataclasses.replace(config, refittable=refit))
        info = cache.BuildInfo(config.workspace_bytes, config.opt_level, time.perf_counter() - start,
                               {"refittable": True} if refit else {})
        path = cache.store_plan(folder, key, plan, info)
        progress.say(f"{stage.value}: wrote {path} ({path.stat().st_size / 2**20:.1f} MiB)")
        report.built.append(stage)

    if config.verify:
        report.checks = verify_engines(folder, manifest, requested_stages(manifest, config), config.device, progress)
    return report


def build_plan(trt: Any, onnx_path: Path, config: BuildConfig) -> bytes:
    """Parse one static-shape ONNX file into a strongly typed network and build it.
    Loads and saves the timing cache at `config.timing_cache_path`. `config.refittable`:
    BuilderFlag.REFIT, so weights can be replaced by ONNX initializer name after loading
    (engines/tensorrt.py's set_weights); NVIDIA reports refittable engines running
    slower on some GPUs (TensorRT issues #2936, #3099), so it is asked for, not default."""
    check_external_data(onnx_path)   # TensorRT's parser reads any location it is given: refuse escapes first
    log = _logger(trt)
    builder = trt.Builder(log)
    # STRONGLY_TYPED: types come from the ONNX file. Required on 10.x, implied on 11.
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, log)
    if not parser.parse_from_file(str(onnx_path)):   # finds unet.onnx.data beside the file
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ArtifactError(f"{onnx_path}: TensorRT cannot parse it: {errors or 'no details'}")
    build_config = builder.create_builder_config()
    build_config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, config.workspace_bytes)
    build_config.builder_optimization_level = config.opt_level
    if config.refittable:
        build_config.set_flag(trt.BuilderFlag.REFIT)
    timing_path = config.timing_cache_path
    timing = build_config.create_timing_cache(cache.read_timing_cache(timing_path))
    if not build_config.set_timing_cache(timing, ignore_mismatch=False):
        # Saved on another GPU or TensorRT version: start a fresh one.
        timing = build_config.create_timing_cache(b"")
        build_config.set_timing_cache(timing, ignore_mismatch=False)
    plan = builder.build_serialized_network(network, build_config)
    if plan is None:
        raise ArtifactError(f"{onnx_path}: TensorRT could not build an engine (see the TensorRT log above; "
                            f"a larger --workspace-gb may help)")
    cache.write_timing_cache(timing_path, build_config.get_timing_cache().serialize())
    return bytes(memoryview(plan).cast("B"))


def verify_engines(folder: Path, manifest: Manifest, stages: Sequence[Stage], device: int,
                   progress: Progress) -> list[Any]:
    """Each engine against ONNX Runtime CPU on the same random inputs: export's table."""
    from .tensorrt import Options, open_engines
    from .verify import compare, random_inputs, run_onnx, table, verify_tolerance

    checks = []
    engines = open_engines(folder, manifest, Options(cuda_graph=False, device=device), stages=list(stages))
    try:
        for stage in stages:
            spec = manifest.specs[stage]
            inputs = random_inputs(spec, manifest.facts)
            with progress.step(f"{stage.value}: TensorRT vs ONNX Runtime"):
                got = engines[stage](inputs)
                want = run_onnx(folder / stage.onnx_file, inputs)
            checks.append(compare(stage, manifest.precisions[stage], got, want,
                                  verify_tolerance(stage, Precision.FP16)))
    finally:
        for e in engines.values():
            e.close()
    progress.say("verification (TensorRT vs ONNX Runtime CPU, random inputs):\n" + table(checks))
    return checks


def _logger(trt: Any) -> Any:
    from .tensorrt import logger
    return logger(trt)
