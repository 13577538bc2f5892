"""Ancestral sampling of DDPM (Ho et al. 2020, "Denoising Diffusion Probabilistic
Models", eq. 6-7 and Algorithm 2), following diffusers' `DDPMScheduler`
(scheduling_ddpm.py) step for step.

Each step draws x_{t'} from the posterior q(x_{t'} | x_t, x0) of the forward process
given the model's x0, where t' is the next timestep of the schedule (with fewer steps
than training timesteps the "one step" spans several: the alphas are those of t and t',
as diffusers' `previous_timestep` makes them for every spacing). The posterior mean is
eq. 7's; the noise added has the variance `variance_type` names, and no noise is drawn
at t = 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from sdrt.engines.errors import InvalidInput

from . import parametrization as param
from . import spacing, tables
from .base import SamplerRecord, f32, resolve, timesteps_problem, unsupported

F32 = np.float32

DEFAULTS = dict(
    num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
    trained_betas=None, variance_type="fixed_small", clip_sample=True, prediction_type="epsilon",
    thresholding=False, dynamic_thresholding_ratio=0.995, clip_sample_range=1.0,
    sample_max_value=1.0, timestep_spacing="leading", steps_offset=0, rescale_betas_zero_snr=False,
)
VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large")


def _check_variance_type(cfg: dict, name: str) -> None:
    v = cfg["variance_type"]
    if v in ("learned", "learned_range"):
        raise InvalidInput(f"scheduler {name!r}: variance_type={v!r} needs a U-Net that also predicts the "
                           f"variance (twice the latent channels), which Stable Diffusion's does not; "
                           f"accepted: {', '.join(map(repr, VARIANCE_TYPES))}")
    if v == "fixed_large_log":
        # diffusers returns log(beta_t) and then takes its square root as the std, so every
        # step with noise is NaN there (scheduling_ddpm.py, step() and _get_variance).
        raise InvalidInput(f"scheduler {name!r}: variance_type='fixed_large_log' makes diffusers' "
                           f"DDPMScheduler take the square root of log(beta_t) < 0 (NaN); "
                           f"accepted: {', '.join(map(repr, VARIANCE_TYPES))}")
    unsupported(cfg, name, variance_type=VARIANCE_TYPES)


def noise_std(a_t: np.ndarray, a_prev: np.ndarray, variance_type: str) -> np.ndarray:
    """The std of the noise added at each step (diffusers' `_get_variance`, float32):
    "fixed_small" is the posterior variance beta~_t = (1 - a_prev) / (1 - a_t) * beta_t
    (Ho et al. eq. 7), "fixed_large" is beta_t (both are Ho et al.'s sigma_t^2 choices,
    sec. 3.2); "fixed_small_log" is beta~_t through exp(0.5 log), as Glide computes it."""
    beta = F32(1) - a_t / a_prev
    if variance_type == "fixed_large":
        return np.sqrt(beta)
    var = np.maximum((F32(1) - a_prev) / (F32(1) - a_t) * beta, F32(1e-20))
    if variance_type == "fixed_small_log":
        return np.exp(F32(0.5) * np.log(var))
    return np.sqrt(var)


@dataclass(frozen=True, eq=False)
class DDPM(SamplerRecord):
    cfg: dict
    alpha: np.ndarray        # sqrt(alpha_bar_t) of call i: VP level, for x0 and add_noise
    sigma: np.ndarray        # sqrt(1 - alpha_bar_t)
    c_x0: np.ndarray         # eq. 7's posterior-mean weight of x0
    c_x: np.ndarray          # ... and of x_t
    std: np.ndarray          # std of the fresh noise (used where draws is True)
    draws: np.ndarray        # bool: t > 0, where diffusers draws noise
    alpha_bar: np.ndarray    # alpha_bar_t (a zero one cannot take an epsilon prediction)

    def step(self, state: Any, i: int, x: np.ndarray, model_output: np.ndarray,
             noise: np.ndarray | None = None) -> tuple[np.ndarray, Any]:
        x, out = f32(x), f32(model_output)
        x0 = param.vp_x0(self.cfg["prediction_type"], x, out, self.alpha[i], self.sigma[i])
        x0 = tables.clip_or_threshold(x0, self.cfg)
        mean = self.c_x0[i] * x0 + self.c_x[i] * x
        if not self.draws[i]:
            return mean, None
        return mean + self.std[i] * f32(noise), None

    def draws_noise(self, i: int) -> bool:
        return bool(self.draws[i])

    def schedule_problem(self) -> str | None:
        problem = timesteps_problem(self.timesteps, self.cfg["num_train_timesteps"])
        if problem is None and self.cfg["prediction_type"] == "epsilon" and not np.all(self.alpha_bar > 0):
            t = self.timesteps[int(np.argmin(self.alpha_bar > 0))]
            # Zero terminal SNR: x0 = (x - sigma eps) / 0 there (Lin et al. 2023, sec. 3.2:
            # such a schedule needs v-prediction).
            problem = (f"alpha_bar is 0 at timestep {t:g} (zero terminal SNR), where an epsilon "
                       f"prediction divides by zero (it needs prediction_type='v_prediction', or a "
                       f"spacing that does not start at the last training timestep)")
        return problem

    def add_noise(self, x0: np.ndarray, noise: np.ndarray, i: int) -> np.ndarray:
        return param.vp_noise(f32(x0), f32(noise), self.alpha[i], self.sigma[i])


def make(config: Mapping[str, Any], steps: int, begin: int = 0, name: str = "ddpm",
         **overrides: Any) -> DDPM:
    cfg = resolve(config, DEFAULTS, name, **overrides)
    _check_variance_type(cfg, name)
    acp = tables.alphas_cumprod(cfg)
    full = spacing.discrete(cfg["num_train_timesteps"], steps, cfg["timestep_spacing"], cfg["steps_offset"])
    # diffusers' previous_timestep: the next entry of the schedule whatever the spacing,
    # -1 (alpha_bar = 1) after the last; a part-way run keeps the whole schedule's.
    prev = np.concatenate([full[1:], [-1]])[begin:]
    t = full[begin:]
    # A timestep past the table is refused by schedule_problem; index safely until then.
    a_t = tables.alpha_bar_at(acp, t, F32(1))
    a_prev = tables.alpha_bar_at(acp, prev, F32(1))
    b_t, b_prev = F32(1) - a_t, F32(1) - a_prev
    alpha_step = a_t / a_prev                                       # alpha_t of the span t' -> t
    # A timestep below 0 has b_t = 0: not finite, and refused by schedule_problem.
    with np.errstate(divide="ignore", invalid="ignore"):
        # Ho et al. eq. 7: mu~ = sqrt(a_prev) beta_t / (1 - a_t) x0 + sqrt(alpha_t) (1 - a_prev) / (1 - a_t) x_t
        c_x0 = (np.sqrt(a_prev) * (F32(1) - alpha_step)) / b_t
        c_x = np.sqrt(alpha_step) * b_prev / b_t
        std = noise_std(a_t, a_prev, cfg["variance_type"])
    return DDPM(name=name, timesteps=t.astype(F32), init_noise_sigma=1.0,
                stochastic=bool(np.any(t > 0)), begin_index=begin, cfg=cfg,
                alpha=np.sqrt(a_t), sigma=np.sqrt(b_t), c_x0=c_x0.astype(F32), c_x=c_x.astype(F32),
                std=std.astype(F32), draws=t > 0, alpha_bar=a_t)
