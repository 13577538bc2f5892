"""DPM-Solver multistep, following diffusers' `DPMSolverMultistepScheduler`
(scheduling_dpmsolver_multistep.py) step for step, in its four algorithm types:

  "dpmsolver++"      DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided
                     Sampling of Diffusion Probabilistic Models", Alg. 2): data prediction x0
  "sde-dpmsolver++"  SDE-DPM-Solver++(2M) (same paper, sec. 5 / appendix; AUTOMATIC1111's
                     "DPM++ 2M SDE", "DPM++ 2M SDE Heun" with solver_type="heun"): the same
                     x0 history, with fresh noise drawn at every step
  "dpmsolver"        multistep DPM-Solver (Lu et al. 2022, "DPM-Solver: A Fast ODE Solver for
  "sde-dpmsolver"    Diffusion Probabilistic Model Sampling ...", eq. 3.7 / appendix B) on the
                     noise prediction eps, and its SDE variant

Third order is the multistep one of the DPM-Solver paper, appendix B, as diffusers
writes it. The solvers work in lambda = log(alpha / sigma) (half log-SNR); the history
of converted model outputs is the per-generation state. "dpmpp_2m_karras" etc. run the
same solver on a sigma ramp (`tables.sigma_ramp`); use_lu_lambdas is Lu et al.'s
uniform-lambda ramp (DPM-Solver, sec. 3.3), with rounded timesteps.

The update (`model_target`, `weights`, `combine`) and the noise levels (`schedule_levels`)
are shared with the single-step solver (singlestep.py): the two classes use
the same coefficients and differ in which earlier points they extrapolate from.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from sdrt.engines.errors import InvalidInput

from . import parametrization as param
from . import spacing, tables
from .base import SamplerRecord, f32, resolve, unsupported

F32 = np.float32
ONE, HALF, TWO = F32(1.0), F32(0.5), F32(2.0)

DEFAULTS = dict(
    num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
    trained_betas=None, solver_order=2, prediction_type="epsilon", thresholding=False,
    dynamic_thresholding_ratio=0.995, sample_max_value=1.0, algorithm_type="dpmsolver++",
    solver_type="midpoint", lower_order_final=True, euler_at_final=False,
    use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False,
    use_lu_lambdas=False, use_flow_sigmas=False, flow_shift=1.0, final_sigmas_type="zero",
    lambda_min_clipped=-float("inf"), variance_type=None, timestep_spacing="linspace",
    steps_offset=0, rescale_betas_zero_snr=False, use_dynamic_shifting=False,
    time_shift_type="exponential",
)
ALGORITHMS = ("dpmsolver++", "sde-dpmsolver++", "dpmsolver", "sde-dpmsolver")


# --- the update, shared with singlestep.py ------------------------------------------

# exp and log of float32 values correctly rounded (through float64), like np.sqrt: then
# sdrt's float32 arithmetic is diffusers' to the last bit wherever torch's float32 exp,
# log and sqrt are correctly rounded too. x86 torch takes them from SLEEF / MKL (<= 1 ulp
# off for 1-17% of arguments), still far closer than NumPy's SIMD float32 exp/log (38% /
# 12% of arguments differ from torch's). It matters where h is small: at ~1000 steps
# h ~ 0.006 and e^{-h} - 1 loses 8 bits to cancellation.
def _exp(x: F32) -> F32:
    return F32(np.exp(np.float64(x)))


def _log(x: np.ndarray) -> np.ndarray:
    return np.log(np.asarray(x, dtype=np.float64)).astype(F32)


def check_common(cfg: dict, name: str, algorithms: tuple[str, ...]) -> None:
    """Map diffusers' aliases as its constructor does, and refuse what sdrt does not
    follow (flow-matching sigmas, dynamic shifting) or diffusers itself rejects."""
    alg = cfg["algorithm_type"]
    if alg in ("dpmsolver", "sde-dpmsolver", "deis") and cfg["final_sigmas_type"] == "zero":
        # diffusers' constructor raises ValueError, checking the name as given ("deis" too).
        raise InvalidInput(f"scheduler {name!r}: algorithm_type={alg!r} needs final_sigmas_type='sigma_min' "
                           f"(diffusers refuses 'zero' for it: the noise-prediction solver cannot step "
                           f"to sigma = 0)")
    if alg == "deis":
        cfg["algorithm_type"] = "dpmsolver++"
    if cfg["solver_type"] in ("logrho", "bh1", "bh2"):
        cfg["solver_type"] = "midpoint"
    unsupported(cfg, name, algorithm_type=algorithms, solver_type=("midpoint", "heun"),
                solver_order=(1, 2, 3), use_flow_sigmas=(False, None), use_dynamic_shifting=(False, None),
                final_sigmas_type=("zero", "sigma_min"), time_shift_type=("exponential",))
    if cfg["variance_type"] is not None and cfg["prediction_type"] == "epsilon":
        # diffusers keeps the first 3 channels as the mean: a pixel-space model with a learned
        # variance (IF, unCLIP). SD's 4-channel latents have none; ignored for other predictions.
        unsupported(cfg, name, variance_type=(None,))


def model_target(cfg: dict, x: np.ndarray, out: np.ndarray, alpha: F32, sigma: F32) -> np.ndarray:
    """What the solver integrates (diffusers' convert_model_output): the data prediction
    x0 for the ++ solvers, the noise eps for DPM-Solver; thresholding acts on x0."""
    pred = cfg["prediction_type"]
    if cfg["algorithm_type"].endswith("++"):
        return tables.clip_or_threshold(param.vp_x0(pred, x, out, alpha, sigma), cfg)
    eps = param.vp_eps(pred, x, out, alpha, sigma)
    if cfg.get("thresholding"):
        x0 = tables.clip_or_threshold((x - sigma * eps) / alpha, cfg)
        eps = (x - alpha * x0) / sigma
    return eps


def weights(alg: str, solver: str, order: int, h: F32, a_t: F32, s_t: F32, a_s: F32,
            s_s: F32) -> tuple[F32, tuple, F32 | None]:
    """(A, (c0, c1, c2), c_noise) with x_t = A x_s + c0 D0 + c1 D1 + c2 D2 + c_noise z for
    a step of length h in lambda from (a_s, s_s) to (a_t, s_t). Each coefficient is the
    float32 expression diffusers writes, its sign folded in (x - y == x + (-y) exactly).
    Orders 1-2: DPM-Solver++ eqs. (9)/Alg. 2 ("midpoint") or its appendix's "heun" form,
    DPM-Solver eq. 3.7 / Alg. 4; order 3: DPM-Solver appendix B (the caller picks D1)."""
    if alg == "dpmsolver++":
        em = _exp(-h) - ONE                                     # e^{-h} - 1
        c0 = -(a_t * em)
        c1 = -(HALF * (a_t * em)) if order == 2 and solver == "midpoint" else a_t * (em / h + ONE)
        return s_t / s_s, (c0, c1, -(a_t * ((em + h) / h ** 2 - HALF))), None
    if alg == "dpmsolver":
        ep = _exp(h) - ONE                                      # e^{h} - 1
        c0 = -(s_t * ep)
        c1 = -(HALF * (s_t * ep)) if order == 2 and solver == "midpoint" else -(s_t * (ep / h - ONE))
        return a_t / a_s, (c0, c1, -(s_t * ((ep - h) / h ** 2 - HALF))), None
    if alg == "sde-dpmsolver++":
        e2 = _exp(F32(-2.0) * h)
        c0 = a_t * (ONE - e2)
        c1 = HALF * c0 if order == 2 and solver == "midpoint" else a_t * ((ONE - e2) / (F32(-2.0) * h) + ONE)
        c2 = a_t * ((ONE - e2 - TWO * h) / (TWO * h) ** 2 - HALF)
        return s_t / s_s * _exp(-h), (c0, c1, c2), s_t * np.sqrt(ONE - e2)
    # sde-dpmsolver: first and second order only (diffusers has no third-order form).
    ep = _exp(h) - ONE
    c1 = -(s_t * ep) if solver == "midpoint" else -(TWO * (s_t * (ep / h - ONE)))
    return a_t / a_s, (-(TWO * (s_t * ep)), c1, None), s_t * np.sqrt(_exp(TWO * h) - ONE)


def combine(x: np.ndarray, a: F32, cs: tuple, ds: tuple, c_noise: F32 | None,
            noise: np.ndarray | None) -> np.ndarray:
    """A x + sum c_k D_k (+ c_noise z), summed left to right as diffusers does."""
    out = a * x
    for c, d in zip(cs, ds):
        out = out + c * d
    if c_noise is not None:
        if noise is None:
            raise ValueError("this SDE solver step needs noise (draws_noise(i) is True)")
        out = out + c_noise * f32(noise)
    return out


def vp_levels(sigmas: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """VP (alpha_t, sigma_t) and lambda_t of each VE sigma (diffusers'
    _sigma_to_alpha_sigma_t), float32; lambda = +inf at sigma = 0."""
    alpha = ONE / ((sigmas ** 2 + ONE) ** 0.5)
    sigma = sigmas * alpha
    with np.errstate(divide="ignore"):
        lam = _log(alpha) - _log(sigma)
    return alpha, sigma, lam


def ramp_levels(cfg: dict, full: np.ndarray, steps: int, round_lu_karras: bool) -> tuple | None:
    """(sigmas float64, timesteps) of the sigma ramp the config turns on, or None: Karras,
    Lu's uniform lambda, exponential or beta, checked in diffusers' order; Karras and Lu
    timesteps are rounded when asked. diffusers' _convert_to_lu ramps log sigma (= -lambda
    for these VE sigmas) linearly, in its own float64 operation order."""
    log_full = np.log(full)
    if cfg.get("use_karras_sigmas"):
        kind = "karras"
    elif cfg.get("use_lu_lambdas"):
        kind = "lu"
    else:
        kind = tables.ramp_kind(cfg)
    if kind is None:
        return None
    lo, hi = full[0].item(), full[-1].item()
    if kind == "lu":
        lam_lo, lam_hi = log_full[0].item(), log_full[-1].item()
        sig = np.exp(lam_hi + np.linspace(0, 1, steps) * (lam_lo - lam_hi))
    else:
        sig = tables.sigma_ramp(kind, lo, hi, steps)
    t = tables.sigma_to_t(sig, log_full)
    if kind in ("karras", "lu") and round_lu_karras:
        t = t.round()
    return sig, t


def schedule_levels(cfg: dict, full: np.ndarray, t: np.ndarray, steps: int,
                    round_lu_karras: bool) -> tuple[np.ndarray, ...]:
    """(int64 timesteps, alpha, sigma, lambda) of the whole schedule: the training sigmas at
    the spaced timesteps `t`, or the ramp the config turns on (with its own timesteps),
    then the final sigma (0, or sigma_min with final_sigmas_type="sigma_min")."""
    ramp = ramp_levels(cfg, full, steps, round_lu_karras)
    if ramp is None:
        sig = np.interp(t, np.arange(0, len(full)), full)
    else:
        sig, t = ramp
    last = full[0] if cfg["final_sigmas_type"] == "sigma_min" else 0.0
    alpha, sigma, lam = vp_levels(np.concatenate([sig, [last]]).astype(F32))
    return np.asarray(t).astype(np.int64), alpha, sigma, lam     # diffusers' int64 timesteps (ramps: truncated)


def nan_problem(lam: np.ndarray, orders: tuple, solver: str) -> str | None:
    """The first multistep update that divides by a zero step in lambda (a repeated
    noise level), which makes diffusers' float32 result inf or NaN, or None.
    With h = l_{i+1} - l_i and h_j the earlier steps: a first-order step is finite at
    h = 0 (the sample is left as it is), and so is a midpoint second-order one while
    h_0 != 0 (r0 = h_0 / h = inf, D1 = 0); D1 = (1 / r0) (m0 - m1) needs h_0 != 0, the
    heun weight (e^{-h} - 1) / h and the third-order D's need every step non-zero."""
    for i, k in enumerate(orders):
        if k == 1:
            continue
        h, earlier = lam[i + 1] - lam[i], [lam[i - j] - lam[i - j - 1] for j in range(k - 1)]
        if 0 in earlier or (h == 0 and (k == 3 or solver == "heun")):
            return repeat_problem(i, k, solver)
    return None


def repeat_problem(i: int, order: int, solver: str) -> str:
    return (f"its noise level repeats around call {i} (a zero step in lambda), where diffusers' "
            f"order-{order} {solver} update divides by zero and the sample becomes NaN")


# --- the multistep sampler ------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class DPMSolverMultistep(SamplerRecord):
    cfg: dict
    orders: tuple            # solver order used at call i (lower at the start and the end)
    alpha: np.ndarray        # float32 (n_calls + 1,): VP alpha_t and sigma_t of each sigma
    sigma: np.ndarray
    lam: np.ndarray          # lambda_t = log alpha_t - log sigma_t (+inf at sigma = 0)

    def init_state(self) -> tuple:
        return ()             # the previous converted model outputs, oldest first

    def step(self, state: tuple, i: int, x: np.ndarray, model_output: np.ndarray,
             noise: np.ndarray | None = None) -> tuple[np.ndarray, tuple]:
        x, out, cfg = f32(x), f32(model_output), self.cfg
        m0 = model_target(cfg, x, out, self.alpha[i], self.sigma[i])
        history = (state + (m0,))[-cfg["solver_order"]:]
        order, lam = self.orders[i], self.lam
        # IEEE semantics as in torch: h = inf at a zero final sigma, h = 0 at a repeated
        # level that schedule_problem found harmless.
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            h = lam[i + 1] - lam[i]
            a, cs, cn = weights(cfg["algorithm_type"], cfg["solver_type"], order, h, self.alpha[i + 1],
                                self.sigma[i + 1], self.alpha[i], self.sigma[i])
            if order == 1:
                ds = (m0,)
            elif order == 2:    # DPM-Solver++ Alg. 2: D1 = (m0 - m1) / r0
                r0 = (lam[i] - lam[i - 1]) / h
                ds = (m0, (ONE / r0) * (m0 - history[-2]))
            else:               # DPM-Solver appendix B: first and second divided differences
                m1, m2 = history[-2], history[-3]
                r0, r1 = (lam[i] - lam[i - 1]) / h, (lam[i - 1] - lam[i - 2]) / h
                d1_0, d1_1 = (ONE / r0) * (m0 - m1), (ONE / r1) * (m1 - m2)
                ds = (m0, d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1), (ONE / (r0 + r1)) * (d1_0 - d1_1))
            return combine(x, a, cs[:order], ds, cn, noise), history

    def schedule_problem(self) -> str | None:
        t = self.timesteps
        if self.begin_index == 0 and t.size > 1 and np.count_nonzero(t == t[0]) > 1:
            # Text-to-image sets no begin index: diffusers' index_for_timestep takes the
            # second match of a repeated first timestep, skips a level and steps past the
            # end of its sigmas (IndexError).
            return (f"its first timestep {t[0]:g} repeats, so diffusers starts one noise level late "
                    f"and runs past the end of its schedule")
        # Not the base range check: a trailing list can end at t = -1 (diffusers' arange
        # overshoots by one point), which diffusers runs to a finite result.
        return nan_problem(self.lam, self.orders, self.cfg["solver_type"])

    def add_noise(self, x0: np.ndarray, noise: np.ndarray, i: int) -> np.ndarray:
        # diffusers picks the sigma by step index once set_begin_index is called (the
        # begin index before the first step, call i + 1 after step i) and noises at
        # its VP (alpha_t, sigma_t).
        return param.vp_noise(f32(x0), f32(noise), self.alpha[i], self.sigma[i])


def _last_timestep(cfg: dict, acp: np.ndarray) -> int:
    """One past the last timestep visited: timesteps whose lambda is below
    lambda_min_clipped are never visited (cosine schedules)."""
    lambdas = np.log(acp ** 0.5) - np.log((F32(1) - acp) ** 0.5)
    return cfg["num_train_timesteps"] - int(np.searchsorted(lambdas[::-1], cfg["lambda_min_clipped"], side="left"))


def _orders(cfg: dict, n: int, begin: int) -> tuple:
    """diffusers' order schedule for the steps from `begin` of n on: warm up from first
    order over the first steps run (lower_order_nums counts from 0 whatever the begin
    index), and drop order at the end of the whole schedule (lower_order_final) for
    stability with few steps, and always at a zero final sigma."""
    k = cfg["solver_order"]
    out = []
    for i in range(begin, n):
        run = i - begin            # steps already taken: diffusers' lower_order_nums
        final = i == n - 1 and (cfg["euler_at_final"] or (cfg["lower_order_final"] and n < 15)
                                or cfg["final_sigmas_type"] == "zero")
        second = i == n - 2 and cfg["lower_order_final"] and n < 15
        out.append(1 if k == 1 or run < 1 or final else 2 if k == 2 or run < 2 or second else 3)
    return tuple(out)


def make(config: Mapping[str, Any], steps: int, begin: int = 0, name: str = "dpmpp_2m",
         **overrides: Any) -> DPMSolverMultistep:
    cfg = resolve(config, DEFAULTS, name, **overrides)
    check_common(cfg, name, ALGORITHMS)
    if cfg["algorithm_type"] == "sde-dpmsolver" and cfg["solver_order"] == 3:
        raise InvalidInput(f"scheduler {name!r}: algorithm_type='sde-dpmsolver' has no third-order update "
                           f"in diffusers (its step fails at the first third-order step); use solver_order "
                           f"1 or 2, or algorithm_type='sde-dpmsolver++'")
    acp = tables.alphas_cumprod(cfg)
    if cfg["rescale_betas_zero_snr"]:
        acp = acp.copy()
        acp[-1] = F32(2.0 ** -24)   # as diffusers: keeps sigma_max finite
    full = tables.sigmas_from_alphas_cumprod(acp)
    t = spacing.dpmsolver(cfg["num_train_timesteps"], steps, cfg["timestep_spacing"], cfg["steps_offset"],
                          _last_timestep(cfg, acp))
    t, alpha, sigma, lam = schedule_levels(cfg, full, t, steps,
                                           round_lu_karras=cfg["beta_schedule"] != "squaredcos_cap_v2")
    # A part-way start runs from step index `begin` (diffusers' set_begin_index).
    # The SDE solvers draw one randn_tensor in every step(), whatever its order: the base
    # draws_noise (every call when stochastic) is diffusers' draw pattern.
    return DPMSolverMultistep(name=name, timesteps=t.astype(F32)[begin:], init_noise_sigma=1.0,
                              stochastic=cfg["algorithm_type"].startswith("sde"), begin_index=begin,
                              cfg=cfg, orders=_orders(cfg, len(t), begin),
                              alpha=alpha[begin:], sigma=sigma[begin:], lam=lam[begin:])
