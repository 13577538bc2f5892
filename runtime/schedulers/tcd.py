"""Trajectory Consistency Distillation sampling (Zheng et al. 2024, "Trajectory
Consistency Distillation", Alg. 4 "strategic stochastic sampling"), following diffusers'
`TCDScheduler` (scheduling_tcd.py) step for step.

From x_t the model's x0 and eps give the point of the trajectory at the intermediate
timestep s = floor((1 - gamma) t') before the next timestep t' (a DDIM jump from t to s);
with gamma > 0 the sample is then noised forward from s to t' with fresh noise. gamma = 0
is deterministic (s = t'), gamma = 1 is LCM-like multistep consistency sampling (s = 0).

diffusers calls gamma `eta`, an argument of `step()` (default 0.3) rather than of the
scheduler's constructor, so it is not a scheduler option here: diffusers' Stable Diffusion
pipelines pass their own `eta` argument, 0.0 unless the caller sets one
(`prepare_extra_step_kwargs` gives it to every scheduler whose step() takes `eta`), and a
plain pipeline call therefore samples TCD deterministically. `make(..., eta=)` takes the
value a pipeline call would pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from numbers import Real
from typing import Any, Mapping

import numpy as np

from sdrt.engines.errors import InvalidInput

from . import parametrization as param
from . import spacing, tables
from .base import SamplerRecord, f32, resolve, timesteps_problem
from .lcm import _check_steps

F32 = np.float32

DEFAULTS = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    trained_betas=None, original_inference_steps=50, clip_sample=False, clip_sample_range=1.0,
    set_alpha_to_one=True, steps_offset=0, prediction_type="epsilon", thresholding=False,
    dynamic_thresholding_ratio=0.995, sample_max_value=1.0, timestep_spacing="leading",
    timestep_scaling=10.0, rescale_betas_zero_snr=False,
)
# What StableDiffusionPipeline.__call__ passes as `eta` when the caller gives none.
PIPELINE_ETA = 0.0


@dataclass(frozen=True, eq=False)
class TCD(SamplerRecord):
    cfg: dict
    alpha: np.ndarray        # sqrt(alpha_bar_t), sqrt(1 - alpha_bar_t) at call i: VP level of x_t
    sigma: np.ndarray
    alpha_s: np.ndarray      # the same at the intermediate timestep s of call i
    sigma_s: np.ndarray
    keep: np.ndarray         # sqrt(alpha_bar_t' / alpha_bar_s): forward noising s -> t'
    fresh: np.ndarray        # sqrt(1 - alpha_bar_t' / alpha_bar_s)
    draws: np.ndarray        # bool: diffusers draws noise (eta > 0, not the schedule's last step)
    alpha_bar: np.ndarray    # alpha_bar_t (a zero one cannot take an epsilon prediction)

    def step(self, state: Any, i: int, x: np.ndarray, model_output: np.ndarray,
             noise: np.ndarray | None = None) -> tuple[np.ndarray, Any]:
        x, out = f32(x), f32(model_output)
        pred, a, s = self.cfg["prediction_type"], self.alpha[i], self.sigma[i]
        x0 = param.vp_x0(pred, x, out, a, s)
        eps = param.vp_eps(pred, x, out, a, s)
        # TCD Alg. 4: the DDIM jump to s (diffusers' "pred_noised_sample"); unlike LCM and
        # DDIM, diffusers' TCD applies neither clip_sample nor thresholding to x0.
        x_s = self.alpha_s[i] * x0 + self.sigma_s[i] * eps
        if not self.draws[i]:
            return x_s, None
        return self.keep[i] * x_s + self.fresh[i] * f32(noise), None

    def draws_noise(self, i: int) -> bool:
        return bool(self.draws[i])

    def schedule_problem(self) -> str | None:
        problem = timesteps_problem(self.timesteps, self.cfg["num_train_timesteps"])
        if problem is None and self.cfg["prediction_type"] == "epsilon" and not np.all(self.alpha_bar > 0):
            t = self.timesteps[int(np.argmin(self.alpha_bar > 0))]
            problem = (f"alpha_bar is 0 at timestep {t:g} (zero terminal SNR), where an epsilon "
                       f"prediction divides by zero (it needs prediction_type='v_prediction')")
        return problem

    def add_noise(self, x0: np.ndarray, noise: np.ndarray, i: int) -> np.ndarray:
        return param.vp_noise(f32(x0), f32(noise), self.alpha[i], self.sigma[i])


def _check_eta(eta: Any, name: str) -> float:
    if isinstance(eta, bool) or not isinstance(eta, Real) or not 0 <= eta <= 1:
        raise InvalidInput(f"scheduler {name!r}: eta (TCD's gamma) must be a number in [0, 1], got {eta!r:.40}")
    return float(eta)


def make(config: Mapping[str, Any], steps: int, begin: int = 0, name: str = "tcd",
         eta: float = PIPELINE_ETA, **overrides: Any) -> TCD:
    cfg = resolve(config, DEFAULTS, name, **overrides)
    eta = _check_eta(eta, name)
    _check_steps(cfg, steps, name)
    acp = tables.alphas_cumprod(cfg)
    # The same pick from the distillation schedule as LCM's (set_timesteps with strength=1,
    # which is how the Stable Diffusion pipelines call it; image-to-image slices the list).
    full = spacing.lcm(cfg["num_train_timesteps"], steps, cfg["original_inference_steps"])
    # The next timestep of the whole schedule; after the last it is 0, not -1, so the last
    # step lands on alpha_bar_0 and set_alpha_to_one plays no part.
    prev = np.concatenate([full[1:], [0]])[begin:]
    t = full[begin:]
    # s = floor((1 - eta) * t') in float32: torch multiplies the long tensor by the Python
    # float in float32 (float64 floors some lower: eta = 0.3, t' = 90 gives 62, not 63).
    s = np.floor(F32(1 - eta) * prev.astype(F32)).astype(np.int64)
    a_t, a_prev, a_s = acp[t], acp[prev], acp[s]
    ratio = a_prev / a_s
    draws = np.full(len(t), eta > 0)
    draws[begin + np.arange(len(t)) == steps - 1] = False       # no noise on the last step
    alpha, sigma = param.vp_coefficients(a_t)
    alpha_s, sigma_s = param.vp_coefficients(a_s)
    return TCD(name=name, timesteps=t.astype(F32), init_noise_sigma=1.0, stochastic=bool(draws.any()),
               begin_index=begin, cfg=cfg, alpha=alpha, sigma=sigma, alpha_s=alpha_s, sigma_s=sigma_s,
               keep=np.sqrt(ratio), fresh=np.sqrt(F32(1) - ratio), draws=draws, alpha_bar=a_t)
