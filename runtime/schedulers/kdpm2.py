"""DPM-Solver-2 as Karras et al. 2022 write it (Alg. 2's second-order step, with the
midpoint taken in log sigma; k-diffusion's `sample_dpm_2` and `sample_dpm_2_ancestral`),
following diffusers' `KDPM2DiscreteScheduler` and `KDPM2AncestralDiscreteScheduler`.

Each step from sigma_k evaluates the U-Net twice: once at sigma_k, an Euler half-step
to the midpoint sigma_mid = sqrt(sigma_k * sigma_target) (the mean of the two in log
sigma), and once there; the slope at the midpoint then carries the step's start all the
way to the target. The last step, down to sigma = 0, is a plain Euler step (2n - 1
U-Net calls for n steps). The plain sampler targets sigma_{k+1}; the ancestral one
targets sigma_down and then adds fresh noise of std sigma_up, so that the marginal is
right at sigma_{k+1} (k-diffusion's `get_ancestral_step`, eta = 1).

Per call i the tables hold the level the U-Net input is at, the step the call's slope
is multiplied by and, for the ancestral corrector, the noise std: the state between the
two calls of a step is the step's starting sample.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

import numpy as np

from . import parametrization as param
from .base import SamplerRecord, f32, resolve
from .heun import frozen as _frozen, init_sigma, per_call, step_schedule, two_call_problem

F32 = np.float32

# KDPM2DiscreteScheduler.__init__'s keywords and defaults (diffusers 0.42.1); the
# ancestral class takes exactly the same ones.
DEFAULTS = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="linear",
    trained_betas=None, use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False,
    prediction_type="epsilon", timestep_spacing="linspace", steps_offset=0,
)
# Both classes raise NotImplementedError for prediction_type "sample" in step().
PREDICTION_TYPES = ("epsilon", "v_prediction")


def _log_midpoint(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """exp(lerp(log a, log b, 0.5)) in float32, as diffusers computes its interpolated
    sigmas: torch's lerp with weight 0.5 is b - (b - a) * 0.5. log and exp are taken in
    float64 and rounded (torch's vectorised float32 ones are within an ulp of that)."""
    with np.errstate(divide="ignore", invalid="ignore"):     # sigma_down = 0 gives NaN, as in torch
        la = np.log(a.astype(np.float64)).astype(F32)
        lb = np.log(b.astype(np.float64)).astype(F32)
        return np.exp((lb - (lb - la) * F32(0.5)).astype(np.float64)).astype(F32)


def _sigma_to_t(sigma: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """`tables.sigma_to_t` in float32 throughout: diffusers hands its torch tensors of
    interpolated sigmas to `_sigma_to_t`, so every product there is a float32 one.
    The bracketing index (the last training log-sigma <= log sigma, at least 0, at most
    T - 2) comes from a binary search: training sigmas rise with t, and diffusers'
    cumsum-argmax over a T x n table cost 25 ms at 1000 steps."""
    log_sigma = np.log(np.maximum(sigma.astype(F32), F32(1e-10)))
    low = np.clip(np.searchsorted(log_sigmas, log_sigma, side="right") - 1, 0, log_sigmas.shape[0] - 2)
    high = low + 1
    w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[high]), F32(0), F32(1))
    return (F32(1) - w) * low.astype(F32) + w * high.astype(F32)


@dataclass(frozen=True, eq=False)
class KDPM2(SamplerRecord):
    order: ClassVar[int] = 2
    prediction_type: str
    num_train: int
    sigmas: np.ndarray       # float32: diffusers' `sigmas` table from the begin index (add_noise)
    level: np.ndarray        # float32 (n_calls,): the noise level of call i's input
    dt: np.ndarray           # float32 (n_calls,): what call i's slope is multiplied by
    sigma_up: np.ndarray     # ancestral only: std of the noise the corrector adds

    def _corrects(self, i: int) -> bool:
        # Calls alternate first / second evaluation from the start of the whole schedule
        # (a part-way start skips whole steps, so begin_index is even).
        return (self.begin_index + i) % 2 == 1

    def init_state(self) -> Any:
        return None

    def scale_model_input(self, x: np.ndarray, i: int) -> np.ndarray:
        return f32(x) / ((self.level[i] ** 2 + 1) ** 0.5)

    def step(self, state: Any, i: int, x: np.ndarray, model_output: np.ndarray,
             noise: np.ndarray | None = None) -> tuple[np.ndarray, Any]:
        x, out = f32(x), f32(model_output)
        level = self.level[i]
        derivative = (x - param.ve_x0(self.prediction_type, x, out, level)) / level
        if not self._corrects(i):
            # Euler half-step to the midpoint; the step restarts from x (a read-only copy,
            # so a caller that edits its latents in place cannot change the state).
            return x + derivative * self.dt[i], _frozen(x)
        x = state + derivative * self.dt[i]
        if self.stochastic:
            x = x + f32(noise) * self.sigma_up[i]
        return x, None

    def draws_noise(self, i: int) -> bool:
        # diffusers' ancestral step draws one randn_tensor in each second evaluation.
        return self.stochastic and self._corrects(i)

    def add_noise(self, x0: np.ndarray, noise: np.ndarray, i: int) -> np.ndarray:
        # diffusers picks the sigma by step index once set_begin_index is called: the
        # begin index before the first call, step_index (= call i + 1) after call i. After
        # a first evaluation that is sigma_{k+1}, not the midpoint the latent is at:
        # inpainting re-noises the known region to sigma_{k+1} there, as diffusers does
        # (the corrector only takes a slope from that latent).
        return param.ve_noise(f32(x0), f32(noise), self.sigmas[i])

    def schedule_problem(self) -> str | None:
        first = [i for i in range(len(self.timesteps)) if not self._corrects(i)]
        problem = two_call_problem(self.timesteps, self.level[first], self.num_train)
        if problem is None and not (np.all(np.isfinite(self.level)) and np.all(np.isfinite(self.dt))):
            # With eta = 1, sigma_down = sqrt(sigma_next^2 - sigma_up^2) cancels to 0 or below
            # in float32 once sigma falls ~4096-fold in one step (sigma_max ~ 2e4 of a cosine
            # schedule): diffusers' midpoint is NaN there too.
            k = (self.begin_index + int(np.argmin(np.isfinite(self.level) & np.isfinite(self.dt)))) // 2
            problem = (f"the midpoint noise level of step {k} is not a number (its sigma_down "
                       f"underflows in float32: sigma falls too far in one step)")
        return problem


def _make(config: Mapping[str, Any], steps: int, begin: int, name: str, ancestral: bool,
          overrides: dict[str, Any]) -> KDPM2:
    cfg = resolve(config, DEFAULTS, name, prediction_types=PREDICTION_TYPES, **overrides)
    t, sig, log_sigmas = step_schedule(config, cfg, steps, name)
    if cfg["use_karras_sigmas"]:
        t = t.round()          # only KDPM2's Karras timesteps are rounded
    # n is the spacing's length: "trailing" gives one step more than asked for at some
    # counts (np.arange's float step), ending at t = -1 (refused in schedule_problem).
    n = len(sig)
    s = np.concatenate([sig, [0.0]]).astype(F32)           # s_0 .. s_{n-1}, 0
    s_from, s_to = s[:-1], s[1:]
    if ancestral:
        # k-diffusion's get_ancestral_step with eta = 1, in diffusers' float32 order.
        with np.errstate(divide="ignore", invalid="ignore"):
            up = (s_to ** 2 * (s_from ** 2 - s_to ** 2) / s_from ** 2) ** 0.5
            target = (s_to ** 2 - up ** 2) ** 0.5        # sigma_down
    else:
        up = np.zeros(n, F32)
        target = s_to
    # The midpoint of step k (diffusers lerps from log s_{k+1} towards log s_k, and
    # from log s_k towards log sigma_down); the last step goes to 0 in one Euler step.
    mid = np.zeros(n, F32)
    mid[:-1] = (_log_midpoint(s_from[:-1], target[:-1]) if ancestral
                else _log_midpoint(target[:-1], s_from[:-1]))
    # U-Net timesteps: t_0, then per step the midpoint's, then the next level's.
    t_mid = _sigma_to_t(mid[:-1], log_sigmas)
    timesteps = np.empty(2 * n - 1, F32)
    timesteps[0::2] = np.asarray(t).astype(F32)
    timesteps[1::2] = t_mid
    # Calls 2k (at s_k, Euler to the midpoint) and 2k + 1 (at the midpoint, from s_k
    # to the target with the midpoint's slope).
    level = np.empty(2 * n - 1, F32)
    level[0::2], level[1::2] = s_from, mid[:-1]
    dt = np.empty(2 * n - 1, F32)
    dt[0::2], dt[1::2] = mid - s_from, (target - s_from)[:-1]
    sigma_up = np.zeros(2 * n - 1, F32)
    sigma_up[1::2] = up[:-1]
    # diffusers' sigmas table: [s0, s1, s1, ..., s_{n-1}, s_{n-1}, 0, 0, 0].
    sigmas = np.concatenate([per_call(s), s[-1:]])
    return KDPM2(name=name, timesteps=timesteps[begin:], stochastic=ancestral, begin_index=begin,
                 init_noise_sigma=init_sigma(sigmas, cfg["timestep_spacing"]),
                 prediction_type=cfg["prediction_type"], num_train=cfg["num_train_timesteps"],
                 sigmas=sigmas[begin:], level=level[begin:], dt=dt[begin:], sigma_up=sigma_up[begin:])


def make_kdpm2(config: Mapping[str, Any], steps: int, begin: int = 0, name: str = "kdpm2",
               **overrides: Any) -> KDPM2:
    return _make(config, steps, begin, name, False, overrides)


def make_kdpm2_ancestral(config: Mapping[str, Any], steps: int, begin: int = 0, name: str = "kdpm2_a",
                         **overrides: Any) -> KDPM2:
    return _make(config, steps, begin, name, True, overrides)
