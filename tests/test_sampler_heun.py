"""Heun (Karras et al. 2022, Alg. 1 without churn) against diffusers'
HeunDiscreteScheduler (the oracle): the options the shared trajectory tests leave out,
part-way starts with them, large step counts and refusals."""

from __future__ import annotations

import inspect

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from test_sampler_kdpm2 import exact_torch_math  # noqa: E402,F401  (fixture)
from test_schedulers import SD15, SD21, assert_matches_diffusers  # noqa: E402
from test_schedulers_strength import assert_part_way_matches_diffusers  # noqa: E402

from sdrt.engines.errors import InvalidInput  # noqa: E402
from sdrt.runtime.schedulers import make_sampler  # noqa: E402
from sdrt.runtime.schedulers.heun import DEFAULTS  # noqa: E402


def test_defaults_are_diffusers_constructors_keywords():
    params = inspect.signature(diffusers.HeunDiscreteScheduler.__init__).parameters
    assert {k: p.default for k, p in params.items() if k != "self"} == DEFAULTS


@pytest.mark.usefixtures("exact_torch_math")
@pytest.mark.parametrize("config", [SD15, SD21], ids=["sd15_epsilon", "sd21_v"])
def test_beta_ramp_in_four_steps_matches_diffusers_with_exact_float32_math(config, monkeypatch):
    """The 4-step beta ramp ends with a correction from sigma 4.05 down to 0.029, where
    x - x0 cancels to sigma * eps: the 1-ulp difference between torch's float32 sqrt and
    a correctly rounded one in the training sigma at t = 0 moves diffusers' own result
    by 2.9e-5 (see test_sampler_kdpm2)."""
    assert_matches_diffusers("heun_beta", config, 4, monkeypatch, rtol=1e-6)


@pytest.mark.parametrize("name, extra", [
    ("heun", {"clip_sample": True, "clip_sample_range": 0.5, "prediction_type": "sample"}),
    ("heun", {"clip_sample": True, "beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02}),
    ("heun", {"beta_schedule": "squaredcos_cap_v2", "timestep_spacing": "leading"}),
    ("heun", {"timestep_spacing": "leading", "steps_offset": 3, "prediction_type": "v_prediction"}),
    ("heun", {"prediction_type": "sample", "timestep_spacing": "trailing"}),
    ("heun_karras", {"prediction_type": "v_prediction", "timestep_spacing": "trailing"}),
    ("heun_karras", {"clip_sample": True, "clip_sample_range": 2.0}),
    ("heun_exponential", {"timestep_spacing": "leading"}),
    ("heun_beta", {"timestep_spacing": "trailing", "prediction_type": "v_prediction"}),
])
@pytest.mark.parametrize("steps", [3, 12])
def test_less_common_options_match_diffusers(name, extra, steps, monkeypatch):
    assert_matches_diffusers(name, {**SD15, **extra}, steps, monkeypatch)


def test_clip_sample_as_a_scheduler_option_matches_diffusers(monkeypatch):
    assert_matches_diffusers("heun", SD21, 8, monkeypatch, options={"clip_sample": True, "clip_sample_range": 1.5})


def test_trained_betas_match_diffusers(monkeypatch):
    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2
    assert_matches_diffusers("heun", {**SD15, "trained_betas": betas.tolist()}, 10, monkeypatch)


@pytest.mark.parametrize("name", ["heun_karras", "heun_beta"])
def test_config_sigma_bounds_shape_the_ramp_as_in_diffusers(name, monkeypatch):
    """from_config keeps a checkpoint's sigma_min / sigma_max as hidden attributes that
    `_convert_to_karras` and friends read, though neither is a Heun keyword."""
    config = {**SD21, "sigma_min": 0.1, "sigma_max": 8.0}
    assert make_sampler(name, config, 6).sigmas[-2] == np.float32(0.1)
    assert_matches_diffusers(name, config, 6, monkeypatch)
    ignored = {**config, "_use_default_values": ["sigma_min", "sigma_max"]}
    np.testing.assert_array_equal(make_sampler(name, ignored, 6).sigmas, make_sampler(name, SD21, 6).sigmas)
    assert_matches_diffusers(name, ignored, 6, monkeypatch)


@pytest.mark.parametrize("name, extra, strength", [
    ("heun", {"timestep_spacing": "leading", "prediction_type": "v_prediction"}, 0.5),
    ("heun", {"clip_sample": True, "clip_sample_range": 0.8, "timestep_spacing": "trailing"}, 0.7),
    ("heun_karras", {"timestep_spacing": "trailing"}, 0.8),
    ("heun_exponential", {"prediction_type": "v_prediction"}, 0.35),
])
@pytest.mark.parametrize("steps", [5, 18])
def test_part_way_with_options_matches_diffusers(name, extra, strength, steps, monkeypatch):
    assert_part_way_matches_diffusers(name, {**SD15, **extra}, steps, strength, monkeypatch)


def test_calls_alternate_predictor_and_corrector_and_the_last_step_is_euler():
    s = make_sampler("heun", SD15, 4)
    sched = diffusers.HeunDiscreteScheduler.from_config(SD15)
    sched.set_timesteps(4)
    np.testing.assert_array_equal(s.timesteps, sched.timesteps.numpy())      # [t0, t1, t1, t2, t2, t3, t3]
    np.testing.assert_allclose(s.sigmas, sched.sigmas.numpy(), rtol=1e-6)
    assert len(s.timesteps) == 2 * 4 - 1 and not s.stochastic
    assert not any(s.draws_noise(i) for i in range(len(s.timesteps)))


@pytest.mark.parametrize("spacing", ["linspace", "trailing"])
def test_a_thousand_steps_match_diffusers(spacing, monkeypatch):
    assert_matches_diffusers("heun", {**SD15, "timestep_spacing": spacing}, 1000, monkeypatch)


def test_leading_spacing_past_the_training_timesteps_is_refused():
    """SD 1.5's steps_offset=1 on leading spacing asks for t = 1000 at 1000 steps, a
    timestep the U-Net never saw (diffusers' table lookup clamps it to sigma(999)."""
    config = {**SD15, "timestep_spacing": "leading"}
    with pytest.raises(InvalidInput, match=r"timesteps reach 1000, past the 1000 training timesteps; "
                                           r"use at most 999 steps"):
        make_sampler("heun", config, 1000)
    assert make_sampler("heun", config, 999).timesteps[0] == 999


def test_exp_beta_schedule_is_refused():
    """diffusers' Heun (alone) also takes beta_schedule="exp"; sdrt's tables do not have it."""
    with pytest.raises(InvalidInput, match="beta_schedule 'exp'"):
        make_sampler("heun", {**SD15, "beta_schedule": "exp"}, 10)


@pytest.mark.parametrize("bad", [-1.0, 0.0, float("inf")])
def test_a_clip_sample_range_that_clips_everything_is_refused(bad):
    with pytest.raises(InvalidInput, match="clip_sample_range must be a positive number"):
        make_sampler("heun", {**SD15, "clip_sample": True, "clip_sample_range": bad}, 10)


def test_a_bad_sigma_bound_in_the_config_is_refused():
    with pytest.raises(InvalidInput, match="sigma_max must be a positive number"):
        make_sampler("heun_exponential", {**SD15, "sigma_max": -3}, 10)


def test_trailing_spacing_that_overshoots_to_a_negative_timestep_is_refused():
    """np.arange(1000, 0, -1000 / 61) has 62 points: diffusers runs a 62nd step at t = -1."""
    config = {**SD15, "timestep_spacing": "trailing"}
    sched = diffusers.HeunDiscreteScheduler.from_config(config)
    sched.set_timesteps(61)
    assert sched.timesteps[-1] == -1
    with pytest.raises(InvalidInput, match="timesteps reach -1, below 0; use at most 60 or at least 62 steps"):
        make_sampler("heun", config, 61)


def test_a_ramp_on_that_trailing_step_count_matches_diffusers(monkeypatch):
    """A sigma ramp takes its ends from the spaced schedule but has exactly `steps` points."""
    assert_matches_diffusers("heun_karras", {**SD15, "timestep_spacing": "trailing"}, 61, monkeypatch)
