"""What every sampler exposes, and how a checkpoint's scheduler_config.json becomes
the settings of one sampler.

A sampler is a frozen record of precomputed per-call tables (read-only arrays) plus
four pure functions (`init_state`, `scale_model_input`, `step`, `add_noise`): no
mutable state lives in it, so one sampler can serve several generations or threads
at once, and randomness enters only through the `noise` arguments.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, ClassVar, Mapping, Protocol, runtime_checkable

import numpy as np

from sdrt.engines.errors import InvalidInput

from .parametrization import PREDICTION_TYPES
from .spacing import SPACINGS

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
MAX_TRAIN_TIMESTEPS = 100_000


@runtime_checkable
class Sampler(Protocol):
    name: str
    timesteps: np.ndarray        # float32 (n_calls,): the U-Net's `timestep` input at call i
    init_noise_sigma: float      # pure-noise latents = standard normal * init_noise_sigma
    stochastic: bool             # some step() calls need fresh standard-normal noise (see draws_noise)
    order: int                   # diffusers' scheduler.order: a part-way start skips t_start * order calls
    begin_index: int             # where timesteps[0] sits in the full schedule (diffusers' set_begin_index)

    def init_state(self) -> Any: ...

    def scale_model_input(self, x: np.ndarray, i: int) -> np.ndarray: ...

    def step(self, state: Any, i: int, x: np.ndarray, model_output: np.ndarray,
             noise: np.ndarray | None) -> tuple[np.ndarray, Any]: ...

    def add_noise(self, x0: np.ndarray, noise: np.ndarray, i: int) -> np.ndarray: ...

    def draws_noise(self, i: int) -> bool: ...

    def schedule_problem(self) -> str | None: ...


@dataclass(frozen=True, eq=False)
class SamplerRecord:
    """The fields every sampler has; subclasses add their per-call tables. Arrays are
    made read-only, so a sampler shared between threads cannot be changed by one."""
    name: str
    timesteps: np.ndarray
    init_noise_sigma: float
    stochastic: bool
    begin_index: int
    # U-Net calls per step as diffusers counts them (`scheduler.order`): 2 for the
    # second-order samplers that evaluate the U-Net twice per step (Heun, KDPM2); PNDM's
    # extra call is in its timesteps list, not in its order.
    order: ClassVar[int] = 1

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, np.ndarray):
                value.flags.writeable = False

    def init_state(self) -> Any:
        """The per-generation state before the first call; None for samplers without history."""
        return None

    def scale_model_input(self, x: np.ndarray, i: int) -> np.ndarray:
        """The U-Net's input at call i. VP samplers feed the latent as it is; the VE ones
        (Euler, Heun, LMS, KDPM2) rescale it to unit variance."""
        return f32(x)

    def draws_noise(self, i: int) -> bool:
        """Whether call i's step() takes fresh noise: where diffusers' step draws one
        `randn_tensor`, so a shared generator stays in step with diffusers' draws."""
        return self.stochastic

    def schedule_problem(self) -> str | None:
        """Why this schedule cannot run as diffusers would run it (a repeated noise level
        divides by zero, a timestep past the training range indexes out of its tables),
        or None. The default checks the U-Net timesteps; samplers whose levels are
        sigmas, or whose lists repeat on purpose, override it."""
        cfg = getattr(self, "cfg", None)
        return timesteps_problem(self.timesteps, cfg["num_train_timesteps"] if isinstance(cfg, dict) else None)


def timesteps_problem(t: np.ndarray, num_train: int | None = None) -> str | None:
    """A strictly descending list inside the training range, or what is wrong with it."""
    t = np.asarray(t, dtype=np.float64)
    if num_train is not None and t.size and (t.max() > num_train - 1 or t.min() < 0):
        return (f"its timesteps reach {t.max():g}, past the {num_train} training timesteps"
                if t.max() > num_train - 1 else f"its timesteps reach {t.min():g}, below 0")
    if np.any(np.diff(t) >= 0):
        k = int(np.argmax(np.diff(t) >= 0))
        return f"its schedule repeats timestep {t[k + 1]:g} (calls {k} and {k + 1})"
    return None


def levels_problem(sigmas: np.ndarray) -> str | None:
    """Noise levels (sigmas before each step) strictly descending, or what is wrong."""
    s = np.asarray(sigmas, dtype=np.float64)
    if not np.all(np.isfinite(s)):
        return "its noise levels are not finite"
    if np.any(np.diff(s) >= 0):
        k = int(np.argmax(np.diff(s) >= 0))
        return f"its schedule repeats noise level sigma={s[k + 1]:.6g} (steps {k} and {k + 1})"
    return None


def hidden_config(config: Mapping[str, Any]) -> Mapping[str, Any]:
    """The checkpoint config as diffusers' `self.config` holds it after `from_config`:
    every key, those the class does not take included, but the ones listed in
    `_use_default_values` (diffusers' extract_init_dict drops them, so the class default
    applies: a config saved from a live scheduler lists the values it never set)."""
    skip = config.get("_use_default_values") or ()
    return {k: v for k, v in config.items() if k not in skip}


def resolve(config: Mapping[str, Any], defaults: Mapping[str, Any], scheduler: str,
            prediction_types: tuple[str, ...] = PREDICTION_TYPES,
            **overrides: Any) -> dict[str, Any]:
    """The settings a diffusers `XScheduler.from_config(config, **overrides)` would use:
    keys X's constructor knows are taken from `config`, all others fall back to X's
    own defaults (so a PNDM config run through Euler gets Euler's "linspace" spacing
    unless the config names one). Values that would make diffusers fail are rejected
    here with the value and what is accepted."""
    config = hidden_config(config)
    cfg = {k: config.get(k, v) for k, v in defaults.items()}
    cfg.update(overrides)
    where = f"scheduler {scheduler!r}"

    n = cfg["num_train_timesteps"]
    # The upper bound keeps a hostile config from allocating gigabytes of tables
    # (10**9 steps asked for 7.5 GiB per table); SD checkpoints use 1000.
    if isinstance(n, bool) or not isinstance(n, int) or not 2 <= n <= MAX_TRAIN_TIMESTEPS:
        raise InvalidInput(f"{where}: num_train_timesteps must be an integer from 2 to {MAX_TRAIN_TIMESTEPS}, "
                           f"got {n!r:.40}")
    if cfg.get("trained_betas") is not None:
        try:
            tb = np.asarray(cfg["trained_betas"], dtype=np.float64)
        except (TypeError, ValueError):
            tb = np.full(1, np.nan)
        if tb.shape != (n,) or not np.all((tb > 0) & (tb < 1)):
            raise InvalidInput(f"{where}: trained_betas must be {n} values in (0, 1), "
                               f"got shape {tb.shape}")
    elif cfg["beta_schedule"] not in BETA_SCHEDULES:
        raise InvalidInput(f"{where}: unknown beta_schedule {cfg['beta_schedule']!r}; "
                           f"accepted: {', '.join(BETA_SCHEDULES)}")
    elif cfg["beta_schedule"] != "squaredcos_cap_v2":
        for key in ("beta_start", "beta_end"):
            b = cfg.get(key)
            # NaN or >= 1 here surfaced as a NaN "from the U-Net" steps later.
            if isinstance(b, bool) or not isinstance(b, (int, float)) or not 0 < b < 1:
                raise InvalidInput(f"{where}: {key} must be a number in (0, 1), got {b!r:.40}")
    if cfg["prediction_type"] not in prediction_types:
        raise InvalidInput(f"{where}: prediction_type {cfg['prediction_type']!r} is not supported; "
                           f"accepted: {', '.join(prediction_types)}")
    if "timestep_spacing" in cfg and cfg["timestep_spacing"] not in SPACINGS:
        raise InvalidInput(f"{where}: unknown timestep_spacing {cfg['timestep_spacing']!r}; "
                           f"accepted: {', '.join(SPACINGS)}")
    ramps = [k for k in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas") if cfg.get(k)]
    if len(ramps) > 1:
        raise InvalidInput(f"{where}: only one of {', '.join(ramps)} can be on")
    off = cfg.get("steps_offset", 0)
    if isinstance(off, bool) or not isinstance(off, int) or not 0 <= off < n:
        raise InvalidInput(f"{where}: steps_offset must be an integer in 0..{n - 1}, got {off!r}")
    return cfg


def unsupported(cfg: Mapping[str, Any], scheduler: str, **wanted: Any) -> None:
    """Reject config options diffusers supports but sdrt does not reimplement, rather
    than silently sampling with a different schedule."""
    for key, accepted in wanted.items():
        value = cfg.get(key)
        if value not in accepted:
            raise InvalidInput(f"scheduler {scheduler!r}: {key}={value!r} is not supported by sdrt; "
                               f"accepted: {', '.join(repr(a) for a in accepted)}")


def f32(x: np.ndarray) -> np.ndarray:
    """The latent as float32 (engines may return float16 on an fp16 build)."""
    return np.asarray(x, dtype=np.float32)
