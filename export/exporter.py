"""`export_artifacts`: a diffusers checkpoint folder -> verified static-shape ONNX
artifacts plus everything the runtime reads, with manifest.json written last.

Per stage, memory is kept to about one copy of the weights at a time: the torch
module is traced (the trace's own forward pass gives the torch reference outputs) and
freed before clean-up, which streams the weights from disk to disk; ONNX Runtime then
loads the saved graph for verification. Every stage is built in a temporary folder
inside the output folder and renamed into place only after it passed verification;
the manifest, the mark of a complete folder, is written last.
"""

from __future__ import annotations

import ctypes
import gc
import hashlib
import importlib
import os
import shutil
from importlib import metadata
from pathlib import Path
from typing import Any

from sdrt.engines import files
from sdrt.engines.errors import ArtifactError, BackendUnavailable, InvalidInput, InvalidType, NumericsError
from sdrt.engines.families import family
from sdrt.engines.manifest import (CheckpointInfo, FileRecord, Manifest, check_model_name, file_record, model_name,
                                   write_manifest)
from sdrt.engines.specs import ModelFacts, Precision, ShapeConfig, Stage, StageSpec, check_io, stage_specs
from sdrt.engines import weightmap
from sdrt.engines.weightmap import StageWeights, WeightMap

from . import outdir
from .checkpoint import FEATURE_EXTRACTOR_CONFIG, SCHEDULER_CONFIG, Checkpoint, open_checkpoint
from .config import ExportConfig
from .controlnet import ControlNetSource, check_paths, load_controlnets, open_controlnets
from sdrt.engines.progress import Progress

TOOLS = ("sdrt", "torch", "diffusers", "transformers", "onnx", "onnxruntime", "onnx-graphsurgeon")


def export_artifacts(config: ExportConfig, progress: Progress | None = None) -> Manifest:
    progress = progress or Progress()
    _check_config(config)
    ckpt = open_checkpoint(Path(config.model_dir), allow_pickle=config.allow_pickle,
                           safety_checker=config.safety_checker)
    facts = ckpt.facts()
    _check_feature_extractor(ckpt, facts)
    controlnets = open_controlnets(check_paths(config.controlnets), ckpt, facts, config.allow_pickle)
    stages = _stages(facts, config)
    precisions = {s: config.stage_precision(s) for s in stages}
    upcast = _vae_upcast(ckpt, config, precisions)
    native = facts.native_image_size
    shape = ShapeConfig(
        height=native if config.height is None else config.height,
        width=native if config.width is None else config.width,
        batch=config.batch, cfg=_cfg(facts, config.cfg), prompt_chunks=config.prompt_chunks,
        deepcache=config.deepcache, controlnets=len(controlnets), embedding_slots=config.embedding_slots,
    ).validate(facts)
    if Precision.FP16 in precisions.values():
        _precision_module()  # fail before any work if fp16 cannot be done here
    out_dir = Path(config.out_dir)
    if out_dir.exists() and out_dir.resolve() == ckpt.folder.resolve():
        # --force would replace the checkpoint's own tokenizer/ and scheduler/ folders.
        raise InvalidInput(f"--out {out_dir} is the model folder itself; choose a separate artifact folder")
    outdir.prepare(out_dir, config.force, progress)
    if upcast:
        progress.say(upcast)
    if ckpt.safety_listed and not config.safety_checker:
        progress.say("leaving out the checkpoint's safety checker (--no-safety-checker): generated images are "
                     "not checked for NSFW content")
    progress.say(f"exporting {ckpt.folder} ({facts.family}, {facts.prediction_type}) at "
                 f"{shape.width}x{shape.height}, batch {shape.batch}{' with CFG' if shape.cfg else ''} to {out_dir}")

    specs = stage_specs(facts, shape, stages)
    checks = []
    known: dict[str, FileRecord] = {}   # records computed while writing
    linked: dict[Stage, StageWeights] = {}   # which initializer holds which parameter
    for stage in stages:
        check = _export_stage(ckpt, facts, specs[stage], precisions[stage], out_dir, config.verify, progress, known,
                              linked, controlnets)
        if check is not None:
            checks.append(check)
            if not check.passed:
                from .verify import table

                progress.say("verification:\n" + table(checks))
                raise NumericsError(
                    f"verification failed: {stage.value} differs from torch by up to {check.max_abs:.3g} "
                    f"(allowed {check.bound:.3g} = {check.atol:g} + {check.rtol:g} x output scale "
                    f"{check.scale:.3g}); no manifest written (--no-verify skips this check)")
    if checks:
        from .verify import table

        progress.say("verification (ONNX Runtime CPU vs torch, random inputs):\n" + table(checks))

    merged_loras = []
    if config.loras:
        from .merge import merge_loras

        with progress.step(f"merging {len(config.loras)} LoRA(s) into the weights"):
            merged_loras = merge_loras(out_dir, WeightMap(linked), tuple(config.loras), stages)
        known.clear()   # the weight files changed: hash them again
    copied = _copy_runtime_files(ckpt, out_dir)
    if Stage.SAFETY_CHECKER in stages:   # its feature extractor: how the runtime makes the checker's input
        files.atomic_write_bytes(out_dir / FEATURE_EXTRACTOR_CONFIG,
                                 (ckpt.folder / FEATURE_EXTRACTOR_CONFIG).read_bytes())
        copied.append(FEATURE_EXTRACTOR_CONFIG)
    weightmap.write(out_dir, WeightMap(linked))
    copied.append(weightmap.WEIGHT_MAP)
    names = []
    for stage in stages:
        names += [n for n in (stage.onnx_file, stage.data_file) if n]
    with progress.step("hashing files"):
        records = {name: known.get(name) or file_record(out_dir, name) for name in names + copied}
    with progress.step("hashing the U-Net weights (AUTOMATIC1111's model hash)"):
        checkpoint = checkpoint_info(ckpt, config.model_name)
    manifest = Manifest(
        facts=facts, shape=shape, precisions=precisions, files=records, tools=_tool_versions(),
        verification={c.stage.value: c.to_json() for c in checks},
        source=str(ckpt.folder.resolve()), checkpoint=checkpoint, merged_loras=tuple(merged_loras),
    )
    write_manifest(out_dir, manifest)
    progress.say(f"wrote {out_dir / 'manifest.json'}")
    return manifest


def checkpoint_info(ckpt: Checkpoint, name: str | None = None) -> CheckpointInfo:
    """The checkpoint's name and AUTOMATIC1111's model hash, for PNG metadata.

    AUTOMATIC1111 hashes a single-file checkpoint (SHA-256 of the whole file, first 10
    hex digits: modules/hashes.py). A diffusers folder has no such file; its U-Net's
    weights are the part that identifies a fine-tune, so those are hashed: the file
    export loads for the U-Net, or for a sharded U-Net its shards' bytes one after
    another in the order of their numbers. A single-file U-Net's hash is the one
    `sha256sum unet/diffusion_pytorch_model.safetensors` prints."""
    weights = ckpt.weights["unet"]
    unet = ckpt.folder / "unet"
    shards = [weights.file]
    if weights.file.endswith(".index.json"):   # shard names were checked by open_checkpoint
        weight_map = files.read_json_object(unet / weights.file, InvalidInput, "shard index")["weight_map"]
        shards = sorted({str(v) for v in weight_map.values()})
    digest = hashlib.sha256()
    block = bytearray(1 << 20)   # 1 MiB at a time: a 3.4 GB fp32 U-Net is never held in memory
    view = memoryview(block)
    for shard in shards:
        with open(unet / shard, "rb", buffering=0) as f:
            while n := f.readinto(block):
                digest.update(view[:n])
    derived = model_name(ckpt.folder.resolve()) or "checkpoint"
    return CheckpointInfo(derived if name is None else check_model_name(name),
                          digest.hexdigest(), tuple(f"unet/{shard}" for shard in shards))


def _vae_upcast(ckpt: Checkpoint, config: ExportConfig, precisions: dict[Stage, Precision]) -> str:
    """A VAE whose config sets force_upcast (SDXL's overflows in fp16) stays fp32 in an
    fp16 export unless --vae-precision fp16 is asked for, as diffusers upcasts it.
    Returns the notice to print, or ''."""
    vae_stages = [s for s in precisions if s in (Stage.VAE_ENCODER, Stage.VAE_DECODER)]
    if (config.vae_precision is None and ckpt.configs["vae"].get("force_upcast")
            and any(precisions[s] is Precision.FP16 for s in vae_stages)):
        for s in vae_stages:
            precisions[s] = Precision.FP32
        return ("the VAE's config sets force_upcast (it overflows in fp16, as SDXL's does): its stages stay fp32, "
                "as diffusers upcasts them; --vae-precision fp16 exports them in fp16 anyway (an fp16-safe VAE)")
    return ""


def _cfg(facts: ModelFacts, asked: bool | None) -> bool:
    """CFG unless the U-Net takes the guidance scale as an embedding (LCM), which
    diffusers runs without CFG (LatentConsistencyModelPipeline, and
    StableDiffusionPipeline for a U-Net with time_cond_proj_dim)."""
    if asked is None:
        return not facts.guidance_embedding
    if asked and facts.guidance_embedding:
        raise InvalidInput(f"this U-Net takes the guidance scale as an embedding (time_cond_proj_dim "
                           f"{facts.time_cond_proj_dim}, an LCM-distilled model) and runs without classifier-free "
                           f"guidance; export it without cfg=True")
    return bool(asked)


def _stages(facts: ModelFacts, config: ExportConfig) -> tuple[Stage, ...]:
    """The family's stages, less the optional ones this export leaves out."""
    left_out = set() if config.vae_encoder else {Stage.VAE_ENCODER}
    if left_out and facts.inpainting:
        raise InvalidInput("this is an inpainting checkpoint: its U-Net takes the masked image's latents, which "
                           "need the VAE encoder; export without --no-vae-encoder")
    if config.deepcache is not True:
        if config.deepcache is not False:
            raise InvalidInput(f"deepcache must be True or False, got {config.deepcache!r}")
        left_out.add(Stage.UNET_SHALLOW)
    if not facts.safety_image_size:   # none in the checkpoint, or --no-safety-checker
        left_out.add(Stage.SAFETY_CHECKER)
    if not config.controlnets:
        left_out.add(Stage.CONTROLNET)
    return tuple(s for s in family(facts.family).stages if s not in left_out)


def _check_feature_extractor(ckpt: Checkpoint, facts: ModelFacts) -> None:
    """The runtime must be able to read the feature extractor's config and make the
    checker's input size from it: refused now, naming the file, not at generation."""
    if ckpt.preprocessor is None:
        return
    from sdrt.runtime.safety import ClipImageProcessing

    path = ckpt.folder / FEATURE_EXTRACTOR_CONFIG
    try:
        processing = ClipImageProcessing.from_config(ckpt.preprocessor, str(path))
    except ArtifactError as e:
        raise InvalidInput(str(e)) from None
    side = facts.safety_image_size
    if processing.crop != (side, side):
        got = "no center crop" if processing.crop is None else f"crop_size {processing.crop[1]}x{processing.crop[0]}"
        raise InvalidInput(f"{path}: {got}, but the safety checker's vision model takes {side}x{side} images; "
                           f"export with --no-safety-checker to leave it out")


def _check_config(config: ExportConfig) -> None:
    if not isinstance(config.model_dir, (str, os.PathLike)):
        raise InvalidType(f"model_dir must be a path, got {type(config.model_dir).__name__}")
    if not isinstance(config.out_dir, (str, os.PathLike)):
        raise InvalidType(f"out_dir must be a path, got {type(config.out_dir).__name__}")
    if isinstance(config.batch, bool) or not isinstance(config.batch, int) or config.batch < 1:
        raise InvalidInput(f"batch must be an integer >= 1 (images per call), got {config.batch!r}")
    if config.model_name is not None:
        check_model_name(config.model_name)   # before minutes of export
    if config.loras:
        from sdrt.runtime.loras import parse_loras

        parse_loras(list(config.loras))   # names and scales, before minutes of export
    accepted = ", ".join(p.value for p in Precision)
    for name, value in (("precision", config.precision), ("vae_precision", config.vae_precision)):
        if value is not None and not isinstance(value, Precision):
            try:
                Precision(value)
            except ValueError:
                raise InvalidInput(f"{name} {value!r} is not supported: choose one of {accepted}") from None


def _precision_module() -> Any:
    try:
        precision = importlib.import_module("sdrt.export.precision")
    except ImportError as e:
        raise BackendUnavailable(f"fp16 export is not available in this build ({e}); export with --precision fp32") from None
    return precision


def _export_stage(ckpt: Checkpoint, facts: Any, spec: StageSpec, precision: Precision, out_dir: Path,
                  verify: bool, progress: Progress, known: dict[str, FileRecord],
                  linked: dict[Stage, StageWeights], controlnets: tuple[ControlNetSource, ...] = ()) -> Any:
    from . import graphs
    from . import weightmap as link
    from .checkpoint import load_module
    from .verify import FP32_TOLERANCE, compare, random_inputs, run_onnx

    stage = spec.stage
    name = stage.value
    with files.temp_folder(out_dir, prefix=f"{files.TEMP_PREFIX}{name}-") as work:
        with progress.step(f"{name}: loading weights"):
            module = load_controlnets(controlnets) if stage is Stage.CONTROLNET else load_module(ckpt, stage)
            graph = graphs.wrap(stage, module, spec, facts)
        params = None
        if link.link_stage(stage):
            with progress.step(f"{name}: hashing parameters (to link them to the graph's weights)"):
                params = link.fingerprints(module, stage)
        del module
        inputs = random_inputs(spec, facts)
        raw = work / "raw"
        raw.mkdir()
        with progress.step(f"{name}: tracing to ONNX (opset {graphs.OPSET})"):
            reference = graphs.export_raw(graph, spec, inputs, raw / "model.onnx")
        del graph
        _release_memory()

        with progress.step(f"{name}: constant folding and shape inference"):
            fp32 = work / (stage.onnx_file if precision is Precision.FP32 else "fp32.onnx")
            data = None if not stage.data_file else (stage.data_file if precision is Precision.FP32 else "fp32.onnx.data")
            data_sha256 = graphs.clean_file(raw / "model.onnx", fp32, data)
            shutil.rmtree(raw)
        if params is not None:
            with progress.step(f"{name}: linking parameters to the graph's weights"):
                weights = link.match(stage, params, link.initializer_keys(fp32))
            params = None
        final = work / stage.onnx_file
        tolerance = FP32_TOLERANCE
        if precision is not Precision.FP32:
            module = _precision_module()
            with progress.step(f"{name}: converting to {precision.value}"):
                module.convert_stage(fp32, final, stage)
            if link.link_stage(stage):
                weights = link.after_conversion(weights, final)
            tolerance = tuple(module.verify_tolerance(stage, precision))
            for p in (fp32, work / "fp32.onnx.data"):
                p.unlink(missing_ok=True)
        _check_signature(final, spec)

        check = None
        if verify:
            with progress.step(f"{name}: verifying in ONNX Runtime"):
                got = run_onnx(final, inputs, full_optimization=stage is not Stage.UNET)
            check = compare(stage, precision, got, reference, tolerance)
            del got
            _release_memory()  # the ORT session is gone; the next stage starts from a low floor
            if not check.passed:
                return check
        # Weights first, graph second: a graph never points at a missing data file.
        for fname in (stage.data_file, stage.onnx_file):
            if fname:
                if not (work / fname).is_file():
                    raise ArtifactError(f"{name}: export produced no {fname}")
                graphs.fsync_file(work / fname)
                os.replace(work / fname, out_dir / fname)
        if data_sha256 and precision is Precision.FP32:
            known[stage.data_file] = FileRecord(data_sha256, (out_dir / stage.data_file).stat().st_size)
        if link.link_stage(stage):
            linked[stage] = weights
        return check


def _release_memory() -> None:
    """Collect, then hand freed heap back to the OS. glibc keeps freed arenas mapped,
    so without malloc_trim each stage's peak sits on the last one's leftovers (the
    SD 2.1 export's floor grew to 2.9 GiB before the U-Net without it)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc (macOS, musl): nothing to trim


def _check_signature(path: Path, spec: StageSpec) -> None:
    """The written graph's I/O must be exactly the spec's (a bug here would otherwise
    surface as an engine error on another machine)."""
    from .graphs import io_signature

    sig = io_signature(path)
    check_io(spec, {n: (shape, dtype) for n, shape, dtype in sig["inputs"]},
             {n: (shape, dtype) for n, shape, dtype in sig["outputs"]}, path.name,
             "this is a bug in sdrt's export, please report it")


def _copy_runtime_files(ckpt: Checkpoint, out_dir: Path) -> list[str]:
    """Tokenizer files and the scheduler config, so the artifact folder is all the
    runtime needs. A tokenizer.json (the `tokenizers` library's format, what the
    torch-free runtime loads) is derived when the checkpoint has none."""
    written = []
    for name in ckpt.tokenizer_dirs:   # tokenizer/, and SDXL's tokenizer_2/
        for src in ckpt.tokenizer_files(name):
            rel = f"{name}/{src.name}"
            files.atomic_write_bytes(out_dir / rel, src.read_bytes())
            written.append(rel)
        rel = f"{name}/tokenizer.json"
        if rel not in written:
            from transformers import CLIPTokenizer

            tok = CLIPTokenizer.from_pretrained(ckpt.folder / name)
            with files.atomic_path(out_dir / rel) as tmp:
                tok.backend_tokenizer.save(str(tmp))
            written.append(rel)
    files.atomic_write_bytes(out_dir / SCHEDULER_CONFIG, (ckpt.folder / SCHEDULER_CONFIG).read_bytes())
    written.append(SCHEDULER_CONFIG)
    return written


def _tool_versions() -> dict[str, str]:
    versions = {}
    for dist in TOOLS:
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = "not installed"
    return versions
