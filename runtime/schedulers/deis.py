"""DEIS multistep (Zhang & Chen 2023, "Fast Sampling of Diffusion Models with Exponential
Integrator"), the log-rho variant, following diffusers' `DEISMultistepScheduler`
(scheduling_deis_multistep.py) step for step.

The probability-flow ODE is integrated exactly in its linear part (the exponential
integrator, sec. 3) with the noise prediction eps extrapolated by a Lagrange polynomial
through the last 1-3 evaluations. "logrho" places the polynomial in log rho, where
rho = sigma_t / alpha_t, and integrates it in closed form (diffusers' `ind_fn`, the
antiderivative of each Lagrange basis polynomial); first order is DDIM.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from . import multistep
from .base import f32, hidden_config, resolve, unsupported

F32 = np.float32

DEFAULTS = dict(
    num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
    trained_betas=None, solver_order=2, prediction_type="epsilon", thresholding=False,
    dynamic_thresholding_ratio=0.995, sample_max_value=1.0, algorithm_type="deis",
    solver_type="logrho", lower_order_final=True, use_karras_sigmas=False,
    use_exponential_sigmas=False, use_beta_sigmas=False, use_flow_sigmas=False, flow_shift=1.0,
    timestep_spacing="linspace", steps_offset=0, use_dynamic_shifting=False,
    time_shift_type="exponential",
)


def _ind2(t: F32, b: F32, c: F32) -> F32:
    """Integral of (log t - log c) / (log b - log c) dt (the linear Lagrange basis in log rho)."""
    return t * (-np.log(c) + np.log(t) - 1) / (np.log(b) - np.log(c))


def _ind3(t: F32, b: F32, c: F32, d: F32) -> F32:
    """Integral of (log t - log c)(log t - log d) / ((log b - log c)(log b - log d)) dt."""
    numerator = t * (np.log(c) * (np.log(d) - np.log(t) + 1) - np.log(d) * np.log(t) + np.log(d)
                     + np.log(t) ** 2 - 2 * np.log(t) + 2)
    return numerator / ((np.log(b) - np.log(c)) * (np.log(b) - np.log(d)))


@dataclass(frozen=True, eq=False)
class DEIS(multistep.Multistep):

    def step(self, state: tuple, i: int, x: np.ndarray, model_output: np.ndarray,
             noise: np.ndarray | None = None) -> tuple[np.ndarray, tuple]:
        x, out = f32(x), f32(model_output)
        a_s0, s_s0 = self.alpha[i], self.sigma[i]
        # The history is noise predictions, re-derived from the (thresholded) x0.
        m0 = (x - a_s0 * self.x0(x, out, i)) / s_s0
        history = (state + (multistep.keep(m0),))[-self.cfg["solver_order"]:]
        a_t, s_t = self.alpha[i + 1], self.sigma[i + 1]
        order = self.orders[i]
        if order == 1:
            # DDIM in lambda (diffusers' deis_first_order_update).
            h = self.lam[i + 1] - self.lam[i]
            return (a_t / a_s0) * x - (s_t * (np.exp(h) - F32(1.0))) * m0, history
        rho = self.sigma[i + 1 - order:i + 2] / self.alpha[i + 1 - order:i + 2]   # oldest first, then rho_t
        r_t, r0, r1 = rho[-1], rho[-2], rho[-3]
        m1 = history[-2]
        if order == 2:
            c0 = _ind2(r_t, r0, r1) - _ind2(r0, r0, r1)
            c1 = _ind2(r_t, r1, r0) - _ind2(r0, r1, r0)
            return a_t * (x / a_s0 + c0 * m0 + c1 * m1), history
        r2, m2 = rho[-4], history[-3]
        c0 = _ind3(r_t, r0, r1, r2) - _ind3(r0, r0, r1, r2)
        c1 = _ind3(r_t, r1, r2, r0) - _ind3(r0, r1, r2, r0)
        c2 = _ind3(r_t, r2, r0, r1) - _ind3(r0, r2, r0, r1)
        return a_t * (x / a_s0 + c0 * m0 + c1 * m1 + c2 * m2), history


def _orders(cfg: dict, n: int, begin: int) -> tuple:
    """diffusers' order for the steps from `begin` of n on: warm up from first order over
    the steps run (lower_order_nums counts from 0 whatever the begin index), and with
    lower_order_final lower the last two steps of a schedule under 15 steps."""
    k, short = cfg["solver_order"], cfg["lower_order_final"] and n < 15
    out = []
    for i in range(begin, n):
        run = i - begin
        out.append(1 if k == 1 or run < 1 or (short and i == n - 1)
                   else 2 if k == 2 or run < 2 or (short and i == n - 2) else 3)
    return tuple(out)


def make(config: Mapping[str, Any], steps: int, begin: int = 0, name: str = "deis",
         **overrides: Any) -> DEIS:
    cfg = resolve(config, DEFAULTS, name, **overrides)
    # diffusers runs DPM-Solver's algorithm and solver types as DEIS log-rho.
    if cfg["algorithm_type"] in ("dpmsolver", "dpmsolver++"):
        cfg["algorithm_type"] = "deis"
    if cfg["solver_type"] in ("midpoint", "heun", "bh1", "bh2"):
        cfg["solver_type"] = "logrho"
    unsupported(cfg, name, algorithm_type=("deis",), solver_type=("logrho",), solver_order=(1, 2, 3),
                use_flow_sigmas=(False, None), use_dynamic_shifting=(False, None))
    # DEIS takes no sigma_min / sigma_max, but its ramps use the checkpoint config's.
    bounds = multistep.ramp_bounds(hidden_config(config), name)
    # DEIS has no final_sigmas_type: the level after the last step is sigma_min, the
    # smallest training sigma (a ramp's own last level, repeated, on a ramp).
    t, sigmas = multistep.levels(cfg, steps, "sigma_min", bounds)
    multistep.check_first_timestep(name, cfg, steps, t, sigmas, "sigma_min", bounds)
    return DEIS(name=name, timesteps=t.astype(F32)[begin:], init_noise_sigma=1.0, stochastic=False,
                begin_index=begin, cfg=cfg, orders=_orders(cfg, len(t), begin),
                **multistep.tables_from(sigmas, begin))
