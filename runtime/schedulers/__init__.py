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

import math
from numbers import Real
from typing import Any, Callable, Mapping, NamedTuple

from sdrt.engines.errors import InvalidInput, InvalidType

from . import ddim, dpmsolver, euler, lcm, pndm, spacing
from .base import Sampler

# Largest step count accepted: beyond the 1000 training timesteps of every SD
# checkpoint the schedules repeat timesteps, and diffusers rejects them too.
MAX_STEPS = 1000


class _Entry(NamedTuple):
    diffusers_class: str
    # Settings the name fixes whatever the checkpoint's config says; diffusers gets the
    # same ones as `from_config(config, **overrides)`.
    overrides: dict[str, Any]
    make: Callable[..., Sampler]


_ENTRIES: dict[str, _Entry] = {
    "ddim": _Entry("DDIMScheduler", {}, ddim.make),
    "pndm": _Entry("PNDMScheduler", {}, pndm.make),
    "euler": _Entry("EulerDiscreteScheduler", {}, euler.make_euler),
    "euler_a": _Entry("EulerAncestralDiscreteScheduler", {}, euler.make_euler_ancestral),
    # The two DPM-Solver++ names differ only in the sigma ramp, so each names its own:
    # "dpmpp_2m" on a checkpoint whose config asks for Karras sigmas is still the plain one.
    "dpmpp_2m": _Entry("DPMSolverMultistepScheduler", {"use_karras_sigmas": False}, dpmsolver.make),
    "dpmpp_2m_karras": _Entry("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}, dpmsolver.make),
    "lcm": _Entry("LCMScheduler", {}, lcm.make),
}

SCHEDULERS: tuple[str, ...] = tuple(_ENTRIES)
# name -> the diffusers class it follows, as people write it ("Cls(option=value)").
DIFFUSERS_CLASS: dict[str, str] = {
    k: e.diffusers_class + ("(" + ", ".join(f"{o}={v!r}" for o, v in e.overrides.items() if v) + ")"
                            if any(e.overrides.values()) else "")
    for k, e in _ENTRIES.items()
}

# The checkpoint's own scheduler class -> our sampler name; unknown classes fall back
# to PNDM, the SD 1.x default.
_DEFAULT_BY_CLASS = {
    "PNDMScheduler": "pndm",
    "DDIMScheduler": "ddim",
    "EulerDiscreteScheduler": "euler",
    "EulerAncestralDiscreteScheduler": "euler_a",
    "DPMSolverMultistepScheduler": "dpmpp_2m",
    "LCMScheduler": "lcm",
}
FALLBACK_SCHEDULER = "pndm"

__all__ = ["SCHEDULERS", "DIFFUSERS_CLASS", "MAX_STEPS", "Sampler", "make_sampler",
           "default_scheduler", "diffusers_scheduler"]


def _check_config(scheduler_config: Any) -> None:
    if not isinstance(scheduler_config, Mapping):
        raise InvalidType(f"scheduler_config must be a mapping (the parsed scheduler_config.json), "
                          f"got {type(scheduler_config).__name__}")


def _check_name(name: Any) -> None:
    if not isinstance(name, str):
        raise InvalidType(f"scheduler name must be a string, got {type(name).__name__}")
    if name not in _ENTRIES:
        raise InvalidInput(f"unknown scheduler {name!r}: choose one of {', '.join(SCHEDULERS)}")


def default_scheduler(scheduler_config: Mapping[str, Any]) -> str:
    """The sampler that follows the checkpoint's own scheduler (its `_class_name`;
    DPM-Solver with use_karras_sigmas is "dpmpp_2m_karras"); "pndm" for a class sdrt
    does not follow."""
    _check_config(scheduler_config)
    name = _DEFAULT_BY_CLASS.get(scheduler_config.get("_class_name"), FALLBACK_SCHEDULER)
    if name == "dpmpp_2m" and scheduler_config.get("use_karras_sigmas"):
        name = "dpmpp_2m_karras"
    return name


def diffusers_scheduler(name: str, scheduler_config: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """(class name, overrides) of the diffusers scheduler sampler `name` follows on this
    checkpoint: `getattr(diffusers, cls).from_config(scheduler_config, **overrides)`
    steps as `make_sampler(name, scheduler_config, steps)` does."""
    _check_name(name)
    _check_config(scheduler_config)
    entry = _ENTRIES[name]
    return entry.diffusers_class, dict(entry.overrides)


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
                 strength: float | None = None) -> Sampler:
    """Build the sampler `name` for `steps` denoising steps from a checkpoint's
    scheduler config. With `strength` in (0, 1] (image-to-image, inpainting) it covers
    only the last `int(steps * strength)` steps of that schedule, exactly as diffusers'
    `get_timesteps` + `set_begin_index` run them; None or 1.0 is the whole schedule.
    Raises InvalidInput / InvalidType naming the bad value."""
    _check_name(name)
    _check_config(scheduler_config)
    if isinstance(steps, bool) or not isinstance(steps, int):
        raise InvalidType(f"steps must be an integer, got {steps!r} ({type(steps).__name__})")
    train = scheduler_config.get("num_train_timesteps", MAX_STEPS)
    limit = min(MAX_STEPS, train) if isinstance(train, int) and train >= 1 else MAX_STEPS
    if not 1 <= steps <= limit:
        raise InvalidInput(f"steps must be in 1..{limit}, got {steps}")
    t_start = 0 if strength is None else _check_strength(strength, steps, limit)
    entry = _ENTRIES[name]
    # Every followed scheduler has order 1, so the begin index is t_start calls.
    return entry.make(scheduler_config, steps, t_start, name=name, **entry.overrides)
