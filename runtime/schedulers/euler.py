"""Euler and Euler-ancestral samplers on the variance-exploding ODE / SDE of
Karras et al. 2022 ("Elucidating the Design Space of Diffusion-Based Generative
Models", Alg. 1 without churn; k-diffusion's `sample_euler` / `sample_euler_ancestral`),
following diffusers' `EulerDiscreteScheduler` and `EulerAncestralDiscreteScheduler`.

The latent lives at noise level sigma, x = x0 + sigma * eps; the U-Net sees it rescaled
to unit variance, x / sqrt(sigma^2 + 1), and its output is turned into a denoised x0.

Precision. The tables keep diffusers' dtypes step for step: the training sigmas are
float32, `np.interp` and the sigma ramps run in float64 and are cast to float32 once,
every per-step quantity is float32, and square roots are IEEE float32 (`np.sqrt`).
With torch's float32 square roots correctly rounded, diffusers' zero-terminal-SNR
trajectories are reproduced bit for bit (<= 7e-8). But torch's x86 CPU builds take
them from MKL, which is not correctly rounded (an AMD EPYC with torch 2.13: 1 input
in 6 is 1 ulp off; sqrt(2^24 - 1), the zero-SNR sigma_max, comes out 4096.0, not
4095.9998), and that reaches diffusers' rescaled betas, its sigma table and the
ancestral sigma_down. An ulp in a sigma is invisible almost everywhere (~1e-7), but
the first step down from sigma_max = 4096 cancels ~11 bits (x ~ 4096 * eps steps to
x ~ x0): there diffusers' own result moves with the machine's sqrt, by up to 5.3e-4
relative measured (Euler, 2 linspace steps; Euler a 1.5e-4 at 3), under 4e-5 from
10 steps on. sdrt gives what diffusers gives with an IEEE sqrt.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Real
from typing import Any, Mapping

import numpy as np

from sdrt.engines.errors import InvalidInput

from . import parametrization as param
from . import spacing, tables
from .base import SamplerRecord, f32, resolve, unsupported

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
    """sigma_t for every training timestep t (ascending t), float32."""
    acp = tables.alphas_cumprod(cfg)
    if cfg["rescale_betas_zero_snr"]:
        # Zero terminal SNR makes sigma infinite; diffusers caps alpha_bar at 2^-24
        # (the smallest float16 subnormal), so sigma_max = sqrt(2^24 - 1) ~ 4096.
        acp = acp.copy()
        acp[-1] = F32(2.0 ** -24)
    return tables.sigmas_from_alphas_cumprod(acp)


def init_sigma(sigmas: np.ndarray, timestep_spacing: str) -> float:
    """Std of the initial latents. With "leading" spacing the first timestep is below
    T - 1, and diffusers scales by sqrt(sigma_max^2 + 1) there (scheduling_euler_discrete.py,
    `init_noise_sigma`), in float32."""
    top = sigmas.max()
    return float(top if timestep_spacing in ("linspace", "trailing") else np.sqrt(top * top + F32(1)))


@dataclass(frozen=True, eq=False)
class Euler(SamplerRecord):
    prediction_type: str
    sigmas: np.ndarray       # float32 (n_calls + 1,): level before call i (log_linear: see _log_linear)
    sigma_up: np.ndarray     # ancestral only: std of the fresh noise added at step i
    sigma_down: np.ndarray   # ancestral only: level the deterministic part steps to

    def init_state(self) -> Any:
        return None

    def scale_model_input(self, x: np.ndarray, i: int) -> np.ndarray:
        sigma = self.sigmas[i]
        return f32(x) / np.sqrt(sigma * sigma + F32(1))

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
        """Where diffusers' own run breaks. A repeated level is harmless here (that step
        has dt = 0: leading spacing with steps_offset=1 at 1000 steps runs t = 1000 at
        sigma(999)), but diffusers' text-to-image pipeline finds its first sigma by
        looking the first timestep up (`index_for_timestep`), and takes the *second*
        match when it repeats: it then starts one sigma late and indexes past the table."""
        s = np.asarray(self.sigmas, dtype=np.float64)
        if not np.all(np.isfinite(s)):
            return "its noise levels are not finite"
        if np.any(s[:-1] <= 0):
            return "a noise level before the last step is 0 (the Euler step divides by it)"
        if self.stochastic and np.any(np.diff(s) > 0):
            k = int(np.argmax(np.diff(s) > 0))
            return f"its noise level rises at step {k} (sigma_up would be the root of a negative number)"
        t = np.asarray(self.timesteps, dtype=np.float64)
        again = np.nonzero(t[1:] == t[0])[0]
        if again.size:
            return (f"its first timestep {t[0]:g} repeats at call {again[0] + 1} "
                    f"(diffusers would start from the wrong sigma)")
        return None

    def add_noise(self, x0: np.ndarray, noise: np.ndarray, i: int) -> np.ndarray:
        # diffusers picks the sigma by step index once set_begin_index is called: the
        # begin index before the first step, step_index (= call i + 1) after step i.
        return param.ve_noise(f32(x0), f32(noise), self.sigmas[i])


def _ramp_bounds(cfg: dict, sig: np.ndarray, name: str) -> tuple[float, float]:
    """(sigma_min, sigma_max) of a sigma ramp: the config's values where set, else the
    ends of the interpolated schedule (diffusers' `_convert_to_karras` and siblings).
    sigma_min above sigma_max is left alone, as diffusers leaves it (one step is just
    sigma_max); where it makes diffusers fail, schedule_problem says so."""
    bounds = []
    for key, default in (("sigma_min", sig[-1].item()), ("sigma_max", sig[0].item())):
        v = cfg[key]
        # 0 divides by zero in the last step, and a negative level is no noise level
        # (diffusers' Karras ramp turns it into NaN, its exponential one raises).
        if v is not None and (isinstance(v, bool) or not isinstance(v, Real) or not 0 < v < math.inf):
            raise InvalidInput(f"scheduler {name!r}: {key} must be a positive number, got {v!r:.40}")
        bounds.append(default if v is None else float(v))
    return bounds[0], bounds[1]


def _log_linear(full: np.ndarray, steps: int) -> np.ndarray:
    """diffusers' interpolation_type="log_linear": steps + 1 levels evenly spaced in log
    sigma over the whole training range, `torch.linspace(...).exp()` in float32. That is
    one level more than there are timesteps: with discrete timesteps the last step ends
    at the training sigma_min and the final 0 is never reached (EDM's continuous ones
    are one per level, so there the last step does go to 0)."""
    ramp = tables.linspace_f32(np.log(full[-1]), np.log(full[0]), steps + 1)
    return np.exp(ramp.astype(np.float64)).astype(F32)


def make_euler(config: Mapping[str, Any], steps: int, begin: int = 0, name: str = "euler",
               **overrides: Any) -> Euler:
    cfg = resolve(config, EULER_DEFAULTS, name, **overrides)
    unsupported(cfg, name, interpolation_type=("linear", "log_linear"),
                timestep_type=("discrete", "continuous"), final_sigmas_type=("zero", "sigma_min"))
    full = training_sigmas(cfg)
    t = spacing.fractional(cfg["num_train_timesteps"], steps, cfg["timestep_spacing"], cfg["steps_offset"])
    if cfg["interpolation_type"] == "linear":
        sig = np.interp(t, np.arange(0, len(full)), full)          # float64, as diffusers
    else:
        sig = _log_linear(full, steps)
    kind = tables.ramp_kind(cfg)
    if kind:
        lo, hi = _ramp_bounds(cfg, sig, name)
        sig = tables.sigma_ramp(kind, lo, hi, steps)
        t = tables.sigma_to_t(sig, np.log(full))
    last = full[0] if cfg["final_sigmas_type"] == "sigma_min" else 0.0
    sigmas = np.concatenate([sig, [last]]).astype(F32)
    if cfg["timestep_type"] == "continuous" and cfg["prediction_type"] == "v_prediction":
        # EDM's c_noise = ln(sigma) / 4 (Karras et al. 2022, Table 1), computed by
        # diffusers in float32 from the float32 sigmas, one per level but the last.
        t = F32(0.25) * np.log(sigmas[:-1])
    empty = np.zeros(0, F32)
    # A part-way start runs from sigma index `begin` (diffusers' step_index starts at
    # the begin index); the initial-noise scale stays that of the whole schedule.
    return Euler(name=name, timesteps=np.asarray(t).astype(F32)[begin:],
                 init_noise_sigma=init_sigma(sigmas, cfg["timestep_spacing"]), stochastic=False,
                 begin_index=begin, prediction_type=cfg["prediction_type"], sigmas=sigmas[begin:],
                 sigma_up=empty, sigma_down=empty)


def make_euler_ancestral(config: Mapping[str, Any], steps: int, begin: int = 0, name: str = "euler_a",
                         **overrides: Any) -> Euler:
    # diffusers' ancestral step raises NotImplementedError for prediction_type="sample".
    cfg = resolve(config, ANCESTRAL_DEFAULTS, name, prediction_types=("epsilon", "v_prediction"), **overrides)
    full = training_sigmas(cfg)
    t = spacing.fractional(cfg["num_train_timesteps"], steps, cfg["timestep_spacing"], cfg["steps_offset"])
    sigmas = np.concatenate([np.interp(t, np.arange(0, len(full)), full), [0.0]]).astype(F32)
    # k-diffusion's get_ancestral_step in diffusers' float32 operation order. At zero
    # terminal SNR the first sigma_down = sqrt(s_to^2 - s_up^2) cancels almost every bit
    # (s_up ~ s_to when s_from = 4096), so it inherits the last ulp of each square root.
    s_from, s_to = sigmas[:-1], sigmas[1:]
    up = np.sqrt(s_to ** 2 * (s_from ** 2 - s_to ** 2) / s_from ** 2)
    down = np.sqrt(s_to ** 2 - up ** 2)
    return Euler(name=name, timesteps=t[begin:], init_noise_sigma=init_sigma(sigmas, cfg["timestep_spacing"]),
                 stochastic=True, begin_index=begin, prediction_type=cfg["prediction_type"],
                 sigmas=sigmas[begin:], sigma_up=up.astype(F32)[begin:], sigma_down=down.astype(F32)[begin:])
