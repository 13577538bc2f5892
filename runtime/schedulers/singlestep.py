"""DPM-Solver++ single-step (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided
Sampling of Diffusion Probabilistic Models", Alg. 1 (2S); third order from the
DPM-Solver paper, Lu et al. 2022, Alg. 2 (DPM-Solver-3)), following diffusers'
`DPMSolverSinglestepScheduler` (scheduling_dpmsolver_singlestep.py) step for step.

A k-th order step is split into k U-Net calls: the timesteps are grouped by the order
list (`_order_list`, diffusers' get_order_list), e.g. [1, 2, 1, 2, ...] for order 2;
each call of a group jumps from the group's first sample to the next noise level, using
the model outputs at the group's earlier levels as intermediate points. Algorithm
types "dpmsolver++" (data prediction), "sde-dpmsolver++" (noise drawn at every call)
and "dpmsolver" (noise prediction); the update weights are dpmsolver.weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, NamedTuple

import numpy as np

from sdrt.engines.errors import InvalidInput

from . import parametrization as param
from . import spacing, tables
from .base import SamplerRecord, f32, resolve
from .dpmsolver import (ONE, TWO, _last_timestep, check_common, combine, model_target,
                        repeat_problem, schedule_levels, weights)

F32 = np.float32

DEFAULTS = dict(
    num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
    trained_betas=None, solver_order=2, prediction_type="epsilon", thresholding=False,
    dynamic_thresholding_ratio=0.995, sample_max_value=1.0, algorithm_type="dpmsolver++",
    solver_type="midpoint", lower_order_final=False, use_karras_sigmas=False,
    use_exponential_sigmas=False, use_beta_sigmas=False, use_flow_sigmas=False, flow_shift=1.0,
    final_sigmas_type="zero", lambda_min_clipped=-float("inf"), variance_type=None,
    use_dynamic_shifting=False, time_shift_type="exponential",
)
ALGORITHMS = ("dpmsolver++", "sde-dpmsolver++", "dpmsolver")


class State(NamedTuple):
    """The per-generation history, never mutated."""
    outputs: tuple = ()                  # the last solver_order converted model outputs, oldest first
    sample: np.ndarray | None = None     # the sample at the current group's first call


@dataclass(frozen=True, eq=False)
class DPMSolverSinglestep(SamplerRecord):
    cfg: dict
    orders: tuple            # the order of call i's update (warm-up from a part-way start included)
    alpha: np.ndarray        # float32 (n_calls + 1,): VP alpha_t and sigma_t of each sigma
    sigma: np.ndarray
    lam: np.ndarray          # lambda_t = log alpha_t - log sigma_t (+inf at sigma = 0)

    def init_state(self) -> State:
        return State()

    def step(self, state: State, i: int, x: np.ndarray, model_output: np.ndarray,
             noise: np.ndarray | None = None) -> tuple[np.ndarray, State]:
        x, out, cfg = f32(x), f32(model_output), self.cfg
        outputs, sample = state
        outputs = (outputs + (model_target(cfg, x, out, self.alpha[i], self.sigma[i]),))[-cfg["solver_order"]:]
        k, lam = self.orders[i], self.lam
        if k == 1:
            sample = x                  # a group starts here
        b = i - k + 1                   # the group's first call: every update starts from it
        m = outputs[-k:]                # m[0] at level b, ..., m[-1] at level i
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            h = lam[i + 1] - lam[b]
            a, cs, cn = weights(cfg["algorithm_type"], cfg["solver_type"], k, h, self.alpha[i + 1],
                                self.sigma[i + 1], self.alpha[b], self.sigma[b])
            if k == 1:
                ds = (m[0],)
            elif k == 2:                # Alg. 1: D1 = (m(s0) - m(s1)) / r0, r0 = h0 / h
                r0 = (lam[i] - lam[b]) / h
                ds = (m[0], (ONE / r0) * (m[1] - m[0]))
            else:                       # DPM-Solver-3 with intermediate levels s1 = b + 1, s0 = i
                r0, r1 = (lam[i] - lam[b]) / h, (lam[i - 1] - lam[b]) / h
                d1_0, d1_1 = (ONE / r1) * (m[1] - m[0]), (ONE / r0) * (m[2] - m[0])
                if cfg["solver_type"] == "midpoint":
                    ds, cs = (m[0], d1_1), cs[:2]
                else:
                    ds = (m[0], (r0 * d1_0 - r1 * d1_1) / (r0 - r1), TWO * (d1_1 - d1_0) / (r0 - r1))
            return combine(sample, a, cs[:len(ds)], ds, cn, noise), State(outputs, sample)

    def schedule_problem(self) -> str | None:
        t = self.timesteps
        if self.begin_index == 0 and t.size > 1 and np.count_nonzero(t == t[0]) > 1:
            # As in the multistep solver: diffusers' text-to-image loop (no begin index)
            # starts at the second match and indexes past the end of its order list.
            return (f"its first timestep {t[0]:g} repeats, so diffusers starts one noise level late "
                    f"and runs past the end of its schedule")
        lam, solver = self.lam, self.cfg["solver_type"]
        for i, k in enumerate(self.orders):
            b = i - k + 1
            # D1 needs l(s0) != l(b) (r0 = 0 otherwise); third-order heun also divides by
            # l(s1) - l(b) and r0 - r1 (l(s0) - l(s1)). Midpoint's third order uses D1_1 only.
            if (k >= 2 and lam[i] == lam[b]) or (k == 3 and solver == "heun" and (
                    lam[i - 1] == lam[b] or lam[i] == lam[i - 1])):
                return repeat_problem(i, k, solver)
        return None

    def add_noise(self, x0: np.ndarray, noise: np.ndarray, i: int) -> np.ndarray:
        # As the multistep solver: the sigma of the step index (begin index before the
        # first step, call i + 1 after step i) at its VP (alpha_t, sigma_t).
        return param.vp_noise(f32(x0), f32(noise), self.alpha[i], self.sigma[i])


def _order_list(cfg: dict, n: int) -> list[int]:
    """diffusers' get_order_list: groups [1, 2, 3] (or [1, 2]) repeated, the tail filled
    with lower orders under lower_order_final, and first order into a zero final sigma.
    set_timesteps turns lower_order_final on when n is not a multiple of the order or the
    final sigma is zero (it cannot end a group there otherwise)."""
    k = cfg["solver_order"]
    lower_final = cfg["lower_order_final"] or n % k != 0 or cfg["final_sigmas_type"] == "zero"
    if k == 1:
        orders = [1] * n
    elif not lower_final:
        orders = [1, 2, 3][:k] * (n // k)
    elif k == 3:
        orders = [1, 2, 3] * (n // 3 - (n % 3 == 0)) + {0: [1, 2, 1], 1: [1], 2: [1, 2]}[n % 3]
    else:
        orders = [1, 2] * (n // 2 - (n % 2 == 0)) + ([1, 1] if n % 2 == 0 else [1])
    if cfg["final_sigmas_type"] == "zero":
        orders[-1] = 1
    return orders


def _orders(cfg: dict, n: int, begin: int) -> tuple:
    """The order of each call run from `begin`. diffusers' step lowers the listed order
    while it holds fewer model outputs (`while model_outputs[-order] is None`): a
    part-way start that lands inside a group runs first order there and finishes that
    group at the orders its outputs allow; the group boundaries stay those of the whole
    schedule's list."""
    listed = _order_list(cfg, n)
    return tuple(min(listed[i], i - begin + 1) for i in range(begin, n))


def make(config: Mapping[str, Any], steps: int, begin: int = 0, name: str = "dpmpp_2s",
         **overrides: Any) -> DPMSolverSinglestep:
    cfg = resolve(config, DEFAULTS, name, **overrides)
    check_common(cfg, name, ALGORITHMS)
    if cfg["algorithm_type"] == "dpmsolver" and cfg["thresholding"]:
        # diffusers indexes alpha_t by a timestep it no longer receives (None) and fails.
        raise InvalidInput(f"scheduler {name!r}: thresholding with algorithm_type='dpmsolver' fails in "
                           f"diffusers' DPMSolverSinglestepScheduler; use algorithm_type='dpmsolver++'")
    acp = tables.alphas_cumprod(cfg)
    full = tables.sigmas_from_alphas_cumprod(acp)
    # Linspace only (the class has no timestep_spacing), clipped by lambda_min_clipped.
    t = spacing.dpmsolver(cfg["num_train_timesteps"], steps, "linspace", 0, _last_timestep(cfg, acp))
    # Karras timesteps are always rounded in this class.
    t, alpha, sigma, lam = schedule_levels(cfg, full, t, steps, round_lu_karras=True)
    # sde-dpmsolver++ draws one randn_tensor in every step(): the base draws_noise.
    return DPMSolverSinglestep(name=name, timesteps=t.astype(F32)[begin:], init_noise_sigma=1.0,
                               stochastic=cfg["algorithm_type"] == "sde-dpmsolver++", begin_index=begin,
                               cfg=cfg, orders=_orders(cfg, len(t), begin),
                               alpha=alpha[begin:], sigma=sigma[begin:], lam=lam[begin:])
