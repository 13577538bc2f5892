"""`sdrt generate`: image(s) from an artifact folder, saved as PNGs with their settings.

argparse stops here. `generation_request` turns the command line into the keyword
arguments of one `Pipeline.__call__`: a new generation flag is one argument in
`add_generation_args` and one entry in `_GIVEN`. With --from-png the PNG's parameters
text fills every setting the command line leaves out, so the generation flags default
to None ("not given") and are resolved there. The pipeline (and with it the backend)
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
from sdrt.runtime.config import DEFAULT_GUIDANCE, DEFAULT_STEPS, GenerationConfig, Generator, Task

from .backends import add_backend_args, backend_request
from .errors import writing_into
from .folders import artifact_folder, check_folder_for

DEFAULT_PROMPT = "a watercolor fox"   # `sdrt demo` has no required prompt
# What a generation gets for a setting neither the command line nor a PNG gives.
# steps and guidance None: the artifact's defaults (an LCM model runs 4 steps at 8.5,
# a --no-cfg artifact guidance 1); see Artifact.default_steps / default_guidance.
DEFAULTS: dict[str, Any] = dict(negative_prompt=None, steps=None, guidance=None, scheduler=None,
                                seed=None, generator=Generator.TORCH.value, image=None, mask_image=None, strength=None,
                                outpaint=None, scheduler_options=None, prompt_weighting=True, clip_skip=None,
                                prompt_2=None, negative_prompt_2=None, original_size=None,
                                crops_coords_top_left=None, target_size=None, cache_interval=1, safety_checker=True,
                                embeddings=None, allow_pickle=False)
# Pipeline.__call__ argument <- argparse destination, for the flags a PNG's settings yield to.
_GIVEN = dict(prompt="prompt", negative_prompt="negative_prompt", steps="steps", guidance="guidance",
              scheduler="scheduler", seed="seed", generator="generator", image="image", mask_image="mask",
              strength="strength", outpaint="outpaint", prompt_weighting="prompt_weighting", clip_skip="clip_skip",
              prompt_2="prompt_2", negative_prompt_2="negative_prompt_2", original_size="original_size",
              crops_coords_top_left="crops_coords_top_left", target_size="target_size",
              cache_interval="deepcache", cache_uniform="deepcache_uniform", cache_center="deepcache_center",
              cache_pow="deepcache_pow", loras="loras", safety_checker="safety_checker", control_image="control_image",
              controlnet_conditioning_scale="control_scale", control_guidance_start="control_start",
              control_guidance_end="control_end", guess_mode="guess_mode", embeddings="embeddings",
              allow_pickle="allow_pickle")
# ControlNet settings given once apply to every ControlNet (the API's single number).
_PER_CONTROLNET = ("controlnet_conditioning_scale", "control_guidance_start", "control_guidance_end")


def register(sub: argparse._SubParsersAction) -> None:
    g = sub.add_parser("generate", help="generate images from an artifact folder",
                       description="Generate image(s) from an artifact folder written by `sdrt export`. "
                                   "Writes PNGs with the settings in a `parameters` text chunk and prints "
                                   "per-stage timings. For an artifact exported with --batch N, image i>0 "
                                   "goes to OUT-i.png.")
    g.add_argument("artifact_dir", metavar="ARTIFACT_DIR", type=Path)
    add_generation_args(g, default_prompt=None)
    g.add_argument("--from-png", type=Path, default=None, metavar="IMAGE.png",
                   help="regenerate from the PNG's parameters text (sdrt's or AUTOMATIC1111's): its prompt, "
                        "negative prompt, steps, sampler, CFG scale, seed, clip skip, RNG and denoising strength; "
                        "flags given here override them. The same seed and artifact give the same image")
    g.add_argument("--out", type=Path, default=Path("image.png"), help="output PNG (default: image.png)")
    g.add_argument("--refiner", type=Path, default=None, metavar="REFINER_DIR",
                   help="an SDXL refiner artifact folder: ARTIFACT_DIR (the base) runs the first --high-noise-frac "
                        "of the schedule and hands its latents to the refiner (diffusers' ensemble of expert "
                        "denoisers), in one call")
    g.add_argument("--high-noise-frac", type=float, default=0.8, metavar="F",
                   help="with --refiner: the fraction of the noise schedule the base runs (default 0.8)")
    g.add_argument("--force", action="store_true", help="overwrite existing output files")
    add_backend_args(g)
    g.set_defaults(handler=run_generate)


def add_generation_args(p: argparse.ArgumentParser, default_prompt: str | None) -> None:
    """The settings of one generation, shared by `generate` and `demo`. Defaults are
    None ("not given") and filled in by `generation_request`."""
    from sdrt.runtime.schedulers import SAMPLERS   # NumPy only

    p.add_argument("--prompt", default=default_prompt,
                   help="text prompt" + (f" (default: {default_prompt!r})" if default_prompt else
                                         "; required unless --from-png gives one"))
    p.add_argument("--negative-prompt", default=None, help="what to steer away from")
    p.add_argument("--steps", type=int, default=None,
                   help=f"denoising steps (default {DEFAULT_STEPS}; 4 for an LCM model, as diffusers)")
    p.add_argument("--guidance", type=float, default=None,
                   help=f"classifier-free guidance scale; <= 1 disables it (default {DEFAULT_GUIDANCE}; 1 on a "
                        f"--no-cfg artifact; an LCM model's embedded guidance scale, default 8.5)")
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
    sdxl = p.add_argument_group("SDXL", "settings of SDXL models (diffusers' StableDiffusionXLPipeline arguments)")
    sdxl.add_argument("--prompt-2", default=None, help="the second text encoder's prompt (default: --prompt)")
    sdxl.add_argument("--negative-prompt-2", default=None,
                      help="the second text encoder's negative prompt (default: --negative-prompt)")
    sdxl.add_argument("--original-size", type=_pixel_pair, default=None, metavar="H,W",
                      help="size condition: the 'original' image size in pixels (default: the artifact's)")
    sdxl.add_argument("--crop-top-left", dest="crops_coords_top_left", type=_pixel_pair, default=None,
                      metavar="TOP,LEFT", help="crop condition in pixels (default 0,0)")
    sdxl.add_argument("--target-size", type=_pixel_pair, default=None, metavar="H,W",
                      help="size condition: the target size in pixels (default: the artifact's)")
    p.add_argument("--clip-skip", type=int, default=None, metavar="N",
                   help="condition on the text encoder's hidden state N layers before the last (diffusers' "
                        "clip_skip; AUTOMATIC1111's 'Clip skip' N+1). Default 0: the last")
    dc = p.add_argument_group("DeepCache", "reuse the U-Net's deep features across steps (Ma et al., CVPR 2024): "
                              "faster, and the image changes; needs an artifact exported with --deepcache")
    dc.add_argument("--deepcache", type=int, default=None, metavar="N",
                    help="run the full U-Net every N steps and its shallow graph in between (default 1: off, exact)")
    dc.add_argument("--deepcache-nonuniform", dest="deepcache_uniform", action="store_const", const=False,
                    default=None, help="the reference's non-uniform schedule: ceil(steps/N) full steps packed "
                                       "around --deepcache-center by a power law")
    dc.add_argument("--deepcache-center", type=int, default=None, metavar="STEP",
                    help="non-uniform: the step the full steps crowd around (default 30%% of the steps)")
    dc.add_argument("--deepcache-pow", type=float, default=None, metavar="P",
                    help="non-uniform: the power law's exponent, > 1 (default 1.4)")
    p.add_argument("--lora", dest="loras", action="append", type=lora_arg, default=None, metavar="FILE[:SCALE]",
                   help="apply a LoRA (.safetensors, diffusers/PEFT or kohya/AUTOMATIC1111 format) at SCALE "
                        "(default 1.0), as diffusers' fuse_lora; repeat for several. Needs an artifact exported "
                        "by this sdrt and the onnxruntime backend (or TensorRT engines built with --refittable)")
    p.add_argument("--no-safety-checker", dest="safety_checker", action="store_const", const=False, default=None,
                   help="do not run the artifact's safety checker (by default, images it flags as NSFW are "
                        "returned black and reported here, as diffusers does)")
    cn = p.add_argument_group("ControlNet", "needs an artifact exported with --controlnet; as diffusers' "
                              "StableDiffusionControlNetPipeline (and its Img2Img / Inpaint pipelines with --image)")
    cn.add_argument("--control-image", action="append", type=Path, default=None, metavar="FILE",
                    help="conditioning image (PNG, JPEG, WebP), used as given (no edge or depth detection), resized "
                         "to the artifact's size; repeat it once per ControlNet, in their export order")
    cn.add_argument("--control-scale", action="extend", nargs="+", type=float, default=None, metavar="S",
                    help="controlnet_conditioning_scale: one value for all ControlNets or one per ControlNet "
                         "(default 1.0; with --image 0.8, with --mask or --outpaint 0.5, as diffusers)")
    cn.add_argument("--control-start", action="extend", nargs="+", type=float, default=None, metavar="F",
                    help="control_guidance_start: the fraction of the steps where a ControlNet starts acting "
                         "(default 0.0; one value or one per ControlNet)")
    cn.add_argument("--control-end", action="extend", nargs="+", type=float, default=None, metavar="F",
                    help="control_guidance_end: the fraction of the steps where it stops (default 1.0)")
    cn.add_argument("--guess-mode", action="store_const", const=True, default=None,
                    help="guess mode: the ControlNets read the image without the prompt's help (conditional half "
                         "only; diffusers recommends --guidance 3 to 5)")
    p.add_argument("--embedding", dest="embeddings", action="append", default=None, type=_embedding_arg,
                   metavar="FILE[:TOKEN]",
                   help="a textual-inversion embedding (.safetensors, AUTOMATIC1111's or diffusers'); repeatable. "
                        "Its trigger in the prompt or negative prompt is the file's name without the extension "
                        "(AUTOMATIC1111's files) or its stored token (diffusers'), or TOKEN")
    p.add_argument("--allow-pickle-code-execution", dest="allow_pickle", action="store_const", const=True,
                   default=None, help="allow .pt/.bin embeddings, pickles whose loading can execute code from the "
                                      "file (needs torch); only for files from a source you trust")
    p.add_argument("--no-weighting", dest="prompt_weighting", action="store_const", const=False, default=None,
                   help="take the prompt literally: no AUTOMATIC1111 attention syntax ('(word:1.2)', "
                        "'[word]', BREAK), which is read by default")
    p.add_argument("--seed", type=_seed_arg, default=None, metavar="SEED[,SEED...]",
                   help="0..2**64-1 (default: random, printed); gives diffusers' image for "
                        "torch.Generator('cpu').manual_seed(SEED). For an artifact exported with --batch N, "
                        "N comma-separated seeds give each image its own (diffusers' list of generators)")
    p.add_argument("--generator", default=None, choices=[g.value for g in Generator],
                   help="random numbers: torch (default; torch-compatible seeds) or numpy (sdrt 0.1's)")
    p.add_argument("--image", type=Path, default=None,
                   help="input image (PNG, JPEG, WebP): image-to-image, or with --mask / --outpaint")
    p.add_argument("--mask", type=Path, default=None, help="inpainting mask for --image (white = repaint)")
    p.add_argument("--strength", type=float, default=None,
                   help="how much of the schedule runs on --image, in (0, 1] (default 0.8; 1.0 with --mask)")
    p.add_argument("--outpaint", default=None, metavar="L,T,R,B",
                   help="extend --image by these pixel margins (N, X,Y or L,T,R,B) and paint the new area")


def _pixel_pair(text: str) -> tuple[int, int]:
    """'1024,768' (or 1024x768) -> (1024, 768)."""
    parts = text.replace("x", ",").split(",")
    try:
        a, b = (int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected two integers such as 1024,1024; got {text!r}") from None
    return a, b


def lora_arg(text: str) -> tuple[str, float]:
    """FILE or FILE:SCALE (the scale after the last colon, when it reads as a number)."""
    path, sep, tail = text.rpartition(":")
    if sep and path:
        try:
            scale = float(tail)
        except ValueError:
            return text, 1.0
        if not math.isfinite(scale):
            raise argparse.ArgumentTypeError(f"LoRA scale {tail!r} is not a finite number")
        return path, scale
    return text, 1.0


def _embedding_arg(text: str) -> Path | tuple[Path, str]:
    """FILE, or FILE:TOKEN (a path that exists is taken whole, colons and all)."""
    path, sep, token = text.rpartition(":")
    if not sep or Path(text).exists() or not path or "/" in token or "\\" in token:
        return Path(text)
    if not token.strip():
        raise argparse.ArgumentTypeError(f"expected FILE or FILE:TOKEN, got {text!r}")
    return Path(path), token


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


def given_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The `Pipeline.__call__` arguments the command line sets itself."""
    given = {name: getattr(args, dest) for name, dest in _GIVEN.items() if getattr(args, dest) is not None}
    options = dict(args.scheduler_options)
    if len(options) < len(args.scheduler_options):
        keys = [k for k, _ in args.scheduler_options]
        raise InvalidInput(f"--scheduler-option {next(k for k in keys if keys.count(k) > 1)} is given twice")
    if options:
        given["scheduler_options"] = options
    for name in _PER_CONTROLNET:
        if name in given and len(given[name]) == 1:
            given[name] = given[name][0]
    return given


def generation_request(args: argparse.Namespace, png: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The keyword arguments of one `Pipeline.__call__`: the command line's settings,
    then those of a PNG (`png`: infotext.settings(...).kwargs), then the defaults.
    --scheduler-option adds to the PNG's options unless --scheduler names another
    sampler (the options belong to the sampler)."""
    given = given_settings(args)
    png = dict(png or {})
    if "scheduler_options" in given and "scheduler" not in given and png.get("scheduler_options"):
        given["scheduler_options"] = {**png["scheduler_options"], **given["scheduler_options"]}
    if "scheduler" in given:
        png.pop("scheduler_options", None)
    return {"prompt": None, **DEFAULTS, **png, **given}


def png_settings(path: Path, args: argparse.Namespace) -> Any:
    """The settings of a PNG's parameters text (infotext.Settings), leaving out those
    the command line gives. Errors name the file."""
    from sdrt.runtime import infotext
    from sdrt.runtime.images import PARAMETERS_KEY, read_parameters

    text = read_parameters(path)
    if text is None:
        raise InvalidInput(f"{path} has no '{PARAMETERS_KEY}' text: it was not written by sdrt or AUTOMATIC1111, "
                           f"or its metadata was removed")
    given = set(given_settings(args))
    # --scheduler-option alone adds to the PNG's options (generation_request merges them).
    given.discard("scheduler_options")
    try:
        return infotext.settings(text, skip=given)
    except InvalidInput as e:
        raise InvalidInput(f"{path}: {e}") from None


def check_png_fits(path: Path, png: Any, request: Mapping[str, Any], manifest: Any) -> list[str]:
    """Refuse a PNG this artifact cannot regenerate (another size; an image task without
    its input images); return warning lines (another model, what is not reproduced)."""
    shape = manifest.shape
    if png.size is not None and png.size != (shape.width, shape.height):
        w, h = png.size
        raise InvalidInput(f"{path} is {w}x{h} (its Size), and this artifact generates {shape.width}x{shape.height}: "
                           f"export the model with --width {w} --height {h}")
    task = png.task
    inputs = (("--image", "image", task.takes_image), ("--mask", "mask_image", task is Task.INPAINT),
              ("--outpaint", "outpaint", task is Task.OUTPAINT))
    needs = [flag for flag, key, wanted in inputs if wanted and request.get(key) is None]
    if needs:
        strength = png.kwargs.get("strength")
        made = f"{task.value}" + (f" (Denoising strength {strength:g})" if strength is not None else "")
        raise InvalidInput(f"{path} was made by {made}: pass {' and '.join(needs)} to regenerate it")
    notes = list(png.notes)
    if png.model_hash and manifest.model_hash and png.model_hash.lower() != manifest.model_hash:
        notes.append(f"{path} was made with model hash {png.model_hash}"
                        f"{f' ({png.model})' if png.model else ''}, this artifact's is {manifest.model_hash}"
                        f"{f' ({manifest.model_name})' if manifest.model_name else ''}: the image will differ")
    return notes


def run_generate(args: argparse.Namespace) -> int:
    from sdrt.engines.manifest import read_manifest
    from sdrt.runtime.images import output_paths

    if args.prompt is None and args.from_png is None:
        # argparse's own wording, from when --prompt was a required flag
        raise InvalidInput("the following arguments are required: --prompt (or --from-png IMAGE.png, whose prompt "
                           "is used)")
    backend, options = backend_request(args)
    folder = artifact_folder(args.artifact_dir)
    manifest = read_manifest(folder)   # fail fast on a missing or incomplete folder
    png = png_settings(args.from_png, args) if args.from_png is not None else None
    request = generation_request(args, png.kwargs if png else None)
    notes = check_png_fits(args.from_png, png, request, manifest) if png else []
    check_request(request, manifest.shape.batch)
    paths = output_paths(args.out, manifest.shape.batch)
    refuse_existing(paths, args.force)   # before minutes of work, not after
    check_folder_for(args.out)
    for note in notes:
        print(f"sdrt {args.command}: warning: {note}", file=sys.stderr)
    refiner = artifact_folder(args.refiner) if args.refiner is not None else None
    generate_and_save(folder, backend, options, request, paths, command=args.command, refiner=refiner,
                      high_noise_frac=args.high_noise_frac)
    return 0


def check_request(request: Mapping[str, Any], batch: int) -> None:
    """Validate the settings before loading engines, so a typo costs no load time.
    The pipeline validates them again (it is also an API entry point)."""
    r = request
    # Without --scheduler the options belong to the checkpoint's own sampler: they are
    # checked against it by Artifact.request, still before loading.
    GenerationConfig.create(r["prompt"], r["negative_prompt"],
                            DEFAULT_STEPS if r["steps"] is None else r["steps"],
                            DEFAULT_GUIDANCE if r["guidance"] is None else r["guidance"],
                            "euler" if r["scheduler"] is None else r["scheduler"], r["seed"],
                            batch=batch, generator=r["generator"],
                            scheduler_options=None if r["scheduler"] is None else r.get("scheduler_options"),
                            clip_skip=r.get("clip_skip"), cache_interval=r.get("cache_interval", 1),
                            cache_uniform=r.get("cache_uniform", True), cache_center=r.get("cache_center"),
                            cache_pow=r.get("cache_pow"))


def generate_and_save(folder: Path, backend: str, options: Mapping[str, Any], request: Mapping[str, Any],
                      paths: list[Path], command: str, progress: Progress | None = None,
                      refiner: Path | None = None, high_noise_frac: float = 0.8) -> None:
    """Load the pipeline (and a refiner's), generate, write the PNGs (atomically) and
    print the timings."""
    from sdrt.runtime.artifact import Artifact
    from sdrt.runtime.images import write_pngs
    from sdrt.runtime.pipeline import Pipeline, refine_requests

    progress = progress or Progress()
    artifact = Artifact.open(folder)
    refiner_artifact = Artifact.open(refiner) if refiner is not None else None
    # Every setting, the sampler and the input images are checked here, before engines load.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if refiner_artifact is None:
            prepared = artifact.request(**request)
        else:
            kwargs = {k: v for k, v in request.items() if k != "prompt"}
            prepared, _ = refine_requests(artifact, refiner_artifact, request["prompt"], high_noise_frac, kwargs)
    _print_warnings(caught, command)     # e.g. the checkpoint's scheduler class is not followed
    progress.say(f"loading {folder}" + (f" and the refiner {refiner}" if refiner else ""))
    pipe = Pipeline.load(artifact, backend=backend, **options)
    refiner_pipe = Pipeline.load(refiner_artifact, backend=backend, **options) if refiner_artifact else None
    if pipe.backend_reason:
        print(f"sdrt {command}: {pipe.backend_reason}", file=sys.stderr)
    try:
        cached = [e.cached for e in pipe.engines.values()]
        how = ("optimized graphs from the cache" if all(cached) else
               "graphs optimized now; later loads reuse them" if any(c is False for c in cached) else "")
        steps = prepared.config.steps
        progress.say(f"loaded{f' ({how})' if how else ''}; generating {steps} steps")
        every = max(1, steps // 5)

        def on_step(i: int, n: int) -> None:
            if i % every == 0 or i == n:
                progress.say(f"U-Net call {i}/{n}")

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if refiner_pipe is None:
                result = pipe.run(prepared, on_step=on_step)
            else:
                result = pipe.refine(refiner_pipe, request["prompt"], high_noise_frac, on_step=on_step,
                                     **{k: v for k, v in request.items() if k != "prompt"})
        _print_warnings(caught, command)     # e.g. a truncated prompt
        c = result.config
        with writing_into(paths[0].parent):
            # Each image's own text: batch items differ in it only by their seeds (--seed A,B).
            write_pngs(paths, result.images, force=True)   # existence was checked up front
    finally:
        pipe.close()
        if refiner_pipe is not None:
            refiner_pipe.close()
    report_flagged(result.nsfw_content_detected, paths, command)
    print(format_timings(result.timings, c.steps, c.scheduler, ", ".join(map(str, c.seeds or (result.seed,)))))
    for path in paths:
        print(f"wrote {path}")


def _seed_arg(text: str) -> int | list[int]:
    """--seed: one integer, or comma-separated integers (one per batch item); their
    range and count are checked with the other settings (GenerationConfig.create)."""
    seeds = []
    for part in text.split(","):
        try:
            seeds.append(int(part))
        except ValueError:   # argparse's wording for type=int, and where in a list
            where = f" in {text!r} (SEED or SEED,SEED,...: one per batch item)" if "," in text else ""
            raise argparse.ArgumentTypeError(f"invalid int value: {part!r}{where}") from None
    return seeds if len(seeds) > 1 else seeds[0]


def report_flagged(flags: list[bool] | None, paths: list[Path], command: str) -> None:
    """One stderr line naming the batch items the safety checker flagged (written black)."""
    flagged = [i for i, f in enumerate(flags or ()) if f]
    if flagged:
        items = ", ".join(f"{i} ({paths[i]})" for i in flagged)
        print(f"sdrt {command}: safety checker: potential NSFW content in batch item{'s' * (len(flagged) > 1)} "
              f"{items}: written as black images; try another prompt or seed (--no-safety-checker turns the "
              f"checker off)", file=sys.stderr)


def _print_warnings(caught: list, command: str) -> None:
    for w in caught:   # one line for a user, not a source listing
        print(f"sdrt {command}: warning: {w.message}", file=sys.stderr)


def refuse_existing(paths: list[Path], force: bool) -> None:
    if force:
        return
    for path in paths:
        if path.exists():
            raise AlreadyExists(f"{path} already exists; pass --force to overwrite it")


def format_timings(t: Any, steps: int, scheduler: str, seed: int | str) -> str:
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
