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

from . import tables
from .base import f32, resolve
from .ddim import alpha_at

F32 = np.float32

DEFAULTS = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    trained_betas=None, original_inference_steps=50, clip_sample=False, clip_sample_range=1.0,
    set_alpha_to_one=True, steps_offset=0, prediction_type="epsilon", thresholding=False,
    dynamic_thresholding_ratio=0.995, sample_max_value=1.0, timestep_spacing="leading",
    timestep_scaling=10.0, rescale_betas_zero_snr=False,
)
SIGMA_DATA = 0.5   # the consistency-model data std (Song et al. 2023, "Consistency Models", sec. 5)


def _timesteps(cfg: dict, n: int, name: str) -> np.ndarray:
    """n timesteps picked evenly from the distillation schedule (every T // original
    steps, ending at T - 1); LCM ignores timestep_spacing and steps_offset."""
    T, orig = cfg["num_train_timesteps"], cfg["original_inference_steps"]
    if isinstance(orig, bool) or not isinstance(orig, int) or not 1 <= orig <= T:
        raise InvalidInput(f"scheduler {name!r}: original_inference_steps must be an integer in 1..{T}, "
                           f"got {orig!r}")
    if n > orig:
        raise InvalidInput(f"scheduler {name!r} supports at most original_inference_steps={orig} steps, got {n}")
    origin = (np.arange(1, orig + 1) * (T // orig) - 1)[::-1]
    idx = np.floor(np.linspace(0, len(origin), num=n, endpoint=False)).astype(np.int64)
    return origin[idx].astype(np.int64)


@dataclass(frozen=True, eq=False)
class LCM:
    name: str
    timesteps: np.ndarray
    init_noise_sigma: float
    stochastic: bool
    cfg: dict
    alpha_t: np.ndarray
    alpha_prev: np.ndarray
    c_skip: np.ndarray
    c_out: np.ndarray

    def init_state(self) -> Any:
        return None

    def scale_model_input(self, x: np.ndarray, i: int) -> np.ndarray:
        return f32(x)

    def step(self, state: Any, i: int, x: np.ndarray, model_output: np.ndarray,
             noise: np.ndarray | None = None) -> tuple[np.ndarray, Any]:
        x, out = f32(x), f32(model_output)
        a_t, a_prev = self.alpha_t[i], self.alpha_prev[i]
        b_t = F32(1) - a_t
        pred = self.cfg["prediction_type"]
        if pred == "epsilon":
            x0 = (x - np.sqrt(b_t) * out) / np.sqrt(a_t)
        elif pred == "v_prediction":
            x0 = np.sqrt(a_t) * x - np.sqrt(b_t) * out
        else:
            x0 = out
        x0 = tables.clip_or_threshold(x0, self.cfg)
        denoised = self.c_out[i] * x0 + self.c_skip[i] * x
        if i == len(self.timesteps) - 1:
            return denoised, None    # the last step returns the estimate itself, noise unused
        return np.sqrt(a_prev) * denoised + np.sqrt(F32(1) - a_prev) * f32(noise), None


def make(config: Mapping[str, Any], steps: int, name: str = "lcm") -> LCM:
    cfg = resolve(config, DEFAULTS, name)
    acp = tables.alphas_cumprod(cfg)
    final = F32(1.0) if cfg["set_alpha_to_one"] else acp[0]
    t = _timesteps(cfg, steps, name)
    prev = np.concatenate([t[1:], t[-1:]])
    # Boundary-condition scalings (LCM eq. 6 with the timestep scaled by timestep_scaling),
    # float32 as diffusers computes them from the integer timestep tensor.
    st = t.astype(F32) * F32(cfg["timestep_scaling"])
    c_skip = F32(SIGMA_DATA ** 2) / (st ** 2 + F32(SIGMA_DATA ** 2))
    c_out = st / (st ** 2 + F32(SIGMA_DATA ** 2)) ** 0.5
    return LCM(name=name, timesteps=t.astype(F32), init_noise_sigma=1.0, stochastic=True, cfg=cfg,
               alpha_t=alpha_at(acp, t, final), alpha_prev=alpha_at(acp, prev, final),
               c_skip=c_skip.astype(F32), c_out=c_out.astype(F32))
