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

from . import parametrization as param
from . import spacing, tables
from .base import SamplerRecord, f32, levels_problem, resolve, unsupported

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


def training_sigmas(cfg: dict) -> np.ndarray:
    acp = tables.alphas_cumprod(cfg)
    if cfg["rescale_betas_zero_snr"]:
        # Zero terminal SNR makes sigma infinite; diffusers caps alpha_bar at 2^-24.
        acp = acp.copy()
        acp[-1] = F32(2.0 ** -24)
    return tables.sigmas_from_alphas_cumprod(acp)


def init_sigma(sigmas: np.ndarray, timestep_spacing: str) -> float:
    """Std of the initial latents. With "leading" spacing the first timestep is below
    T - 1, and diffusers scales by sqrt(sigma_max^2 + 1) there (scheduling_euler_discrete.py)."""
    top = sigmas.max()
    return float(top if timestep_spacing in ("linspace", "trailing") else (top ** 2 + F32(1)) ** 0.5)


@dataclass(frozen=True, eq=False)
class Euler(SamplerRecord):
    prediction_type: str
    sigmas: np.ndarray       # float32 (n_calls + 1,): noise level before call i, 0 (or sigma_min) at the end
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
        denoised = param.ve_x0(self.prediction_type, x, out, sigma)
        derivative = (x - denoised) / sigma          # dx/dsigma of the probability-flow ODE
        if not self.stochastic:
            return x + derivative * (self.sigmas[i + 1] - sigma), None
        # Ancestral: step deterministically to sigma_down, then add noise of std sigma_up
        # so the marginal is right at sigma_{i+1} (k-diffusion `get_ancestral_step`).
        x = x + derivative * (self.sigma_down[i] - sigma)
        return x + f32(noise) * self.sigma_up[i], None

    def schedule_problem(self) -> str | None:
        return levels_problem(self.sigmas[:-1])

    def add_noise(self, x0: np.ndarray, noise: np.ndarray, i: int) -> np.ndarray:
        # diffusers picks the sigma by step index once set_begin_index is called: the
        # begin index before the first step, step_index (= call i + 1) after step i.
        return param.ve_noise(f32(x0), f32(noise), self.sigmas[i])


def make_euler(config: Mapping[str, Any], steps: int, begin: int = 0, name: str = "euler",
               **overrides: Any) -> Euler:
    cfg = resolve(config, EULER_DEFAULTS, name, **overrides)
    unsupported(cfg, name, interpolation_type=("linear",), use_exponential_sigmas=(False, None),
                use_beta_sigmas=(False, None), timestep_type=("discrete",),
                final_sigmas_type=("zero", "sigma_min"))
    full = training_sigmas(cfg)
    t = spacing.fractional(cfg["num_train_timesteps"], steps, cfg["timestep_spacing"], cfg["steps_offset"])
    sig = np.interp(t, np.arange(0, len(full)), full)
    if cfg["use_karras_sigmas"]:
        lo = cfg["sigma_min"] if cfg["sigma_min"] is not None else sig[-1].item()
        hi = cfg["sigma_max"] if cfg["sigma_max"] is not None else sig[0].item()
        sig = tables.karras_sigmas(lo, hi, steps)
        t = tables.sigma_to_t(sig, np.log(full))
    last = full[0] if cfg["final_sigmas_type"] == "sigma_min" else 0.0
    sigmas = np.concatenate([sig, [last]]).astype(F32)
    empty = np.zeros(0, F32)
    # A part-way start runs from sigma index `begin` (diffusers' step_index starts at
    # the begin index); the initial-noise scale stays that of the whole schedule.
    return Euler(name=name, timesteps=np.asarray(t).astype(F32)[begin:],
                 init_noise_sigma=init_sigma(sigmas, cfg["timestep_spacing"]), stochastic=False,
                 begin_index=begin, prediction_type=cfg["prediction_type"], sigmas=sigmas[begin:],
                 sigma_up=empty, sigma_down=empty)


def make_euler_ancestral(config: Mapping[str, Any], steps: int, begin: int = 0, name: str = "euler_a",
                         **overrides: Any) -> Euler:
    cfg = resolve(config, ANCESTRAL_DEFAULTS, name, prediction_types=("epsilon", "v_prediction"), **overrides)
    full = training_sigmas(cfg)
    t = spacing.fractional(cfg["num_train_timesteps"], steps, cfg["timestep_spacing"], cfg["steps_offset"])
    sigmas = np.concatenate([np.interp(t, np.arange(0, len(full)), full), [0.0]]).astype(F32)
    s_from, s_to = sigmas[:-1], sigmas[1:]
    up = (s_to ** 2 * (s_from ** 2 - s_to ** 2) / s_from ** 2) ** 0.5
    down = (s_to ** 2 - up ** 2) ** 0.5
    return Euler(name=name, timesteps=t[begin:], init_noise_sigma=init_sigma(sigmas, cfg["timestep_spacing"]),
                 stochastic=True, begin_index=begin, prediction_type=cfg["prediction_type"],
                 sigmas=sigmas[begin:], sigma_up=up.astype(F32)[begin:], sigma_down=down.astype(F32)[begin:])
