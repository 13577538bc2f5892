"""The one home of the parametrization (`runtime.schedulers.parametrization`) against
its defining property: noise a known x0 with a known eps, form what an epsilon-, v-
or sample-predicting model would output, and get x0 and eps back (Salimans & Ho 2022,
v = alpha * eps - sigma * x0; VE: x = x0 + sigma * eps, the U-Net seeing the VP latent)."""

from __future__ import annotations

import numpy as np
import pytest

from sdrt.runtime.schedulers import parametrization as param

F32 = np.float32
ALPHA_BARS = (0.9991, 0.5, 0.0047)      # SD's alpha_bar near t = 0, mid-way, near t = 999


def draws() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.standard_normal((2, 4, 8, 8), dtype=F32), rng.standard_normal((2, 4, 8, 8), dtype=F32)


def vp_targets(x0, eps, alpha, sigma) -> dict[str, np.ndarray]:
    return {"epsilon": eps, "v_prediction": alpha * eps - sigma * x0, "sample": x0}


@pytest.mark.parametrize("alpha_bar", ALPHA_BARS)
@pytest.mark.parametrize("pred", param.PREDICTION_TYPES)
def test_vp_model_output_gives_back_x0_and_eps(alpha_bar, pred):
    x0, eps = draws()
    alpha, sigma = param.vp_coefficients(F32(alpha_bar))
    assert alpha ** 2 + sigma ** 2 == pytest.approx(1, abs=1e-6)
    x = param.vp_noise(x0, eps, alpha, sigma)
    out = vp_targets(x0, eps, alpha, sigma)[pred]
    got_x0, got_eps = param.vp_x0_eps(pred, x, out, alpha, sigma)
    # Recovering eps from a sample prediction at alpha_bar ~ 1 divides by sigma ~ 0.03.
    tol = 1e-5 / min(float(alpha), float(sigma))
    np.testing.assert_allclose(got_x0, x0, atol=tol)
    np.testing.assert_allclose(got_eps, eps, atol=tol)
    np.testing.assert_array_equal(got_x0, param.vp_x0(pred, x, out, alpha, sigma))
    np.testing.assert_array_equal(got_eps, param.vp_eps(pred, x, out, alpha, sigma))
    assert got_x0.dtype == got_eps.dtype == np.float32


@pytest.mark.parametrize("alpha_bar", ALPHA_BARS)
@pytest.mark.parametrize("pred", param.PREDICTION_TYPES)
def test_ve_model_output_gives_back_x0(alpha_bar, pred):
    """Euler's VE latent x0 + sigma * eps is the VP latent times sqrt(sigma^2 + 1); the
    model, fed the VP latent, predicts in VP terms."""
    x0, eps = draws()
    alpha, sigma_vp = param.vp_coefficients(F32(alpha_bar))
    sigma = F32(np.sqrt((1 - F32(alpha_bar)) / F32(alpha_bar)))
    x = param.ve_noise(x0, eps, sigma)
    np.testing.assert_allclose(x / np.sqrt(sigma ** 2 + 1), param.vp_noise(x0, eps, alpha, sigma_vp),
                               atol=1e-5)
    out = vp_targets(x0, eps, alpha, sigma_vp)[pred]
    got = param.ve_x0(pred, x, out, sigma)
    np.testing.assert_allclose(got, x0, atol=2e-5 * max(1.0, float(sigma)))
    assert got.dtype == np.float32
