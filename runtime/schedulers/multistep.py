"""What the multistep exponential-integrator samplers UniPC (`unipc`) and DEIS (`deis`)
share: their noise levels, the VP coefficients of each level, and the record that
holds them.

Both follow diffusers' DPM-Solver lineage (scheduling_unipc_multistep.py and
scheduling_deis_multistep.py are both modified from scheduling_dpmsolver_multistep.py):
n integer timesteps down to, but not including, t = 0, the sigma of each one, and one
final level after the last step. Each level is read as VP coefficients
alpha_t = 1 / sqrt(sigma^2 + 1), sigma_t = sigma * alpha_t (`_sigma_to_alpha_sigma_t`)
and the half log-SNR lambda_t = log alpha_t - log sigma_t (Lu et al. 2022,
"DPM-Solver", sec. 3.1), in which both solvers take their steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from numbers import Real
from typing import Any, Mapping

import numpy as np

from sdrt.engines.errors import InvalidInput

from . import parametrization as param
from . import spacing, tables
from .base import SamplerRecord, f32, levels_problem

F32 = np.float32


def training_sigmas(cfg: dict) -> np.ndarray:
    """sigma = sqrt((1 - alpha_bar) / alpha_bar) of every training timestep, float32."""
    acp = tables.alphas_cumprod(cfg)
    if cfg.get("rescale_betas_zero_snr"):
        # Zero terminal SNR makes the first sigma infinite; diffusers sets alpha_bar_T to
        # 2^-24 (the smallest float16 subnormal) after the cumprod to keep it finite.
        acp = acp.copy()
        acp[-1] = F32(2.0 ** -24)
    return tables.sigmas_from_alphas_cumprod(acp)


def ramp_bounds(values: Mapping[str, Any], name: str) -> tuple[float | None, float | None]:
    """The sigma_min / sigma_max that replace the training range's ends in a sigma ramp
    (diffusers' `_convert_to_karras` & co. read `self.config.sigma_min` / `sigma_max`):
    UniPC's keywords, or for DEIS, which has no such keywords, the checkpoint config's
    own keys (see `base.hidden_config`)."""
    out = []
    for key in ("sigma_min", "sigma_max"):
        v = values.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, Real) or not 0 < v < float("inf")):
            raise InvalidInput(f"scheduler {name!r}: {key} must be a positive number or None (it bounds the "
                               f"sigma ramp), got {v!r:.40}")
        out.append(None if v is None else float(v))
    return out[0], out[1]


def levels(cfg: dict, steps: int, final: str, bounds: tuple = (None, None)) -> tuple[np.ndarray, np.ndarray]:
    """(timesteps int64 (n,), sigmas float32 (n + 1,)) as diffusers' set_timesteps builds
    them: the spaced timesteps and their interpolated sigmas, or a sigma ramp
    (use_karras/exponential/beta_sigmas) and the timesteps it maps back to. The level
    after the last step is 0 for final="zero"; for "sigma_min" the smallest training
    sigma on the plain spacing and the ramp's own last level on a ramp."""
    full = training_sigmas(cfg)
    t = spacing.dpmsolver(cfg["num_train_timesteps"], steps, cfg["timestep_spacing"], cfg["steps_offset"],
                          cfg["num_train_timesteps"])
    kind = tables.ramp_kind(cfg)
    if kind:
        lo = bounds[0] if bounds[0] is not None else full[0].item()
        hi = bounds[1] if bounds[1] is not None else full[-1].item()
        sig = tables.sigma_ramp(kind, lo, hi, steps)
        t = tables.sigma_to_t(sig, np.log(full))
        # Karras timesteps are rounded; the exponential and beta ones are truncated by
        # the cast to int64 (diffusers rounds only in the Karras branch).
        t = t.round() if kind == "karras" else t
        last = sig[-1] if final == "sigma_min" else 0.0
    else:
        sig = np.interp(t, np.arange(0, len(full)), full)
        last = full[0] if final == "sigma_min" else 0.0
    return np.asarray(t).astype(np.int64), np.concatenate([sig, [last]]).astype(F32)


def check_first_timestep(name: str, cfg: dict, steps: int, t: np.ndarray, sigmas: np.ndarray, final: str,
                         bounds: tuple = (None, None)) -> None:
    """Refuse levels (t, sigmas) = levels(cfg, steps, final, bounds) whose first two
    timesteps coincide (a long sigma ramp whose top levels map to the same timestep, or
    one reaching past the largest training sigma): without set_begin_index diffusers
    finds its first step by timestep, takes the second match (index_for_timestep) and
    runs off the schedule's end. Checked here rather than in schedule_problem, whose
    search for a step count that works would build every longer schedule: the top of a
    ramp only gets denser with more steps, so the most that work are found by bisection."""
    def repeats(t: np.ndarray) -> bool:
        return len(t) > 1 and t[0] == t[1]

    if not repeats(t):
        return
    works, fails = 1, steps
    while fails - works > 1:
        mid = (works + fails) // 2
        works, fails = (works, mid) if repeats(levels(cfg, mid, final, bounds)[0]) else (mid, fails)
    raise InvalidInput(f"scheduler {name!r} with {steps} steps: its first two noise levels (sigma {sigmas[0]:.6g} "
                       f"and {sigmas[1]:.6g}) both map to timestep {t[0]}, where diffusers starts at the second "
                       f"and runs off the schedule's end; use at most {works} steps"
                       + ("" if bounds[1] is None else " or a lower sigma_max"))


def vp_levels(sigmas: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(alpha_t, sigma_t, lambda_t) of each level, float32 as diffusers computes them per
    step; lambda is +inf at a zero final level."""
    alpha = F32(1) / ((sigmas ** 2 + F32(1)) ** 0.5)
    sigma = sigmas * alpha
    with np.errstate(divide="ignore"):
        lam = np.log(alpha) - np.log(sigma)
    return alpha, sigma, lam


def keep(a: np.ndarray) -> np.ndarray:
    """A read-only float32 copy for the history a state carries: the caller's array (a
    model output buffer an engine reuses, a latent changed in place) may change later."""
    a = np.array(a, dtype=F32)
    a.flags.writeable = False
    return a


@dataclass(frozen=True, eq=False)
class Multistep(SamplerRecord):
    """The tables of a multistep sampler, from the begin index on: entry i is call i's
    level, entry i + 1 the level it steps to (the last entry is the final level)."""
    cfg: dict
    orders: tuple            # solver order used at call i (lower while warming up and at the end)
    sigmas: np.ndarray       # float32 (n_calls + 1,): noise levels as sigma
    alpha: np.ndarray        # float32 (n_calls + 1,): alpha_t, sigma_t, lambda_t of each level
    sigma: np.ndarray
    lam: np.ndarray

    def init_state(self) -> Any:
        return ()

    def x0(self, x: np.ndarray, out: np.ndarray, i: int) -> np.ndarray:
        """The data prediction at call i, dynamically thresholded when asked."""
        x0 = param.vp_x0(self.cfg["prediction_type"], x, out, self.alpha[i], self.sigma[i])
        return tables.clip_or_threshold(x0, self.cfg)

    def schedule_problem(self) -> str | None:
        if self.cfg["solver_order"] == 1:
            return None     # a first-order step between equal levels is the identity in diffusers
        # Equal levels make the multistep ratios (lambda_si - lambda_s0) / h infinite or
        # 0 / 0 (diffusers returns NaN). The final level may equal the last one (a ramp's
        # sigma_min end): that step has h = 0, handled by each sampler.
        return levels_problem(self.sigmas[:-1])

    def add_noise(self, x0: np.ndarray, noise: np.ndarray, i: int) -> np.ndarray:
        # diffusers picks the level by step index once set_begin_index is called (the
        # begin index before the first step, call i + 1 after step i), at its VP alpha, sigma.
        return param.vp_noise(f32(x0), f32(noise), self.alpha[i], self.sigma[i])


def tables_from(sigmas: np.ndarray, begin: int) -> dict[str, np.ndarray]:
    """The level tables of a run that starts at call `begin` (diffusers' set_begin_index)."""
    alpha, sigma, lam = vp_levels(sigmas)
    return dict(sigmas=sigmas[begin:], alpha=alpha[begin:], sigma=sigma[begin:], lam=lam[begin:])
