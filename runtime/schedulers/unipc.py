"""UniPC (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast
Sampling of Diffusion Models"), following diffusers' `UniPCMultistepScheduler`
(scheduling_unipc_multistep.py) step for step.

Each step of order p has two halves, both in lambda = log(alpha / sigma):
  - UniC, the corrector: once the model has been evaluated at the sample x_t the
    previous step predicted, x_t is recomputed from the previous step's start with that
    evaluation included, which raises the order by one at no extra model call.
    diffusers runs it at the start of the *next* step() call, so the state carries the
    sample the previous predictor started from (`last_sample`).
  - UniP, the predictor: a multistep update from the current level to the next with
    the last p model evaluations.
Both weigh the divided differences D_k = (m_k - m_0) / r_k of the history by rhos that
solve R rho = b, where b holds the phi functions of h divided by B(h): B(h) = h for
solver_type "bh1", e^h - 1 for "bh2" (the paper's two choices of B(h)). With
predict_x0 the history is data predictions x0 (the DPM-Solver++ form), else noise
predictions.
"""

from __future__ import annotations

from dataclasses import dataclass
from numbers import Integral
from typing import Any, Mapping

import numpy as np

from sdrt.engines.errors import InvalidInput

from . import multistep
from . import parametrization as param
from .base import f32, resolve, unsupported

F32 = np.float32

DEFAULTS = dict(
    num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
    trained_betas=None, solver_order=2, prediction_type="epsilon", thresholding=False,
    dynamic_thresholding_ratio=0.995, sample_max_value=1.0, predict_x0=True, solver_type="bh2",
    lower_order_final=True,
    disable_corrector=(),        # diffusers' [] (a tuple: this dict is shared by every call)
    solver_p=None, use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False,
    use_flow_sigmas=False, flow_shift=1.0, timestep_spacing="linspace", steps_offset=0,
    final_sigmas_type="zero", rescale_betas_zero_snr=False, use_dynamic_shifting=False,
    time_shift_type="exponential", sigma_min=None, sigma_max=None, shift_terminal=None,
)


@dataclass(frozen=True)
class UniPCState:
    outputs: tuple = ()          # converted model outputs (x0 or eps), oldest first, at most solver_order
    last_sample: Any = None      # the sample the previous predictor started from (None before the first step)


def _weighted(rhos: np.ndarray, d1s: list) -> np.ndarray:
    """sum_k rho_k D_k (diffusers' einsum "k,bkc...->bc...")."""
    out = rhos[0] * d1s[0]
    for rho, d in zip(rhos[1:], d1s[1:]):
        out = out + rho * d
    return out


@dataclass(frozen=True, eq=False)
class UniPC(multistep.Multistep):
    corrects: tuple          # whether call i starts with the corrector (not the first call run, not disabled)

    def init_state(self) -> UniPCState:
        return UniPCState()

    def _convert(self, x: np.ndarray, out: np.ndarray, i: int) -> np.ndarray:
        if self.cfg["predict_x0"]:
            return self.x0(x, out, i)
        return param.vp_eps(self.cfg["prediction_type"], x, out, self.alpha[i], self.sigma[i])

    def _bh(self, t: int, s0: int, order: int, corrector: bool):
        """The B(h) update from level s0 to level t using the levels s0 - 1, s0 - 2, ...
        of the history (diffusers' multistep_uni_p_bh_update / multistep_uni_c_bh_update):
        (factor on x, factor on m0, factor on the weighted differences, r_k, rhos), float32
        as diffusers computes them."""
        lam, x0_form = self.lam, self.cfg["predict_x0"]
        with np.errstate(all="ignore"):     # diffusers computes b even where it is not used
            h = lam[t] - lam[s0]
            rks = [(lam[s0 - k] - lam[s0]) / h for k in range(1, order)] + [F32(1)]
            hh = -h if x0_form else h
            h_phi_1 = np.expm1(hh)          # h phi_1(h) = e^h - 1
            h_phi_k = h_phi_1 / hh - F32(1)
            b_h = hh if self.cfg["solver_type"] == "bh1" else np.expm1(hh)
            r, b, factorial = [], [], 1
            for k in range(1, order + 1):
                r.append(np.array(rks, dtype=F32) ** (k - 1))
                b.append(h_phi_k * factorial / b_h)
                factorial *= k + 1
                h_phi_k = h_phi_k / hh - 1 / factorial
            r, b = np.stack(r).astype(F32), np.array(b, dtype=F32)
            if corrector:   # UniC-p: p equations, the last rho weighs the new evaluation
                rhos = np.full(1, 0.5, F32) if order == 1 else np.linalg.solve(r, b).astype(F32)
            else:           # UniP-p: p - 1 equations
                rhos = (None if order == 1 else np.full(1, 0.5, F32) if order == 2
                        else np.linalg.solve(r[:-1, :-1], b[:-1]).astype(F32))
        if x0_form:
            ratio, scale = self.sigma[t] / self.sigma[s0], self.alpha[t]
        else:
            ratio, scale = self.alpha[t] / self.alpha[s0], self.sigma[t]
        return ratio, scale * h_phi_1, scale * b_h, rks, rhos

    @staticmethod
    def _differences(outputs: tuple, rks: list, order: int) -> list:
        m0 = outputs[-1]
        return [(outputs[-(k + 1)] - m0) / rks[k - 1] for k in range(1, order)]

    def _correct(self, state: UniPCState, i: int, m_t: np.ndarray) -> np.ndarray:
        """UniC: the sample at level i recomputed from the previous step's start with the
        model's output at level i (m_t) included, at the previous step's order."""
        order = self.orders[i - 1]
        ratio, c_m0, c_res, rks, rhos = self._bh(i, i - 1, order, corrector=True)
        m0 = state.outputs[-1]
        x_t = ratio * state.last_sample - c_m0 * m0
        d1_t = m_t - m0
        res = rhos[-1] * d1_t
        if order > 1:
            res = _weighted(rhos[:-1], self._differences(state.outputs, rks, order)) + res
        return x_t - c_res * res

    def _predict(self, outputs: tuple, i: int, x: np.ndarray) -> np.ndarray:
        """UniP: from level i to level i + 1 with the last orders[i] outputs."""
        order = self.orders[i]
        ratio, c_m0, c_res, rks, rhos = self._bh(i + 1, i, order, corrector=False)
        x_t = ratio * x - c_m0 * outputs[-1]
        if order == 1:
            return x_t
        return x_t - c_res * _weighted(rhos, self._differences(outputs, rks, order))

    def step(self, state: UniPCState, i: int, x: np.ndarray, model_output: np.ndarray,
             noise: np.ndarray | None = None) -> tuple[np.ndarray, UniPCState]:
        # diffusers' step(): convert, correct the current sample, push the output, predict.
        x, out = f32(x), f32(model_output)
        m = self._convert(x, out, i)
        if self.corrects[i]:
            x = self._correct(state, i, m)
        outputs = (state.outputs + (multistep.keep(m),))[-self.cfg["solver_order"]:]
        return self._predict(outputs, i, x), UniPCState(outputs, multistep.keep(x))


def _orders(cfg: dict, n: int, begin: int) -> tuple:
    """diffusers' this_order for the steps from `begin` of n on: at most one more than the
    steps already run (lower_order_nums counts from 0 whatever the begin index) and, with
    lower_order_final, at most the steps left in the whole schedule (whatever n is)."""
    k = cfg["solver_order"]
    return tuple(min(k, n - i if cfg["lower_order_final"] else k, i - begin + 1) for i in range(begin, n))


def _last_step_problem(sigmas: np.ndarray, orders: tuple) -> str | None:
    """What makes diffusers' last predictor return NaN or fail to solve: past a zero final
    level lambda is infinite and only the first-order update stays finite; a final level
    equal to the last one (h = 0) leaves third order a singular system."""
    last = orders[-1] if orders else 1
    if sigmas[-1] == 0 and last > 1:
        return (f"its last step is of order {last}, which divides by the zero final noise level (diffusers "
                f"returns NaN): set lower_order_final=True, or final_sigmas_type='sigma_min', or use 1 step")
    if sigmas[-1] == sigmas[-2] and last > 2:
        return (f"its last step is of order {last} onto a repeated final noise level (a singular system in "
                f"diffusers): set lower_order_final=True, or use at most 2 steps")
    return None


def _disabled(value: Any, name: str) -> tuple:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__") or not all(
            isinstance(v, Integral) and not isinstance(v, bool) for v in value):
        raise InvalidInput(f"scheduler {name!r}: disable_corrector must be a list of step indices, "
                           f"got {value!r:.60}")
    return tuple(sorted({int(v) for v in value}))


def make(config: Mapping[str, Any], steps: int, begin: int = 0, name: str = "unipc",
         **overrides: Any) -> UniPC:
    cfg = resolve(config, DEFAULTS, name, **overrides)
    if cfg["solver_type"] in ("midpoint", "heun", "logrho"):   # diffusers maps these the same way
        cfg["solver_type"] = "bh2"
    unsupported(cfg, name, solver_type=("bh1", "bh2"), solver_order=(1, 2, 3), predict_x0=(True, False),
                final_sigmas_type=("zero", "sigma_min"), solver_p=(None,), use_flow_sigmas=(False, None),
                use_dynamic_shifting=(False, None), shift_terminal=(None,))
    if cfg["final_sigmas_type"] == "zero" and (cfg["solver_type"] == "bh1" or not cfg["predict_x0"]):
        what = "solver_type='bh1'" if cfg["solver_type"] == "bh1" else "predict_x0=False"
        raise InvalidInput(f"scheduler {name!r}: {what} needs final_sigmas_type='sigma_min': at a zero final "
                           f"noise level diffusers' last UniPC step multiplies an infinite coefficient by 0 "
                           f"and returns NaN")
    cfg["disable_corrector"] = _disabled(cfg["disable_corrector"], name)
    bounds = multistep.ramp_bounds(cfg, name)
    t, sigmas = multistep.levels(cfg, steps, cfg["final_sigmas_type"], bounds)
    multistep.check_first_timestep(name, cfg, steps, t, sigmas, cfg["final_sigmas_type"], bounds)
    n = len(t)       # can differ from steps: "trailing" takes a float arange
    orders = _orders(cfg, n, begin)
    # Refused here rather than in schedule_problem: every longer schedule fails the same
    # way, and the search for a step count that works would build all of them.
    problem = _last_step_problem(sigmas, orders)
    if problem:
        raise InvalidInput(f"scheduler {name!r} with {steps} steps: {problem}")
    off = frozenset(cfg["disable_corrector"])
    # disable_corrector counts steps of the whole schedule (diffusers' step_index - 1).
    corrects = tuple(i > begin and i - 1 not in off for i in range(begin, n))
    return UniPC(name=name, timesteps=t.astype(F32)[begin:], init_noise_sigma=1.0, stochastic=False,
                 begin_index=begin, cfg=cfg, orders=orders, corrects=corrects,
                 **multistep.tables_from(sigmas, begin))
