"""Linear multistep sampling (k-diffusion's `sample_lms`, Karras et al. 2022's VE ODE
integrated with the last up to four derivatives), following diffusers'
`LMSDiscreteScheduler` (scheduling_lms_discrete.py) step for step.

The latent lives at noise level sigma, x = x0 + sigma * eps, like Euler's. Step i adds
sum_k c_ik d_{i-k}, where d_j = (x_j - x0_j) / sigma_j is the derivative found at call j
and c_ik is the integral from sigma_i to sigma_{i+1} of the Lagrange basis polynomial
that is 1 at sigma_{i-k} and 0 at the other nodes (Adams-Bashforth with non-uniform
steps). diffusers integrates it numerically with `scipy.integrate.quad`; the polynomial
has degree at most 3, so Gauss-Legendre quadrature with 2 nodes integrates it exactly
(up to float64 rounding), and the runtime needs no scipy.
"""

from __future__ import annotations

from dataclasses import dataclass
from numbers import Real
from typing import Any, Mapping

import numpy as np

from sdrt.engines.errors import InvalidInput

from . import parametrization as param
from . import spacing, tables
from .base import SamplerRecord, f32, hidden_config, levels_problem, resolve
from .euler import init_sigma

F32 = np.float32

DEFAULTS = dict(
    num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
    trained_betas=None, use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False,
    prediction_type="epsilon", timestep_spacing="linspace", steps_offset=0,
)
# diffusers' pipelines call step() without `order`, so its default of 4 is what runs.
ORDER = 4
# Gauss-Legendre with m nodes is exact for polynomials of degree <= 2m - 1.
_GL_NODES, _GL_WEIGHTS = np.polynomial.legendre.leggauss(ORDER // 2)


def lms_coefficients(sigmas: np.ndarray, begin: int, n_calls: int) -> np.ndarray:
    """(n_calls, ORDER) float64: row i holds c_ik for call i of a run that starts at
    index `begin` of the whole schedule's `sigmas` (diffusers' get_lms_coefficient).

    diffusers takes the interpolation order from the step index in the whole schedule,
    min(begin + i + 1, 4), but only has the derivatives of the calls it ran, so a run
    that starts part-way uses the first min(i + 1, 4) coefficients of a higher-order
    basis whose nodes reach back before its start (zip() in LMS step() drops the rest);
    those terms are left 0 here."""
    s = np.asarray(sigmas, dtype=np.float64)
    out = np.zeros((n_calls, ORDER))
    for i in range(n_calls):
        g = begin + i
        nodes = s[g - np.arange(min(g + 1, ORDER))]            # sigma_g, sigma_{g-1}, ...
        a, b = s[g], s[g + 1]
        tau = (b - a) / 2 * _GL_NODES + (a + b) / 2
        w = (b - a) / 2 * _GL_WEIGHTS
        for k in range(min(i + 1, ORDER)):
            others = np.delete(nodes, k)
            # A repeated node divides by zero here, as in diffusers; schedule_problem refuses it.
            with np.errstate(divide="ignore", invalid="ignore"):
                basis = np.prod((tau[:, None] - others) / (nodes[k] - others), axis=1)
            out[i, k] = w @ basis
    return out


@dataclass(frozen=True, eq=False)
class LMS(SamplerRecord):
    prediction_type: str
    sigmas: np.ndarray   # float32 (n_calls + 1,): noise level before call i, 0 at the end
    coeffs: np.ndarray   # float32 (n_calls, ORDER): c_ik, the weight of call i-k's derivative at call i

    def init_state(self) -> tuple[np.ndarray, ...]:
        return ()        # the last derivatives, newest first

    def scale_model_input(self, x: np.ndarray, i: int) -> np.ndarray:
        return f32(x) / ((self.sigmas[i] ** 2 + 1) ** 0.5)

    def step(self, state: tuple[np.ndarray, ...], i: int, x: np.ndarray, model_output: np.ndarray,
             noise: np.ndarray | None = None) -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
        x, out = f32(x), f32(model_output)
        sigma = self.sigmas[i]
        derivative = (x - param.ve_x0(self.prediction_type, x, out, sigma)) / sigma
        history = (derivative,) + tuple(state)
        # diffusers sums term by term, newest derivative first, in float32 (torch rounds
        # the float64 coefficient to the tensor's dtype), then adds the sum to x.
        total = self.coeffs[i, 0] * history[0]
        for k in range(1, min(i + 1, ORDER)):
            total = total + self.coeffs[i, k] * history[k]
        return x + total, history[:ORDER - 1]

    def schedule_problem(self) -> str | None:
        # A repeated sigma is a repeated interpolation node: the basis divides by zero.
        return levels_problem(self.sigmas[:-1])

    def add_noise(self, x0: np.ndarray, noise: np.ndarray, i: int) -> np.ndarray:
        # As Euler: the sigma of call i (diffusers' begin index, then step_index).
        return param.ve_noise(f32(x0), f32(noise), self.sigmas[i])


def _ramp_bound(config: Mapping[str, Any], key: str, name: str) -> float | None:
    """diffusers' exponential and beta ramps read `config.sigma_min` / `sigma_max` when the
    checkpoint's config carries them (from_config keeps keys the class does not take), even
    though LMSDiscreteScheduler has no such keyword."""
    v = hidden_config(config).get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, Real) or not 0 < v < float("inf"):
        raise InvalidInput(f"scheduler {name!r}: {key} must be a positive number or null, got {v!r:.40}")
    return float(v)


def make(config: Mapping[str, Any], steps: int, begin: int = 0, name: str = "lms",
         **overrides: Any) -> LMS:
    cfg = resolve(config, DEFAULTS, name, **overrides)
    acp = tables.alphas_cumprod(cfg)
    full = tables.sigmas_from_alphas_cumprod(acp)
    t = spacing.fractional(cfg["num_train_timesteps"], steps, cfg["timestep_spacing"], cfg["steps_offset"])
    sig = np.interp(t, np.arange(0, len(full)), full)              # float64, as diffusers
    kind = tables.ramp_kind(cfg)
    if kind:
        lo, hi = sig[-1].item(), sig[0].item()
        if kind != "karras":                                       # Karras ignores the config's bounds
            lo = _ramp_bound(config, "sigma_min", name) or lo
            hi = _ramp_bound(config, "sigma_max", name) or hi
        sig = tables.sigma_ramp(kind, lo, hi, steps)
        t = tables.sigma_to_t(sig, np.log(full))
    sigmas = np.concatenate([sig, [0.0]]).astype(F32)
    coeffs = lms_coefficients(sigmas, begin, steps - begin).astype(F32)
    return LMS(name=name, timesteps=np.asarray(t).astype(F32)[begin:],
               init_noise_sigma=init_sigma(sigmas, cfg["timestep_spacing"]), stochastic=False,
               begin_index=begin, prediction_type=cfg["prediction_type"], sigmas=sigmas[begin:],
               coeffs=coeffs)
