"""KDPM2 and KDPM2-ancestral (DPM-Solver-2 with the midpoint in log sigma) against
diffusers' KDPM2DiscreteScheduler and KDPM2AncestralDiscreteScheduler (the oracle):
options the shared trajectory tests leave out, part-way starts with them, refusals.

Where diffusers' own float32 arithmetic is ill-conditioned the oracle runs with
`exact_torch_math`: torch's float32 sqrt, log and exp correctly rounded. torch's CPU
kernels for these (Intel MKL's vector math on x86) are within an ulp but not correctly
rounded, and NumPy's sqrt is, so a 1-ulp difference in a training sigma is all that
separates the two. It matters for the ancestral sampler: with eta = 1 its
sigma_down = sqrt(sigma_next^2 - sigma_up^2) cancels catastrophically when sigma_next is
much smaller than sigma (the step into t = 0 on "linspace" spacing), so the midpoint
level of that step, and its U-Net timestep (near 0, i.e. a relative error of 100%), are
float32 noise in diffusers itself: diffusers run against diffusers with correctly
rounded sqrt differs by 1.8e-5 (epsilon) and 4e-4 (v-prediction) after 2 steps.
With exact_torch_math the two agree to ~1e-7 there.
"""

from __future__ import annotations

import inspect

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from test_schedulers import SD15, SD21, assert_matches_diffusers, oracle  # noqa: E402
from test_schedulers_strength import assert_part_way_matches_diffusers  # noqa: E402

from sdrt.engines.errors import InvalidInput  # noqa: E402
from sdrt.runtime.schedulers import make_sampler  # noqa: E402
from sdrt.runtime.schedulers.kdpm2 import DEFAULTS, make_kdpm2_ancestral  # noqa: E402


@pytest.fixture
def exact_torch_math(monkeypatch):
    """torch's float32 `** 0.5`, `.log()` and `.exp()` correctly rounded (computed in
    float64 and rounded once), for the duration of a test."""
    pow_, log_, exp_ = torch.Tensor.__pow__, torch.Tensor.log, torch.Tensor.exp

    def rounded(f, t):
        return torch.from_numpy(np.asarray(f(t.numpy().astype(np.float64))).astype(np.float32))

    def power(self, e):
        if self.dtype == torch.float32 and isinstance(e, float) and e == 0.5:
            return rounded(np.sqrt, self)
        return pow_(self, e)

    monkeypatch.setattr(torch.Tensor, "__pow__", power)
    monkeypatch.setattr(torch.Tensor, "log", lambda t: rounded(np.log, t) if t.dtype == torch.float32 else log_(t))
    monkeypatch.setattr(torch.Tensor, "exp", lambda t: rounded(np.exp, t) if t.dtype == torch.float32 else exp_(t))


def test_defaults_are_both_diffusers_constructors_keywords():
    for cls in (diffusers.KDPM2DiscreteScheduler, diffusers.KDPM2AncestralDiscreteScheduler):
        params = inspect.signature(cls.__init__).parameters
        assert {k: p.default for k, p in params.items() if k != "self"} == DEFAULTS


@pytest.mark.parametrize("steps", [1, 2, 7, 25])
@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("config", [SD15, SD21], ids=["sd15_epsilon", "sd21_v"])
def test_kdpm2_ancestral_matches_diffusers_with_exact_float32_math(config, spacing, steps, monkeypatch,
                                                                   exact_torch_math):
    assert_matches_diffusers("kdpm2_a", {**config, "timestep_spacing": spacing}, steps, monkeypatch,
                             rtol=1e-6)


@pytest.mark.parametrize("name", ["kdpm2_a_karras", "kdpm2_a_exponential", "kdpm2_a_beta"])
@pytest.mark.parametrize("steps", [2, 4, 25])
def test_kdpm2_ancestral_ramps_match_diffusers_with_exact_float32_math(name, steps, monkeypatch,
                                                                      exact_torch_math):
    assert_matches_diffusers(name, SD21, steps, monkeypatch)


@pytest.mark.parametrize("steps", [3, 20])
def test_kdpm2_ancestral_leading_with_steps_offset_matches_diffusers_with_exact_float32_math(
        steps, monkeypatch, exact_torch_math):
    """The last midpoint is sigma(t = 3) up to float32 noise, its timestep 3 +- 4e-6."""
    config = {**SD15, "timestep_spacing": "leading", "steps_offset": 3, "prediction_type": "v_prediction"}
    assert_matches_diffusers("kdpm2_a", config, steps, monkeypatch)


@pytest.mark.parametrize("strength", [0.3, 0.75, 1.0])
@pytest.mark.parametrize("steps", [4, 25])
def test_kdpm2_ancestral_part_way_matches_diffusers_with_exact_float32_math(steps, strength, monkeypatch,
                                                                           exact_torch_math):
    assert_part_way_matches_diffusers("kdpm2_a", SD15, steps, strength, monkeypatch)
    assert_part_way_matches_diffusers("kdpm2_a", SD21, steps, strength, monkeypatch)


@pytest.mark.parametrize("name, extra", [
    ("kdpm2", {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02}),
    ("kdpm2", {"beta_schedule": "squaredcos_cap_v2", "timestep_spacing": "trailing"}),
    ("kdpm2", {"timestep_spacing": "leading", "steps_offset": 3, "prediction_type": "v_prediction"}),
    ("kdpm2_karras", {"prediction_type": "v_prediction", "timestep_spacing": "trailing"}),
    ("kdpm2_exponential", {"timestep_spacing": "leading"}),
    ("kdpm2_beta", {"timestep_spacing": "leading", "prediction_type": "v_prediction"}),
    ("kdpm2_a", {"timestep_spacing": "trailing", "beta_schedule": "linear", "beta_start": 0.0001,
                 "beta_end": 0.02}),
    ("kdpm2_a_karras", {"timestep_spacing": "trailing"}),
])
@pytest.mark.parametrize("steps", [3, 12])
def test_less_common_options_match_diffusers(name, extra, steps, monkeypatch):
    assert_matches_diffusers(name, {**SD15, **extra}, steps, monkeypatch)


def test_trained_betas_match_diffusers(monkeypatch):
    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2
    config = {**SD15, "trained_betas": betas.tolist(), "timestep_spacing": "trailing"}
    assert_matches_diffusers("kdpm2", config, 10, monkeypatch)
    assert_matches_diffusers("kdpm2_a", config, 10, monkeypatch)


@pytest.mark.parametrize("name", ["kdpm2_karras", "kdpm2_a_exponential"])
def test_config_sigma_bounds_shape_the_ramp_as_in_diffusers(name, monkeypatch):
    """from_config keeps a checkpoint's sigma_min / sigma_max as hidden attributes that
    `_convert_to_karras` and friends read, though neither is a KDPM2 keyword."""
    config = {**SD15, "_class_name": "EulerDiscreteScheduler", "sigma_min": 0.1, "sigma_max": 8.0,
              "timestep_spacing": "trailing"}
    assert make_sampler(name, config, 6).sigmas[0] == np.float32(8.0)
    assert_matches_diffusers(name, config, 6, monkeypatch)
    # ... unless save_config recorded them as defaults (`_use_default_values`).
    ignored = {**config, "_use_default_values": ["sigma_min", "sigma_max"]}
    np.testing.assert_array_equal(make_sampler(name, ignored, 6).sigmas, make_sampler(name, SD15 | {
        "timestep_spacing": "trailing"}, 6).sigmas)
    assert_matches_diffusers(name, ignored, 6, monkeypatch)


@pytest.mark.parametrize("name, extra, strength", [
    ("kdpm2", {"timestep_spacing": "leading", "prediction_type": "v_prediction"}, 0.5),
    ("kdpm2_karras", {"timestep_spacing": "trailing"}, 0.8),
    ("kdpm2_a", {"timestep_spacing": "trailing", "prediction_type": "v_prediction"}, 0.6),
    ("kdpm2_a_karras", {"timestep_spacing": "trailing"}, 0.35),
])
@pytest.mark.parametrize("steps", [5, 18])
def test_part_way_with_options_matches_diffusers(name, extra, strength, steps, monkeypatch):
    assert_part_way_matches_diffusers(name, {**SD15, **extra}, steps, strength, monkeypatch)


@pytest.mark.parametrize("name", ["kdpm2", "kdpm2_a"])
def test_the_corrector_alone_draws_noise_in_the_ancestral_sampler(name):
    s = make_sampler(name, SD15, 5, strength=0.6)     # starts at a whole step: call 0 is a first evaluation
    assert [s.draws_noise(i) for i in range(len(s.timesteps))] == (
        [False, True, False, True, False] if name == "kdpm2_a" else [False] * 5)


@pytest.mark.parametrize("name, config", [
    ("kdpm2", {**SD15, "timestep_spacing": "linspace"}),
    ("kdpm2_a", {**SD15, "timestep_spacing": "trailing"}),
])
def test_a_thousand_steps_match_diffusers(name, config, monkeypatch):
    assert_matches_diffusers(name, config, 1000, monkeypatch)


@pytest.mark.parametrize("name", ["kdpm2", "kdpm2_a"])
def test_leading_spacing_past_the_training_timesteps_is_refused(name):
    """SD 1.5's steps_offset=1 on leading spacing asks for t = 1000 at 1000 steps: the
    table lookup clamps it to sigma(999), a step that does not move, at a timestep the
    U-Net never saw. 999 steps are fine."""
    config = {**SD15, "timestep_spacing": "leading"}
    with pytest.raises(InvalidInput, match=r"timesteps reach 1000, past the 1000 training timesteps; "
                                           r"use at most 999 steps"):
        make_sampler(name, config, 1000)
    assert make_sampler(name, config, 999).timesteps[0] == 999


@pytest.mark.parametrize("name", ["kdpm2", "kdpm2_a"])
def test_sample_prediction_is_refused_as_diffusers_cannot_step_it(name, monkeypatch):
    config = {**SD15, "prediction_type": "sample"}
    with pytest.raises(InvalidInput, match="prediction_type 'sample' is not supported; accepted: epsilon, "
                                           "v_prediction"):
        make_sampler(name, config, 10)
    sched = oracle(name, config)
    sched.set_timesteps(10)
    x = torch.zeros(1, 4, 8, 8)
    with pytest.raises(NotImplementedError):
        sched.step(x, sched.timesteps[0], x)


@pytest.mark.parametrize("bad", [-1.0, 0, "0.1", float("nan")])
def test_a_bad_sigma_bound_in_the_config_is_refused(bad):
    with pytest.raises(InvalidInput, match="sigma_min must be a positive number"):
        make_sampler("kdpm2_karras", {**SD15, "sigma_min": bad}, 10)


def test_sigma_bounds_the_wrong_way_round_are_a_schedule_problem():
    s = make_kdpm2_ancestral({**SD15, "sigma_min": 20.0}, 10, use_karras_sigmas=True)
    assert s.schedule_problem().startswith("its noise levels rise (sigma=14.6146 at step 0")


@pytest.mark.parametrize("spacing", ["trailing", "linspace"])
def test_ancestral_steps_whose_midpoint_is_nan_in_diffusers_are_refused(spacing):
    """A cosine schedule's sigma_max is ~2e4: the first step falls ~1e4-fold, its
    sigma_down cancels below 0 in float32 and diffusers' midpoint (and timestep) is NaN."""
    config = {**SD15, "beta_schedule": "squaredcos_cap_v2", "timestep_spacing": spacing}
    sched = oracle("kdpm2_a", config)
    sched.set_timesteps(3)
    assert torch.isnan(sched.timesteps).any()
    with pytest.raises(InvalidInput, match="the midpoint noise level of step 0 is not a number"):
        make_sampler("kdpm2_a", config, 3)
    make_sampler("kdpm2", config, 3)          # no sigma_down: the plain sampler is fine


@pytest.mark.parametrize("name", ["kdpm2", "kdpm2_a"])
def test_trailing_spacing_that_overshoots_to_a_negative_timestep_is_refused(name):
    """np.arange(1000, 0, -1000 / 61) has 62 points: diffusers runs a 62nd step at t = -1."""
    config = {**SD15, "timestep_spacing": "trailing"}
    sched = oracle(name, config)
    sched.set_timesteps(61)
    assert sched.timesteps[-1] == -1
    with pytest.raises(InvalidInput, match="timesteps reach -1, below 0; use at most 60 or at least 62 steps"):
        make_sampler(name, config, 61)


@pytest.mark.usefixtures("exact_torch_math")     # the ancestral one's last midpoint timestep is ~0.47
@pytest.mark.parametrize("name", ["kdpm2_karras", "kdpm2_a_karras"])
def test_a_ramp_on_that_trailing_step_count_matches_diffusers(name, monkeypatch):
    """A sigma ramp takes its ends from the spaced schedule but has exactly `steps` points."""
    assert_matches_diffusers(name, {**SD15, "timestep_spacing": "trailing"}, 61, monkeypatch)
