"""`sdrt demo`, `sdrt generate` and `sdrt info`.

argparse stops here: handlers turn arguments into library calls. Nothing here imports
torch; `demo` needs the export extra and imports it inside its handler.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Mapping

from sdrt.engines.base import Backend
from sdrt.engines.errors import AlreadyExists, BackendUnavailable, InvalidInput
from sdrt.engines.manifest import MANIFEST_NAME, read_manifest

from .config import DEFAULT_GUIDANCE, DEFAULT_STEPS

DEFAULT_PROMPT = "a watercolor fox"
DEFAULT_DEMO_DIR = "sdrt-demo"
DEMO_IMAGE = "demo.png"


def register(sub: argparse._SubParsersAction) -> None:
    from .schedulers import SCHEDULERS   # NumPy only
    names = ", ".join(SCHEDULERS)

    g = sub.add_parser("generate", help="generate images from an artifact folder",
                       description="Generate image(s) from an artifact folder written by `sdrt export`. "
                                   "Writes PNGs with the settings in a `parameters` text chunk and prints "
                                   "per-stage timings. For an artifact exported with --batch N, image i>0 "
                                   "goes to OUT-i.png.")
    g.add_argument("artifact_dir", metavar="ARTIFACT_DIR", type=Path)
    _generation_args(g, names, prompt_required=True)
    g.add_argument("--out", type=Path, default=Path("image.png"), help="output PNG (default: image.png)")
    g.add_argument("--force", action="store_true", help="overwrite existing output files")
    g.add_argument("--backend", default=Backend.ONNXRUNTIME.value, help="onnxruntime (default) or tensorrt")
    g.add_argument("--provider", default=None,
                   help="ONNX Runtime provider: cpu (default) or cuda (needs onnxruntime-gpu)")
    g.add_argument("--threads", type=int, default=None, help="CPU threads (default: one per physical core)")
    g.add_argument("--no-cuda-graph", dest="cuda_graph", action="store_false",
                   help="TensorRT: run the U-Net without capturing it as a CUDA graph")
    g.add_argument("--shared-device-memory", action="store_true",
                   help="TensorRT: one activation memory block for all stages (small Jetson boards)")
    g.set_defaults(handler=run_generate)

    i = sub.add_parser("info", help="describe an artifact folder",
                       description="Print an artifact folder's manifest: model facts, shapes, per-stage "
                                   "tensors and precision, export verification, tools and files.")
    i.add_argument("artifact_dir", metavar="ARTIFACT_DIR", type=Path)
    i.add_argument("--check", action="store_true", help="also verify every file's SHA-256")
    i.set_defaults(handler=run_info)

    d = sub.add_parser("demo", help="make the built-in tiny model, export it and generate an image",
                       description="End to end in one command: write the built-in tiny SD 1.5 model, export "
                                   "it to ONNX (or reuse a complete earlier export in the folder), generate "
                                   "an image and print the timings. Needs the export extra (torch).")
    d.add_argument("--out", type=Path, default=Path(DEFAULT_DEMO_DIR),
                   help=f"folder for the model, artifacts and image (default: ./{DEFAULT_DEMO_DIR})")
    _generation_args(d, names, prompt_required=False)
    d.add_argument("--force", action="store_true", help=f"overwrite {DEMO_IMAGE} in a folder the demo did not make")
    d.set_defaults(handler=run_demo)


def _generation_args(p: argparse.ArgumentParser, names: str, prompt_required: bool) -> None:
    p.add_argument("--prompt", required=prompt_required, default=None if prompt_required else DEFAULT_PROMPT,
                   help="text prompt" + ("" if prompt_required else f" (default: {DEFAULT_PROMPT!r})"))
    p.add_argument("--negative-prompt", default=None, help="what to steer away from")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"denoising steps (default {DEFAULT_STEPS})")
    p.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE,
                   help=f"classifier-free guidance scale; <= 1 disables it (default {DEFAULT_GUIDANCE})")
    p.add_argument("--scheduler", default=None, help=f"one of {names} (default: the checkpoint's own)")
    p.add_argument("--seed", type=int, default=None, help="0..2**64-1 (default: random, printed)")


# ---------------------------------------------------------------------------------
# generate


def run_generate(args: argparse.Namespace) -> int:
    from .images import output_paths
    options: dict[str, Any] = {}
    if (args.provider is not None or args.threads is not None) and Backend.parse(args.backend) is not Backend.ONNXRUNTIME:
        raise InvalidInput(f"--provider and --threads apply to the onnxruntime backend, not {args.backend}")
    if args.provider is not None:
        options["providers"] = args.provider
    if args.threads is not None:
        options["threads"] = args.threads
    if Backend.parse(args.backend) is Backend.TENSORRT:
        options.update(cuda_graph=args.cuda_graph, shared_device_memory=args.shared_device_memory)
    manifest = read_manifest(args.artifact_dir)   # fail fast on a missing or incomplete folder
    _check_generation_args(args, manifest.shape.batch)
    paths = output_paths(args.out, manifest.shape.batch)
    _refuse_existing(paths, args.force)   # before minutes of work, not after
    _check_folder_for(args.out)
    model = Path(manifest.source).name if manifest.source else args.artifact_dir.resolve().name
    _generate_and_save(args.artifact_dir, args, paths, options, model=model)
    return 0


def _generate_and_save(folder: Path, args: argparse.Namespace, paths: list[Path], options: Mapping[str, Any],
                       model: str, start: float | None = None) -> None:
    from .images import parameters_text, write_pngs
    from .pipeline import Pipeline

    start = time.perf_counter() if start is None else start
    _progress(start, f"loading {folder}")
    pipe = Pipeline.load(folder, backend=args.backend, **options)
    cached = [getattr(e, "cached", None) for e in pipe.engines.values()]
    how = ("optimized graphs from the cache" if all(cached) else
           "graphs optimized now; later loads reuse them" if any(c is False for c in cached) else "")
    _progress(start, f"loaded{f' ({how})' if how else ''}; generating {args.steps} steps")
    every = max(1, args.steps // 5)

    def on_step(i: int, n: int) -> None:
        if i % every == 0 or i == n:
            _progress(start, f"U-Net call {i}/{n}")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = pipe(args.prompt, negative_prompt=args.negative_prompt, steps=args.steps, guidance=args.guidance,
                      scheduler=args.scheduler, seed=args.seed, on_step=on_step)
    for w in caught:   # e.g. a truncated prompt: one line for a user, not a source listing
        print(f"sdrt {args.command}: warning: {w.message}", file=sys.stderr)
    c = result.config
    text = parameters_text(c.prompt, c.negative_prompt, c.steps, c.scheduler, c.guidance, result.seed,
                           pipe.width, pipe.height, model)
    write_pngs(paths, result.images, text, force=True)   # existence was checked up front
    pipe.close()
    print(format_timings(result.timings, c.steps, c.scheduler, result.seed))
    for path in paths:
        print(f"wrote {path}")


def _check_generation_args(args: argparse.Namespace, batch: int) -> None:
    """Validate the settings before loading engines, so a typo costs no load time.
    The pipeline validates them again (it is also an API entry point)."""
    from .config import GenerationConfig
    from .schedulers import SCHEDULERS
    known = tuple(SCHEDULERS)
    GenerationConfig.create(args.prompt, args.negative_prompt, args.steps, args.guidance,
                            known[0] if args.scheduler is None else args.scheduler, args.seed,
                            batch=batch, schedulers=known)


def _check_folder_for(out: Path) -> None:
    """The output's folder must be a folder (or not exist yet), checked before the work."""
    for parent in (out.parent, *out.parent.parents):
        if parent.exists():
            if not parent.is_dir():
                raise InvalidInput(f"cannot write {out}: {parent} is a file, not a folder")
            return


def _refuse_existing(paths: list[Path], force: bool) -> None:
    if force:
        return
    for path in paths:
        if path.exists():
            raise AlreadyExists(f"{path} already exists; pass --force to overwrite it")


def format_timings(t: Any, steps: int, scheduler: str, seed: int) -> str:
    n = len(t.steps)
    rows = [
        ("text encoder", _ms(t.text_encoder), ""),
        ("U-Net per step (median)", _ms(t.unet_median), f"x {n} calls"),
        ("scheduler+host per step (median)", _ms(t.host_median), ""),
        ("denoising total", _ms(sum(t.steps)), ""),
        ("VAE decoder", _ms(t.vae_decoder), ""),
        ("total", _ms(t.total), ""),
    ]
    width = max(len(r[0]) for r in rows)
    lines = [f"{scheduler}, {steps} steps, seed {seed}"]
    lines += [f"  {name:<{width}}  {value:>11}  {extra}".rstrip() for name, value, extra in rows]
    return "\n".join(lines)


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms" if seconds < 10 else f"{seconds:.2f} s"


def _progress(start: float, message: str) -> None:
    # The same format as export's progress lines, so `sdrt demo` reads as one log.
    print(f"[{time.perf_counter() - start:7.1f}s] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------
# info


def run_info(args: argparse.Namespace) -> int:
    from sdrt.engines.manifest import load_manifest
    folder: Path = args.artifact_dir
    m = load_manifest(folder) if args.check else read_manifest(folder)
    from .cli import one_line
    # Names and strings come from the manifest: escape control characters, so a hostile
    # file name cannot rewrite the terminal (ANSI escapes) or fake extra lines.
    print("\n".join(one_line(line) for line in format_info(folder, m, checked=args.check).splitlines()))
    return 0


def format_info(folder: Path, m: Any, checked: bool = False) -> str:
    f, s = m.facts, m.shape
    out = [f"artifact folder {folder}"]
    if m.source:
        out.append(f"  source        {m.source}")
    out.append(f"  model         {f.family}, prediction {f.prediction_type}, latent channels {f.latent_channels}, "
               f"VAE scale {f.vae_scale_factor} (scaling factor {f.vae_scaling_factor:g}), "
               f"text {f.text_max_length} x {f.text_hidden_size}")
    out.append(f"  image         {s.width}x{s.height} (native {f.native_image_size}), batch {s.batch}, "
               f"classifier-free guidance {'on' if s.cfg else 'off (--no-cfg)'}")
    out.append("stages")
    for stage, spec in m.specs.items():
        out.append(f"  {stage.value:<13} {m.precisions[stage].value}")
        for kind, tensors in (("in ", spec.inputs), ("out", spec.outputs)):
            for t in tensors:
                out.append(f"      {kind} {t.name:<22} {t.dtype.value:<8} {list(t.shape)}")
    if m.verification:
        out.append("verification (export, against PyTorch)")
        out += _nested(m.verification, 1)
    if m.tools:
        out.append("tools")
        out += [f"  {k:<13} {v}" for k, v in sorted(m.tools.items())]
    out.append("files" + (" (SHA-256 verified)" if checked else " (sizes from the manifest; --check verifies hashes)"))
    total = 0
    for rel, rec in sorted(m.files.items()):
        present = (folder / rel).is_file()
        total += rec.size
        out.append(f"  {rel:<40} {_size(rec.size):>10}  {rec.sha256[:12]}{'' if present else '  MISSING'}")
    out.append(f"  {'total':<40} {_size(total):>10}")
    return "\n".join(out)


def _nested(value: Any, depth: int) -> list[str]:
    pad = "  " * depth
    if isinstance(value, Mapping):
        lines = []
        for k, v in value.items():
            if isinstance(v, (Mapping, list)) and v and not _flat(v):
                lines.append(f"{pad}{k}")
                lines += _nested(v, depth + 1)
            else:
                lines.append(f"{pad}{k:<24} {_scalar(v)}")
        return lines
    if isinstance(value, list):
        return [line for item in value for line in _nested(item, depth)]
    return [f"{pad}{_scalar(value)}"]


def _flat(v: Any) -> bool:
    items = v.values() if isinstance(v, Mapping) else v
    return all(not isinstance(x, (Mapping, list)) for x in items) and len(v) <= 4


def _scalar(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, Mapping):
        return ", ".join(f"{k}={_scalar(x)}" for k, x in v.items())
    if isinstance(v, list):
        return ", ".join(_scalar(x) for x in v)
    return str(v)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


# ---------------------------------------------------------------------------------
# demo


def run_demo(args: argparse.Namespace) -> int:
    try:
        from sdrt.export.config import ExportConfig
        from sdrt.export.exporter import export_artifacts
        from sdrt.export.tiny import make_tiny_model
    except ImportError as e:
        raise BackendUnavailable(f"sdrt demo needs the export extra ({e.name} is missing): "
                                 f"pip install 'sdrt[export]'") from None
    from .images import output_paths

    out: Path = args.out
    if out.exists() and not out.is_dir():
        raise InvalidInput(f"--out {out} is a file; the demo needs a folder (it writes model/, artifacts/ and {DEMO_IMAGE})")
    model_dir, artifact_dir = out / "model", out / "artifacts"
    image = out / DEMO_IMAGE
    # The demo's own folder (recognised by its export) may be reused and its image
    # replaced; anything else is the user's file.
    ours = (artifact_dir / MANIFEST_NAME).is_file()
    if image.exists() and not ours and not args.force:
        raise AlreadyExists(f"{image} already exists; pass --force to overwrite it")
    _check_generation_args(args, batch=1)
    start = time.perf_counter()
    if not _complete_export(artifact_dir):
        if not (model_dir / "model_index.json").is_file():
            _progress(start, f"writing the built-in tiny SD 1.5 model to {model_dir}")
            make_tiny_model(model_dir, variant="sd15", force=model_dir.exists())
        _progress(start, f"exporting it to ONNX in {artifact_dir}")
        export_artifacts(ExportConfig(model_dir=model_dir, out_dir=artifact_dir, force=artifact_dir.exists()))
    else:
        _progress(start, f"reusing the export in {artifact_dir}")
    args.backend = Backend.ONNXRUNTIME.value
    _generate_and_save(artifact_dir, args, output_paths(image, 1), {}, model="sdrt-tiny-sd15", start=start)
    _progress(start, "demo done")
    return 0


def _complete_export(folder: Path) -> bool:
    from sdrt.engines.errors import SdrtError
    from sdrt.engines.manifest import load_manifest
    try:
        load_manifest(folder)
        return True
    except SdrtError:
        return False
