"""LMS (linear multistep, order 4) against diffusers' LMSDiscreteScheduler (the oracle):
its scipy-quad coefficients, option combinations, sigma ramps, large step counts and
part-way starts."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from test_schedulers import SD15, SD21, assert_matches_diffusers, draws, model, oracle  # noqa: E402
from test_schedulers_strength import assert_part_way_matches_diffusers  # noqa: E402

from sdrt.engines.errors import InvalidInput  # noqa: E402
from sdrt.runtime.schedulers import lms, make_sampler  # noqa: E402


@pytest.mark.parametrize("name, config, steps, begin", [
    ("lms", SD15, 1, 0),
    ("lms", SD15, 4, 0),
    ("lms", SD21, 25, 0),
    ("lms", {**SD15, "timestep_spacing": "trailing"}, 50, 0),
    ("lms", SD15, 25, 10),                     # part-way: diffusers' order counts from the whole schedule
    ("lms_karras", SD15, 30, 0),
    ("lms_beta", SD21, 12, 5),
])
def test_lms_coefficients_equal_diffusers_scipy_quad(name, config, steps, begin):
    """The exact integral of each Lagrange basis polynomial against diffusers'
    get_lms_coefficient (scipy.integrate.quad of the float32-evaluated polynomial):
    the same numbers up to quad's float32 integrand, for every call and term."""
    sched = oracle(name, config)
    sched.set_timesteps(steps)
    ours = lms.lms_coefficients(sched.sigmas.numpy(), begin, steps - begin)
    for i in range(steps - begin):
        g = begin + i
        ref = np.array([sched.get_lms_coefficient(min(g + 1, lms.ORDER), g, k) for k in range(min(i + 1, 4))])
        np.testing.assert_allclose(ours[i, :len(ref)], ref, rtol=0, atol=1e-6 * np.abs(ref).max())
        assert not ours[i, len(ref):].any()


@pytest.mark.parametrize("extra", [
    {"prediction_type": "sample", "timestep_spacing": "trailing"},
    {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02},
    {"beta_schedule": "squaredcos_cap_v2", "timestep_spacing": "leading", "steps_offset": 3},
    {"prediction_type": "v_prediction", "use_karras_sigmas": True},
    {"prediction_type": "v_prediction", "timestep_spacing": "linspace"},
])
@pytest.mark.parametrize("steps", [3, 20])
def test_lms_less_common_config_options_match_diffusers(extra, steps, monkeypatch):
    assert_matches_diffusers("lms", {**SD15, **extra}, steps, monkeypatch)


@pytest.mark.parametrize("name", ["lms_exponential", "lms_beta"])
def test_lms_ramps_take_sigma_bounds_a_checkpoint_config_carries(name, monkeypatch):
    """LMSDiscreteScheduler has no sigma_min/sigma_max keywords, but its exponential and
    beta ramps read them from the config when the checkpoint's config has them (an Euler
    config passed through from_config); Karras ignores them."""
    config = {**SD15, "sigma_min": 0.1, "sigma_max": 8.0}
    s = make_sampler(name, config, 10)
    assert s.sigmas[0] == pytest.approx(8.0) and s.sigmas[-2] == pytest.approx(0.1)
    assert_matches_diffusers(name, config, 10, monkeypatch)
    assert_matches_diffusers("lms_karras", config, 10, monkeypatch)
    assert_matches_diffusers(name, {**SD15, "sigma_min": None, "sigma_max": None}, 10, monkeypatch)


def test_lms_refuses_a_sigma_bound_that_is_not_a_positive_number():
    with pytest.raises(InvalidInput, match="sigma_min must be a positive number or null, got 'low'"):
        make_sampler("lms_exponential", {**SD15, "sigma_min": "low"}, 10)


def test_lms_1000_steps_match_diffusers(monkeypatch):
    """At 1000 steps the nodes crowd together near sigma_min; diffusers' float32 integrand
    puts up to ~1e-5 relative noise into its coefficients there, the trajectory still agrees."""
    assert_matches_diffusers("lms", {**SD21, "timestep_spacing": "trailing"}, 1000, monkeypatch)


def test_lms_refuses_the_repeated_sigma_that_makes_diffusers_divide_by_zero():
    """"leading" with steps_offset=1 at 1000 steps puts timestep 1000 past the table; np.interp
    clamps it to sigma(999), repeating the first level: the second step's Lagrange basis
    divides by sigma_0 - sigma_1 = 0 in diffusers."""
    config = {**SD15, "timestep_spacing": "leading"}
    sched = oracle("lms", config)
    sched.set_timesteps(1000)
    assert sched.sigmas[0] == sched.sigmas[1]
    x, _ = draws(2)
    xt = torch.from_numpy(x) * sched.init_noise_sigma
    for t in sched.timesteps[:2]:
        xt = sched.step(torch.from_numpy(model(sched.scale_model_input(xt, t).numpy(), float(t))), t, xt).prev_sample
    assert not torch.isfinite(xt).all()
    with pytest.raises(InvalidInput, match=r"repeats noise level.*use at most 999"):
        make_sampler("lms", config, 1000)


@pytest.mark.parametrize("name, extra", [
    ("lms", {}),
    ("lms", {"timestep_spacing": "leading", "steps_offset": 3, "prediction_type": "sample"}),
    ("lms_karras", {"prediction_type": "v_prediction"}),
    ("lms_exponential", {"timestep_spacing": "trailing"}),
])
@pytest.mark.parametrize("strength", [0.35, 0.8])
@pytest.mark.parametrize("steps", [6, 30])
def test_lms_part_way_with_options_matches_diffusers(name, extra, strength, steps, monkeypatch):
    """Part-way runs start with a higher interpolation order than the derivatives they
    have (diffusers' order comes from the step index in the whole schedule)."""
    assert_part_way_matches_diffusers(name, {**SD15, **extra}, steps, strength, monkeypatch)


def test_lms_runtime_never_loads_scipy():
    code = ("import sys, numpy as np\n"
            "from sdrt.runtime.schedulers import make_sampler\n"
            "for n in ('lms', 'lms_karras', 'lms_exponential', 'lms_beta'):\n"
            "    s = make_sampler(n, {'beta_schedule': 'scaled_linear', 'beta_start': 0.00085,"
            " 'beta_end': 0.012}, 8, strength=0.7)\n"
            "    x, st = np.ones((1, 4, 2, 2), np.float32), s.init_state()\n"
            "    for i in range(len(s.timesteps)):\n"
            "        x, st = s.step(st, i, x, x, None)\n"
            "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] == 'scipy')))\n")
    proc = subprocess.run([sys.executable, "-c", "import json\n" + code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []
