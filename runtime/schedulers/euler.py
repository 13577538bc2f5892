"""Euler and Euler-ancestral samplers on the variance-exploding ODE / SDE of
Karras et al. 2022 ("Elucidating the Design Space of Diffusion-Based Generative
Models", Alg. 1 without churn; k-diffusion's `sample_euler` / `sample_euler_ancestral`),
following diffusers' `EulerDiscreteScheduler` and `EulerAncestralDiscreteScheduler`.

The latent lives at noise level sigma, x = x0 + sigma * eps; the U-Net sees it rescaled
to unit variance, x / sqrt(sigma^2 + 1), and its output is turned into a denoised x0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from . import tables
from .base import f32, resolve, unsupported

F32 = np.float32

EULER_DEFAULTS = dict(
    num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
    trained_betas=None, prediction_type="epsilon", interpolation_type="linear",
    use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False,
    sigma_min=None, sigma_max=None, timestep_spacing="linspace", timestep_type="discrete",
    steps_offset=0, rescale_betas_zero_snr=False, final_sigmas_type="zero",
)
ANCESTRAL_DEFAULTS = dict(
    num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
    trained_betas=None, prediction_type="epsilon", timestep_spacing="linspace",
    steps_offset=0, rescale_betas_zero_snr=False,
)


def float_timesteps(cfg: dict, n: int) -> np.ndarray:
    """Euler's float32 timesteps: unlike DDIM's, "linspace" ones are not rounded."""
    T = cfg["num_train_timesteps"]
    if cfg["timestep_spacing"] == "linspace":
        return np.linspace(0, T - 1, n, dtype=F32)[::-1].copy()
    if cfg["timestep_spacing"] == "leading":
        return (np.arange(0, n) * (T // n)).round()[::-1].astype(F32) + F32(cfg["steps_offset"])
    return np.arange(T, 0, -T / n).round().astype(F32) - F32(1)


def training_sigmas(cfg: dict) -> np.ndarray:
    acp = tables.alphas_cumprod(cfg)
    if cfg["rescale_betas_zero_snr"]:
        # Zero terminal SNR makes sigma infinite; diffusers caps alpha_bar at 2^-24.
        acp = acp.copy()
        acp[-1] = F32(2.0 ** -24)
    return tables.sigmas_from_alphas_cumprod(acp)


def init_sigma(sigmas: np.ndarray, spacing: str) -> float:
    """Std of the initial latents. With "leading" spacing the first timestep is below
    T - 1, and diffusers scales by sqrt(sigma_max^2 + 1) there (scheduling_euler_discrete.py)."""
    top = sigmas.max()
    return float(top if spacing in ("linspace", "trailing") else (top ** 2 + F32(1)) ** 0.5)


def to_denoised(pred: str, x: np.ndarray, out: np.ndarray, sigma: np.float32) -> np.ndarray:
    """x0 from the U-Net output at noise level sigma (Karras et al. 2022, Table 1;
    v-prediction: Salimans & Ho 2022)."""
    if pred == "epsilon":
        return x - sigma * out
    if pred == "v_prediction":
        return out * (-sigma / (sigma ** 2 + 1) ** 0.5) + (x / (sigma ** 2 + 1))
    return out


@dataclass(frozen=True, eq=False)
class Euler:
    name: str
    timesteps: np.ndarray
    init_noise_sigma: float
    stochastic: bool
    prediction_type: str
    sigmas: np.ndarray       # float32 (n + 1,): noise level before call i, 0 (or sigma_min) at the end
    sigma_up: np.ndarray     # ancestral only: std of the fresh noise added at step i
    sigma_down: np.ndarray   # ancestral only: level the deterministic part steps to

    def init_state(self) -> Any:
        return None

    def scale_model_input(self, x: np.ndarray, i: int) -> np.ndarray:
        return f32(x) / ((self.sigmas[i] ** 2 + 1) ** 0.5)

    def step(self, state: Any, i: int, x: np.ndarray, model_output: np.ndarray,
             noise: np.ndarray | None = None) -> tuple[np.ndarray, Any]:
        x, out = f32(x), f32(model_output)
        sigma = self.sigmas[i]
        denoised = to_denoised(self.prediction_type, x, out, sigma)
        derivative = (x - denoised) / sigma          # dx/dsigma of the probability-flow ODE
        if not self.stochastic:
            return x + derivative * (self.sigmas[i + 1] - sigma), None
        # Ancestral: step deterministically to sigma_down, then add noise of std sigma_up
        # so the marginal is right at sigma_{i+1} (k-diffusion `get_ancestral_step`).
        x = x + derivative * (self.sigma_down[i] - sigma)
        return x + f32(noise) * self.sigma_up[i], None


def make_euler(config: Mapping[str, Any], steps: int, name: str = "euler") -> Euler:
    cfg = resolve(config, EULER_DEFAULTS, name)
    unsupported(cfg, name, interpolation_type=("linear",), use_exponential_sigmas=(False, None),
                use_beta_sigmas=(False, None), timestep_type=("discrete",),
                final_sigmas_type=("zero", "sigma_min"))
    full = training_sigmas(cfg)
    t = float_timesteps(cfg, steps)
    sig = np.interp(t, np.arange(0, len(full)), full)
    if cfg["use_karras_sigmas"]:
        lo = cfg["sigma_min"] if cfg["sigma_min"] is not None else sig[-1].item()
        hi = cfg["sigma_max"] if cfg["sigma_max"] is not None else sig[0].item()
        sig = tables.karras_sigmas(lo, hi, steps)
        t = tables.sigma_to_t(sig, np.log(full))
    last = full[0] if cfg["final_sigmas_type"] == "sigma_min" else 0.0
    sigmas = np.concatenate([sig, [last]]).astype(F32)
    empty = np.zeros(0, F32)
    return Euler(name=name, timesteps=np.asarray(t).astype(F32),
                 init_noise_sigma=init_sigma(sigmas, cfg["timestep_spacing"]), stochastic=False,
                 prediction_type=cfg["prediction_type"], sigmas=sigmas, sigma_up=empty, sigma_down=empty)


def make_euler_ancestral(config: Mapping[str, Any], steps: int, name: str = "euler_a") -> Euler:
    cfg = resolve(config, ANCESTRAL_DEFAULTS, name, prediction_types=("epsilon", "v_prediction"))
    full = training_sigmas(cfg)
    t = float_timesteps(cfg, steps)
    sigmas = np.concatenate([np.interp(t, np.arange(0, len(full)), full), [0.0]]).astype(F32)
    s_from, s_to = sigmas[:-1], sigmas[1:]
    up = (s_to ** 2 * (s_from ** 2 - s_to ** 2) / s_from ** 2) ** 0.5
    down = (s_to ** 2 - up ** 2) ** 0.5
    return Euler(name=name, timesteps=t, init_noise_sigma=init_sigma(sigmas, cfg["timestep_spacing"]),
                 stochastic=True, prediction_type=cfg["prediction_type"], sigmas=sigmas,
                 sigma_up=up.astype(F32), sigma_down=down.astype(F32))
