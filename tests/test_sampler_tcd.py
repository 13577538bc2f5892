"""TCD (Trajectory Consistency Distillation) against diffusers' TCDScheduler (the oracle):
the eta a pipeline call passes, stochastic eta (gamma) values, the last step, options,
large step counts, part-way starts and refusals."""

from __future__ import annotations

import inspect

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from test_schedulers import SD15, SD21, SHAPE, draws, model, oracle, step_kwargs  # noqa: E402
from test_schedulers_strength import t_start_of  # noqa: E402

from sdrt.engines.errors import InvalidInput  # noqa: E402
from sdrt.runtime.schedulers import make_sampler, tcd  # noqa: E402

RTOL = 1e-5
ZERO_SNR_V = {"rescale_betas_zero_snr": True, "prediction_type": "v_prediction"}


def run_diffusers(config, steps, strength, step_kwargs, monkeypatch, seed=0):
    """diffusers' TCD loop as the Stable Diffusion pipelines run it (text-to-image from
    noise, or image-to-image from get_timesteps + set_begin_index + add_noise); each
    randn_tensor of the scheduler module is the next of the shared draws.
    Returns (timesteps, final latents, the calls that drew noise)."""
    x, noise = draws(steps, seed)
    sched = oracle("tcd", config)
    sched.set_timesteps(steps)
    t_start = 0 if strength is None else t_start_of(steps, strength)
    timesteps = sched.timesteps[t_start:]
    if strength is not None:
        sched.set_begin_index(t_start)
    module = __import__(type(sched).__module__, fromlist=["randn_tensor"])
    taken, drawn, call = iter(noise[1:]), [], [0]
    monkeypatch.setattr(module, "randn_tensor",
                        lambda *a, **k: drawn.append(call[0]) or torch.from_numpy(next(taken)))
    xt = torch.from_numpy(x) if strength is None else sched.add_noise(
        torch.from_numpy(x), torch.from_numpy(noise[0]), timesteps[:1].repeat(SHAPE[0]))
    for i, t in enumerate(timesteps):
        call[0] = i
        out = model(sched.scale_model_input(xt, t).numpy(), float(t))
        xt = sched.step(torch.from_numpy(out), t, xt, **step_kwargs).prev_sample
    return timesteps.numpy().astype(np.float32), xt.numpy(), drawn


def run_sdrt(sampler, steps, strength, seed=0):
    x, noise = draws(steps, seed)
    xt = x if strength is None else sampler.add_noise(x, noise[0], 0)
    taken, drawn, state = iter(noise[1:]), [], sampler.init_state()
    for i, t in enumerate(sampler.timesteps):
        if sampler.draws_noise(i):
            drawn.append(i)
        out = model(sampler.scale_model_input(xt, i), float(t))
        xt, state = sampler.step(state, i, xt, out, next(taken) if sampler.draws_noise(i) else None)
    return sampler.timesteps, xt, drawn


def assert_same(sampler, config, steps, strength, step_kwargs, monkeypatch):
    ref_t, ref_x, ref_drawn = run_diffusers(config, steps, strength, step_kwargs, monkeypatch)
    t, x, drawn = run_sdrt(sampler, steps, strength)
    assert np.isfinite(ref_x).all(), "the oracle itself diverged: not a useful case"
    np.testing.assert_array_equal(t, ref_t)
    assert drawn == ref_drawn, "the sampler draws noise on other calls than diffusers"
    assert sampler.stochastic == bool(ref_drawn)
    err = np.abs(x - ref_x).max() / np.abs(ref_x).max()
    assert err <= RTOL, f"max relative error {err:.2e} after {len(t)} calls"


def test_a_plain_pipeline_call_passes_tcd_eta_zero():
    """StableDiffusionPipeline's eta defaults to 0.0 and reaches every scheduler whose
    step() takes `eta`, TCD's included (whose own default, 0.3, is thus never used)."""
    sched = oracle("tcd", SD15)
    assert step_kwargs(sched) == {"eta": tcd.PIPELINE_ETA} == {"eta": 0.0}
    assert inspect.signature(type(sched).step).parameters["eta"].default == 0.3
    assert "eta" not in tcd.DEFAULTS and "eta" not in inspect.signature(type(sched).__init__).parameters
    s = make_sampler("tcd", SD15, 4)
    assert not s.stochastic and not any(s.draws_noise(i) for i in range(4))


def leaves_a_step(steps: int, strength: float | None) -> bool:
    return strength is None or steps - t_start_of(steps, strength) >= 1


@pytest.mark.parametrize("config", [SD15, SD21], ids=["sd15_epsilon", "sd21_v"])
@pytest.mark.parametrize("strength, steps", [(st, k) for st in (None, 0.3, 0.75) for k in (1, 2, 4, 8, 25, 50)
                                             if leaves_a_step(k, st)])
def test_tcd_matches_diffusers_as_a_plain_pipeline_call_runs_it(config, strength, steps, monkeypatch):
    s = make_sampler("tcd", config, steps, strength=strength)
    assert_same(s, config, steps, strength, step_kwargs(oracle("tcd", config)), monkeypatch)


@pytest.mark.parametrize("eta", [0.1, 0.3, 0.9, 1.0])
@pytest.mark.parametrize("strength, steps", [(st, k) for st in (None, 0.5) for k in (1, 4, 8)
                                             if leaves_a_step(k, st)])
def test_tcd_eta_matches_diffusers_step_eta(eta, strength, steps, monkeypatch):
    """gamma > 0: fresh noise on every call but the whole schedule's last (a part-way run
    ends on that step too)."""
    begin = 0 if strength is None else t_start_of(steps, strength)
    s = tcd.make(SD15, steps, begin, eta=eta)
    assert_same(s, SD15, steps, strength, {"eta": eta}, monkeypatch)
    assert [s.draws_noise(i) for i in range(len(s.timesteps))] == [begin + i < steps - 1
                                                                     for i in range(len(s.timesteps))]


@pytest.mark.parametrize("extra", [
    {"original_inference_steps": 20, "prediction_type": "v_prediction"},
    {"beta_schedule": "squaredcos_cap_v2", "prediction_type": "sample"},
    {"set_alpha_to_one": False, "timestep_spacing": "trailing", "steps_offset": 7},   # no part in TCD
    {"thresholding": True, "clip_sample": True, "clip_sample_range": 0.1},           # ignored by diffusers' step
    ZERO_SNR_V,
])
@pytest.mark.parametrize("eta", [0.0, 0.3])
@pytest.mark.parametrize("strength", [None, 0.6])
def test_tcd_less_common_config_options_match_diffusers(extra, eta, strength, monkeypatch):
    config, steps = {**SD15, **extra}, 6
    begin = 0 if strength is None else t_start_of(steps, strength)
    assert_same(tcd.make(config, steps, begin, eta=eta), config, steps, strength, {"eta": eta}, monkeypatch)


def test_tcd_1000_steps_match_diffusers(monkeypatch):
    config = {**SD21, "original_inference_steps": 1000}
    assert_same(tcd.make(config, 1000, eta=0.3), config, 1000, None, {"eta": 0.3}, monkeypatch)


def test_tcd_intermediate_timestep_is_floored_in_float32_as_torch_does():
    """s = floor((1 - eta) * t'): torch multiplies the long timestep by the Python float in
    float32, which rounds some products up to the integer float64 floors below (eta = 0.3:
    0.7 * 90 is 63 in float32, 62.99999999999999 in float64)."""
    config = {**SD15, "original_inference_steps": 1000}
    sched = oracle("tcd", config)
    sched.set_timesteps(1000)                      # t = 999 .. 0: call i steps to t' = 998 - i
    s = tcd.make(config, 1000, eta=0.3)
    differ = [p for p in range(999) if int(torch.floor((1 - 0.3) * torch.tensor(p)).long()) != int((1 - 0.3) * p)]
    assert 90 in differ
    for p in differ:
        s_ref = int(torch.floor((1 - 0.3) * sched.timesteps[998 - p]).long())
        assert s.alpha_s[998 - p] == pytest.approx(float(sched.alphas_cumprod[s_ref].sqrt()), rel=1e-6)


def test_tcd_refuses_more_steps_than_it_was_distilled_with():
    with pytest.raises(InvalidInput, match="original_inference_steps=50 steps, got 51"):
        make_sampler("tcd", SD15, 51)
    with pytest.raises(InvalidInput, match=r"original_inference_steps must be an integer in 1\.\.1000, got 2000"):
        make_sampler("tcd", SD15, 4, options={"original_inference_steps": 2000})


@pytest.mark.parametrize("eta", [-0.1, 1.5, float("nan"), True, "0.3", None])
def test_tcd_refuses_an_eta_diffusers_asserts_against(eta):
    with pytest.raises(InvalidInput, match=r"eta \(TCD's gamma\) must be a number in \[0, 1\]"):
        tcd.make(SD15, 4, eta=eta)


def test_tcd_refuses_epsilon_prediction_at_zero_terminal_snr_where_diffusers_gives_nan():
    config = {**SD15, "rescale_betas_zero_snr": True}
    sched = oracle("tcd", config)
    sched.set_timesteps(4)
    x, _ = draws(4)
    out = sched.step(torch.from_numpy(model(x, 999.0)), sched.timesteps[0], torch.from_numpy(x), eta=0.0)
    assert not torch.isfinite(out.prev_sample).all()
    with pytest.raises(InvalidInput, match=r"alpha_bar is 0 at timestep 999 .*v_prediction"):
        make_sampler("tcd", config, 4)
