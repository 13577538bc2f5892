"""NumPy samplers that follow diffusers' schedulers step for step (no torch).

    from sdrt.runtime.schedulers import SCHEDULERS, make_sampler
    sampler = make_sampler("euler_a", scheduler_config, steps=25)
    x = noise * sampler.init_noise_sigma
    state = sampler.init_state()
    for i, t in enumerate(sampler.timesteps):
        out = unet(sampler.scale_model_input(x, i), t, ...)
        x, state = sampler.step(state, i, x, out, rng.standard_normal(x.shape, np.float32)
                                if sampler.stochastic else None)

Image-to-image starts part-way: `make_sampler(name, config, steps, strength=0.6)` covers
the last `int(steps * strength)` steps, and the loop above starts from
`x = sampler.add_noise(image_latents, noise, 0)`; inpainting re-noises the known region
to the next call's level after step i with `sampler.add_noise(image_latents, noise, i + 1)`.

`scheduler_config` is the checkpoint's scheduler_config.json as a dict, read the way
diffusers' `XScheduler.from_config` reads it (see `base.resolve`). The model output's
meaning (epsilon / v / sample) is in `parametrization`, the timestep lists in `spacing`,
the noise levels in `tables`.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass, field
from numbers import Real
from typing import Any, Callable, Mapping, NamedTuple

import numpy as np

from sdrt.engines.errors import InvalidInput, InvalidType

from . import names, spacing
from .base import Sampler

# Largest step count accepted: beyond the 1000 training timesteps of every SD
# checkpoint the schedules repeat timesteps, and diffusers rejects them too.
MAX_STEPS = 1000
RAMP_KEYS = tuple(f"use_{r}_sigmas" for r in names.RAMP_SUFFIXES)


@dataclass(frozen=True)
class _Entry:
    module: str                  # the module of this package that holds the sampler
    make: str                    # its constructor: make(config, steps, begin, name, **overrides)
    defaults: str                # its dict of diffusers constructor keywords and defaults
    diffusers_class: str
    order: int = 1               # diffusers' scheduler.order (U-Net calls per step)
    # Settings the name fixes whatever the checkpoint's config says; diffusers gets the
    # same ones as `from_config(config, **overrides)`.
    fixed: Mapping[str, Any] = field(default_factory=dict)

    def load(self) -> tuple[Callable[..., Sampler], Mapping[str, Any]]:
        mod = importlib.import_module(f"{__name__}.{self.module}")
        return getattr(mod, self.make), getattr(mod, self.defaults)

    @property
    def keys(self) -> tuple[str, ...]:
        """The options this sampler takes: its diffusers class's constructor keywords."""
        return tuple(self.load()[1])

    @property
    def ramps(self) -> bool:
        return RAMP_KEYS[0] in self.keys


_E = _Entry
_ENTRIES: dict[str, _Entry] = {
    "ddim": _E("ddim", "make", "DEFAULTS", "DDIMScheduler"),
    "pndm": _E("pndm", "make", "DEFAULTS", "PNDMScheduler"),
    "ddpm": _E("ddpm", "make", "DEFAULTS", "DDPMScheduler"),
    "euler": _E("euler", "make_euler", "EULER_DEFAULTS", "EulerDiscreteScheduler"),
    "euler_a": _E("euler", "make_euler_ancestral", "ANCESTRAL_DEFAULTS", "EulerAncestralDiscreteScheduler"),
    "heun": _E("heun", "make", "DEFAULTS", "HeunDiscreteScheduler", order=2),
    "lms": _E("lms", "make", "DEFAULTS", "LMSDiscreteScheduler"),
    "kdpm2": _E("kdpm2", "make_kdpm2", "DEFAULTS", "KDPM2DiscreteScheduler", order=2),
    "kdpm2_a": _E("kdpm2", "make_kdpm2_ancestral", "DEFAULTS", "KDPM2AncestralDiscreteScheduler", order=2),
    "dpmpp_2m": _E("dpmsolver", "make", "DEFAULTS", "DPMSolverMultistepScheduler",
                   fixed={"algorithm_type": "dpmsolver++"}),
    "dpmpp_2m_sde": _E("dpmsolver", "make", "DEFAULTS", "DPMSolverMultistepScheduler",
                       fixed={"algorithm_type": "sde-dpmsolver++"}),
    "dpmpp_2s": _E("singlestep", "make", "DEFAULTS", "DPMSolverSinglestepScheduler"),
    "unipc": _E("unipc", "make", "DEFAULTS", "UniPCMultistepScheduler"),
    "deis": _E("deis", "make", "DEFAULTS", "DEISMultistepScheduler"),
    "lcm": _E("lcm", "make", "DEFAULTS", "LCMScheduler"),
    "tcd": _E("tcd", "make", "DEFAULTS", "TCDScheduler"),
}


def _available(entry: _Entry) -> bool:
    try:
        entry.load()
    except ModuleNotFoundError as e:
        if e.name != f"{__name__}.{entry.module}":
            raise
        return False
    return True


# Every sampler whose module is present (a sampler lands with its module and tests).
_ENTRIES = {k: e for k, e in _ENTRIES.items() if _available(e)}

# The samplers, and every name accepted for them: each sampler that takes a sigma ramp
# also has "<name>_karras", "<name>_exponential" and "<name>_beta".
SAMPLERS: tuple[str, ...] = tuple(_ENTRIES)
SCHEDULERS: tuple[str, ...] = SAMPLERS + tuple(
    names.join(k, r) for k, e in _ENTRIES.items() if e.ramps for r in names.RAMP_SUFFIXES)


def _fixed(name: str) -> dict[str, Any]:
    """The overrides an sdrt name stands for: its sampler's fixed options and, for a
    sampler that takes sigma ramps, exactly the ramp the suffix names (none for a bare name)."""
    sampler, ramp = names.split(name)
    entry = _ENTRIES[sampler]
    fixed = dict(entry.fixed)
    if entry.ramps:
        fixed.update({f"use_{r}_sigmas": r == ramp for r in names.RAMP_SUFFIXES})
    return fixed


# name -> the diffusers class it follows, as people write it ("Cls(option=value)").
DIFFUSERS_CLASS: dict[str, str] = {}
for _name in SCHEDULERS:
    _on = {k: v for k, v in _fixed(_name).items() if v is not False}
    DIFFUSERS_CLASS[_name] = _ENTRIES[names.split(_name)[0]].diffusers_class + (
        "(" + ", ".join(f"{k}={v!r}" for k, v in _on.items()) + ")" if _on else "")

# The checkpoint's own scheduler class -> our sampler. DPM-Solver's classes pick the
# sampler by algorithm_type (see checkpoint_default).
_DEFAULT_BY_CLASS = {e.diffusers_class: k for k, e in reversed(_ENTRIES.items())}
# What runs when the checkpoint ships a class sdrt does not follow (an EDM or flow-matching
# scheduler, a custom class): Euler reads any SD scheduler config and any prediction type.
FALLBACK_SCHEDULER = "euler"

__all__ = ["SAMPLERS", "SCHEDULERS", "DIFFUSERS_CLASS", "MAX_STEPS", "Sampler", "make_sampler",
           "default_scheduler", "checkpoint_default", "diffusers_scheduler", "canonical_name",
           "option_keys", "check_options", "resolved_name", "a1111_name", "CheckpointDefault",
           "FALLBACK_SCHEDULER", "SchedulerFallback"]


class SchedulerFallback(UserWarning):
    """The checkpoint's scheduler class is not one sdrt follows; another sampler runs."""


def _check_config(scheduler_config: Any) -> None:
    if not isinstance(scheduler_config, Mapping):
        raise InvalidType(f"scheduler_config must be a mapping (the parsed scheduler_config.json), "
                          f"got {type(scheduler_config).__name__}")


def canonical_name(name: Any, schedule_type: str | None = None) -> str:
    """The sdrt name for what a user typed: an sdrt name in any case ("DPMPP_2M_Karras"),
    an AUTOMATIC1111 sampler ("DPM++ 2M Karras", "Euler a"), or an AUTOMATIC1111 sampler
    with its separate `schedule_type` ("DPM++ 2M", "Karras"). Raises InvalidInput
    listing the accepted names."""
    if not isinstance(name, str):
        raise InvalidType(f"scheduler name must be a string, got {type(name).__name__}")
    key = name.strip().lower()
    if schedule_type is None and key in SCHEDULERS:
        return key
    if schedule_type is not None and key in SAMPLERS:
        sampler, ramp = key, names._schedule(schedule_type, key)
    else:
        found = names.from_a1111(name, schedule_type)
        if found is None:
            raise InvalidInput(f"unknown scheduler {name[:60]!r}: choose one of {', '.join(SAMPLERS)} "
                               f"(add _karras, _exponential or _beta for the sigma ramps), or an "
                               f"AUTOMATIC1111 name such as 'DPM++ 2M Karras' or 'Euler a'")
        sampler, ramp = found
    if sampler not in _ENTRIES:
        raise InvalidInput(f"scheduler {name!r} ({sampler}) is not supported by sdrt; "
                           f"choose one of {', '.join(SAMPLERS)}")
    if ramp and not _ENTRIES[sampler].ramps:
        raise InvalidInput(f"scheduler {name!r}: {sampler} has no {ramp} sigma ramp "
                           f"(diffusers' {_ENTRIES[sampler].diffusers_class} has no use_{ramp}_sigmas)")
    return names.join(sampler, ramp)


def _check_name(name: Any) -> str:
    if not isinstance(name, str):
        raise InvalidType(f"scheduler name must be a string, got {type(name).__name__}")
    if name not in SCHEDULERS:
        return canonical_name(name)
    return name


def option_keys(name: str) -> tuple[str, ...]:
    """The scheduler options sampler `name` accepts (its diffusers class's keywords)."""
    return _ENTRIES[names.split(_check_name(name))[0]].keys


def check_options(name: str, options: Any) -> dict[str, Any]:
    """`options` as a dict, each key one the sampler's diffusers class takes and each value
    of that keyword's type (a bool for a bool keyword, a number for a number one)."""
    if options is None:
        return {}
    if not isinstance(options, Mapping):
        raise InvalidType(f"scheduler_options must be a mapping of option names to values, "
                          f"got {type(options).__name__}")
    entry = _ENTRIES[names.split(name)[0]]
    defaults = entry.load()[1]
    out = {}
    for key, value in options.items():
        if key not in defaults:
            raise InvalidInput(f"scheduler {name!r} ({entry.diffusers_class}) has no option {key!r}; "
                               f"it accepts: {', '.join(sorted(defaults))}")
        default = defaults[key]
        if isinstance(default, bool):
            ok = isinstance(value, bool)
        elif isinstance(default, int):
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif isinstance(default, float):
            ok = isinstance(value, Real) and not isinstance(value, bool)
        elif isinstance(default, str):
            ok = isinstance(value, str)
        else:
            ok = True
        if not ok:
            kind = type(default).__name__
            raise InvalidType(f"scheduler option {key}={value!r:.40} must be a {kind} "
                              f"(default {default!r}), got {type(value).__name__}")
        out[key] = value
    return out


def _overrides(name: str, options: Mapping[str, Any]) -> dict[str, Any]:
    return {**_fixed(name), **options}


def resolved_name(name: str, scheduler_config: Mapping[str, Any], options: Mapping[str, Any] | None = None) -> str:
    """The sdrt name of what runs: `name` with the ramp suffix the options leave on
    (`dpmpp_2m` with use_karras_sigmas=True is `dpmpp_2m_karras`)."""
    name = _check_name(name)
    sampler, _ = names.split(name)
    if not _ENTRIES[sampler].ramps:
        return name
    over = _overrides(name, check_options(name, options))
    on = [r for r in names.RAMP_SUFFIXES if over.get(f"use_{r}_sigmas", scheduler_config.get(f"use_{r}_sigmas"))]
    return names.join(sampler, on[0] if len(on) == 1 else "")


def a1111_name(name: str) -> tuple[str, str]:
    """(AUTOMATIC1111 sampler name, schedule type) for an sdrt name, for PNG metadata and
    the AUTOMATIC1111 API: ("DPM++ 2M", "Karras") for "dpmpp_2m_karras"."""
    sampler, ramp = names.split(_check_name(name))
    return names.to_a1111(sampler, ramp)


class CheckpointDefault(NamedTuple):
    name: str                        # the sampler that runs when none is asked for
    options: dict[str, Any]          # options that keep the checkpoint's algorithm
    notice: str | None               # one line when the class is not followed (a fallback)


def checkpoint_default(scheduler_config: Mapping[str, Any]) -> CheckpointDefault:
    """The sampler that follows the checkpoint's own scheduler (its `_class_name` with the
    options that tell its algorithm and sigma ramp); for a class sdrt does not follow,
    FALLBACK_SCHEDULER with a one-line notice saying so."""
    _check_config(scheduler_config)
    cls = scheduler_config.get("_class_name")
    name = _DEFAULT_BY_CLASS.get(cls)
    options: dict[str, Any] = {}
    if cls == "DPMSolverMultistepScheduler":
        algorithm = scheduler_config.get("algorithm_type", "dpmsolver++")
        name = "dpmpp_2m_sde" if algorithm in ("sde-dpmsolver++", "sde-dpmsolver") else "dpmpp_2m"
        if algorithm not in ("dpmsolver++", "sde-dpmsolver++") and name in _ENTRIES:
            options["algorithm_type"] = algorithm
    if name is None or name not in _ENTRIES:
        what = f"scheduler class {cls!r}" if isinstance(cls, str) else "a scheduler config without _class_name"
        return CheckpointDefault(FALLBACK_SCHEDULER, {}, (
            f"the checkpoint ships {what}, which sdrt does not follow; using "
            f"{FALLBACK_SCHEDULER!r} ({DIFFUSERS_CLASS[FALLBACK_SCHEDULER]}) with its config instead "
            f"(choose another with --scheduler)"))
    if _ENTRIES[name].ramps:
        on = [r for r in names.RAMP_SUFFIXES if scheduler_config.get(f"use_{r}_sigmas")]
        name = names.join(name, on[0] if on else "")
    return CheckpointDefault(name, options, None)


def default_scheduler(scheduler_config: Mapping[str, Any]) -> str:
    """The name of `checkpoint_default(scheduler_config)`."""
    return checkpoint_default(scheduler_config).name


def diffusers_scheduler(name: str, scheduler_config: Mapping[str, Any],
                        options: Mapping[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
    """(class name, overrides) of the diffusers scheduler sampler `name` follows on this
    checkpoint: `getattr(diffusers, cls).from_config(scheduler_config, **overrides)`
    steps as `make_sampler(name, scheduler_config, steps, options=options)` does."""
    name = _check_name(name)
    _check_config(scheduler_config)
    entry = _ENTRIES[names.split(name)[0]]
    return entry.diffusers_class, _overrides(name, check_options(name, options))


def _check_strength(strength: Any, steps: int, limit: int) -> int:
    """diffusers' get_timesteps start for `strength`, once the value is known to leave
    at least one step; returns t_start."""
    if isinstance(strength, bool) or not isinstance(strength, Real):
        raise InvalidType(f"strength must be a real number in (0, 1], got {strength!r:.40} "
                          f"({type(strength).__name__})")
    if not 0 < strength <= 1:     # also false for NaN
        raise InvalidInput(f"strength must be in (0, 1] (the fraction of the {steps} steps to run), "
                           f"got {strength!r}")
    t_start = spacing.strength_start(steps, strength)
    if steps - t_start < 1:
        # The smallest values that leave one step, checked with the same int() diffusers uses.
        s_min = next(k / 1000 for k in range(math.ceil(1000 / steps), 1001) if int(steps * (k / 1000)) >= 1)
        hint = f"raise strength to at least {s_min:g}"
        if int(limit * strength) >= 1:
            k_min = max(1, math.floor(1 / strength) - 1)
            while int(k_min * strength) < 1:
                k_min += 1
            hint += f" or steps to at least {k_min}"
        raise InvalidInput(f"strength {strength!r} x {steps} steps leaves no denoising step "
                           f"(int({steps} * {strength!r}) = 0): {hint}")
    return t_start


def make_sampler(name: str, scheduler_config: Mapping[str, Any], steps: int,
                 strength: float | None = None, options: Mapping[str, Any] | None = None,
                 denoising_start: float | None = None) -> Sampler:
    """Build the sampler `name` for `steps` denoising steps from a checkpoint's
    scheduler config, with `options` on top as diffusers' `from_config(config, **options)`
    takes them. With `strength` in (0, 1] (image-to-image, inpainting) it covers
    only the last `int(steps * strength)` steps of that schedule, exactly as diffusers'
    `get_timesteps` + `set_begin_index` run them; None or 1.0 is the whole schedule.
    Raises InvalidInput / InvalidType naming the bad value; a step count whose schedule
    would repeat a noise level or leave the training timesteps is refused with the
    nearest count that works. `denoising_start` in (0, 1) (SDXL's refiner, taking over
    from a base run with denoising_end) starts at the first timestep below
    (1 - denoising_start) x the training timesteps, as diffusers' SDXL get_timesteps."""
    name = _check_name(name)
    _check_config(scheduler_config)
    options = check_options(name, options)
    if isinstance(steps, bool) or not isinstance(steps, int):
        raise InvalidType(f"steps must be an integer, got {steps!r} ({type(steps).__name__})")
    train = scheduler_config.get("num_train_timesteps", MAX_STEPS)
    limit = min(MAX_STEPS, train) if isinstance(train, int) and train >= 1 else MAX_STEPS
    if not 1 <= steps <= limit:
        raise InvalidInput(f"steps must be in 1..{limit}, got {steps}")
    t_start = 0 if strength is None else _check_strength(strength, steps, limit)
    entry = _ENTRIES[names.split(name)[0]]
    make = entry.load()[0]
    over = _overrides(name, options)
    label = resolved_name(name, scheduler_config, options)

    def build(n: int, begin: int = 0) -> Sampler:
        return make(scheduler_config, n, begin, name=label, **over)

    full = build(steps)
    problem = full.schedule_problem()
    if problem:
        raise InvalidInput(_degenerate(label, steps, limit, problem, build))
    if denoising_start is not None:
        begin = _denoising_start_index(full, scheduler_config, denoising_start, entry.order)
        return full if begin == 0 else build(steps, begin)
    if t_start == 0:
        return full
    # diffusers skips t_start steps, i.e. t_start * order U-Net calls (get_timesteps).
    return build(steps, t_start * entry.order)


def _cutoff(scheduler_config: Mapping[str, Any], fraction: float) -> int:
    """diffusers' discrete_timestep_cutoff for denoising_start / denoising_end."""
    train = scheduler_config.get("num_train_timesteps", MAX_STEPS)
    return int(round(train - fraction * train))


def check_fraction(name: str, value: Any) -> float:
    """denoising_start / denoising_end: a number in (0, 1), the fraction of the noise schedule."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise InvalidType(f"{name} must be a number in (0, 1), got {value!r:.40} ({type(value).__name__})")
    if not 0 < value < 1:
        raise InvalidInput(f"{name} must be in (0, 1) (the fraction of the noise schedule), got {value!r}")
    return float(value)


def _denoising_start_index(full: Sampler, scheduler_config: Mapping[str, Any], denoising_start: Any,
                           order: int) -> int:
    """The call a refiner starts at (StableDiffusionXLImg2ImgPipeline.get_timesteps with
    denoising_start): the calls whose timestep is below the cutoff are run, one more for a
    second-order sampler whose count would be even."""
    cutoff = _cutoff(scheduler_config, check_fraction("denoising_start", denoising_start))
    n = int((np.asarray(full.timesteps) < cutoff).sum())
    if order == 2 and n % 2 == 0:
        n += 1
    if n == 0:
        raise InvalidInput(f"denoising_start {denoising_start} leaves no denoising step of the {len(full.timesteps)}")
    return len(full.timesteps) - n


def denoising_end_calls(sampler: Sampler, scheduler_config: Mapping[str, Any], denoising_end: Any) -> int:
    """How many of the sampler's calls run before `denoising_end` (SDXL base handing
    over to a refiner): those whose timestep is at or above the cutoff, as
    StableDiffusionXLPipeline filters them."""
    cutoff = _cutoff(scheduler_config, check_fraction("denoising_end", denoising_end))
    n = int((np.asarray(sampler.timesteps) >= cutoff).sum())
    if n == 0:
        raise InvalidInput(f"denoising_end {denoising_end} leaves no denoising step before the hand-off")
    return n


def _degenerate(name: str, steps: int, limit: int, problem: str, build: Callable[[int], Sampler]) -> str:
    """The refusal for a step count whose schedule is degenerate, with the nearest count
    below and above that is not. Searched by doubling the distance, then bisecting the
    last gap (about 2 log2(1000) builds each way, not 1000: a beta ramp takes ~0.1 s)."""
    def ok(n: int) -> bool:
        try:
            return not build(n).schedule_problem()
        except InvalidInput:
            return False

    def nearest(direction: int) -> int | None:
        bad, dist = steps, 1
        while True:
            n = steps + direction * dist
            n = max(1, min(limit, n))
            if n == bad:
                return None
            if ok(n):
                while abs(n - bad) > 1:          # bisect (bad, n) for the count next to the bad side
                    mid = (n + bad) // 2
                    bad, n = (bad, mid) if ok(mid) else (mid, n)
                return n
            bad, dist = n, dist * 2

    below, above = nearest(-1), nearest(+1)
    hints = [f"at most {below}" if below else "", f"at least {above}" if above else ""]
    if not any(hints):
        return f"scheduler {name!r} with {steps} steps: {problem}; no step count avoids it with this config"
    return f"scheduler {name!r} with {steps} steps: {problem}; use {' or '.join(h for h in hints if h)} steps"
