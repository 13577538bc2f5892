"""DDPM ancestral sampling against diffusers' DDPMScheduler (the oracle): variance
types, clipping and thresholding, spacings with steps_offset, zero terminal SNR, the
calls that draw noise, large step counts, part-way starts, and the options refused."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from test_schedulers import SD15, SD21, assert_matches_diffusers, draws, model, oracle  # noqa: E402
from test_schedulers_strength import assert_part_way_matches_diffusers  # noqa: E402

from sdrt.engines.errors import InvalidInput  # noqa: E402
from sdrt.runtime.schedulers import make_sampler  # noqa: E402

ZERO_SNR_V = {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing", "prediction_type": "v_prediction"}


@pytest.mark.parametrize("extra", [
    {"variance_type": "fixed_small_log"},
    {"variance_type": "fixed_large"},
    {"variance_type": "fixed_large", "timestep_spacing": "trailing", "prediction_type": "sample"},
    {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02, "clip_sample": True},
    {"clip_sample": True, "clip_sample_range": 0.5, "timestep_spacing": "linspace"},
    {"thresholding": True, "prediction_type": "sample", "sample_max_value": 1.5},
    {"timestep_spacing": "leading", "steps_offset": 3, "beta_schedule": "squaredcos_cap_v2"},
    ZERO_SNR_V,
    {**ZERO_SNR_V, "variance_type": "fixed_small_log"},
])
@pytest.mark.parametrize("steps", [3, 20])
def test_ddpm_less_common_config_options_match_diffusers(extra, steps, monkeypatch):
    assert_matches_diffusers("ddpm", {**SD15, **extra}, steps, monkeypatch)


def _draw_calls(config: dict, steps: int, monkeypatch) -> list[int]:
    """The calls at which diffusers' DDPMScheduler.step draws a randn_tensor."""
    sched = oracle("ddpm", config)
    sched.set_timesteps(steps)
    module = __import__(type(sched).__module__, fromlist=["randn_tensor"])
    calls, current = [], [0]
    monkeypatch.setattr(module, "randn_tensor",
                        lambda shape, **k: calls.append(current[0]) or torch.zeros(shape))
    x = torch.zeros((1, 4, 2, 2))
    for i, t in enumerate(sched.timesteps):
        current[0] = i
        x = sched.step(torch.zeros_like(x), t, x).prev_sample
    return calls


@pytest.mark.parametrize("extra, last_draws", [
    ({"timestep_spacing": "leading", "steps_offset": 1}, True),     # SD 1.5's: the last timestep is 1
    ({"timestep_spacing": "leading", "steps_offset": 0}, False),
    ({"timestep_spacing": "trailing"}, True),                       # ends at T / n - 1
    ({"timestep_spacing": "linspace"}, False),
])
def test_ddpm_draws_noise_on_exactly_the_calls_diffusers_does(extra, last_draws, monkeypatch):
    """diffusers draws for every timestep t > 0, so the last step draws too unless the
    schedule ends at t = 0 (steps_offset leaves it at t = 1, "trailing" at T / n - 1)."""
    for strength in (None, 0.5):
        s = make_sampler("ddpm", {**SD15, **extra}, 8, strength=strength)
        ref = [c - s.begin_index for c in _draw_calls({**SD15, **extra}, 8, monkeypatch) if c >= s.begin_index]
        assert [i for i in range(len(s.timesteps)) if s.draws_noise(i)] == ref
        assert s.draws_noise(len(s.timesteps) - 1) is last_draws
        assert s.stochastic


@pytest.mark.parametrize("spacing", ["linspace", "trailing"])
def test_ddpm_1000_steps_match_diffusers(spacing, monkeypatch):
    assert_matches_diffusers("ddpm", {**SD21, "timestep_spacing": spacing}, 1000, monkeypatch)


def test_ddpm_refuses_the_timestep_past_the_table_diffusers_indexes_out_of_range():
    """"leading" with steps_offset=1 at 1000 steps starts at timestep 1000."""
    sched = oracle("ddpm", SD15)
    sched.set_timesteps(1000)
    with pytest.raises(IndexError):
        sched.step(torch.zeros(1, 4, 2, 2), sched.timesteps[0], torch.zeros(1, 4, 2, 2))
    with pytest.raises(InvalidInput, match=r"timesteps reach 1000, past the 1000 training timesteps.*at most 999"):
        make_sampler("ddpm", SD15, 1000)


def test_ddpm_refuses_the_negative_timestep_trailing_spacing_gives_some_step_counts():
    """np.arange's float step makes "trailing" produce n + 1 timesteps ending at -1 for some
    n (61 is the first): diffusers would run the U-Net at t = -1 and index alpha_bar[-1]."""
    config = {**SD15, "timestep_spacing": "trailing"}
    sched = oracle("ddpm", config)
    sched.set_timesteps(61)
    assert len(sched.timesteps) == 62 and sched.timesteps[-1] == -1
    with pytest.raises(InvalidInput, match=r"timesteps reach -1, below 0.*at most 60 or at least 62"):
        make_sampler("ddpm", config, 61)


def test_ddpm_refuses_epsilon_prediction_at_zero_terminal_snr_where_diffusers_gives_nan():
    config = {**SD15, "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}
    sched = oracle("ddpm", config)
    sched.set_timesteps(4)
    x, _ = draws(4)
    out = sched.step(torch.from_numpy(model(x, 999.0)), sched.timesteps[0], torch.from_numpy(x)).prev_sample
    assert not torch.isfinite(out).all()
    with pytest.raises(InvalidInput, match=r"alpha_bar is 0 at timestep 999 .*v_prediction"):
        make_sampler("ddpm", config, 4)
    # Leading spacing never reaches the last timestep: it runs, and matches diffusers.
    assert make_sampler("ddpm", {**config, "timestep_spacing": "leading"}, 4).timesteps[0] == 751


@pytest.mark.parametrize("variance_type", ["learned", "learned_range"])
def test_ddpm_refuses_learned_variances_sd_unets_do_not_predict(variance_type):
    with pytest.raises(InvalidInput, match=rf"variance_type='{variance_type}' needs a U-Net that also "
                                           rf"predicts the variance.*accepted: 'fixed_small'"):
        make_sampler("ddpm", SD15, 10, options={"variance_type": variance_type})


def test_ddpm_refuses_fixed_large_log_which_diffusers_turns_into_nan():
    sched = oracle("ddpm", {**SD15, "variance_type": "fixed_large_log"})
    sched.set_timesteps(4)
    x, _ = draws(4)
    out = sched.step(torch.from_numpy(model(x, 751.0)), sched.timesteps[0], torch.from_numpy(x)).prev_sample
    assert torch.isnan(out).all()
    with pytest.raises(InvalidInput, match=r"fixed_large_log.*square root of log\(beta_t\)"):
        make_sampler("ddpm", SD15, 4, options={"variance_type": "fixed_large_log"})


@pytest.mark.parametrize("extra", [
    {},
    {"variance_type": "fixed_large", "clip_sample": True},
    {"variance_type": "fixed_small_log", "timestep_spacing": "linspace"},
    {**ZERO_SNR_V},
    {"timestep_spacing": "leading", "steps_offset": 3, "prediction_type": "v_prediction"},
])
@pytest.mark.parametrize("strength", [0.4, 0.8])
@pytest.mark.parametrize("steps", [6, 30])
def test_ddpm_part_way_with_options_matches_diffusers(extra, strength, steps, monkeypatch):
    assert_part_way_matches_diffusers("ddpm", {**SD15, **extra}, steps, strength, monkeypatch)
