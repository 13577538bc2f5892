"""DPM-Solver++ multistep (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided
Sampling of Diffusion Probabilistic Models", Alg. 2; third order from the DPM-Solver
paper, Lu et al. 2022, appendix), following diffusers' `DPMSolverMultistepScheduler`
with algorithm_type "dpmsolver++". "dpmpp_2m_karras" is the same solver on the Karras
et al. 2022 sigma ramp (eq. 5).

The solver works in lambda = log(alpha / sigma) (half log-SNR) on data predictions
x0; its history is the previous x0 predictions, kept in the per-generation state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from . import parametrization as param
from . import spacing, tables
from .base import SamplerRecord, f32, levels_problem, resolve, unsupported

F32 = np.float32

DEFAULTS = dict(
    num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
    trained_betas=None, solver_order=2, prediction_type="epsilon", thresholding=False,
    dynamic_thresholding_ratio=0.995, sample_max_value=1.0, algorithm_type="dpmsolver++",
    solver_type="midpoint", lower_order_final=True, euler_at_final=False,
    use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False,
    use_lu_lambdas=False, use_flow_sigmas=False, flow_shift=1.0, final_sigmas_type="zero",
    lambda_min_clipped=-float("inf"), variance_type=None, timestep_spacing="linspace",
    steps_offset=0, rescale_betas_zero_snr=False, use_dynamic_shifting=False,
)


def _last_timestep(cfg: dict, acp: np.ndarray) -> int:
    """One past the last timestep visited: timesteps whose lambda is below
    lambda_min_clipped are never visited (cosine schedules)."""
    lambdas = np.log(acp ** 0.5) - np.log((F32(1) - acp) ** 0.5)
    return cfg["num_train_timesteps"] - int(np.searchsorted(lambdas[::-1], cfg["lambda_min_clipped"], side="left"))


@dataclass(frozen=True, eq=False)
class DPMSolverPP(SamplerRecord):
    cfg: dict
    orders: tuple            # solver order used at step i (lower at the start and the end)
    alpha: np.ndarray        # float32 (n_calls + 1,): VP alpha_t and sigma_t of each sigma in the ramp
    sigma: np.ndarray
    lam: np.ndarray          # lambda_t = log alpha_t - log sigma_t (+inf at sigma = 0)

    def init_state(self) -> tuple:
        return ()             # previous data predictions, oldest first

    def scale_model_input(self, x: np.ndarray, i: int) -> np.ndarray:
        return f32(x)

    def step(self, state: tuple, i: int, x: np.ndarray, model_output: np.ndarray,
             noise: np.ndarray | None = None) -> tuple[np.ndarray, tuple]:
        x, out = f32(x), f32(model_output)
        a, s = self.alpha[i], self.sigma[i]
        m0 = param.vp_x0(self.cfg["prediction_type"], x, out, a, s)
        m0 = tables.clip_or_threshold(m0, self.cfg)
        history = (state + (m0,))[-self.cfg["solver_order"]:]
        a_t, s_t, s_s0 = self.alpha[i + 1], self.sigma[i + 1], self.sigma[i]
        h = self.lam[i + 1] - self.lam[i]
        with np.errstate(over="ignore"):
            phi = a_t * (np.exp(-h) - F32(1.0))     # alpha_t (e^{-h} - 1), eq. (9)'s weight
        order = self.orders[i]
        if order == 1:
            # DPM-Solver++(1) = DDIM in lambda: eq. (9) of the ++ paper.
            return (s_t / s_s0) * x - phi * m0, history
        m1 = history[-2]
        h0 = self.lam[i] - self.lam[i - 1]
        r0 = h0 / h
        d1 = (F32(1.0) / r0) * (m0 - m1)
        if order == 2:
            if self.cfg["solver_type"] == "midpoint":  # Alg. 2, 2M
                return (s_t / s_s0) * x - phi * m0 - F32(0.5) * phi * d1, history
            return (s_t / s_s0) * x - phi * m0 + (a_t * ((np.exp(-h) - F32(1.0)) / h + F32(1.0))) * d1, history
        # Third order multistep (DPM-Solver, Lu et al. 2022, appendix B, as in diffusers).
        m2 = history[-3]
        r1 = (self.lam[i - 1] - self.lam[i - 2]) / h
        d1_0, d1_1 = (F32(1.0) / r0) * (m0 - m1), (F32(1.0) / r1) * (m1 - m2)
        d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
        d2 = (F32(1.0) / (r0 + r1)) * (d1_0 - d1_1)
        e = np.exp(-h)
        return ((s_t / s_s0) * x - phi * m0 + (a_t * ((e - F32(1.0)) / h + F32(1.0))) * d1
                - (a_t * ((e - F32(1.0) + h) / h ** 2 - F32(0.5))) * d2), history

    def schedule_problem(self) -> str | None:
        # Equal levels make h = 0 and the multistep ratio r0 = h0 / h infinite.
        return levels_problem(self.sigma[:-1] / self.alpha[:-1])

    def add_noise(self, x0: np.ndarray, noise: np.ndarray, i: int) -> np.ndarray:
        # diffusers picks the sigma by step index once set_begin_index is called (the
        # begin index before the first step, call i + 1 after step i) and noises at
        # its VP (alpha_t, sigma_t).
        return param.vp_noise(f32(x0), f32(noise), self.alpha[i], self.sigma[i])


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
         **overrides: Any) -> DPMSolverPP:
    cfg = resolve(config, DEFAULTS, name, **overrides)
    if cfg["algorithm_type"] == "deis":          # diffusers maps it the same way
        cfg["algorithm_type"] = "dpmsolver++"
    if cfg["solver_type"] in ("logrho", "bh1", "bh2"):
        cfg["solver_type"] = "midpoint"
    unsupported(cfg, name, algorithm_type=("dpmsolver++",), solver_type=("midpoint", "heun"),
                solver_order=(1, 2, 3), use_exponential_sigmas=(False, None), use_beta_sigmas=(False, None),
                use_lu_lambdas=(False, None), use_flow_sigmas=(False, None), variance_type=(None,),
                final_sigmas_type=("zero", "sigma_min"), use_dynamic_shifting=(False, None))
    acp = tables.alphas_cumprod(cfg)
    if cfg["rescale_betas_zero_snr"]:
        acp = acp.copy()
        acp[-1] = F32(2.0 ** -24)   # as diffusers: keeps sigma_max finite
    full = tables.sigmas_from_alphas_cumprod(acp)
    t = spacing.dpmsolver(cfg["num_train_timesteps"], steps, cfg["timestep_spacing"], cfg["steps_offset"],
                          _last_timestep(cfg, acp))
    if cfg["use_karras_sigmas"]:
        sig = tables.karras_sigmas(full[0].item(), full[-1].item(), steps)
        t = tables.sigma_to_t(sig, np.log(full))
        if cfg["beta_schedule"] != "squaredcos_cap_v2":
            t = t.round()
    else:
        sig = np.interp(t, np.arange(0, len(full)), full)
    last = full[0] if cfg["final_sigmas_type"] == "sigma_min" else 0.0
    sigmas = np.concatenate([sig, [last]]).astype(F32)
    alpha = F32(1) / ((sigmas ** 2 + F32(1)) ** 0.5)
    sigma = sigmas * alpha
    with np.errstate(divide="ignore"):
        lam = np.log(alpha) - np.log(sigma)
    t = np.asarray(t).astype(np.int64)
    # A part-way start runs from step index `begin` (diffusers' set_begin_index).
    return DPMSolverPP(name=name, timesteps=t.astype(F32)[begin:], init_noise_sigma=1.0, stochastic=False,
                       begin_index=begin, cfg=cfg, orders=_orders(cfg, len(t), begin),
                       alpha=alpha[begin:], sigma=sigma[begin:], lam=lam[begin:])
