"""UniPC against diffusers' UniPCMultistepScheduler (the oracle) with the options that
change its algorithm: solver type and order, the x0 / noise form, the corrector
switched off per step, the final level, ramps, thresholding, zero-SNR, part-way starts;
and what it refuses, where diffusers itself turns the run into NaN or fails."""

from __future__ import annotations

import inspect
import itertools

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from test_schedulers import SD15, SD21, assert_matches_diffusers, diffusers_finite, draws, model, run_diffusers  # noqa: E402
from test_schedulers_strength import assert_part_way_matches_diffusers  # noqa: E402

from sdrt.engines.errors import InvalidInput  # noqa: E402
from sdrt.runtime.schedulers import make_sampler, unipc  # noqa: E402

CONFIGS = {"sd15_epsilon": SD15, "sd21_v": SD21}


def _finite_in_diffusers(config: dict, steps: int, options: dict, monkeypatch) -> bool:
    return diffusers_finite("unipc", config, steps, monkeypatch, options,
                            errors=(RuntimeError, IndexError, AssertionError))     # torch's LinAlgError is a RuntimeError


def test_unipc_defaults_are_the_diffusers_constructor_defaults():
    params = inspect.signature(diffusers.UniPCMultistepScheduler.__init__).parameters
    expected = {k: p.default for k, p in params.items() if k != "self"}
    ours = {**unipc.DEFAULTS, "disable_corrector": list(unipc.DEFAULTS["disable_corrector"])}
    assert ours == expected


# bh1 and the noise-prediction form need a nonzero final level (see the refusals below).
SOLVERS = [
    pytest.param(st, k, x0, id=f"{st}-order{k}-{'x0' if x0 else 'eps'}")
    for st, k, x0 in itertools.product(("bh1", "bh2"), (1, 2, 3), (True, False))
]


@pytest.mark.parametrize("config_name", CONFIGS)
@pytest.mark.parametrize("steps", [1, 2, 3, 8, 20])
@pytest.mark.parametrize("solver_type, order, predict_x0", SOLVERS)
def test_unipc_solver_type_order_and_form_match_diffusers(solver_type, order, predict_x0, steps,
                                                          config_name, monkeypatch):
    final = "zero" if solver_type == "bh2" and predict_x0 else "sigma_min"
    options = dict(solver_type=solver_type, solver_order=order, predict_x0=predict_x0, final_sigmas_type=final)
    assert_matches_diffusers("unipc", CONFIGS[config_name], steps, monkeypatch, options)


@pytest.mark.parametrize("predict_x0, final", [(True, "zero"), (False, "sigma_min")])
@pytest.mark.parametrize("order", [1, 2, 3])
def test_unipc_sample_prediction_matches_diffusers(order, predict_x0, final, monkeypatch):
    options = dict(solver_order=order, predict_x0=predict_x0, final_sigmas_type=final)
    assert_matches_diffusers("unipc", {**SD15, "prediction_type": "sample"}, 9, monkeypatch, options)


@pytest.mark.parametrize("steps", [2, 7, 20])
@pytest.mark.parametrize("order, solver_type", [(2, "bh2"), (3, "bh2"), (3, "bh1")])
def test_unipc_without_lower_order_final_matches_diffusers(order, solver_type, steps, monkeypatch):
    """Full order to the end needs a nonzero final level (plain spacing: distinct from the last)."""
    options = dict(solver_order=order, solver_type=solver_type, lower_order_final=False,
                   final_sigmas_type="sigma_min")
    assert_matches_diffusers("unipc", SD21, steps, monkeypatch, options)


@pytest.mark.parametrize("disabled", [[0], [0, 1, 2], [3, 5], list(range(20))])
@pytest.mark.parametrize("order", [2, 3])
def test_unipc_disable_corrector_matches_diffusers(disabled, order, monkeypatch):
    options = dict(solver_order=order, disable_corrector=disabled)
    assert_matches_diffusers("unipc", SD15, 9, monkeypatch, options)


def test_unipc_disable_corrector_changes_the_result(monkeypatch):
    """The case above is not vacuous: with the corrector off the trajectory differs."""
    x, noise = draws(9)
    on = run_diffusers("unipc", SD15, 9, x, noise, monkeypatch)[2]
    off = run_diffusers("unipc", SD15, 9, x, noise, monkeypatch, {"disable_corrector": [2, 3]})[2]
    assert np.abs(on - off).max() > 1e-4


@pytest.mark.parametrize("steps", [1, 4, 25])
@pytest.mark.parametrize("ramp", ["karras", "exponential", "beta"])
def test_unipc_sigma_ramp_with_sigma_min_final_matches_diffusers(ramp, steps, monkeypatch):
    """With a ramp, "sigma_min" repeats the ramp's last level: the last step has h = 0."""
    assert_matches_diffusers(f"unipc_{ramp}", SD21, steps, monkeypatch, {"final_sigmas_type": "sigma_min"})


@pytest.mark.parametrize("options", [
    {"sigma_min": 0.1, "sigma_max": 10.0},
    {"sigma_min": 0.05},
    {"sigma_max": 12.0, "final_sigmas_type": "sigma_min"},
])
@pytest.mark.parametrize("ramp", ["karras", "exponential", "beta"])
def test_unipc_ramp_bounds_match_diffusers(ramp, options, monkeypatch):
    assert_matches_diffusers(f"unipc_{ramp}", SD15, 12, monkeypatch, options)


@pytest.mark.parametrize("steps", [4, 12])
def test_unipc_karras_without_lower_order_final_second_order_matches_diffusers(steps, monkeypatch):
    options = dict(lower_order_final=False, final_sigmas_type="sigma_min")
    assert_matches_diffusers("unipc_karras", SD15, steps, monkeypatch, options)


@pytest.mark.parametrize("predict_x0, final", [(True, "zero"), (False, "sigma_min")])
@pytest.mark.parametrize("order", [2, 3])
def test_unipc_thresholding_matches_diffusers(order, predict_x0, final, monkeypatch):
    """Dynamic thresholding clamps the x0 history (the noise form has no x0 to clamp,
    and diffusers ignores the option there)."""
    options = dict(thresholding=True, solver_order=order, predict_x0=predict_x0, final_sigmas_type=final,
                   sample_max_value=1.5)
    assert_matches_diffusers("unipc", SD15, 10, monkeypatch, options)
    if predict_x0:   # the clamp is active in this run
        x, noise = draws(10)
        plain = run_diffusers("unipc", SD15, 10, x, noise, monkeypatch, {**options, "thresholding": False})[2]
        clamped = run_diffusers("unipc", SD15, 10, x, noise, monkeypatch, options)[2]
        assert np.abs(plain - clamped).max() > 1e-3


@pytest.mark.parametrize("steps", [1, 2, 7, 25])
@pytest.mark.parametrize("order", [1, 2, 3])
def test_unipc_zero_terminal_snr_with_trailing_v_prediction_matches_diffusers(order, steps, monkeypatch):
    config = {**SD21, "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}
    assert_matches_diffusers("unipc", config, steps, monkeypatch, {"solver_order": order})


@pytest.mark.parametrize("steps", [3, 7, 25])
@pytest.mark.parametrize("offset", [0, 1, 3])
def test_unipc_leading_spacing_with_steps_offset_matches_diffusers(offset, steps, monkeypatch):
    config = {**SD15, "timestep_spacing": "leading", "steps_offset": offset}
    assert_matches_diffusers("unipc", config, steps, monkeypatch, {"solver_order": 3})


@pytest.mark.parametrize("solver_type", ["midpoint", "heun", "logrho"])
def test_unipc_takes_dpm_solver_types_as_bh2_like_diffusers(solver_type, monkeypatch):
    """A DPM-Solver or DEIS config run through UniPC: diffusers maps its solver_type to bh2."""
    assert_matches_diffusers("unipc", {**SD15, "solver_type": solver_type}, 8, monkeypatch)
    assert make_sampler("unipc", {**SD15, "solver_type": solver_type}, 8).cfg["solver_type"] == "bh2"


@pytest.mark.parametrize("spacing, steps, order", [
    ("linspace", 1000, 1), ("leading", 999, 1), ("trailing", 998, 1),   # repeated levels, first order
    ("trailing", 1000, 2), ("linspace", 999, 3), ("leading", 998, 2),
])
def test_unipc_near_1000_steps_matches_diffusers(spacing, steps, order, monkeypatch):
    """Step counts near the 1000 training steps that diffusers runs to a finite end, even
    with repeated levels (a first-order step between equal levels is the identity)."""
    config = {**SD15, "timestep_spacing": spacing}
    assert_matches_diffusers("unipc", config, steps, monkeypatch, {"solver_order": order})


@pytest.mark.parametrize("spacing, steps, options", [
    ("linspace", 1000, {}),                            # repeated levels at second order
    ("leading", 999, {}),
    ("trailing", 998, {"solver_order": 3}),
    ("leading", 1000, {"solver_order": 1}),            # every timestep the same
    ("linspace", 7, {"lower_order_final": False}),    # second order onto the zero final level
    ("linspace", 2, {"lower_order_final": False, "solver_order": 3}),
    ("trailing", 700, {"lower_order_final": False, "solver_order": 3, "final_sigmas_type": "sigma_min"}),
])
def test_unipc_schedules_diffusers_cannot_run_are_refused(spacing, steps, options, monkeypatch):
    config = {**SD15, "timestep_spacing": spacing}
    with pytest.raises(InvalidInput, match=rf"scheduler 'unipc' with {steps} steps: its "):
        make_sampler("unipc", config, steps, options=options)
    assert not _finite_in_diffusers(config, steps, options, monkeypatch)


@pytest.mark.parametrize("ramp", ["karras", "exponential", "beta"])
def test_unipc_third_order_onto_a_repeated_final_level_is_refused(ramp, monkeypatch):
    options = dict(lower_order_final=False, solver_order=3, final_sigmas_type="sigma_min")
    with pytest.raises(InvalidInput, match="onto a repeated final noise level.*lower_order_final=True"):
        make_sampler(f"unipc_{ramp}", SD15, 7, options=options)
    assert not _finite_in_diffusers(SD15, 7, {**options, f"use_{ramp}_sigmas": True}, monkeypatch)
    # ... while fewer steps keep the last step at second order (warm-up) and run.
    assert_matches_diffusers(f"unipc_{ramp}", SD15, 2, monkeypatch, options)


@pytest.mark.parametrize("ramp", ["karras", "exponential", "beta"])
def test_unipc_ramp_above_the_training_range_is_refused(ramp, monkeypatch):
    """sigma_max past the largest training sigma (14.6) maps the first levels to t = 999
    twice; diffusers then starts at the second of them and runs off the schedule's end."""
    options = {"sigma_max": 20.0}
    with pytest.raises(InvalidInput, match="both map to timestep 999.*use at most [0-9]+ steps or a lower sigma_max"):
        make_sampler(f"unipc_{ramp}", SD15, 25, options=options)
    assert not _finite_in_diffusers(SD15, 25, {**options, f"use_{ramp}_sigmas": True}, monkeypatch)


def test_unipc_beta_ramp_from_32_steps_is_refused_with_the_most_that_work(monkeypatch):
    """The beta ramp crowds its top levels: from 32 steps the first two both truncate to
    timestep 998 and diffusers fails; 31 run."""
    with pytest.raises(InvalidInput, match="with 32 steps: .*both map to timestep 998.*use at most 31 steps$"):
        make_sampler("unipc_beta", SD15, 32)
    assert not _finite_in_diffusers(SD15, 32, {"use_beta_sigmas": True}, monkeypatch)
    assert_matches_diffusers("unipc_beta", SD15, 31, monkeypatch)


def test_unipc_refused_step_counts_name_ones_that_work():
    with pytest.raises(InvalidInput, match="set lower_order_final=True, .* or use 1 step"):
        make_sampler("unipc", SD15, 5, options={"lower_order_final": False})
    with pytest.raises(InvalidInput, match="use at most 999 steps"):
        make_sampler("unipc", SD15, 1000)


@pytest.mark.parametrize("options", [{"solver_type": "bh1"}, {"predict_x0": False}])
@pytest.mark.parametrize("steps", [1, 7])
def test_unipc_forms_that_turn_a_zero_final_level_into_nan_are_refused(options, steps, monkeypatch):
    with pytest.raises(InvalidInput, match="needs final_sigmas_type='sigma_min'"):
        make_sampler("unipc", SD15, steps, options=options)
    assert not _finite_in_diffusers(SD15, steps, options, monkeypatch)


@pytest.mark.parametrize("options, match", [
    ({"solver_p": "DDIMScheduler"}, "solver_p='DDIMScheduler' is not supported"),
    ({"prediction_type": "flow_prediction"}, "prediction_type 'flow_prediction' is not supported"),
    ({"use_flow_sigmas": True}, "use_flow_sigmas=True is not supported"),
    ({"use_dynamic_shifting": True}, "use_dynamic_shifting=True is not supported"),
    ({"shift_terminal": 0.1}, "shift_terminal=0.1 is not supported"),
    ({"solver_order": 4}, "solver_order=4 is not supported by sdrt; accepted: 1, 2, 3"),
    ({"solver_type": "bh3"}, "solver_type='bh3' is not supported by sdrt; accepted: 'bh1', 'bh2'"),
    ({"final_sigmas_type": "sigma_max"}, "final_sigmas_type='sigma_max' is not supported"),
    ({"disable_corrector": "0"}, "disable_corrector must be a list of step indices"),
    ({"disable_corrector": [True]}, "disable_corrector must be a list of step indices"),
    ({"disable_corrector": [0.5]}, "disable_corrector must be a list of step indices"),
    ({"sigma_min": -1.0, "use_karras_sigmas": True}, "sigma_min must be a positive number or None"),
    ({"sigma_max": "big"}, "sigma_max must be a positive number or None"),
    ({"sigma_max": True}, "sigma_max must be a positive number or None"),
])
def test_unipc_refuses_options_it_does_not_reimplement(options, match):
    with pytest.raises(InvalidInput, match=match):
        make_sampler("unipc", SD15, 10, options=options)


def test_unipc_flow_options_without_effect_are_accepted(monkeypatch):
    """flow_shift and time_shift_type only act with flow sigmas or dynamic shifting."""
    assert_matches_diffusers("unipc", SD15, 6, monkeypatch, {"flow_shift": 3.0, "time_shift_type": "linear"})


@pytest.mark.parametrize("extra", [
    {"solver_order": 3},
    {"solver_order": 3, "lower_order_final": False, "final_sigmas_type": "sigma_min"},
    {"solver_type": "bh1", "final_sigmas_type": "sigma_min", "solver_order": 3},
    {"predict_x0": False, "final_sigmas_type": "sigma_min"},
    # Step indices of the whole schedule: a part-way run (t_start 3 or 10) skips them.
    {"disable_corrector": [4, 11, 12]},
    {"use_karras_sigmas": True, "final_sigmas_type": "sigma_min"},
    {"use_exponential_sigmas": True, "solver_order": 3},
    {"thresholding": True, "sample_max_value": 1.5},
    {"prediction_type": "v_prediction", "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"},
    {"timestep_spacing": "leading", "steps_offset": 2, "solver_order": 1},
])
@pytest.mark.parametrize("strength", [0.5, 0.8])
@pytest.mark.parametrize("steps", [6, 20])
def test_unipc_part_way_with_options_matches_diffusers(extra, strength, steps, monkeypatch):
    assert_part_way_matches_diffusers("unipc", {**SD15, **extra}, steps, strength, monkeypatch)


def test_unipc_part_way_disable_corrector_counts_steps_of_the_whole_schedule():
    s = make_sampler("unipc", {**SD15, "disable_corrector": [11]}, 20, strength=0.5)
    assert s.begin_index == 10
    # Call 0 has no previous step to correct; call 2 (step 12) corrects step 11's prediction.
    assert s.corrects == (False, True, False) + (True,) * 7


@pytest.mark.parametrize("options", [{"solver_order": 3}, {"predict_x0": False, "final_sigmas_type": "sigma_min"}])
def test_unipc_history_survives_reused_buffers(options):
    """Engines may hand back the same output buffer every call and callers may update the
    latent in place: the state keeps its own copies."""
    s = make_sampler("unipc", SD15, 8, options=options)
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
