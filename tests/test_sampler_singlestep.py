"""DPM-Solver++ single-step (dpmpp_2s) against diffusers' DPMSolverSinglestepScheduler,
the oracle: solver orders and their order lists, solver types, algorithm types, final
sigmas, ramps, part-way starts that land inside a group of the order list, and step
counts near 1000 (refused exactly where diffusers fails)."""

from __future__ import annotations

import itertools

import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from test_sampler_dpmsolver import (  # noqa: E402
    COSINE, assert_part_way_with_options_matches, diffusers_fails, diffusers_outcome, params,
    with_correctly_rounded_torch,
)
from test_schedulers import SD15, SD21, assert_matches_diffusers, draws, run_sdrt  # noqa: E402
from test_schedulers_strength import assert_part_way_matches_diffusers, rel_err, t_start_of  # noqa: E402

from sdrt.engines.errors import InvalidInput  # noqa: E402
from sdrt.runtime.schedulers import diffusers_scheduler, make_sampler, singlestep  # noqa: E402


DPM = {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"}
SDE = {"algorithm_type": "sde-dpmsolver++"}

# Every order with both solver types, lower_order_final on and off, and both final
# sigmas: diffusers turns lower_order_final on itself when the steps are not a multiple
# of the order or the final sigma is zero; 5, 6, 7 steps cover each remainder mod 2 and 3.
ORDER_CASES = [
    pytest.param({"solver_order": k, "solver_type": st, "lower_order_final": lof, "final_sigmas_type": fs},
                 id=f"order{k}-{st}-lof{int(lof)}-{fs}")
    for k, st, lof, fs in itertools.product((1, 2, 3), ("midpoint", "heun"), (True, False), ("zero", "sigma_min"))
    if not (k == 1 and st == "heun")      # first order has no solver type
]


@pytest.mark.parametrize("steps", [5, 6, 7])
@pytest.mark.parametrize("options", ORDER_CASES)
def test_dpmpp_2s_orders_and_solver_types_match_diffusers(options, steps, monkeypatch):
    assert_matches_diffusers("dpmpp_2s", SD15, steps, monkeypatch, options)


ALGORITHM_CASES = {
    "sde": (SD15, SDE),
    "sde_heun": (SD15, {**SDE, "solver_type": "heun"}),
    "sde_order1": (SD15, {**SDE, "solver_order": 1}),
    # Third-order SDE on SD15's epsilon config with the stand-in model grows to |x| ~ 400,
    # where diffusers' own result moves by 4e-5 for a 1-ulp change of the noise; SD21 is
    # well conditioned.
    "sde_order3_v": (SD21, {**SDE, "solver_order": 3}),
    "sde_order3_heun_sigma_min_v": (SD21, {**SDE, "solver_order": 3, "solver_type": "heun",
                                           "lower_order_final": False, "final_sigmas_type": "sigma_min"}),
    "dpmsolver_v": (SD21, DPM),
    "dpmsolver_heun_v": (SD21, {**DPM, "solver_type": "heun"}),
    "dpmsolver_order3_v": (SD21, {**DPM, "solver_order": 3}),
    "dpmsolver_order3_heun_v": (SD21, {**DPM, "solver_order": 3, "solver_type": "heun", "lower_order_final": False}),
    "dpmsolver_order3_eps": (SD15, {**DPM, "solver_order": 3}),
    "thresholding_sample": (SD15, {"thresholding": True, "prediction_type": "sample", "sample_max_value": 1.5}),
    "order3_v": (SD15, {"solver_order": 3, "prediction_type": "v_prediction"}),
}


@pytest.mark.parametrize("steps", [6, 13, 25])
@pytest.mark.parametrize("case", ALGORITHM_CASES)
def test_dpmpp_2s_algorithm_types_match_diffusers(case, steps, monkeypatch):
    config, options = ALGORITHM_CASES[case]
    assert_matches_diffusers("dpmpp_2s", config, steps, monkeypatch, options)


@pytest.mark.parametrize("name, config, options", [
    ("dpmpp_2s_karras", SD21, {"solver_order": 3}),
    ("dpmpp_2s", COSINE, {"lambda_min_clipped": -5.1}),
    ("dpmpp_2s_exponential", SD21, {"solver_order": 3, "final_sigmas_type": "sigma_min"}),
    ("dpmpp_2s_beta", SD15, {"solver_type": "heun"}),
    ("dpmpp_2s_karras", SD21, {**SDE, "solver_type": "heun"}),
    # The class has no timestep_spacing, steps_offset or rescale_betas_zero_snr: from_config
    # ignores them, and so does sdrt.
    ("dpmpp_2s", {**SD21, "timestep_spacing": "trailing", "rescale_betas_zero_snr": True}, {}),
])
@pytest.mark.parametrize("steps", [4, 15])
def test_dpmpp_2s_ramps_and_config_keys_match_diffusers(name, config, options, steps, monkeypatch):
    assert_matches_diffusers(name, config, steps, monkeypatch, options)


@pytest.mark.parametrize("options, message", [
    ({"algorithm_type": "dpmsolver"}, "needs final_sigmas_type='sigma_min'"),         # ValueError in diffusers
    ({**DPM, "thresholding": True}, "thresholding with algorithm_type='dpmsolver'"),  # fails in its step
    ({"algorithm_type": "sde-dpmsolver", "final_sigmas_type": "sigma_min"},          # NotImplementedError
     "algorithm_type='sde-dpmsolver' is not supported"),
])
def test_options_diffusers_fails_on_are_refused(options, message):
    with pytest.raises(InvalidInput, match=message):
        make_sampler("dpmpp_2s", SD15, 10, options=options)
    try:
        failure = diffusers_fails("dpmpp_2s", SD15, options)
    except (ValueError, NotImplementedError) as e:
        failure = e
    assert failure is not None


@pytest.mark.parametrize("config, options, steps", [
    # |x| grows to ~400 here: 1e-4 against this machine's torch, the last bit with correct rounding.
    (SD15, {**SDE, "solver_order": 3, "solver_type": "heun", "final_sigmas_type": "sigma_min"}, 40),
    (SD15, {**SDE, "solver_type": "heun"}, 999),
    (SD21, {**DPM, "solver_order": 3, "solver_type": "heun"}, 999),
])
def test_ill_conditioned_runs_match_diffusers_bit_for_bit_with_correctly_rounded_math(
        config, options, steps, monkeypatch):
    with_correctly_rounded_torch(monkeypatch)
    assert_matches_diffusers("dpmpp_2s", config, steps, monkeypatch, options, rtol=1e-6)


# --- part-way starts -------------------------------------------------------------------------

def diffusers_orders(config, options, steps, t_start):
    """The order each of diffusers' step() calls uses after set_begin_index(t_start)
    (read from its singlestep_dpm_solver_update)."""
    cls, over = diffusers_scheduler("dpmpp_2s", config, options)
    sched = getattr(diffusers, cls).from_config(config, **over)
    sched.set_timesteps(steps)
    sched.set_begin_index(t_start)
    used = []
    update = sched.singlestep_dpm_solver_update
    sched.singlestep_dpm_solver_update = lambda *a, order=None, **k: used.append(order) or update(*a, order=order, **k)
    x = torch.from_numpy(draws(steps)[0])
    for t in sched.timesteps[t_start:]:
        x = sched.step(0.5 * x, t, x).prev_sample
    return used


@pytest.mark.parametrize("options", [{"solver_order": 2}, {"solver_order": 3},
                                     {"solver_order": 3, "lower_order_final": False, "final_sigmas_type": "sigma_min"}])
@pytest.mark.parametrize("steps", [7, 12])
def test_part_way_start_inside_a_group_lowers_the_order_as_diffusers(options, steps):
    """diffusers keeps the whole schedule's order list and lowers an order while it has
    fewer model outputs: a start inside a group runs first order there and finishes that
    group at the orders its outputs allow."""
    for t_start in range(steps):
        s = singlestep.make({**SD15, **options}, steps, t_start)
        assert list(s.orders) == diffusers_orders(SD15, options, steps, t_start), t_start


@pytest.mark.parametrize("extra", [
    {"solver_order": 3},
    {"solver_order": 3, "solver_type": "heun", "lower_order_final": False, "final_sigmas_type": "sigma_min"},
    {"solver_order": 2, "prediction_type": "v_prediction"},
    {"use_karras_sigmas": True},
])
@pytest.mark.parametrize("steps, strength", [(6, 0.5), (12, 0.6), (12, 0.75), (20, 0.8)])
def test_dpmpp_2s_part_way_matches_diffusers(extra, steps, strength, monkeypatch):
    name = "dpmpp_2s_karras" if extra.get("use_karras_sigmas") else "dpmpp_2s"
    assert_part_way_matches_diffusers(name, {**SD15, **extra}, steps, strength, monkeypatch)


@pytest.mark.parametrize("options", [{**SDE, "solver_order": 3}, {**DPM, "solver_order": 3, "solver_type": "heun"}])
@pytest.mark.parametrize("steps, strength", [(10, 0.55), (12, 0.7)])
def test_dpmpp_2s_part_way_with_other_algorithms_matches_diffusers(options, steps, strength, monkeypatch):
    assert t_start_of(steps, strength) % 3 != 0          # the start lands inside a group
    assert_part_way_with_options_matches("dpmpp_2s", SD21, options, steps, strength, monkeypatch)


# --- step counts near 1000 ---------------------------------------------------------------------

NEAR_1000 = [
    # (name, config, options, steps): what diffusers does is in the comment.
    ("dpmpp_2s_karras", COSINE, {"solver_order": 3}, 4),       # finite (Karras timesteps rounded on cosine too)
    ("dpmpp_2s_karras", COSINE, {}, 15),                       # cosine's sigma_max: t0 repeats, IndexError
    ("dpmpp_2s", SD15, {}, 1000),                              # a repeat inside a [1, 2] group: finite
    ("dpmpp_2s", SD15, {"solver_order": 3}, 1000),             # midpoint third order skips D1_0: finite
    ("dpmpp_2s", SD15, {"solver_order": 3, "solver_type": "heun"}, 999),           # finite
    ("dpmpp_2s", SD15, {"solver_order": 3, "solver_type": "heun"}, 1000),          # r0 - r1 = 0: NaN
    ("dpmpp_2s", SD15, {**SDE, "solver_order": 3, "solver_type": "heun"}, 1000),   # NaN
    ("dpmpp_2s_karras", SD15, {"final_sigmas_type": "sigma_min", "solver_type": "heun"}, 1000),   # finite
    ("dpmpp_2s_beta", SD15, {}, 31),                           # finite
    ("dpmpp_2s_beta", SD15, {}, 32),                           # first timestep repeats: IndexError
]


@pytest.mark.parametrize("name, config, options, steps", params(NEAR_1000))
def test_refused_exactly_where_diffusers_fails_and_matches_elsewhere(name, config, options, steps, monkeypatch):
    x, noise = draws(steps)
    ref = diffusers_outcome(name, config, options, steps, x, noise, monkeypatch)
    over = diffusers_scheduler(name, config, options)[1]
    problem = singlestep.make(config, steps, 0, name=name, **over).schedule_problem()
    assert (problem is not None) == (ref is None), problem
    if ref is not None:
        rtol = 1e-4 if options.get("algorithm_type") == "sde-dpmsolver++" else 1e-5   # see test_sampler_dpmsolver
        assert rel_err(run_sdrt(name, config, steps, x, noise, options)[2], ref) <= rtol
