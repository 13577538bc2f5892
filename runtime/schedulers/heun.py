"""Heun's second-order sampler on the probability-flow ODE of Karras et al. 2022
("Elucidating the Design Space of Diffusion-Based Generative Models", Alg. 1 without
churn; k-diffusion's `sample_heun`), following diffusers' `HeunDiscreteScheduler`.

Each step from sigma_k to sigma_{k+1} evaluates the U-Net twice: an Euler predictor
at sigma_k, then a correction at sigma_{k+1} that averages the two slopes (the
trapezoidal rule). The last step, down to sigma = 0, is a plain Euler step, so n steps
make 2n - 1 U-Net calls. As in diffusers every call is one `step(state, i, ...)`: the
timesteps list has one entry per call ([t_0, t_1, t_1, t_2, t_2, ...]) and the state
between the two calls of a step carries the predictor's slope and starting sample.

`step_schedule` (the per-step timesteps and sigmas before they are interleaved) is
shared with KDPM2 (`kdpm2.py`), whose `set_timesteps` builds them the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from numbers import Real
from typing import Any, ClassVar, Mapping

import numpy as np

from sdrt.engines.errors import InvalidInput

from . import parametrization as param
from . import spacing, tables
from .base import SamplerRecord, f32, hidden_config, levels_problem, resolve

F32 = np.float32

# HeunDiscreteScheduler.__init__'s keywords and defaults (diffusers 0.42.1).
DEFAULTS = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="linear",
    trained_betas=None, prediction_type="epsilon", use_karras_sigmas=False,
    use_exponential_sigmas=False, use_beta_sigmas=False, clip_sample=False, clip_sample_range=1.0,
    timestep_spacing="linspace", steps_offset=0,
)


def _ramp_bounds(config: Mapping[str, Any], sig: np.ndarray, name: str) -> tuple[float, float]:
    """(sigma_min, sigma_max) of a sigma ramp. Heun's and KDPM2's `_convert_to_*` read
    `self.config.sigma_min` / `sigma_max` when the config has them, though neither is
    a keyword of these classes: `from_config` keeps every key of the checkpoint's
    config (but those listed in `_use_default_values`) as a hidden config attribute.
    Otherwise the ends of the spaced schedule."""
    config = hidden_config(config)
    out = []
    for key, fallback in (("sigma_min", sig[-1].item()), ("sigma_max", sig[0].item())):
        value = config.get(key)
        if value is None:
            out.append(fallback)
            continue
        if isinstance(value, bool) or not isinstance(value, Real) or not 0 < value < float("inf"):
            raise InvalidInput(f"scheduler {name!r}: the config's {key} must be a positive number "
                               f"(it bounds the sigma ramp), got {value!r:.40}")
        out.append(float(value))
    return out[0], out[1]


def step_schedule(config: Mapping[str, Any], cfg: dict, steps: int,
                  name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(timesteps, sigmas, log_sigmas) of the `steps` steps, before diffusers repeats
    them per call: timesteps float32 from the spacing or, on a sigma ramp, float64
    fractional ones from the ramp's sigmas (k-diffusion's `sigma_to_t`); sigmas float64
    (np.interp of the training sigmas, or the ramp); log_sigmas float32, the training
    table `sigma_to_t` interpolates in (scheduling_heun_discrete.py, set_timesteps)."""
    full = tables.sigmas_from_alphas_cumprod(tables.alphas_cumprod(cfg))
    log_sigmas = np.log(full)
    t = spacing.fractional(cfg["num_train_timesteps"], steps, cfg["timestep_spacing"], cfg["steps_offset"])
    sig = np.interp(t, np.arange(0, len(full)), full)
    kind = tables.ramp_kind(cfg)
    if kind is not None:
        lo, hi = _ramp_bounds(config, sig, name)
        sig = tables.sigma_ramp(kind, lo, hi, steps)
        t = tables.sigma_to_t(sig, log_sigmas)
    return t, sig, log_sigmas


def per_call(values: np.ndarray) -> np.ndarray:
    """[v_0, v_1, v_1, v_2, v_2, ...]: the first entry once, every later one twice, as
    diffusers interleaves the tables of its two-call samplers (`repeat_interleave(2)`)."""
    return np.concatenate([values[:1], np.repeat(values[1:], 2)])


def init_sigma(sigmas: np.ndarray, timestep_spacing: str) -> float:
    """Std of the initial latents: sigma_max, or sqrt(sigma_max^2 + 1) with "leading"
    spacing (diffusers' `init_noise_sigma` of the Karras-family schedulers)."""
    top = sigmas.max()
    return float(top if timestep_spacing in ("linspace", "trailing") else (top ** 2 + F32(1)) ** 0.5)


def frozen(x: np.ndarray) -> np.ndarray:
    """A read-only copy of x: what the state between the two calls of a step keeps, so a
    caller that edits its latents in place cannot change a state it was handed."""
    x = x.copy()
    x.flags.writeable = False
    return x


def two_call_problem(timesteps: np.ndarray, levels: np.ndarray, num_train: int) -> str | None:
    """What is wrong with a two-call schedule, or None. Its U-Net timesteps repeat on
    purpose, so only their range is checked; the noise level at the start of each step
    must be positive, finite and strictly descending (a repeat means a step that does
    not move: leading spacing with steps_offset at 1000 steps asks for t = 1000)."""
    t = np.asarray(timesteps, dtype=np.float64)
    if t.size and t.max() > num_train - 1:
        return f"its timesteps reach {t.max():g}, past the {num_train} training timesteps"
    if t.size and t.min() < 0:
        return f"its timesteps reach {t.min():g}, below 0"
    if not np.all(np.isfinite(levels)):
        return levels_problem(levels)
    if levels.size and levels.min() <= 0:
        return "its noise levels reach 0 before the last step"
    if np.any(np.diff(levels) > 0):
        # A ramp whose sigma_min (from the config) is above its sigma_max.
        k = int(np.argmax(np.diff(levels) > 0))
        return f"its noise levels rise (sigma={levels[k]:.6g} at step {k}, {levels[k + 1]:.6g} at step {k + 1})"
    return levels_problem(levels)


@dataclass(frozen=True, eq=False)
class Heun(SamplerRecord):
    order: ClassVar[int] = 2
    cfg: dict
    sigmas: np.ndarray       # float32 (n_calls + 1,): the noise level of call i's input, 0 at the end
    dt: np.ndarray           # float32 (n_calls,): sigma_{k+1} - sigma_k of the step call i belongs to

    def _corrects(self, i: int) -> bool:
        # Calls alternate predictor / corrector from the start of the whole schedule
        # (a part-way start skips whole steps, so begin_index is even).
        return (self.begin_index + i) % 2 == 1

    def init_state(self) -> Any:
        return None

    def scale_model_input(self, x: np.ndarray, i: int) -> np.ndarray:
        return f32(x) / ((self.sigmas[i] ** 2 + 1) ** 0.5)

    def step(self, state: Any, i: int, x: np.ndarray, model_output: np.ndarray,
             noise: np.ndarray | None = None) -> tuple[np.ndarray, Any]:
        x, out = f32(x), f32(model_output)
        sigma = self.sigmas[i]
        denoised = tables.clip_or_threshold(param.ve_x0(self.cfg["prediction_type"], x, out, sigma), self.cfg)
        derivative = (x - denoised) / sigma          # dx/dsigma of the probability-flow ODE
        if not self._corrects(i):
            # Euler predictor; its slope and starting point wait for the correction.
            derivative.flags.writeable = False          # a new array: only x needs a copy
            return x + derivative * self.dt[i], (derivative, frozen(x))
        first_derivative, start = state
        # Trapezoidal correction from the step's start (Karras et al. 2022, Alg. 1, l. 7-8).
        return start + ((first_derivative + derivative) / 2) * self.dt[i], None

    def add_noise(self, x0: np.ndarray, noise: np.ndarray, i: int) -> np.ndarray:
        # diffusers picks the sigma by step index once set_begin_index is called: the
        # begin index before the first call, step_index (= call i + 1) after call i. After
        # a predictor call that is sigma_{k+1}, the level the correction evaluates at.
        return param.ve_noise(f32(x0), f32(noise), self.sigmas[i])

    def schedule_problem(self) -> str | None:
        first = [i for i in range(len(self.timesteps)) if not self._corrects(i)]
        return two_call_problem(self.timesteps, self.sigmas[first], self.cfg["num_train_timesteps"])


def make(config: Mapping[str, Any], steps: int, begin: int = 0, name: str = "heun",
         **overrides: Any) -> Heun:
    cfg = resolve(config, DEFAULTS, name, **overrides)
    r = cfg["clip_sample_range"]
    if cfg["clip_sample"] and (isinstance(r, bool) or not isinstance(r, Real) or not 0 < r < float("inf")):
        raise InvalidInput(f"scheduler {name!r}: clip_sample_range must be a positive number, got {r!r:.40}")
    t, sig, _ = step_schedule(config, cfg, steps, name)
    sigmas = np.concatenate([sig, [0.0]]).astype(F32)
    # diffusers: sigmas [s0, s1, s1, ..., s_{n-1}, s_{n-1}, 0], timesteps [t0, t1, t1, ...].
    call_sigmas = np.concatenate([sigmas[:1], np.repeat(sigmas[1:-1], 2), sigmas[-1:]])
    timesteps = per_call(np.asarray(t)).astype(F32)
    # Both calls of step k move by sigma_{k+1} - sigma_k (the corrector reuses the
    # predictor's dt); the last step has its predictor only.
    dt = np.repeat(sigmas[1:] - sigmas[:-1], 2)[:len(timesteps)]
    return Heun(name=name, timesteps=timesteps[begin:], stochastic=False, begin_index=begin,
                init_noise_sigma=init_sigma(call_sigmas, cfg["timestep_spacing"]), cfg=cfg,
                sigmas=call_sigmas[begin:], dt=dt[begin:])
