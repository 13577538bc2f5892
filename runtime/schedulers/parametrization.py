"""What the U-Net's output means: the clean sample x0 and the noise eps it implies,
for each `prediction_type` (k-diffusion's denoiser wrappers, `external.py`: the model
is read as a denoiser once, so solvers never branch on the parametrization).

Two coordinate systems, as the diffusers schedulers use them:

  VP (DDIM, PNDM, LCM, DPM-Solver):  x = alpha * x0 + sigma * eps, alpha^2 + sigma^2 = 1
      (alpha = sqrt(alpha_bar_t), sigma = sqrt(1 - alpha_bar_t))
  VE (Euler, Euler ancestral):       x = x0 + sigma * eps
      (Karras et al. 2022; sigma = sqrt((1 - alpha_bar) / alpha_bar), the U-Net
      sees x / sqrt(sigma^2 + 1), which is the VP latent)

with v = alpha * eps - sigma * x0 (Salimans & Ho 2022, "Progressive Distillation",
sec. 4 and appendix D). The expressions keep diffusers' float32 operation order
term for term (that is what keeps whole trajectories within ~1e-6 of diffusers),
so they are not always the algebraically simplest form. Arguments are float32
arrays and float32 scalars; results are float32.
"""

from __future__ import annotations

import numpy as np

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")

F32 = np.float32


def vp_coefficients(alpha_bar: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(alpha, sigma) = (sqrt(alpha_bar), sqrt(1 - alpha_bar)), float32."""
    alpha_bar = np.asarray(alpha_bar, dtype=F32)
    return np.sqrt(alpha_bar), np.sqrt(F32(1) - alpha_bar)


def vp_x0(pred: str, x: np.ndarray, out: np.ndarray, alpha: np.float32, sigma: np.float32) -> np.ndarray:
    """x0 from the model output at VP level (alpha, sigma)."""
    if pred == "epsilon":
        return (x - sigma * out) / alpha
    if pred == "v_prediction":
        return alpha * x - sigma * out
    return out


def vp_eps(pred: str, x: np.ndarray, out: np.ndarray, alpha: np.float32, sigma: np.float32) -> np.ndarray:
    """eps from the model output at VP level (alpha, sigma)."""
    if pred == "epsilon":
        return out
    if pred == "v_prediction":
        return alpha * out + sigma * x
    return (x - alpha * out) / sigma


def vp_x0_eps(pred: str, x: np.ndarray, out: np.ndarray, alpha: np.float32,
              sigma: np.float32) -> tuple[np.ndarray, np.ndarray]:
    """Both, as DDIM needs them (scheduling_ddim.py, step 3)."""
    return vp_x0(pred, x, out, alpha, sigma), vp_eps(pred, x, out, alpha, sigma)


def ve_x0(pred: str, x: np.ndarray, out: np.ndarray, sigma: np.float32) -> np.ndarray:
    """x0 from the model output at VE level sigma (Karras et al. 2022, Table 1:
    c_skip = 1 / (sigma^2 + 1), c_out = -sigma / sqrt(sigma^2 + 1) for v-prediction),
    in scheduling_euler_discrete.py's operation order."""
    if pred == "epsilon":
        return x - sigma * out
    if pred == "v_prediction":
        return out * (-sigma / (sigma ** 2 + 1) ** 0.5) + (x / (sigma ** 2 + 1))
    return out


def vp_noise(x0: np.ndarray, noise: np.ndarray, alpha: np.float32, sigma: np.float32) -> np.ndarray:
    """The forward process at VP level: alpha * x0 + sigma * eps (DDPM eq. 4)."""
    return alpha * x0 + sigma * noise


def ve_noise(x0: np.ndarray, noise: np.ndarray, sigma: np.float32) -> np.ndarray:
    """The forward process at VE level: x0 + eps * sigma."""
    return x0 + noise * sigma
