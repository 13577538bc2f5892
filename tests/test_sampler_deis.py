"""DEIS against diffusers' DEISMultistepScheduler (the oracle) with the options that
change its algorithm: solver order and lower_order_final (which acts under 15 steps),
ramps (whose final level repeats the last one), thresholding, the DPM-Solver algorithm
and solver types diffusers reads as DEIS, part-way starts; and what it refuses, where
diffusers itself fails."""

from __future__ import annotations

import dataclasses
import inspect

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from test_schedulers import SD15, SD21, assert_matches_diffusers, diffusers_finite, draws, model, run_diffusers  # noqa: E402
from test_schedulers_strength import assert_part_way_matches_diffusers  # noqa: E402

from sdrt.engines.errors import InvalidInput  # noqa: E402
from sdrt.runtime.schedulers import deis, make_sampler  # noqa: E402

CONFIGS = {"sd15_epsilon": SD15, "sd21_v": SD21}


def _finite_in_diffusers(config: dict, steps: int, options: dict, monkeypatch) -> bool:
    return diffusers_finite("deis", config, steps, monkeypatch, options,
                            errors=(RuntimeError, IndexError, NotImplementedError))


def test_deis_defaults_are_the_diffusers_constructor_defaults():
    params = inspect.signature(diffusers.DEISMultistepScheduler.__init__).parameters
    assert deis.DEFAULTS == {k: p.default for k, p in params.items() if k != "self"}


@pytest.mark.parametrize("config_name", CONFIGS)
@pytest.mark.parametrize("steps", [1, 2, 3, 7, 14, 15, 20])
@pytest.mark.parametrize("lower_order_final", [True, False])
@pytest.mark.parametrize("order", [1, 2, 3])
def test_deis_order_and_lower_order_final_match_diffusers(order, lower_order_final, steps, config_name,
                                                         monkeypatch):
    options = dict(solver_order=order, lower_order_final=lower_order_final)
    assert_matches_diffusers("deis", CONFIGS[config_name], steps, monkeypatch, options)


@pytest.mark.parametrize("steps", [4, 14, 25])
@pytest.mark.parametrize("ramp", ["karras", "exponential", "beta"])
def test_deis_third_order_on_a_ramp_matches_diffusers(ramp, steps, monkeypatch):
    """A ramp's final level repeats its last one (h = 0 on the last step), at full order
    to the end without lower_order_final."""
    options = dict(solver_order=3, lower_order_final=False)
    assert_matches_diffusers(f"deis_{ramp}", SD21, steps, monkeypatch, options)


@pytest.mark.parametrize("order", [2, 3])
@pytest.mark.parametrize("prediction_type", ["epsilon", "sample"])
def test_deis_thresholding_matches_diffusers(prediction_type, order, monkeypatch):
    config = {**SD15, "prediction_type": prediction_type}
    options = dict(thresholding=True, solver_order=order, sample_max_value=1.5)
    assert_matches_diffusers("deis", config, 10, monkeypatch, options)
    x, noise = draws(10)     # the clamp is active in this run
    plain = run_diffusers("deis", config, 10, x, noise, monkeypatch, {**options, "thresholding": False})[2]
    clamped = run_diffusers("deis", config, 10, x, noise, monkeypatch, options)[2]
    assert np.abs(plain - clamped).max() > 1e-3


@pytest.mark.parametrize("order", [1, 2, 3])
def test_deis_sample_prediction_matches_diffusers(order, monkeypatch):
    assert_matches_diffusers("deis", {**SD15, "prediction_type": "sample"}, 9, monkeypatch, {"solver_order": order})


@pytest.mark.parametrize("steps", [3, 7, 25])
@pytest.mark.parametrize("offset", [0, 1, 3])
def test_deis_leading_spacing_with_steps_offset_matches_diffusers(offset, steps, monkeypatch):
    config = {**SD15, "timestep_spacing": "leading", "steps_offset": offset}
    assert_matches_diffusers("deis", config, steps, monkeypatch, {"solver_order": 3})


def test_deis_ignores_zero_terminal_snr_like_diffusers(monkeypatch):
    """DEISMultistepScheduler has no rescale_betas_zero_snr: from_config drops the key."""
    config = {**SD21, "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}
    assert_matches_diffusers("deis", config, 12, monkeypatch)
    np.testing.assert_array_equal(make_sampler("deis", config, 12).sigmas,
                                  make_sampler("deis", {**config, "rescale_betas_zero_snr": False}, 12).sigmas)


@pytest.mark.parametrize("options", [
    {"algorithm_type": "dpmsolver++"}, {"algorithm_type": "dpmsolver"},
    {"solver_type": "midpoint"}, {"solver_type": "heun"}, {"solver_type": "bh1"}, {"solver_type": "bh2"},
])
def test_deis_reads_dpm_solver_and_unipc_types_as_deis_logrho_like_diffusers(options, monkeypatch):
    """A DPM-Solver or UniPC config run through DEIS."""
    assert_matches_diffusers("deis", {**SD15, **options}, 8, monkeypatch)
    cfg = make_sampler("deis", {**SD15, **options}, 8).cfg
    assert (cfg["algorithm_type"], cfg["solver_type"]) == ("deis", "logrho")


@pytest.mark.parametrize("spacing, steps", [("linspace", 1000), ("leading", 999), ("trailing", 998)])
def test_deis_first_order_near_1000_steps_matches_diffusers(spacing, steps, monkeypatch):
    """Step counts near the 1000 training steps whose levels repeat: diffusers runs them
    to a finite end at first order (a step between equal levels is the identity)."""
    config = {**SD15, "timestep_spacing": spacing}
    assert_matches_diffusers("deis", config, steps, monkeypatch, {"solver_order": 1})


def _with_diffusers_levels(s, config: dict, steps: int, options: dict):
    """Sampler `s` on diffusers' own float32 levels: its sigmas and the alpha_t, sigma_t,
    lambda_t its step() derives from each (0-d tensors, as there)."""
    d = diffusers.DEISMultistepScheduler.from_config(config, **options)
    d.set_timesteps(steps)
    vp = [d._sigma_to_alpha_sigma_t(v) for v in d.sigmas]
    alpha = np.array([a.item() for a, _ in vp], np.float32)
    sigma = np.array([sg.item() for _, sg in vp], np.float32)
    lam = np.array([(torch.log(a) - torch.log(sg)).item() for a, sg in vp], np.float32)
    return dataclasses.replace(s, sigmas=d.sigmas.numpy(), alpha=alpha, sigma=sigma, lam=lam)


def _run(s, x: np.ndarray) -> np.ndarray:
    state = s.init_state()
    for i, t in enumerate(s.timesteps):
        x, state = s.step(state, i, x, model(x, float(t)), None)
    return x


@pytest.mark.parametrize("config, steps, order", [
    (SD21, 25, 3), (SD15, 100, 3), (SD21, 200, 2),
    ({**SD15, "timestep_spacing": "trailing"}, 1000, 2), ({**SD15, "timestep_spacing": "leading"}, 998, 2),
])
def test_deis_steps_match_diffusers_on_its_own_levels_where_float32_is_ill_conditioned(config, steps, order,
                                                                                      monkeypatch):
    """Longer third- (and second-) order runs subtract nearly equal float32 integrals
    (ind_fn) and weigh the history by large alternating coefficients: an ulp or two in
    a level moves diffusers' own result by 2e-5 (25 steps) to 1e-4 (1000). torch's float32
    sqrt is not correctly rounded on every CPU (on the AMD EPYC these tests were written on,
    17% of results are 1 ulp off; numpy's is exact), so the levels can differ by an ulp or
    two (see the next test); on diffusers' own levels the steps agree."""
    options = {"solver_order": order}
    x, noise = draws(steps)
    ref = run_diffusers("deis", config, steps, x, noise, monkeypatch, options)[2]
    s = _with_diffusers_levels(make_sampler("deis", config, steps, options=options), config, steps, options)
    out = _run(s, x)
    assert np.abs(out - ref).max() / np.abs(ref).max() <= 2e-6


@pytest.mark.parametrize("ramp", ["", "_karras", "_beta"])
@pytest.mark.parametrize("config", [SD15, SD21])
def test_deis_levels_are_diffusers_levels_within_two_ulps(config, ramp):
    """The two sqrt roundings (the training sigma, then alpha_t) are all that differ."""
    s = make_sampler(f"deis{ramp}", config, 25)
    ours = _with_diffusers_levels(s, config, 25, {f"use{ramp}_sigmas": True} if ramp else {})
    for name in ("sigmas", "alpha", "sigma"):
        a, b = getattr(s, name), getattr(ours, name)
        assert np.abs(a.view(np.int32) - b.view(np.int32)).max() <= 2, name
    np.testing.assert_allclose(s.lam, ours.lam, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("spacing, steps, options", [
    ("linspace", 1000, {}),                      # repeated levels at second order
    ("leading", 999, {}),
    ("trailing", 998, {"solver_order": 3}),
    ("leading", 1000, {"solver_order": 1}),      # every timestep the same
])
def test_deis_schedules_diffusers_cannot_run_are_refused(spacing, steps, options, monkeypatch):
    config = {**SD15, "timestep_spacing": spacing}
    with pytest.raises(InvalidInput, match=rf"scheduler 'deis' with {steps} steps: its "):
        make_sampler("deis", config, steps, options=options)
    assert not _finite_in_diffusers(config, steps, options, monkeypatch)


def test_deis_beta_ramp_from_32_steps_is_refused_with_the_most_that_work(monkeypatch):
    """The beta ramp crowds its top levels: from 32 steps the first two both truncate to
    timestep 998, where diffusers starts at the second and runs off the end; 31 run."""
    with pytest.raises(InvalidInput, match="with 32 steps: .*both map to timestep 998.*use at most 31 steps$"):
        make_sampler("deis_beta", SD15, 32)
    assert not _finite_in_diffusers(SD15, 32, {"use_beta_sigmas": True}, monkeypatch)
    assert_matches_diffusers("deis_beta", SD15, 31, monkeypatch)


@pytest.mark.parametrize("options, match", [
    ({"algorithm_type": "sde-dpmsolver++"}, "algorithm_type='sde-dpmsolver\\+\\+' is not supported"),
    ({"solver_type": "rk4"}, "solver_type='rk4' is not supported"),
    ({"solver_order": 4}, "solver_order=4 is not supported by sdrt; accepted: 1, 2, 3"),
    ({"prediction_type": "flow_prediction"}, "prediction_type 'flow_prediction' is not supported"),
    ({"use_flow_sigmas": True}, "use_flow_sigmas=True is not supported"),
    ({"use_dynamic_shifting": True}, "use_dynamic_shifting=True is not supported"),
])
def test_deis_refuses_options_it_does_not_reimplement(options, match):
    with pytest.raises(InvalidInput, match=match):
        make_sampler("deis", SD15, 10, options=options)


@pytest.mark.parametrize("options", [{"algorithm_type": "sde-dpmsolver++"}, {"solver_type": "rk4"}])
def test_deis_types_diffusers_rejects_are_refused(options):
    with pytest.raises(NotImplementedError):
        diffusers.DEISMultistepScheduler.from_config(SD15, **options)
    with pytest.raises(InvalidInput):
        make_sampler("deis", SD15, 10, options=options)


@pytest.mark.parametrize("extra", [
    {"solver_order": 3},
    {"solver_order": 3, "lower_order_final": False},
    {"solver_order": 1},
    {"use_karras_sigmas": True, "solver_order": 3},
    {"use_beta_sigmas": True},
    {"thresholding": True, "sample_max_value": 1.5},
    {"prediction_type": "v_prediction", "timestep_spacing": "trailing"},
    {"timestep_spacing": "leading", "steps_offset": 2, "solver_order": 3},
])
@pytest.mark.parametrize("strength", [0.5, 0.8])
@pytest.mark.parametrize("steps", [6, 20])
def test_deis_part_way_with_options_matches_diffusers(extra, strength, steps, monkeypatch):
    assert_part_way_matches_diffusers("deis", {**SD15, **extra}, steps, strength, monkeypatch)


def test_deis_history_survives_reused_buffers():
    """Engines may hand back the same output buffer every call and callers may update the
    latent in place: the state keeps its own copies."""
    s = make_sampler("deis", {**SD15, "prediction_type": "sample"}, 8, options={"solver_order": 3})
    x0, _ = draws(8)
    fresh, state = x0.copy(), s.init_state()
    for i, t in enumerate(s.timesteps):
        fresh, state = s.step(state, i, fresh, model(fresh, float(t)), None)
    x, out, state = x0.copy(), np.empty_like(x0), s.init_state()
    for i, t in enumerate(s.timesteps):
        out[...] = model(x, float(t))
        nxt, state = s.step(state, i, x, out, None)
        x[...] = nxt
    np.testing.assert_array_equal(x, fresh)


@pytest.mark.parametrize("bounds", [
    {"sigma_min": 0.1, "sigma_max": 10.0},
    {"sigma_min": 0.05, "sigma_max": None},
    # diffusers drops keys its own config records as defaulted (extract_init_dict).
    {"sigma_min": 0.1, "sigma_max": 10.0, "_use_default_values": ["sigma_max"]},
])
@pytest.mark.parametrize("ramp", ["karras", "exponential", "beta"])
def test_deis_ramp_takes_the_checkpoint_configs_sigma_bounds_like_diffusers(ramp, bounds, monkeypatch):
    """DEISMultistepScheduler has no sigma_min / sigma_max keywords, but from_config keeps
    the checkpoint's keys and its ramps read them."""
    assert_matches_diffusers(f"deis_{ramp}", {**SD15, **bounds}, 12, monkeypatch)
    if ramp == "karras":
        plain = make_sampler("deis_karras", SD15, 12)
        assert make_sampler("deis_karras", {**SD15, **bounds}, 12).sigmas[-1] != plain.sigmas[-1]


def test_deis_refuses_a_config_sigma_bound_that_is_not_a_positive_number():
    with pytest.raises(InvalidInput, match="sigma_min must be a positive number or None"):
        make_sampler("deis_karras", {**SD15, "sigma_min": -0.1}, 12)
