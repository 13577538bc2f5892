"""Where the denoising steps sit on the training timeline: the timestep spacings
(Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed",
Table 2), the variant each diffusers scheduler builds from them, and where an
image-to-image run starts part-way down the list.

Every function is a pure function of config values, reimplemented from diffusers
0.42.1 `set_timesteps` (`diffusers/schedulers/scheduling_*.py`) and
`StableDiffusionImg2ImgPipeline.get_timesteps`. The lists are descending, first
U-Net call first. Noise levels (betas, sigmas, the Karras ramp) live in `tables`.
"""

from __future__ import annotations

import numpy as np

SPACINGS = ("leading", "linspace", "trailing")

F32 = np.float32


# --- the three spacings, descending, float64 --------------------------------------

def leading(num_train: int, n: int, offset: int = 0) -> np.ndarray:
    """t = k * (T // n) + offset, k = n-1..0 (integer-valued)."""
    return (np.arange(0, n) * (num_train // n)).round()[::-1].astype(np.float64) + offset


def trailing(num_train: int, n: int) -> np.ndarray:
    """t = round(T - k * T / n) - 1, k = 0..n-1 (integer-valued): always starts at T - 1."""
    return np.round(np.arange(num_train, 0, -num_train / n)) - 1.0


def linspace(num_train: int, n: int) -> np.ndarray:
    """n evenly spaced points in [0, T - 1], not rounded."""
    return np.linspace(0, num_train - 1, n)[::-1].copy()


# --- each scheduler's variant ---------------------------------------------------------

def discrete(num_train: int, n: int, spacing: str, offset: int) -> np.ndarray:
    """Integer timesteps (int64) of DDIM and PNDM (and DDPM): "linspace" is rounded and,
    as in diffusers, steps_offset only shifts "leading"."""
    if spacing == "linspace":
        t = linspace(num_train, n).round()
    elif spacing == "leading":
        t = leading(num_train, n, offset)
    else:
        t = trailing(num_train, n)
    return t.astype(np.int64)


def fractional(num_train: int, n: int, spacing: str, offset: int) -> np.ndarray:
    """Euler-family timesteps (float32): "linspace" ones are not rounded, the U-Net
    sees fractional timesteps (scheduling_euler_discrete.py, set_timesteps)."""
    if spacing == "linspace":
        return linspace(num_train, n).astype(F32)
    if spacing == "leading":
        return leading(num_train, n).astype(F32) + F32(offset)
    return trailing(num_train, n).astype(F32)


def dpmsolver(num_train: int, n: int, spacing: str, offset: int, last: int) -> np.ndarray:
    """DPM-Solver's integer timesteps (int64): n + 1 points down to t = 0 over
    [0, last), the one at t = 0 dropped (it becomes the final sigma). `last` is below
    num_train when lambda_min_clipped cuts the tail of a cosine schedule."""
    if spacing == "linspace":
        return np.linspace(0, last - 1, n + 1).round()[::-1][:-1].astype(np.int64)
    if spacing == "leading":
        ratio = last // (n + 1)
        return (np.arange(0, n + 1) * ratio).round()[::-1][:-1].astype(np.int64) + offset
    return np.arange(last, 0, -num_train / n).round().astype(np.int64) - 1


def pndm(num_train: int, n: int, spacing: str, offset: int, skip_prk: bool) -> tuple[np.ndarray, np.ndarray]:
    """PNDM's U-Net timesteps as (Runge-Kutta calls, linear-multistep calls), int64.

    With skip_prk_steps the second timestep is repeated (n + 1 calls: the second call
    re-does the first step, PNDM Alg. 2); without, the last four steps of the
    schedule are each evaluated at t, t - d/2, t - d/2, t - d (12 calls) before PLMS
    takes over from the fourth-to-last step."""
    base = discrete(num_train, n, spacing, offset)[::-1]          # ascending, as diffusers keeps it
    if skip_prk:
        plms = np.concatenate([base[:-1], base[-2:-1], base[-1:]])[::-1]
        return np.zeros(0, dtype=np.int64), plms.astype(np.int64)
    order, ratio = 4, num_train // n
    prk = np.array(base[-order:]).repeat(2) + np.tile(np.array([0, ratio // 2]), order)
    prk = prk[:-1].repeat(2)[1:-1][::-1]
    return prk.astype(np.int64), base[:-3][::-1].astype(np.int64)


def lcm(num_train: int, n: int, original_steps: int) -> np.ndarray:
    """LCM's n timesteps (int64), picked evenly from the distillation schedule (every
    T // original_steps steps, ending at T - 1); timestep_spacing and steps_offset
    play no part (scheduling_lcm.py, set_timesteps)."""
    origin = (np.arange(1, original_steps + 1) * (num_train // original_steps) - 1)[::-1]
    idx = np.floor(np.linspace(0, len(origin), num=n, endpoint=False)).astype(np.int64)
    return origin[idx].astype(np.int64)


# --- starting part-way ------------------------------------------------------------------

def strength_start(steps: int, strength: float) -> int:
    """The step image-to-image and inpainting start at: `steps * strength` of the
    schedule's steps are run, the first `t_start` skipped
    (diffusers `StableDiffusionImg2ImgPipeline.get_timesteps`). The sampler then
    covers `timesteps[t_start * order:]`. Leaves `steps - t_start` steps, which can be 0."""
    init_timestep = min(int(steps * strength), steps)
    return max(steps - init_timestep, 0)
