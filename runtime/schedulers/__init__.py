"""NumPy samplers that follow diffusers' schedulers step for step (no torch).

    from sdrt.runtime.schedulers import SCHEDULERS, make_sampler
    sampler = make_sampler("euler_a", scheduler_config, steps=25)
    x = noise * sampler.init_noise_sigma
    state = sampler.init_state()
    for i, t in enumerate(sampler.timesteps):
        out = unet(sampler.scale_model_input(x, i), t, ...)
        x, state = sampler.step(state, i, x, out, rng.standard_normal(x.shape, np.float32)
                                if sampler.stochastic else None)

`scheduler_config` is the checkpoint's scheduler_config.json as a dict, read the way
diffusers' `XScheduler.from_config` reads it (see `base.resolve`).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

from sdrt.engines.errors import InvalidInput, InvalidType

from . import ddim, dpmsolver, euler, lcm, pndm
from .base import Sampler

# Largest step count accepted: beyond the 1000 training timesteps of every SD
# checkpoint the schedules repeat timesteps, and diffusers rejects them too.
MAX_STEPS = 1000

# name -> (diffusers class it follows, constructor)
_FACTORIES: dict[str, tuple[str, Callable[..., Sampler]]] = {
    "ddim": ("DDIMScheduler", ddim.make),
    "pndm": ("PNDMScheduler", pndm.make),
    "euler": ("EulerDiscreteScheduler", euler.make_euler),
    "euler_a": ("EulerAncestralDiscreteScheduler", euler.make_euler_ancestral),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", dpmsolver.make),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler(use_karras_sigmas=True)", dpmsolver.make_karras),
    "lcm": ("LCMScheduler", lcm.make),
}

SCHEDULERS: tuple[str, ...] = tuple(_FACTORIES)
DIFFUSERS_CLASS: dict[str, str] = {k: v[0] for k, v in _FACTORIES.items()}

__all__ = ["SCHEDULERS", "DIFFUSERS_CLASS", "MAX_STEPS", "Sampler", "make_sampler"]


def make_sampler(name: str, scheduler_config: Mapping[str, Any], steps: int) -> Sampler:
    """Build the sampler `name` for `steps` denoising steps from a checkpoint's
    scheduler config. Raises InvalidInput / InvalidType naming the bad value."""
    if not isinstance(name, str):
        raise InvalidType(f"scheduler name must be a string, got {type(name).__name__}")
    if name not in _FACTORIES:
        raise InvalidInput(f"unknown scheduler {name!r}: choose one of {', '.join(SCHEDULERS)}")
    if not isinstance(scheduler_config, Mapping):
        raise InvalidType(f"scheduler_config must be a mapping (the parsed scheduler_config.json), "
                          f"got {type(scheduler_config).__name__}")
    if isinstance(steps, bool) or not isinstance(steps, int):
        raise InvalidType(f"steps must be an integer, got {steps!r} ({type(steps).__name__})")
    train = scheduler_config.get("num_train_timesteps", MAX_STEPS)
    limit = min(MAX_STEPS, train) if isinstance(train, int) and train >= 1 else MAX_STEPS
    if not 1 <= steps <= limit:
        raise InvalidInput(f"steps must be in 1..{limit}, got {steps}")
    return _FACTORIES[name][1](scheduler_config, steps, name=name)
