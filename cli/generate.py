"""`sdrt generate`: image(s) from an artifact folder, saved as PNGs with their settings.

argparse stops here. `generation_request` turns the command line into the keyword
arguments of one `Pipeline.__call__`: a new generation flag is one argument in
`add_generation_args` and one entry there. The pipeline (and with it the backend)
is imported when the command runs, never by `sdrt --help`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
from pathlib import Path
from typing import Any, Mapping

from sdrt.engines.errors import AlreadyExists, InvalidInput
from sdrt.engines.progress import Progress
from sdrt.runtime.config import DEFAULT_GUIDANCE, DEFAULT_STEPS, GenerationConfig

from .errors import writing_into
from .folders import artifact_folder, check_folder_for

DEFAULT_PROMPT = "a watercolor fox"   # `sdrt demo` has no required prompt


def register(sub: argparse._SubParsersAction) -> None:
    g = sub.add_parser("generate", help="generate images from an artifact folder",
                       description="Generate image(s) from an artifact folder written by `sdrt export`. "
                                   "Writes PNGs with the settings in a `parameters` text chunk and prints "
                                   "per-stage timings. For an artifact exported with --batch N, image i>0 "
                                   "goes to OUT-i.png.")
    g.add_argument("artifact_dir", metavar="ARTIFACT_DIR", type=Path)
    add_generation_args(g, prompt_required=True)
    g.add_argument("--out", type=Path, default=Path("image.png"), help="output PNG (default: image.png)")
    g.add_argument("--force", action="store_true", help="overwrite existing output files")
    g.add_argument("--backend", default="onnxruntime", help="onnxruntime (default) or tensorrt")
    g.add_argument("--provider", default=None,
                   help="ONNX Runtime provider: cpu (default) or cuda (needs onnxruntime-gpu)")
    g.add_argument("--threads", type=int, default=None, help="CPU threads (default: one per physical core)")
    g.add_argument("--no-cuda-graph", dest="cuda_graph", action="store_false",
                   help="TensorRT: run the U-Net without capturing it as a CUDA graph")
    g.add_argument("--shared-device-memory", action="store_true",
                   help="TensorRT: one activation memory block for all stages (small Jetson boards)")
    g.set_defaults(handler=run_generate)


def add_generation_args(p: argparse.ArgumentParser, prompt_required: bool) -> None:
    """The settings of one generation, shared by `generate` and `demo`."""
    from sdrt.runtime.schedulers import SAMPLERS   # NumPy only

    p.add_argument("--prompt", required=prompt_required, default=None if prompt_required else DEFAULT_PROMPT,
                   help="text prompt" + ("" if prompt_required else f" (default: {DEFAULT_PROMPT!r})"))
    p.add_argument("--negative-prompt", default=None, help="what to steer away from")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"denoising steps (default {DEFAULT_STEPS})")
    p.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE,
                   help=f"classifier-free guidance scale; <= 1 disables it (default {DEFAULT_GUIDANCE})")
    p.add_argument("--scheduler", default=None,
                   help=f"sampler: one of {', '.join(SAMPLERS)}; add _karras, _exponential or _beta for that "
                        f"sigma ramp (dpmpp_2m_karras), or give an AUTOMATIC1111 name ('DPM++ 2M Karras', "
                        f"'Euler a'). Default: the checkpoint's own scheduler")
    p.add_argument("--scheduler-option", dest="scheduler_options", action="append", default=[],
                   metavar="KEY=VALUE", type=_scheduler_option,
                   help="a diffusers option of the sampler on top of the checkpoint's scheduler config, as "
                        "from_config(config, KEY=VALUE) takes it; repeatable. VALUE: true/false, none, a number, "
                        "a JSON list, or text (e.g. use_karras_sigmas=true, solver_order=3, "
                        "timestep_spacing=trailing)")
    p.add_argument("--seed", type=int, default=None,
                   help="0..2**64-1 (default: random, printed); gives diffusers' image for "
                        "torch.Generator('cpu').manual_seed(SEED)")
    p.add_argument("--generator", default="torch", choices=("torch", "numpy"),
                   help="random numbers: torch (default; torch-compatible seeds) or numpy (sdrt 0.1's)")
    p.add_argument("--image", type=Path, default=None,
                   help="input image (PNG, JPEG, WebP): image-to-image, or with --mask / --outpaint")
    p.add_argument("--mask", type=Path, default=None, help="inpainting mask for --image (white = repaint)")
    p.add_argument("--strength", type=float, default=None,
                   help="how much of the schedule runs on --image, in (0, 1] (default 0.8; 1.0 with --mask)")
    p.add_argument("--outpaint", default=None, metavar="L,T,R,B",
                   help="extend --image by these pixel margins (N, X,Y or L,T,R,B) and paint the new area")


def _scheduler_option(text: str) -> tuple[str, Any]:
    """KEY=VALUE -> (key, value): JSON's true/false/null (and None), numbers and lists;
    anything else is a string (timestep_spacing=trailing)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    raw = raw.strip()
    words = {"true": True, "false": False, "none": None, "null": None}
    if raw.lower() in words:
        return key, words[raw.lower()]
    try:
        value = json.loads(raw)
    except ValueError:
        return key, raw
    if isinstance(value, float) and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{key}: {raw!r} is not a finite number")
    return key, value if isinstance(value, (int, float, list)) else raw


def generation_request(args: argparse.Namespace) -> dict[str, Any]:
    """The command line as the keyword arguments of one `Pipeline.__call__`."""
    options = dict(args.scheduler_options) or None
    if options is not None and len(options) < len(args.scheduler_options):
        keys = [k for k, _ in args.scheduler_options]
        raise InvalidInput(f"--scheduler-option {next(k for k in keys if keys.count(k) > 1)} is given twice")
    return dict(prompt=args.prompt, negative_prompt=args.negative_prompt, steps=args.steps,
                guidance=args.guidance, scheduler=args.scheduler, seed=args.seed, generator=args.generator,
                image=args.image, mask_image=args.mask, strength=args.strength, outpaint=args.outpaint,
                scheduler_options=options)


def run_generate(args: argparse.Namespace) -> int:
    from sdrt.engines.base import Backend
    from sdrt.engines.manifest import read_manifest
    from sdrt.runtime.images import output_paths

    backend = Backend.parse(args.backend)
    options = backend_options(args, backend)
    folder = artifact_folder(args.artifact_dir)
    manifest = read_manifest(folder)   # fail fast on a missing or incomplete folder
    request = generation_request(args)
    check_request(request, manifest.shape.batch)
    paths = output_paths(args.out, manifest.shape.batch)
    refuse_existing(paths, args.force)   # before minutes of work, not after
    check_folder_for(args.out)
    model = Path(manifest.source).name if manifest.source else folder.resolve().name
    generate_and_save(folder, backend, options, request, paths, model=model, command=args.command)
    return 0


def backend_options(args: argparse.Namespace, backend: Any) -> dict[str, Any]:
    """`Pipeline.load` options from the flags of one backend; another backend's flag is refused."""
    from sdrt.engines.base import Backend

    options: dict[str, Any] = {}
    if (args.provider is not None or args.threads is not None) and backend is not Backend.ONNXRUNTIME:
        raise InvalidInput(f"--provider and --threads apply to the onnxruntime backend, not {args.backend}")
    if args.provider is not None:
        options["providers"] = args.provider
    if args.threads is not None:
        options["threads"] = args.threads
    if backend is Backend.TENSORRT:
        options.update(cuda_graph=args.cuda_graph, shared_device_memory=args.shared_device_memory)
    return options


def check_request(request: Mapping[str, Any], batch: int) -> None:
    """Validate the settings before loading engines, so a typo costs no load time.
    The pipeline validates them again (it is also an API entry point)."""
    r = request
    # Without --scheduler the options belong to the checkpoint's own sampler: they are
    # checked against it by Artifact.request, still before loading.
    GenerationConfig.create(r["prompt"], r["negative_prompt"], r["steps"], r["guidance"],
                            "euler" if r["scheduler"] is None else r["scheduler"], r["seed"],
                            batch=batch, generator=r["generator"],
                            scheduler_options=None if r["scheduler"] is None else r.get("scheduler_options"))


def generate_and_save(folder: Path, backend: Any, options: Mapping[str, Any], request: Mapping[str, Any],
                      paths: list[Path], model: str, command: str, progress: Progress | None = None) -> None:
    """Load the pipeline, generate, write the PNGs (atomically) and print the timings."""
    from sdrt.runtime.artifact import Artifact
    from sdrt.runtime.images import parameters_text, write_pngs
    from sdrt.runtime.pipeline import Pipeline

    progress = progress or Progress()
    artifact = Artifact.open(folder)
    # Every setting, the sampler and the input images are checked here, before engines load.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prepared = artifact.request(**request)
    _print_warnings(caught, command)     # e.g. the checkpoint's scheduler class is not followed
    progress.say(f"loading {folder}")
    pipe = Pipeline.load(artifact, backend=backend, **options)
    try:
        cached = [getattr(e, "cached", None) for e in pipe.engines.values()]
        how = ("optimized graphs from the cache" if all(cached) else
               "graphs optimized now; later loads reuse them" if any(c is False for c in cached) else "")
        steps = request["steps"]
        progress.say(f"loaded{f' ({how})' if how else ''}; generating {steps} steps")
        every = max(1, steps // 5)

        def on_step(i: int, n: int) -> None:
            if i % every == 0 or i == n:
                progress.say(f"U-Net call {i}/{n}")

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = pipe.run(prepared, on_step=on_step)
        _print_warnings(caught, command)     # e.g. a truncated prompt
        c = result.config
        text = parameters_text(c.prompt, c.negative_prompt, c.steps, c.scheduler, c.guidance, result.seed,
                               pipe.width, pipe.height, model, generator=c.generator.value, task=c.task.value,
                               strength=c.strength, scheduler_options=c.scheduler_options)
        with writing_into(paths[0].parent):
            write_pngs(paths, result.images, text, force=True)   # existence was checked up front
    finally:
        pipe.close()
    print(format_timings(result.timings, c.steps, c.scheduler, result.seed))
    for path in paths:
        print(f"wrote {path}")


def _print_warnings(caught: list, command: str) -> None:
    for w in caught:   # one line for a user, not a source listing
        print(f"sdrt {command}: warning: {w.message}", file=sys.stderr)


def refuse_existing(paths: list[Path], force: bool) -> None:
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
