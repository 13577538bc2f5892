"""Noise-schedule tables shared by every sampler: betas, cumulative alphas, sigmas
and the Karras sigma ramp (where the steps sit on the timeline is `spacing`).

Everything here is a small pure function of config values, reimplemented from
diffusers 0.42.1 (`diffusers/schedulers/scheduling_*.py`). diffusers keeps these
tables in float32 torch tensors; we reproduce the float32 rounding where it matters
(linspace, cumprod) so the per-step arithmetic sees the same numbers bit for bit,
which is what lets whole trajectories match to ~1e-6 rather than drift.
"""

from __future__ import annotations

import functools
import math

import numpy as np

F32 = np.float32


def linspace_f32(start: float, end: float, n: int) -> np.ndarray:
    """`torch.linspace(start, end, n, dtype=torch.float32)` bit for bit.

    torch's CPU kernel steps from `start` for the first half and back from `end` for
    the second half, each as one fused multiply-add in float32; numpy's float64
    linspace cast to float32 differs in the last bit for ~15% of entries, which is
    enough to move cumprod-derived sigmas by 1e-6 relative.
    """
    if n == 1:
        return np.array([start], dtype=F32)
    a, b = F32(start), F32(end)
    step = (b - a) / F32(n - 1)
    i = np.arange(n, dtype=np.float64)
    # float32 * float32 is exact in float64, so one float64 add then one rounding = fma.
    lo = (np.float64(a) + np.float64(step) * i).astype(F32)
    hi = (np.float64(b) - np.float64(step) * (n - 1 - i)).astype(F32)
    return np.where(np.arange(n) < n // 2, lo, hi).astype(F32)


def _cosine_betas(n: int, max_beta: float = 0.999) -> np.ndarray:
    """Glide's squaredcos_cap_v2 schedule (Nichol & Dhariwal 2021, eq. 17), as
    diffusers' `betas_for_alpha_bar(..., "cosine")`."""
    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    return np.array([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)], dtype=F32)


def _cumprod_f32(a: np.ndarray) -> np.ndarray:
    # torch's CPU cumprod accumulates float32 in double (at::acc_type) and rounds each
    # partial product once; a float32 numpy cumprod would round at every step.
    return np.cumprod(a.astype(np.float64)).astype(F32)


def _rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed",
    Algorithm 1 (diffusers' `rescale_zero_terminal_snr`)."""
    sqrt_ab = np.sqrt(_cumprod_f32(F32(1.0) - betas))
    first, last = sqrt_ab[0].copy(), sqrt_ab[-1].copy()
    sqrt_ab = sqrt_ab - last
    sqrt_ab = sqrt_ab * (first / (first - last))
    ab = sqrt_ab ** 2
    alphas = np.concatenate([ab[:1], ab[1:] / ab[:-1]])
    return (F32(1.0) - alphas).astype(F32)


def betas(cfg: dict) -> np.ndarray:
    """The training betas (float32) from beta_schedule / trained_betas."""
    n = cfg["num_train_timesteps"]
    if cfg.get("trained_betas") is not None:
        b = np.asarray(cfg["trained_betas"], dtype=F32)
    elif cfg["beta_schedule"] == "linear":
        b = linspace_f32(cfg["beta_start"], cfg["beta_end"], n)
    elif cfg["beta_schedule"] == "scaled_linear":
        # Latent diffusion's schedule: linear in sqrt(beta).
        b = linspace_f32(cfg["beta_start"] ** 0.5, cfg["beta_end"] ** 0.5, n) ** 2
    else:  # "squaredcos_cap_v2", checked in base.resolve
        b = _cosine_betas(n)
    if cfg.get("rescale_betas_zero_snr"):
        b = _rescale_zero_terminal_snr(b)
    return b


def alphas_cumprod(cfg: dict) -> np.ndarray:
    """alpha_bar_t = prod_{s<=t} (1 - beta_s), float32, index = training timestep."""
    return _cumprod_f32(F32(1.0) - betas(cfg))


def sigmas_from_alphas_cumprod(acp: np.ndarray) -> np.ndarray:
    """Karras et al. 2022's sigma for each training timestep: sqrt((1 - a) / a), float32."""
    return ((F32(1.0) - acp) / acp) ** 0.5


def alpha_bar_at(acp: np.ndarray, t: np.ndarray, final: np.float32) -> np.ndarray:
    """alpha_bar at (possibly negative) timesteps; before t = 0 the chain ends at `final`
    (`final_alpha_cumprod`: 1 with set_alpha_to_one, else alpha_bar_0). Indices past the
    table wrap rather than raise (diffusers only checks `>= 0`)."""
    t = np.asarray(t, dtype=np.int64)
    return np.where(t >= 0, acp[np.where(t >= 0, t, 0) % len(acp)], final).astype(F32)


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. 2022, eq. 5: sigmas evenly spaced in sigma^(1/rho), float64."""
    ramp = np.linspace(0, 1, n)
    min_inv, max_inv = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (max_inv + ramp * (min_inv - max_inv)) ** rho


def sigma_to_t(sigma: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional training timestep whose sigma is `sigma`, by linear interpolation in
    log-sigma (k-diffusion's `sigma_to_t`; diffusers' `_sigma_to_t`)."""
    sigma = np.asarray(sigma)
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high = low + 1
    w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[high]), 0, 1)
    return ((1 - w) * low + w * high).reshape(sigma.shape)


def clip_or_threshold(x0: np.ndarray, cfg: dict) -> np.ndarray:
    """Clamp the predicted clean sample as DDIM-style schedulers do: dynamic thresholding
    (Saharia et al. 2022, Imagen, sec. 2.3) when `thresholding`, else `clip_sample`."""
    if cfg.get("thresholding"):
        b = x0.shape[0]
        flat = x0.reshape(b, -1)
        s = np.quantile(np.abs(flat), cfg["dynamic_thresholding_ratio"], axis=1)
        s = np.clip(s, 1, cfg["sample_max_value"]).astype(F32)[:, None]
        return (np.clip(flat, -s, s) / s).reshape(x0.shape).astype(F32)
    if cfg.get("clip_sample"):
        r = cfg["clip_sample_range"]
        return np.clip(x0, -r, r).astype(F32)
    return x0


def exponential_sigmas(sigma_min: float, sigma_max: float, n: int) -> np.ndarray:
    """Sigmas evenly spaced in log sigma (k-diffusion's `get_sigmas_exponential`;
    diffusers' `_convert_to_exponential`), float64."""
    return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), n))


def _betacf(a: float, b: float, x: np.ndarray) -> np.ndarray:
    """Continued fraction of the regularized incomplete beta function, elementwise
    (modified Lentz; Press et al., "Numerical Recipes", 3rd ed., sec. 6.4), float64."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0

    def guard(v: np.ndarray) -> np.ndarray:
        return np.where(np.abs(v) < tiny, tiny, v)

    c = np.ones_like(x)
    d = 1.0 / guard(1.0 - qab * x / qap)
    h = d.copy()
    for m in range(1, 400):
        m2 = 2 * m
        for num in (m * (b - m) * x / ((qam + m2) * (a + m2)),
                    -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 / guard(1.0 + num * d)
            c = guard(1.0 + num / c)
            h = h * d * c
        if np.all(np.abs(d * c - 1.0) < 4.5e-16):   # two ulps: 1e-16 is never met where rounding oscillates
            break
    return h


def _beta_cdf(x: np.ndarray, a: float, b: float) -> np.ndarray:
    """I_x(a, b), the Beta(a, b) distribution function, elementwise for x in (0, 1)."""
    x = np.asarray(x, dtype=np.float64)
    front = np.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * np.log(x) + b * np.log1p(-x))
    lower = x < (a + 1.0) / (a + b + 2.0)
    # Each branch where its continued fraction converges fast (Numerical Recipes 6.4.5).
    low = front * _betacf(a, b, np.where(lower, x, 0.5)) / a
    high = 1.0 - front * _betacf(b, a, np.where(lower, 0.5, 1.0 - x)) / b
    return np.where(lower, low, high)


def beta_ppf(q: np.ndarray | float, a: float, b: float) -> np.ndarray:
    """The Beta(a, b) quantile function (scipy.stats.beta.ppf), elementwise, by bisection on
    the distribution function to float64 resolution: the runtime does not depend on scipy."""
    q = np.asarray(q, dtype=np.float64)
    ends = (q <= 0) | (q >= 1)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        x = _beta_quantile(np.where(ends, 0.5, q), a, b)
    return np.where(q <= 0, 0.0, np.where(q >= 1, 1.0, x))


@functools.lru_cache(maxsize=4)
def _beta_cdf_grid(a: float, b: float) -> tuple[np.ndarray, np.ndarray]:
    """(x, I_x(a, b)) on a fine grid, computed once per (a, b): the starting brackets of
    the quantile search, so each ramp costs a few distribution evaluations, not 36."""
    x = np.linspace(0.0, 1.0, 4097)
    cdf = np.concatenate([[0.0], _beta_cdf(x[1:-1], a, b), [1.0]])
    return x, cdf


def _beta_quantile(q: np.ndarray, a: float, b: float) -> np.ndarray:
    x_grid, cdf_grid = _beta_cdf_grid(a, b)
    k = np.clip(np.searchsorted(cdf_grid, q, side="right") - 1, 0, len(x_grid) - 2)
    lo, hi = x_grid[k], x_grid[k + 1]
    # Newton steps on I_x(a, b) - q, kept inside the grid bracket (the density is infinite
    # at 0 and 1 for a, b < 1), then a few bisections where Newton left the bracket.
    x = lo + (hi - lo) * (q - cdf_grid[k]) / (cdf_grid[k + 1] - cdf_grid[k])
    log_norm = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
    # In the end cells the density is singular: start from the leading term of the series,
    # I_x ~ x^a / (a B(a, b)) near 0 and 1 - I_x ~ (1 - x)^b / (b B(a, b)) near 1.
    x = np.where(k == 0, np.exp((np.log(q * a) - log_norm) / a), x)
    x = np.where(k == len(x_grid) - 2, -np.expm1((np.log((1 - q) * b) - log_norm) / b), x)
    x = np.clip(x, lo, hi)
    for _ in range(8):
        f = _beta_cdf(x, a, b) - q
        lo, hi = np.where(f < 0, x, lo), np.where(f < 0, hi, x)
        pdf = np.exp(log_norm + (a - 1) * np.log(x) + (b - 1) * np.log1p(-x))
        step = x - f / pdf
        x = np.where((step >= lo) & (step <= hi), step, 0.5 * (lo + hi))
    return x


def beta_sigmas(sigma_min: float, sigma_max: float, n: int, alpha: float = 0.6, beta: float = 0.6) -> np.ndarray:
    """Sigmas at the quantiles of a Beta(alpha, beta) distribution (Lee et al. 2024,
    "Beta Sampling is All You Need"; diffusers' `_convert_to_beta`), float64."""
    return sigma_min + beta_ppf(1 - np.linspace(0, 1, n), alpha, beta) * (sigma_max - sigma_min)


SIGMA_RAMPS = ("karras", "exponential", "beta")


def sigma_ramp(kind: str, sigma_min: float, sigma_max: float, n: int) -> np.ndarray:
    """The n-point sigma ramp `kind` ("karras", "exponential" or "beta") from sigma_max
    down to sigma_min, float64, as diffusers' use_<kind>_sigmas builds it."""
    if kind == "karras":
        return karras_sigmas(sigma_min, sigma_max, n)
    if kind == "exponential":
        return exponential_sigmas(sigma_min, sigma_max, n)
    return beta_sigmas(sigma_min, sigma_max, n)


def ramp_kind(cfg: dict) -> str | None:
    """Which use_<kind>_sigmas option the resolved config turns on (None: the plain
    spacing). More than one is refused in base.resolve, as diffusers refuses it."""
    for kind in SIGMA_RAMPS:
        if cfg.get(f"use_{kind}_sigmas"):
            return kind
    return None
