"""Latent Consistency Model multistep sampling (Luo et al. 2023, "Latent Consistency
Models", Alg. 1 / eq. 6 boundary-condition scalings), following diffusers' `LCMScheduler`.

Each step maps x_t straight to a denoised estimate with the consistency function
f(x, t) = c_skip(t) x + c_out(t) x0(x, t), then re-noises it to the next timestep with
fresh noise, so every step but the last is stochastic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from sdrt.engines.errors import InvalidInput

from . import parametrization as param
from . import spacing, tables
from .base import SamplerRecord, f32, resolve

F32 = np.float32

DEFAULTS = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    trained_betas=None, original_inference_steps=50, clip_sample=False, clip_sample_range=1.0,
    set_alpha_to_one=True, steps_offset=0, prediction_type="epsilon", thresholding=False,
    dynamic_thresholding_ratio=0.995, sample_max_value=1.0, timestep_spacing="leading",
    timestep_scaling=10.0, rescale_betas_zero_snr=False,
)
SIGMA_DATA = 0.5   # the consistency-model data std (Song et al. 2023, "Consistency Models", sec. 5)


def _check_steps(cfg: dict, n: int, name: str) -> None:
    T, orig = cfg["num_train_timesteps"], cfg["original_inference_steps"]
    if isinstance(orig, bool) or not isinstance(orig, int) or not 1 <= orig <= T:
        raise InvalidInput(f"scheduler {name!r}: original_inference_steps must be an integer in 1..{T}, "
                           f"got {orig!r}")
    if n > orig:
        raise InvalidInput(f"scheduler {name!r} supports at most original_inference_steps={orig} steps, got {n}")


@dataclass(frozen=True, eq=False)
class LCM(SamplerRecord):
    cfg: dict
    alpha_t: np.ndarray
    alpha_prev: np.ndarray
    c_skip: np.ndarray
    c_out: np.ndarray
    noise_alpha: np.ndarray  # VP (alpha, sigma) of call i's timestep, for add_noise
    noise_sigma: np.ndarray

    def step(self, state: Any, i: int, x: np.ndarray, model_output: np.ndarray,
             noise: np.ndarray | None = None) -> tuple[np.ndarray, Any]:
        x, out = f32(x), f32(model_output)
        a_t, a_prev = self.alpha_t[i], self.alpha_prev[i]
        b_t = F32(1) - a_t
        x0 = param.vp_x0(self.cfg["prediction_type"], x, out, np.sqrt(a_t), np.sqrt(b_t))
        x0 = tables.clip_or_threshold(x0, self.cfg)
        denoised = self.c_out[i] * x0 + self.c_skip[i] * x
        # The schedule's last step returns the estimate itself, noise unused; a run that
        # starts part-way (image-to-image) still ends on that step, so it is ours too.
        if i == len(self.timesteps) - 1:
            return denoised, None
        return np.sqrt(a_prev) * denoised + np.sqrt(F32(1) - a_prev) * f32(noise), None

    def draws_noise(self, i: int) -> bool:
        return i != len(self.timesteps) - 1     # diffusers draws no noise for the last step

    def add_noise(self, x0: np.ndarray, noise: np.ndarray, i: int) -> np.ndarray:
        return param.vp_noise(f32(x0), f32(noise), self.noise_alpha[i], self.noise_sigma[i])


def make(config: Mapping[str, Any], steps: int, begin: int = 0, name: str = "lcm",
         **overrides: Any) -> LCM:
    cfg = resolve(config, DEFAULTS, name, **overrides)
    _check_steps(cfg, steps, name)
    acp = tables.alphas_cumprod(cfg)
    final = F32(1.0) if cfg["set_alpha_to_one"] else acp[0]
    full = spacing.lcm(cfg["num_train_timesteps"], steps, cfg["original_inference_steps"])
    # The step to the next timestep of the full schedule (the last steps to itself).
    prev = np.concatenate([full[1:], full[-1:]])[begin:]
    t = full[begin:]
    # Boundary-condition scalings (LCM eq. 6 with the timestep scaled by timestep_scaling),
    # float32 as diffusers computes them from the integer timestep tensor.
    st = t.astype(F32) * F32(cfg["timestep_scaling"])
    c_skip = F32(SIGMA_DATA ** 2) / (st ** 2 + F32(SIGMA_DATA ** 2))
    c_out = st / (st ** 2 + F32(SIGMA_DATA ** 2)) ** 0.5
    noise_alpha, noise_sigma = param.vp_coefficients(tables.alpha_bar_at(acp, t, final))
    return LCM(name=name, timesteps=t.astype(F32), init_noise_sigma=1.0, stochastic=True,
               begin_index=begin, cfg=cfg, alpha_t=tables.alpha_bar_at(acp, t, final),
               alpha_prev=tables.alpha_bar_at(acp, prev, final),
               c_skip=c_skip.astype(F32), c_out=c_out.astype(F32),
               noise_alpha=noise_alpha, noise_sigma=noise_sigma)
