"""DDIM (Song et al. 2021, "Denoising Diffusion Implicit Models", eq. 12 with eta = 0),
following diffusers' `DDIMScheduler` (scheduling_ddim.py) step for step."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from . import tables
from .base import f32, resolve

DEFAULTS = dict(
    num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
    trained_betas=None, clip_sample=True, set_alpha_to_one=True, steps_offset=0,
    prediction_type="epsilon", thresholding=False, dynamic_thresholding_ratio=0.995,
    clip_sample_range=1.0, sample_max_value=1.0, timestep_spacing="leading",
    rescale_betas_zero_snr=False,
)


def discrete_timesteps(cfg: dict, n: int) -> np.ndarray:
    """DDIM's integer timesteps for n steps (descending, int64)."""
    T = cfg["num_train_timesteps"]
    if cfg["timestep_spacing"] == "linspace":
        t = tables.linspace_rounded(T, n)
    elif cfg["timestep_spacing"] == "leading":
        t = tables.leading(T, n, cfg["steps_offset"])
    else:
        t = tables.trailing(T, n)
    return t.astype(np.int64)


def alpha_at(acp: np.ndarray, t: np.ndarray, final: np.float32) -> np.ndarray:
    """alpha_bar at (possibly negative) timesteps; before t = 0 the chain ends at `final`.
    Indices past the table wrap like torch's (diffusers only checks `>= 0`)."""
    t = np.asarray(t, dtype=np.int64)
    return np.where(t >= 0, acp[np.where(t >= 0, t, 0) % len(acp)], final).astype(np.float32)


@dataclass(frozen=True, eq=False)
class DDIM:
    name: str
    timesteps: np.ndarray
    init_noise_sigma: float
    stochastic: bool
    cfg: dict
    alpha_t: np.ndarray      # alpha_bar at call i
    alpha_prev: np.ndarray   # alpha_bar at the timestep call i steps to

    def init_state(self) -> Any:
        return None

    def scale_model_input(self, x: np.ndarray, i: int) -> np.ndarray:
        return f32(x)

    def step(self, state: Any, i: int, x: np.ndarray, model_output: np.ndarray,
             noise: np.ndarray | None = None) -> tuple[np.ndarray, Any]:
        x, eps = f32(x), f32(model_output)
        a_t, a_prev = self.alpha_t[i], self.alpha_prev[i]
        b_t = np.float32(1) - a_t
        pred = self.cfg["prediction_type"]
        # eq. 12's "predicted x0" and the noise that goes with it, per parameterisation
        # (v-prediction: Salimans & Ho 2022, sec. 4).
        if pred == "epsilon":
            x0 = (x - b_t ** 0.5 * eps) / a_t ** 0.5
        elif pred == "sample":
            x0, eps = eps, (x - a_t ** 0.5 * eps) / b_t ** 0.5
        else:
            x0 = a_t ** 0.5 * x - b_t ** 0.5 * eps
            eps = a_t ** 0.5 * eps + b_t ** 0.5 * x
        x0 = tables.clip_or_threshold(x0, self.cfg)
        # eta = 0: the deterministic DDIM step, "direction pointing to x_t" plus x0.
        return a_prev ** 0.5 * x0 + (np.float32(1) - a_prev) ** 0.5 * eps, None


def make(config: Mapping[str, Any], steps: int, name: str = "ddim") -> DDIM:
    cfg = resolve(config, DEFAULTS, name)
    acp = tables.alphas_cumprod(cfg)
    final = np.float32(1.0) if cfg["set_alpha_to_one"] else acp[0]
    t = discrete_timesteps(cfg, steps)
    # diffusers steps back by T // n whatever the spacing (scheduling_ddim.py, step()),
    # so with "linspace"/"trailing" the previous alpha is not that of the next call.
    prev = t - cfg["num_train_timesteps"] // steps
    return DDIM(name=name, timesteps=t.astype(np.float32), init_noise_sigma=1.0, stochastic=False,
                cfg=cfg, alpha_t=alpha_at(acp, t, final), alpha_prev=alpha_at(acp, prev, final))
