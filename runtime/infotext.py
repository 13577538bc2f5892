"""AUTOMATIC1111's "infotext", the PNG `parameters` text: written for every image, and
read back to regenerate one (`sdrt generate --from-png`).

The format is the web UI's (modules/processing.py `create_infotext`, parsed by
modules/infotext_utils.py `parse_generation_parameters`), which ComfyUI, InvokeAI,
civitai, sd-parsers and image viewers read:

    a watercolor fox
    Negative prompt: blurry
    Steps: 25, Sampler: Euler a, Schedule type: Uniform, CFG scale: 7.5, Seed: 42, Size: 512x512, Model hash: 0123456789, Model: sd15, Clip skip: 2, RNG: CPU, Version: sdrt 0.1.0

The prompt may span lines; the last line holds `key: value` pairs in AUTOMATIC1111's
order, a value holding a comma, colon or line break JSON-quoted. `RNG: CPU` is
AUTOMATIC1111's name for torch's CPU generator, which sdrt's default generator
reproduces (`RNG: NumPy`: sdrt 0.1's generator). After AUTOMATIC1111's own keys come
sdrt's, as the web UI's extensions add theirs: `Task` (img2img, inpaint, outpaint),
`Scheduler options` (one JSON value) and `Emphasis: None` (AUTOMATIC1111's name for
prompts taken literally).
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from functools import lru_cache
from importlib import metadata
from typing import Any

from sdrt.engines.errors import InvalidInput

from .config import GenerationConfig, Task
from .controlnet import ControlSettings
from .deepcache import CacheSchedule
from .schedulers import a1111_name, canonical_name

# A1111 modules/infotext_utils.py re_param_code: `key: value` or `key: "JSON string"`.
_FIELD = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_SIZE = re.compile(r"^(\d+)x(\d+)$")
NEGATIVE = "Negative prompt:"
# sdrt generator <-> AUTOMATIC1111's "RNG" setting (modules/rng.py: randn_source).
RNG_NAMES = {"torch": "CPU", "numpy": "NumPy"}
GPU_RNG = ("GPU", "NV")   # CUDA's Philox and its NVIDIA-compatible port: not reproducible on a CPU
NO_EMPHASIS = "None"      # AUTOMATIC1111's emphasis setting that takes the prompt literally
HIRES = "Hires "          # keys of AUTOMATIC1111's hires fix, a second pass sdrt does not run


def quote(value: Any) -> str:
    """A1111's infotext_utils.quote: JSON-quoted when the value holds ',', ':' or a line
    break, so it cannot be read as more fields."""
    text = str(value)
    if "," not in text and "\n" not in text and ":" not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


def unquote(text: str) -> str:
    """A1111's infotext_utils.unquote: the inverse of `quote` (text that is not valid
    JSON is kept as it is)."""
    if len(text) < 2 or text[0] != '"' or text[-1] != '"':
        return text
    try:
        value = json.loads(text)
    except ValueError:
        return text
    return value if isinstance(value, str) else text


@lru_cache(maxsize=1)
def sdrt_version() -> str:
    try:
        return metadata.version("sdrt")
    except metadata.PackageNotFoundError:   # run from a checkout that is not installed
        return "unknown"


def _number(value: float) -> str:
    """7.0 -> "7", 7.5 -> "7.5": the shortest text that reads back as the same float."""
    value = float(value)
    return str(int(value)) if value.is_integer() and abs(value) < 2**53 else repr(value)


def parameters_text(config: GenerationConfig, width: int, height: int, model: str = "", model_hash: str = "",
                    index: int = 0, seed: bool = True, extra: Mapping[str, Any] | None = None) -> str:
    """The `parameters` text of batch item `index`, in AUTOMATIC1111's key order. The
    sampler under its AUTOMATIC1111 name and schedule type ("DPM++ 2M" + "Karras" for
    dpmpp_2m_karras; samplers AUTOMATIC1111 lacks keep their sdrt name); `Clip skip` is
    AUTOMATIC1111's count (diffusers' clip_skip + 1), written from 2 as it does.
    `Seed` is the item's own (config.seeds[index]) when each item has one; seed=False
    leaves the seed out (the caller gave the initial latents). `extra`: more
    keys before Version, as AUTOMATIC1111's extra_generation_params (e.g. "Refiner",
    "Refiner switch at")."""
    label, schedule = a1111_name(config.scheduler)
    clip_skip = config.clip_skip + 1
    fields: dict[str, Any] = {
        "Steps": config.steps,
        "Sampler": label,
        "Schedule type": schedule,
        "CFG scale": _number(config.guidance),
        "Seed": config.item_seeds[index] if seed else None,
        "Size": f"{width}x{height}",   # AUTOMATIC1111 writes width x height
        "Model hash": model_hash or None,
        "Model": model or None,
        "Denoising strength": None if config.strength is None else _number(config.strength),
        "Clip skip": clip_skip if clip_skip >= 2 else None,
        "RNG": RNG_NAMES[config.generator.value],
        # sdrt's own keys, where AUTOMATIC1111 puts its extra_generation_params
        "Task": config.task.value if config.task.takes_image else None,
        "Scheduler options": json.dumps(dict(config.scheduler_options), sort_keys=True)
                             if config.scheduler_options else None,
        "Emphasis": None if config.prompt_weighting else NO_EMPHASIS,
        "DeepCache": deepcache_text(config.deepcache),
        **controlnet_fields(config.controlnet),
        **(extra or {}),
        "Version": f"sdrt {sdrt_version()}",
    }
    line = ", ".join(f"{key}: {quote(value)}" for key, value in fields.items() if value is not None)
    negative = config.negative_prompts[index]
    negative_line = f"\n{NEGATIVE} {negative}" if negative else ""
    return f"{config.prompts[index]}{negative_line}\n{line}".strip()   # .strip() as create_infotext


def controlnet_fields(control: ControlSettings | None) -> dict[str, str]:
    """AUTOMATIC1111's ControlNet extension's entries, one per ControlNet ("ControlNet 0":
    "Module: none, Weight: 1, Resize Mode: Just Resize, Guidance Start: 0, Guidance End: 1",
    its words for an image used as given and stretched to the size), plus diffusers'
    guess mode, which the extension has no exact word for; none without a control image."""
    if control is None:
        return {}
    return {f"ControlNet {k}": f"Module: none, Weight: {_number(w)}, Resize Mode: Just Resize, "
                               f"Guidance Start: {_number(s)}, Guidance End: {_number(e)}"
                               + (", Guess Mode: True" if control.guess_mode else "")
            for k, (w, s, e) in enumerate(zip(control.scales, control.starts, control.ends))}


def deepcache_text(schedule: CacheSchedule) -> str | None:
    """"3" for a full U-Net every 3 steps; "3 non-uniform center 15 pow 1.4" for the
    reference's non-uniform schedule; None when off."""
    if not schedule.enabled:
        return None
    if schedule.uniform:
        return str(schedule.interval)
    center = "" if schedule.center is None else f" center {schedule.center}"
    return f"{schedule.interval} non-uniform{center} pow {schedule.pow:g}"


def _deepcache(text: str) -> dict[str, Any]:
    """The Pipeline arguments `deepcache_text` wrote."""
    words = text.split()
    try:
        out: dict[str, Any] = {"cache_interval": int(words[0])}
        if words[1:2] == ["non-uniform"]:
            rest = dict(zip(words[2::2], words[3::2]))
            out.update(cache_uniform=False, cache_pow=float(rest["pow"]))
            if "center" in rest:
                out["cache_center"] = int(rest["center"])
        elif len(words) > 1:
            raise ValueError(text)
    except (ValueError, IndexError, KeyError):
        raise InvalidInput(f"DeepCache: {text!r:.60} is not an interval (3) or '3 non-uniform center 15 pow 1.4'") \
            from None
    return out


@dataclass(frozen=True)
class Infotext:
    """A parameters text split as AUTOMATIC1111 splits it."""

    prompt: str
    negative_prompt: str
    fields: Mapping[str, str]   # the last line's keys, in order, values unquoted


def parse(text: str) -> Infotext:
    """A1111's parse_generation_parameters, without its UI defaults: prompt lines up to
    one starting `Negative prompt:`, negative prompt lines from there, and a last line
    of at least three `key: value` fields (otherwise the last line is prompt too)."""
    *lines, last = text.strip().split("\n")
    if len(_FIELD.findall(last)) < 3:
        lines.append(last)
        last = ""
    prompt: list[str] = []
    negative: list[str] = []
    for line in lines:
        line = line.strip()
        if line.startswith(NEGATIVE):
            negative.append(line[len(NEGATIVE):].strip())
        else:
            (negative if negative else prompt).append(line)
    return Infotext("\n".join(prompt), "\n".join(negative),
                    {key: unquote(value) for key, value in _FIELD.findall(last)})


@dataclass(frozen=True)
class Settings:
    """What a parameters text asks of a generation, for `Pipeline.__call__`."""

    kwargs: dict[str, Any]           # Pipeline.__call__ keyword arguments the text sets
    task: Task                       # what made the image; image tasks need the input image(s)
    size: tuple[int, int] | None     # (width, height)
    model: str                       # the `Model` and `Model hash` it names ("" when absent)
    model_hash: str
    notes: tuple[str, ...] = ()      # what sdrt will not reproduce (one line each)


def settings(text: str | Infotext, skip: Collection[str] = ()) -> Settings:
    """The generation a parameters text (sdrt's or AUTOMATIC1111's) describes, as
    keyword arguments of `Pipeline.__call__`: prompt, negative_prompt, steps, guidance,
    seed, scheduler and scheduler_options, clip_skip, prompt_weighting, generator, and
    for image tasks strength. Arguments the caller sets itself are named in `skip` and
    not read ("scheduler" skips the options too: they belong to the text's sampler), so
    a value sdrt cannot follow (GPU noise) is no error when it is overridden. Unknown
    keys are ignored. Raises InvalidInput naming the key and its value."""
    info = parse(text) if isinstance(text, str) else text
    f = info.fields
    task = _task(f)
    readers = {
        "prompt": lambda: info.prompt,
        "negative_prompt": lambda: info.negative_prompt or None,
        "steps": lambda: _int(f, "Steps") if "Steps" in f else None,
        "guidance": lambda: _float(f, "CFG scale") if "CFG scale" in f else None,
        "seed": lambda: _int(f, "Seed") if "Seed" in f else None,
        "scheduler": lambda: _scheduler(f) if "Sampler" in f else None,
        "scheduler_options": lambda: _options(f) if "Scheduler options" in f and "scheduler" not in skip else None,
        "clip_skip": lambda: _clip_skip(f) if "Clip skip" in f else None,
        "prompt_weighting": lambda: f.get("Emphasis") != NO_EMPHASIS,
        "generator": lambda: _generator(f.get("RNG")),
        "strength": lambda: _float(f, "Denoising strength") if task.takes_image and "Denoising strength" in f else None,
    }
    kwargs = {}
    for name, read in readers.items():
        if name not in skip and (value := read()) is not None:
            kwargs[name] = value
    if "DeepCache" in f and "cache_interval" not in skip:
        kwargs.update(_deepcache(f["DeepCache"]))
    notes = []
    emphasis = f.get("Emphasis", "Original")
    if emphasis not in ("Original", NO_EMPHASIS) and "prompt_weighting" not in skip:
        notes.append(f"Emphasis: {emphasis} is not followed: sdrt weights prompts as AUTOMATIC1111's "
                     f"default emphasis ('Original') does")
    if any(k.startswith("ControlNet ") for k in f) and "control_image" not in skip:
        notes.append("the ControlNet settings are not read back: pass the control images (--control-image) and "
                     "their settings yourself")
    if "TI hashes" in f and "embeddings" not in skip:
        notes.append(f"the image used textual-inversion embeddings ({f['TI hashes'][:80]}): pass them with "
                     f"--embedding FILE to reproduce it")
    hires = [k for k in f if k.startswith(HIRES)]
    if hires:
        notes.append(f"the hires fix ({', '.join(f'{k}: {f[k]}' for k in hires[:2])}) is not reproduced: sdrt "
                     f"generates its first pass only")
    size = None
    if "Size" in f:
        found = _SIZE.match(f["Size"])
        if not found:
            raise InvalidInput(f"Size: {f['Size']!r:.40} is not WIDTHxHEIGHT")
        size = (int(found.group(1)), int(found.group(2)))
    return Settings(kwargs, task, size, f.get("Model", ""), f.get("Model hash", ""), tuple(notes))


def _scheduler(f: Mapping[str, str]) -> str:
    try:
        return canonical_name(f["Sampler"], f.get("Schedule type"))
    except InvalidInput as e:
        raise InvalidInput(f"Sampler: {f['Sampler']!r:.60}: {e}") from None


def _options(f: Mapping[str, str]) -> dict[str, Any]:
    try:
        options = json.loads(f["Scheduler options"])
    except ValueError:
        options = None
    if not isinstance(options, dict):
        raise InvalidInput(f"Scheduler options: {f['Scheduler options']!r:.80} is not a JSON object")
    return options


def _clip_skip(f: Mapping[str, str]) -> int:
    layers = _int(f, "Clip skip")
    if layers < 1:
        raise InvalidInput(f"Clip skip: {layers} must be 1 or more (AUTOMATIC1111 counts the last layer as 1)")
    return layers - 1


def _task(f: Mapping[str, str]) -> Task:
    """sdrt's `Task`; for AUTOMATIC1111's images: inpainting writes `Mask blur`, img2img
    `Denoising strength` (which txt2img writes too, for its hires fix)."""
    if "Task" in f:
        try:
            return Task(f["Task"])
        except ValueError:
            raise InvalidInput(f"Task: {f['Task']!r:.40} is not one of {', '.join(t.value for t in Task)}") from None
    if "Mask blur" in f:
        return Task.INPAINT
    if "Denoising strength" in f and not any(k.startswith(HIRES) for k in f):
        return Task.IMAGE_TO_IMAGE
    return Task.TEXT_TO_IMAGE


def _generator(rng: str | None) -> str:
    # AUTOMATIC1111 leaves RNG out for its default, GPU (parse_generation_parameters).
    name = "GPU" if rng is None else rng
    for generator, label in RNG_NAMES.items():
        if name == label:
            return generator
    absent = " (AUTOMATIC1111's default when no RNG is recorded)" if rng is None else ""
    if name in GPU_RNG:
        raise InvalidInput(f"RNG: {name}{absent}: the image's noise came from a GPU generator, which sdrt cannot "
                           f"reproduce; set the generator yourself (--generator torch) to generate from these "
                           f"settings with CPU noise, a different image")
    raise InvalidInput(f"RNG: {name!r:.40} is not a generator sdrt knows ({', '.join(RNG_NAMES.values())})")


def _int(f: Mapping[str, str], key: str) -> int:
    try:
        return int(f[key].strip())
    except ValueError:
        raise InvalidInput(f"{key}: {f[key]!r:.40} is not an integer") from None


def _float(f: Mapping[str, str], key: str) -> float:
    try:
        return float(f[key].strip())
    except ValueError:
        raise InvalidInput(f"{key}: {f[key]!r:.40} is not a number") from None
