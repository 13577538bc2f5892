"""DDIM (Song et al. 2021, "Denoising Diffusion Implicit Models", eq. 12 with eta = 0),
following diffusers' `DDIMScheduler` (scheduling_ddim.py) step for step."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from . import parametrization as param
from . import spacing, tables
from .base import SamplerRecord, f32, resolve

DEFAULTS = dict(
    num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
    trained_betas=None, clip_sample=True, set_alpha_to_one=True, steps_offset=0,
    prediction_type="epsilon", thresholding=False, dynamic_thresholding_ratio=0.995,
    clip_sample_range=1.0, sample_max_value=1.0, timestep_spacing="leading",
    rescale_betas_zero_snr=False,
)


@dataclass(frozen=True, eq=False)
class DDIM(SamplerRecord):
    cfg: dict
    alpha_t: np.ndarray      # alpha_bar at call i
    alpha_prev: np.ndarray   # alpha_bar at the timestep call i steps to
    noise_alpha: np.ndarray  # VP (alpha, sigma) of call i's timestep, for add_noise
    noise_sigma: np.ndarray

    def step(self, state: Any, i: int, x: np.ndarray, model_output: np.ndarray,
             noise: np.ndarray | None = None) -> tuple[np.ndarray, Any]:
        x, out = f32(x), f32(model_output)
        a_t, a_prev = self.alpha_t[i], self.alpha_prev[i]
        b_t = np.float32(1) - a_t
        # eq. 12's "predicted x0" and the noise that goes with it.
        x0, eps = param.vp_x0_eps(self.cfg["prediction_type"], x, out, a_t ** 0.5, b_t ** 0.5)
        x0 = tables.clip_or_threshold(x0, self.cfg)
        # eta = 0: the deterministic DDIM step, "direction pointing to x_t" plus x0.
        return a_prev ** 0.5 * x0 + (np.float32(1) - a_prev) ** 0.5 * eps, None

    def add_noise(self, x0: np.ndarray, noise: np.ndarray, i: int) -> np.ndarray:
        return param.vp_noise(f32(x0), f32(noise), self.noise_alpha[i], self.noise_sigma[i])


def make(config: Mapping[str, Any], steps: int, begin: int = 0, name: str = "ddim",
         **overrides: Any) -> DDIM:
    cfg = resolve(config, DEFAULTS, name, **overrides)
    acp = tables.alphas_cumprod(cfg)
    final = np.float32(1.0) if cfg["set_alpha_to_one"] else acp[0]
    T = cfg["num_train_timesteps"]
    t = spacing.discrete(T, steps, cfg["timestep_spacing"], cfg["steps_offset"])[begin:]
    # diffusers steps back by T // n whatever the spacing (scheduling_ddim.py, step()),
    # so with "linspace"/"trailing" the previous alpha is not that of the next call.
    prev = t - T // steps
    noise_alpha, noise_sigma = param.vp_coefficients(tables.alpha_bar_at(acp, t, final))
    return DDIM(name=name, timesteps=t.astype(np.float32), init_noise_sigma=1.0, stochastic=False,
                begin_index=begin, cfg=cfg, alpha_t=tables.alpha_bar_at(acp, t, final),
                alpha_prev=tables.alpha_bar_at(acp, prev, final),
                noise_alpha=noise_alpha, noise_sigma=noise_sigma)
