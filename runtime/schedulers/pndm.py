"""PNDM (Liu et al. 2022, "Pseudo Numerical Methods for Diffusion Models on Manifolds"):
the transfer part is eq. 9, the gradient part a linear multistep (PLMS, eq. 12) or,
for the first steps, a Runge-Kutta (PRK) estimate. Follows diffusers' `PNDMScheduler`
(scheduling_pndm.py), including its call pattern: with skip_prk_steps (what Stable
Diffusion uses) n steps take n + 1 U-Net calls, because the second call re-evaluates
the first step with the averaged gradient (a Heun-like start, eq. 11 / Alg. 2).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from . import parametrization as param
from . import spacing, tables
from sdrt.engines.errors import InvalidInput

from .base import SamplerRecord, f32, resolve, timesteps_problem

DEFAULTS = dict(
    num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
    trained_betas=None, skip_prk_steps=False, set_alpha_to_one=False,
    prediction_type="epsilon", timestep_spacing="leading", steps_offset=0,
)

@dataclass(frozen=True)
class PNDMState:
    ets: tuple = ()              # gradients kept for the multistep formula, oldest first
    cur_sample: Any = None       # the sample a PRK / second-call step restarts from
    acc: Any = 0                 # PRK: running 1/6, 1/3, 1/3 sum of the four gradients


def _call_plan(cfg: dict, n: int, begin: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """U-Net timesteps from call `begin` of the full list on, the timestep whose alpha
    each call uses, the one it steps to, and the kind of each call, as diffusers'
    set_timesteps + counter logic give them. The counter restarts at 0 on a list that
    starts part-way (the pipeline slices `timesteps`; PNDM has no set_begin_index), so
    the first calls run are a PRK warm-up, or the first/second-call start, again."""
    T = cfg["num_train_timesteps"]
    prk, plms = spacing.pndm(T, n, cfg["timestep_spacing"], cfg["steps_offset"], cfg["skip_prk_steps"])
    feed = np.concatenate([prk, plms])[begin:]
    ratio = T // n
    t_alpha, t_prev, kinds = [], [], []
    for c, t in enumerate(feed):
        if c < len(prk):
            # Runge-Kutta calls: alpha from the full PRK list by counter (step_prk), the
            # target half a step (even calls) or no step (odd calls) below the fed timestep.
            t_prev.append(t - (0 if c % 2 else ratio // 2))
            t_alpha.append(prk[c // 4 * 4])
            kinds.append(f"prk{c % 4}")
        elif c == 1:  # the second call re-does step 0 from the same start (diffusers' counter == 1)
            t_alpha.append(t + ratio)
            t_prev.append(t)
            kinds.append("second")
        else:
            t_alpha.append(t)
            t_prev.append(t - ratio)
            kinds.append("first" if c == 0 else "plms")
    return (feed.astype(np.int64), np.array(t_alpha, dtype=np.int64),
            np.array(t_prev, dtype=np.int64), kinds)


@dataclass(frozen=True, eq=False)
class PNDM(SamplerRecord):
    cfg: dict
    kinds: tuple
    alpha_t: np.ndarray
    alpha_prev: np.ndarray
    noise_alpha: np.ndarray  # VP (alpha, sigma) of call i's timestep, for add_noise
    noise_sigma: np.ndarray

    def init_state(self) -> PNDMState:
        return PNDMState()

    def step(self, state: PNDMState, i: int, x: np.ndarray, model_output: np.ndarray,
             noise: np.ndarray | None = None) -> tuple[np.ndarray, PNDMState]:
        x, e = f32(x), f32(model_output)
        kind = self.kinds[i]
        if kind.startswith("prk"):
            # Runge-Kutta: four gradients at t, t - d/2, t - d/2, t - d, each step
            # restarting from the sample at t; the fourth combines them 1/6, 1/3, 1/3, 1/6.
            k = int(kind[3])
            if k == 0:
                state = PNDMState(state.ets + (e,), x, 1 / 6 * e)
            elif k in (1, 2):
                state = PNDMState(state.ets, state.cur_sample, state.acc + 1 / 3 * e)
            else:
                e = state.acc + 1 / 6 * e
                state = PNDMState(state.ets, state.cur_sample, 0)
            base = state.cur_sample
        elif kind == "second":
            e, base = (e + state.ets[-1]) / 2, state.cur_sample
            state = PNDMState(state.ets, None, state.acc)
        else:
            ets = state.ets[-3:] + (e,) if kind == "plms" else (e,)
            base = x
            state = PNDMState(ets, x if kind == "first" else state.cur_sample, state.acc)
            # PLMS, eq. 12: Adams-Bashforth on the kept gradients, newest first.
            if len(ets) == 2:
                e = (3 * ets[-1] - ets[-2]) / 2
            elif len(ets) == 3:
                e = (23 * ets[-1] - 16 * ets[-2] + 5 * ets[-3]) / 12
            elif len(ets) == 4:
                e = (1 / 24) * (55 * ets[-1] - 59 * ets[-2] + 37 * ets[-3] - 9 * ets[-4])
        return self._transfer(base, e, i), state

    def _transfer(self, x: np.ndarray, e: np.ndarray, i: int) -> np.ndarray:
        """PNDM eq. 9: x_{t-d} from x_t and the gradient estimate e (an epsilon)."""
        a_t, a_prev = self.alpha_t[i], self.alpha_prev[i]
        one = np.float32(1)
        b_t, b_prev = one - a_t, one - a_prev
        e = param.vp_eps(self.cfg["prediction_type"], x, e, a_t ** 0.5, b_t ** 0.5)
        denom = a_t * b_prev ** 0.5 + (a_t * b_t * a_prev) ** 0.5
        return (a_prev / a_t) ** 0.5 * x - (a_prev - a_t) * e / denom

    def schedule_problem(self) -> str | None:
        # The repeats of the second call and of the Runge-Kutta calls are by design; the
        # schedule's own steps (the PLMS calls after them) must still descend.
        steps = np.array([t for t, k in zip(self.timesteps, self.kinds) if k in ("first", "plms")])
        return (timesteps_problem(self.timesteps[:1], self.cfg["num_train_timesteps"])
                or timesteps_problem(steps, self.cfg["num_train_timesteps"]))

    def add_noise(self, x0: np.ndarray, noise: np.ndarray, i: int) -> np.ndarray:
        return param.vp_noise(f32(x0), f32(noise), self.noise_alpha[i], self.noise_sigma[i])


def make(config: Mapping[str, Any], steps: int, begin: int = 0, name: str = "pndm",
         **overrides: Any) -> PNDM:
    cfg = resolve(config, DEFAULTS, name, prediction_types=("epsilon", "v_prediction"), **overrides)
    T = cfg["num_train_timesteps"]
    if not cfg["skip_prk_steps"] and not 4 <= steps <= T // 2:
        # Four Runge-Kutta steps of four calls each, at t, t - d/2, t - d/2, t - d: fewer
        # steps break diffusers' set_timesteps, and d/2 < 1 repeats every timestep.
        raise InvalidInput(f"scheduler {name!r} with {steps} steps: its Runge-Kutta warm-up (skip_prk_steps=False, "
                           f"the PNDM default when the config does not set it) needs 4 to {T // 2} steps; "
                           f"use {'at least 4' if steps < 4 else f'at most {T // 2}'} steps, or "
                           f"--scheduler-option skip_prk_steps=true")
    acp = tables.alphas_cumprod(cfg)
    final = np.float32(1.0) if cfg["set_alpha_to_one"] else acp[0]
    feed, t_alpha, t_prev, kinds = _call_plan(cfg, steps, begin)
    noise_alpha, noise_sigma = param.vp_coefficients(tables.alpha_bar_at(acp, feed, final))
    return PNDM(name=name, timesteps=feed.astype(np.float32), init_noise_sigma=1.0, stochastic=False,
                begin_index=begin, cfg=cfg, kinds=tuple(kinds),
                alpha_t=tables.alpha_bar_at(acp, t_alpha, final),
                alpha_prev=tables.alpha_bar_at(acp, t_prev, final),
                noise_alpha=noise_alpha, noise_sigma=noise_sigma)
