"""What one generation asks for, validated once where it enters (STYLE.md, habit 5).

`GenerationConfig.create` takes the values a user passes to `Pipeline.__call__` or
`sdrt generate` and either returns a frozen config or raises a typed error naming
the bad value and what is accepted. Everything past this point trusts the config.
"""

from __future__ import annotations

import enum
import math
import numbers
import secrets
from dataclasses import dataclass
from typing import Any, Mapping

from sdrt.engines.errors import InvalidInput, InvalidType

from . import schedulers
from .controlnet import ControlSettings
from .deepcache import CacheSchedule

DEFAULT_STEPS = 25          # the issue's example; diffusers' own default is 50
DEFAULT_GUIDANCE = 7.5      # diffusers' StableDiffusionPipeline default
MAX_STEPS = 1000            # no SD scheduler has more training timesteps than this
MAX_GUIDANCE = 100.0        # far past any useful value; beyond it images are pure saturation
MAX_SEED = 2**64 - 1
MAX_PROMPT_CHARS = 100_000  # the tokenizer truncates at 77 tokens anyway; this stops absurd input early
# diffusers' defaults: StableDiffusionImg2ImgPipeline strength=0.8, StableDiffusionInpaintPipeline 1.0.
DEFAULT_IMG2IMG_STRENGTH = 0.8
DEFAULT_INPAINT_STRENGTH = 1.0
# StableDiffusionXLImg2ImgPipeline's and StableDiffusionXLInpaintPipeline's defaults.
SDXL_IMG2IMG_STRENGTH = 0.3
SDXL_INPAINT_STRENGTH = 0.9999


class Task(str, enum.Enum):
    """What a call does, decided by the inputs it gets."""

    TEXT_TO_IMAGE = "txt2img"
    IMAGE_TO_IMAGE = "img2img"      # an image, no mask
    INPAINT = "inpaint"             # an image and a mask (white = repaint)
    OUTPAINT = "outpaint"           # an image and canvas margins: inpaint the new area

    @property
    def takes_image(self) -> bool:
        return self is not Task.TEXT_TO_IMAGE

    @property
    def masked(self) -> bool:
        return self in (Task.INPAINT, Task.OUTPAINT)


class Generator(str, enum.Enum):
    """Where random numbers come from. TORCH (the default) reproduces
    `torch.Generator("cpu").manual_seed(seed)`, so a seed gives diffusers' image;
    NUMPY is sdrt 0.1's numpy.random.default_rng(seed), kept so seeds recorded with
    0.1 still give their images."""

    TORCH = "torch"
    NUMPY = "numpy"


@dataclass(frozen=True)
class GenerationConfig:
    prompts: tuple[str, ...]            # one per batch item
    negative_prompts: tuple[str, ...]   # one per batch item ("" = unconditional)
    steps: int
    guidance: float
    scheduler: str
    seed: int                           # with a seed per batch item: the first item's
    task: Task = Task.TEXT_TO_IMAGE
    strength: float | None = None       # image tasks: how much of the schedule runs, in (0, 1]
    generator: Generator = Generator.TORCH
    # diffusers scheduler options on top of the checkpoint's config, sorted (key, value) pairs
    scheduler_options: tuple[tuple[str, Any], ...] = ()
    # AUTOMATIC1111 attention syntax ("(word:1.2)", "[word]", BREAK); False: the text is literal
    prompt_weighting: bool = True
    # diffusers' clip_skip: condition on the hidden state this many layers before the text
    # encoder's last, through its final layer norm (0 = the last; AUTOMATIC1111's "Clip skip" - 1)
    clip_skip: int = 0
    # SDXL: the second text encoder's prompts (None: the same as prompts / negative_prompts,
    # as diffusers' `prompt_2 or prompt`), and the size and crop conditions in pixels,
    # (height, width) and (top, left); None: the artifact's (height, width) and (0, 0).
    prompts_2: tuple[str, ...] | None = None
    negative_prompts_2: tuple[str, ...] | None = None
    original_size: tuple[int, int] | None = None
    crops_coords_top_left: tuple[int, int] | None = None
    target_size: tuple[int, int] | None = None
    # SDXL base -> refiner hand-off (diffusers' "ensemble of expert denoisers"): the base
    # stops at denoising_end of the noise schedule and returns latents; the refiner
    # starts at denoising_start. The refiner's time ids carry aesthetic scores.
    denoising_start: float | None = None
    denoising_end: float | None = None
    aesthetic_score: float = 6.0              # StableDiffusionXLImg2ImgPipeline's defaults
    negative_aesthetic_score: float = 2.5
    # Whether a negative prompt was given at all (None is not ""): SDXL's
    # force_zeros_for_empty_prompt zeros the negative embeddings only when none was.
    negative_given: bool = False
    # DeepCache: the full U-Net every `interval` steps, the shallow one in between (off: 1).
    deepcache: CacheSchedule = CacheSchedule()
    # LoRAs applied for this call (runtime/loras.py), in the order given
    loras: tuple[Any, ...] = ()
    # ControlNet: the conditioning scale, guidance window and guess mode of each of the
    # artifact's ControlNets; None = no control image (a ControlNet artifact then runs its
    # U-Net with zero residuals: the base model).
    controlnet: ControlSettings | None = None
    # One seed per batch item (diffusers' list of generators, runtime/generator_list.py);
    # None: one seed, one generator for the whole batch.
    seeds: tuple[int, ...] | None = None

    @property
    def prompt(self) -> str:
        return self.prompts[0]

    @property
    def item_seeds(self) -> tuple[int, ...]:
        """Each batch item's seed: `seeds`, or the one seed for every item."""
        return self.seeds if self.seeds is not None else (self.seed,) * len(self.prompts)

    @property
    def negative_prompt(self) -> str:
        return self.negative_prompts[0]

    @classmethod
    def create(cls, prompt: Any, negative_prompt: Any, steps: Any, guidance: Any, scheduler: Any,
               seed: Any, *, batch: int, task: Task = Task.TEXT_TO_IMAGE, strength: Any = None,
               generator: Any = Generator.TORCH, scheduler_options: Any = None, prompt_weighting: Any = True,
               clip_skip: Any = None, max_clip_skip: int | None = None, prompt_2: Any = None,
               negative_prompt_2: Any = None, original_size: Any = None, crops_coords_top_left: Any = None,
               target_size: Any = None, sdxl: bool = False, denoising_start: Any = None,
               denoising_end: Any = None, aesthetic_score: Any = 6.0,
               negative_aesthetic_score: Any = 2.5, cache_interval: Any = 1, cache_uniform: Any = True,
               cache_center: Any = None, cache_pow: Any = None) -> "GenerationConfig":
        """`seed`: an int, None (random), or a list/tuple of `batch` ints, one per item;
        `scheduler`: an sdrt or AUTOMATIC1111 sampler name (see schedulers.canonical_name);
        `scheduler_options`: a mapping of the sampler's diffusers options, checked against it;
        `clip_skip`: None or 0 (no skip) to `max_clip_skip` (the text encoder's layers - 1)."""
        name = _scheduler(scheduler)
        seeds = _seeds(seed, batch)
        return cls(
            prompts=_prompts("prompt", prompt, batch, allow_none=False),
            negative_prompts=_prompts("negative_prompt", negative_prompt, batch, allow_none=True),
            negative_given=negative_prompt is not None,
            steps=_steps(steps),
            guidance=_guidance(guidance),
            scheduler=name,
            seed=_seed(seed) if seeds is None else seeds[0],
            seeds=seeds,
            task=task,
            strength=_strength(strength, task, sdxl),
            generator=_generator(generator),
            scheduler_options=_scheduler_options(name, scheduler_options),
            prompt_weighting=_flag("prompt_weighting", prompt_weighting),
            clip_skip=_clip_skip(clip_skip, max_clip_skip),
            prompts_2=_second("prompt_2", prompt_2, batch),
            negative_prompts_2=_second("negative_prompt_2", negative_prompt_2, batch),
            original_size=_pair("original_size", original_size, least=1),
            crops_coords_top_left=_pair("crops_coords_top_left", crops_coords_top_left, least=0),
            target_size=_pair("target_size", target_size, least=1),
            denoising_start=_fraction("denoising_start", denoising_start),
            denoising_end=_fraction("denoising_end", denoising_end),
            aesthetic_score=_score("aesthetic_score", aesthetic_score),
            negative_aesthetic_score=_score("negative_aesthetic_score", negative_aesthetic_score),
            deepcache=CacheSchedule.create(cache_interval, cache_uniform, cache_center, cache_pow),
        )

    @property
    def second_prompts(self) -> tuple[str, ...]:
        """What SDXL's second text encoder reads: prompt_2, else the prompt (per item)."""
        return tuple(b or a for a, b in zip(self.prompts, self.prompts_2 or self.prompts))

    @property
    def second_negative_prompts(self) -> tuple[str, ...]:
        return tuple(b or a for a, b in zip(self.negative_prompts, self.negative_prompts_2 or self.negative_prompts))

    @property
    def sdxl_settings(self) -> bool:
        """Whether any SDXL-only setting was given."""
        return any(v is not None for v in (self.prompts_2, self.negative_prompts_2, self.original_size,
                                           self.crops_coords_top_left, self.target_size, self.denoising_start,
                                           self.denoising_end))


def _prompts(name: str, value: Any, batch: int, allow_none: bool) -> tuple[str, ...]:
    if value is None and allow_none:
        return ("",) * batch     # diffusers' unconditional prompt
    if isinstance(value, str):
        items: tuple = (value,) * batch   # like diffusers' num_images_per_prompt
    elif isinstance(value, (list, tuple)):
        items = tuple(value)
        if len(items) != batch:
            raise InvalidInput(f"{name} has {len(items)} items but this artifact generates {batch} "
                               f"image(s) per call: pass one string or a list of {batch}")
    else:
        accepted = "a string, a list of strings, or None" if allow_none else "a string or a list of strings"
        raise InvalidType(f"{name} must be {accepted}, got {type(value).__name__} {_short(value)}")
    for item in items:
        if not isinstance(item, str):
            raise InvalidType(f"{name} items must be strings, got {type(item).__name__} {_short(item)}")
        if len(item) > MAX_PROMPT_CHARS:
            raise InvalidInput(f"{name} is {len(item)} characters long; at most {MAX_PROMPT_CHARS} are accepted")
        try:
            item.encode("utf-8")
        except UnicodeEncodeError as e:
            # A lone surrogate (e.g. undecodable bytes in argv): the tokenizer would fail with a bare TypeError.
            raise InvalidInput(f"{name} is not valid Unicode text: {item[e.start:e.end]!r} at position {e.start} "
                               f"(lone surrogate); pass UTF-8 text") from None
    return items


def _steps(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InvalidType(f"steps must be an integer from 1 to {MAX_STEPS}, got {type(value).__name__} {_short(value)}")
    if not 1 <= value <= MAX_STEPS:
        raise InvalidInput(f"steps must be from 1 to {MAX_STEPS}, got {_short(value)}")
    return int(value)


def _guidance(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InvalidType(f"guidance must be a number from 0 to {MAX_GUIDANCE:g}, got {type(value).__name__} {_short(value)}")
    try:
        value = float(value)
    except OverflowError:   # an int too large for a float
        raise InvalidInput(f"guidance must be a finite number from 0 to {MAX_GUIDANCE:g}, got {_short(value)}") from None
    if not math.isfinite(value) or not 0.0 <= value <= MAX_GUIDANCE:
        raise InvalidInput(f"guidance must be a finite number from 0 to {MAX_GUIDANCE:g}, got {value}")
    return value


def _scheduler(value: Any) -> str:
    if not isinstance(value, str):
        raise InvalidType(f"scheduler must be a string such as 'euler_a' or 'DPM++ 2M Karras'; got {type(value).__name__}")
    return schedulers.canonical_name(value)


def _scheduler_options(name: str, value: Any) -> tuple[tuple[str, Any], ...]:
    if value is None:
        return ()
    if not isinstance(value, Mapping):
        raise InvalidType(f"scheduler_options must be a dict of option names to values, got {type(value).__name__}")
    for key in value:
        if not isinstance(key, str):
            raise InvalidType(f"scheduler_options keys must be strings, got {type(key).__name__} {_short(key)}")
    return tuple(sorted(schedulers.check_options(name, value).items()))


MAX_CONDITION_SIDE = 65536   # SDXL size conditions: pixels, far past any trained size


def _fraction(name: str, value: Any) -> float | None:
    return None if value is None else schedulers.check_fraction(name, value)


def _score(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise InvalidType(f"{name} must be a finite number, got {type(value).__name__} {_short(value)}")
    return float(value)


def _second(name: str, value: Any, batch: int) -> tuple[str, ...] | None:
    """prompt_2 / negative_prompt_2: None, or prompts as `_prompts` takes them."""
    return None if value is None else _prompts(name, value, batch, allow_none=False)


def _pair(name: str, value: Any, least: int) -> tuple[int, int] | None:
    if value is None:
        return None
    if (not isinstance(value, (tuple, list)) or len(value) != 2
            or any(isinstance(v, bool) or not isinstance(v, numbers.Integral) for v in value)):
        raise InvalidType(f"{name} must be a pair of integers (pixels), got {_short(value)}")
    if not all(least <= v <= MAX_CONDITION_SIDE for v in value):
        raise InvalidInput(f"{name} values must be from {least} to {MAX_CONDITION_SIDE} pixels, got {_short(value)}")
    return int(value[0]), int(value[1])


def _flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise InvalidType(f"{name} must be True or False, got {type(value).__name__} {_short(value)}")
    return value


def _clip_skip(value: Any, most: int | None) -> int:
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InvalidType(f"clip_skip must be an integer (0 = no skip), got {type(value).__name__} {_short(value)}")
    if most is not None and not 0 <= value <= most:
        raise InvalidInput(f"clip_skip must be from 0 to {most} for this text encoder ({most + 1} layers), "
                           f"got {_short(value)}")
    if value < 0:
        raise InvalidInput(f"clip_skip must be 0 or more (layers skipped before the last), got {_short(value)}")
    return int(value)


def _strength(value: Any, task: Task, sdxl: bool = False) -> float | None:
    if not task.takes_image:
        if value is not None:
            raise InvalidInput("strength applies to image-to-image, inpainting and outpainting: pass an image too")
        return None
    if value is None:
        if sdxl:
            return SDXL_IMG2IMG_STRENGTH if task is Task.IMAGE_TO_IMAGE else SDXL_INPAINT_STRENGTH
        return DEFAULT_IMG2IMG_STRENGTH if task is Task.IMAGE_TO_IMAGE else DEFAULT_INPAINT_STRENGTH
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InvalidType(f"strength must be a number in (0, 1], got {type(value).__name__} {_short(value)}")
    value = float(value)
    if not 0.0 < value <= 1.0:   # NaN fails this too
        raise InvalidInput(f"strength must be in (0, 1] (0 would keep the image unchanged), got {value}")
    return value


def _generator(value: Any) -> Generator:
    if isinstance(value, Generator):
        return value
    accepted = ", ".join(g.value for g in Generator)
    if not isinstance(value, str):
        raise InvalidType(f"generator must be one of {accepted}, got {type(value).__name__}")
    try:
        return Generator(value.lower())
    except ValueError:
        raise InvalidInput(f"unknown generator {_short(value)}: choose one of {accepted}") from None


def _seed(value: Any) -> int:
    if value is None:
        return secrets.randbits(64)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InvalidType(f"seed must be an integer from 0 to 2**64-1, got {type(value).__name__} {_short(value)}")
    if not 0 <= value <= MAX_SEED:
        raise InvalidInput(f"seed must be from 0 to 2**64-1 ({MAX_SEED}), got {_short(value)}")
    return int(value)


def _seeds(value: Any, batch: int) -> tuple[int, ...] | None:
    """A seed per batch item: None unless `value` is a list or tuple."""
    if not isinstance(value, (list, tuple)):
        return None
    if len(value) != batch:
        raise InvalidInput(f"seed has {len(value)} items but this artifact generates {batch} image(s) per call: "
                           f"pass one seed or a list of {batch}, one per batch item")
    seeds = []
    for i, item in enumerate(value):
        if isinstance(item, bool) or not isinstance(item, numbers.Integral):
            raise InvalidType(f"seed[{i}] must be an integer from 0 to 2**64-1, got {type(item).__name__} "
                              f"{_short(item)} (a list of {batch} seeds, one per batch item)")
        if not 0 <= item <= MAX_SEED:
            raise InvalidInput(f"seed[{i}] must be from 0 to 2**64-1 ({MAX_SEED}), got {_short(item)} "
                               f"(a list of {batch} seeds, one per batch item)")
        seeds.append(int(item))
    return tuple(seeds)


def _short(value: Any) -> str:
    try:
        text = repr(value)
    except ValueError:   # an int past Python's 4300-digit str() limit
        return f"an integer of about {int(value.bit_length() * 0.30103)} digits"
    except Exception:    # a caller's object whose repr fails
        return f"a {type(value).__name__}"
    return text if len(text) <= 60 else text[:57] + "..."
