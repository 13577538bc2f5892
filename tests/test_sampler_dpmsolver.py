"""The DPM-Solver multistep family (dpmpp_2m, dpmpp_2m_sde, and the noise-prediction
DPM-Solver through algorithm_type) against diffusers' DPMSolverMultistepScheduler, the
oracle: option combinations, part-way starts, what diffusers itself rejects, and step
counts near 1000, where sdrt refuses exactly the schedules diffusers turns into NaN or
crashes on and matches it everywhere else."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from test_schedulers import SD15, SD21, assert_matches_diffusers, draws, run_diffusers, run_sdrt  # noqa: E402
from test_schedulers_strength import assert_part_way_matches_diffusers, rel_err, t_start_of  # noqa: E402

from sdrt.engines.errors import InvalidInput  # noqa: E402
from sdrt.runtime.schedulers import diffusers_scheduler, dpmsolver, make_sampler  # noqa: E402

ZSNR = {**SD21, "timestep_spacing": "trailing", "rescale_betas_zero_snr": True}
COSINE = {**SD15, "beta_schedule": "squaredcos_cap_v2"}
LEADING = {**SD15, "timestep_spacing": "leading"}
TRAILING = {**SD15, "timestep_spacing": "trailing"}
DPM = {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"}       # noise prediction
SDE_DPM = {"algorithm_type": "sde-dpmsolver", "final_sigmas_type": "sigma_min"}


CONFIG_NAMES = {"sd15": SD15, "sd21": SD21, "zsnr": ZSNR, "cosine": COSINE, "leading": LEADING,
                "trailing": TRAILING}


def params(rows):
    """(name, config, options, steps) rows as pytest params with readable ids."""
    def label(config, options):
        cfg = next(k for k, v in CONFIG_NAMES.items() if v is config)
        return "-".join([cfg] + [f"{k}={v}" for k, v in options.items()])
    return [pytest.param(*row, id=f"{row[0]}-{label(row[1], row[2])}-{row[3]}") for row in rows]


def with_correctly_rounded_torch(monkeypatch) -> None:
    """Make torch's float32 sqrt, exp and log correctly rounded (through float64), as
    sdrt computes them. This machine's torch takes them from MKL / SLEEF (<= 1 ulp off in
    1-17% of arguments), which ill-conditioned runs (1000 steps, zero SNR, the
    noise-prediction solver from sigma_max = 4096) amplify to 1e-5..1e-3; with them
    correctly rounded, diffusers' float32 result is sdrt's to the last bit."""
    def rounded(fn):
        return lambda t, *a: fn(t.double(), *a).float() if t.dtype == torch.float32 else fn(t, *a)
    sqrt, power = rounded(torch.Tensor.sqrt), torch.Tensor.__pow__
    monkeypatch.setattr(torch.Tensor, "sqrt", sqrt)
    monkeypatch.setattr(torch.Tensor, "__pow__", lambda t, e: sqrt(t) if e == 0.5 else power(t, e))
    for fn in ("sqrt", "exp", "log"):
        monkeypatch.setattr(torch, fn, rounded(getattr(torch, fn)))


# --- SDE-DPM-Solver++ (dpmpp_2m_sde) ------------------------------------------------------

SDE_CASES = {
    "midpoint": (SD15, {}),
    "heun": (SD15, {"solver_type": "heun"}),                      # AUTOMATIC1111's "DPM++ 2M SDE Heun"
    "order1": (SD21, {"solver_order": 1}),
    "order3": (SD15, {"solver_order": 3}),
    "order3_no_lower_final_sigma_min": (SD21, {"solver_order": 3, "lower_order_final": False,
                                               "final_sigmas_type": "sigma_min"}),
    "heun_euler_at_final_v": (SD21, {"solver_type": "heun", "euler_at_final": True}),
    "zero_snr_trailing_v": (ZSNR, {}),
    "leading_heun": (LEADING, {"solver_type": "heun"}),
    "cosine_lambda_clipped": (COSINE, {"lambda_min_clipped": -5.1}),
    "thresholding_sample": (SD15, {"thresholding": True, "prediction_type": "sample", "sample_max_value": 1.5}),
    "lu_lambdas": (SD15, {"use_lu_lambdas": True}),
}


@pytest.mark.parametrize("steps", [3, 9, 25])
@pytest.mark.parametrize("case", SDE_CASES)
def test_dpmpp_2m_sde_matches_diffusers(case, steps, monkeypatch):
    """Same trajectory and one fresh noise draw per call, as diffusers' step draws."""
    config, options = SDE_CASES[case]
    assert_matches_diffusers("dpmpp_2m_sde", config, steps, monkeypatch, options)


@pytest.mark.parametrize("name", ["dpmpp_2m_sde_karras", "dpmpp_2m_sde_exponential", "dpmpp_2m_sde_beta"])
def test_dpmpp_2m_sde_heun_on_sigma_ramps_matches_diffusers(name, monkeypatch):
    assert_matches_diffusers(name, SD21, 12, monkeypatch, {"solver_type": "heun"})


def test_dpmpp_2m_sde_draws_noise_at_every_call():
    s = make_sampler("dpmpp_2m_sde", SD15, 5)
    assert s.stochastic and all(s.draws_noise(i) for i in range(len(s.timesteps)))
    assert not make_sampler("dpmpp_2m", SD15, 5).stochastic


# --- the noise-prediction DPM-Solver (algorithm_type "dpmsolver" / "sde-dpmsolver") ----------

DPM_CASES = {
    "dpmsolver": (SD15, DPM),
    "dpmsolver_heun": (SD15, {**DPM, "solver_type": "heun"}),
    "dpmsolver_order3": (SD15, {**DPM, "solver_order": 3}),
    "dpmsolver_order1_v": (SD21, {**DPM, "solver_order": 1}),
    "dpmsolver_v_karras": (SD21, {**DPM, "use_karras_sigmas": True}),
    "dpmsolver_thresholding_sample": (SD15, {**DPM, "thresholding": True, "prediction_type": "sample"}),
    "sde_dpmsolver": (SD15, SDE_DPM),
    "sde_dpmsolver_heun_v": (SD21, {**SDE_DPM, "solver_type": "heun"}),
    "sde_dpmsolver_order1_trailing": (TRAILING, {**SDE_DPM, "solver_order": 1}),
}


@pytest.mark.parametrize("steps", [3, 9, 25])
@pytest.mark.parametrize("case", DPM_CASES)
def test_noise_prediction_dpm_solver_matches_diffusers(case, steps, monkeypatch):
    config, options = DPM_CASES[case]
    assert_matches_diffusers("dpmpp_2m", config, steps, monkeypatch, options)


# --- other options ---------------------------------------------------------------------------

@pytest.mark.parametrize("name, config, options", [
    ("dpmpp_2m", SD15, {"use_lu_lambdas": True}),
    ("dpmpp_2m", SD21, {"use_lu_lambdas": True, "solver_order": 3}),
    ("dpmpp_2m", COSINE, {"use_lu_lambdas": True}),                 # cosine: Lu timesteps not rounded
    ("dpmpp_2m_exponential", SD15, {"final_sigmas_type": "sigma_min"}),
    ("dpmpp_2m_beta", SD21, {"final_sigmas_type": "sigma_min"}),
    ("dpmpp_2m_karras", SD15, {"solver_type": "heun", "final_sigmas_type": "sigma_min"}),
    ("dpmpp_2m", ZSNR, {"solver_type": "heun"}),
    ("dpmpp_2m", SD21, {"variance_type": "learned_range"}),          # ignored for v-prediction, as diffusers
    ("dpmpp_2m", SD15, {"algorithm_type": "deis", "solver_type": "bh2",      # diffusers' aliases
                        "final_sigmas_type": "sigma_min"}),
])
@pytest.mark.parametrize("steps", [5, 14])
def test_dpmpp_2m_options_match_diffusers(name, config, options, steps, monkeypatch):
    assert_matches_diffusers(name, config, steps, monkeypatch, options)


def diffusers_fails(name, config, options, steps=10) -> BaseException | None:
    """What diffusers raises building or running this scheduler (None: it runs)."""
    cls, over = diffusers_scheduler(name, config, options)
    sched = getattr(diffusers, cls).from_config(config, **over)
    x, _ = draws(steps)
    xt = torch.from_numpy(x)
    try:
        sched.set_timesteps(steps)
        for t in sched.timesteps:
            xt = sched.step(torch.from_numpy(0.5 * xt.numpy()), t, xt).prev_sample
    except Exception as e:            # noqa: BLE001 - whatever diffusers raises
        return e
    return None


@pytest.mark.parametrize("options, message", [
    # Refused by diffusers' constructor too (ValueError).
    ({"algorithm_type": "dpmsolver"}, "needs final_sigmas_type='sigma_min'"),
    ({"algorithm_type": "sde-dpmsolver"}, "needs final_sigmas_type='sigma_min'"),
    ({"algorithm_type": "deis"}, "needs final_sigmas_type='sigma_min'"),   # checked before the alias
    # diffusers has no third-order sde-dpmsolver update (UnboundLocalError in step).
    ({**SDE_DPM, "solver_order": 3}, "no third-order update"),
    # diffusers keeps 3 "mean" channels of SD's 4-channel output (shape error in step).
    ({"variance_type": "learned"}, "variance_type='learned' is not supported"),
])
def test_options_diffusers_fails_on_are_refused_up_front(options, message):
    with pytest.raises(InvalidInput, match=message):
        make_sampler("dpmpp_2m", SD15, 10, options=options)
    try:
        failure = diffusers_fails("dpmpp_2m", SD15, options)
    except ValueError as e:           # raised by from_config
        failure = e
    assert failure is not None


@pytest.mark.parametrize("options, key", [
    ({"use_flow_sigmas": True}, "use_flow_sigmas"),               # flow-matching models, not SD
    ({"use_dynamic_shifting": True}, "use_dynamic_shifting"),
])
def test_flow_matching_options_are_refused(options, key):
    with pytest.raises(InvalidInput, match=f"{key}=True is not supported"):
        make_sampler("dpmpp_2m_sde", SD15, 10, options=options)


# --- part-way starts -------------------------------------------------------------------------

@pytest.mark.parametrize("extra", [
    {},
    {"solver_order": 3, "solver_type": "heun"},
    {"solver_order": 3, "lower_order_final": False, "final_sigmas_type": "sigma_min"},
    {"timestep_spacing": "trailing", "euler_at_final": True},
    {"use_karras_sigmas": True, "prediction_type": "v_prediction"},
])
@pytest.mark.parametrize("strength", [0.5, 0.8])
@pytest.mark.parametrize("steps", [6, 20])
def test_dpmpp_2m_sde_part_way_matches_diffusers(extra, strength, steps, monkeypatch):
    name = "dpmpp_2m_sde_karras" if extra.get("use_karras_sigmas") else "dpmpp_2m_sde"
    assert_part_way_matches_diffusers(name, {**SD15, **extra}, steps, strength, monkeypatch)


def assert_part_way_with_options_matches(name, config, options, steps, strength, monkeypatch):
    """img2img as diffusers' pipeline runs it (timesteps sliced at t_start, set_begin_index,
    add_noise at the first timestep), with scheduler options on top of the config."""
    cls, over = diffusers_scheduler(name, config, options)
    sched = getattr(diffusers, cls).from_config(config, **over)
    sched.set_timesteps(steps)
    t_start = t_start_of(steps, strength)
    sched.set_begin_index(t_start)
    image, noise = draws(steps, seed=3)
    x_noise = noise.pop()
    module = __import__(type(sched).__module__, fromlist=["randn_tensor"])
    taken = iter(noise)
    monkeypatch.setattr(module, "randn_tensor", lambda *a, **k: torch.from_numpy(next(taken)))
    timesteps = sched.timesteps[t_start:]
    ref = sched.add_noise(torch.from_numpy(image), torch.from_numpy(x_noise), timesteps[:1])
    for t in timesteps:
        ref = sched.step(torch.from_numpy(0.5 * ref.numpy() + 0.1 * np.sin(ref.numpy())), t, ref).prev_sample

    s = make_sampler(name, config, steps, strength=strength, options=options)
    np.testing.assert_array_equal(s.timesteps, timesteps.numpy().astype(np.float32))
    x, state, taken = s.add_noise(image, x_noise, 0), s.init_state(), iter(noise)
    for i in range(len(s.timesteps)):
        out = (0.5 * x + 0.1 * np.sin(x)).astype(np.float32)
        x, state = s.step(state, i, x, out, next(taken) if s.draws_noise(i) else None)
    assert rel_err(x, ref.numpy()) <= 1e-5


@pytest.mark.parametrize("options", [DPM, {**DPM, "solver_order": 3}, {**SDE_DPM, "solver_type": "heun"}])
@pytest.mark.parametrize("steps, strength", [(10, 0.55), (20, 0.8)])
def test_noise_prediction_dpm_solver_part_way_matches_diffusers(options, steps, strength, monkeypatch):
    assert_part_way_with_options_matches("dpmpp_2m", SD21, options, steps, strength, monkeypatch)


# --- step counts near 1000 ---------------------------------------------------------------------

def diffusers_outcome(name, config, options, steps, x, noise, monkeypatch):
    """diffusers' text-to-image result, or None when it raises or is not finite."""
    try:
        out = run_diffusers(name, config, steps, x, noise, monkeypatch, options)[2]
    except (IndexError, RuntimeError):
        return None
    return out if np.isfinite(out).all() else None


NEAR_1000 = [
    # (name, config, options, steps): what diffusers does is in the comment.
    ("dpmpp_2m", SD15, {}, 999),                 # finite
    ("dpmpp_2m", SD15, {}, 1000),                # linspace repeats timesteps: NaN
    ("dpmpp_2m", SD21, {"solver_type": "heun"}, 1000),          # NaN
    ("dpmpp_2m", LEADING, {}, 998),              # finite
    ("dpmpp_2m", LEADING, {}, 999),              # ratio 1 + steps_offset: t = 1000, a repeated level: NaN
    ("dpmpp_2m", LEADING, {"solver_order": 1}, 999),            # first order steps over it: finite
    ("dpmpp_2m", LEADING, {}, 1000),             # ratio 0: every timestep repeats: IndexError
    ("dpmpp_2m", TRAILING, {}, 998),             # ends at t = -1 (a repeated level): finite
    ("dpmpp_2m", TRAILING, {"final_sigmas_type": "sigma_min"}, 998),   # order 2 after it: NaN
    ("dpmpp_2m", TRAILING, {"final_sigmas_type": "sigma_min"}, 999),   # finite
    ("dpmpp_2m", ZSNR, {}, 1000),                # finite
    ("dpmpp_2m_karras", SD15, {}, 1000),         # finite (repeated timesteps, distinct sigmas)
    ("dpmpp_2m_karras", SD15, {"final_sigmas_type": "sigma_min", "solver_type": "heun"}, 14),  # finite
    ("dpmpp_2m_karras", SD15, {"final_sigmas_type": "sigma_min", "solver_type": "heun"}, 15),  # NaN
    ("dpmpp_2m_karras", ZSNR, {}, 30),           # first timestep repeats: IndexError
    ("dpmpp_2m_exponential", COSINE, {}, 5),     # finite
    ("dpmpp_2m_exponential", COSINE, {}, 14),    # cosine's sigma_max is far out: t0 repeats, IndexError
    ("dpmpp_2m_beta", SD15, {}, 31),             # finite
    ("dpmpp_2m_beta", SD15, {}, 32),             # first timestep repeats: IndexError
    ("dpmpp_2m_sde", SD15, {}, 1000),            # NaN
    ("dpmpp_2m_sde", TRAILING, {"solver_type": "heun"}, 998),          # NaN
    ("dpmpp_2m_sde", TRAILING, {"solver_type": "heun"}, 1000),         # finite
]


@pytest.mark.parametrize("name, config, options, steps", params(NEAR_1000))
def test_refused_exactly_where_diffusers_fails_and_matches_elsewhere(name, config, options, steps, monkeypatch):
    x, noise = draws(steps)
    ref = diffusers_outcome(name, config, options, steps, x, noise, monkeypatch)
    cls, over = diffusers_scheduler(name, config, options)
    # The sampler make_sampler checks (calling make_sampler on a refused count also
    # searches every other count for the hint, which takes long on these).
    problem = dpmsolver.make(config, steps, 0, name=name, **over).schedule_problem()
    assert (problem is not None) == (ref is None), problem
    if ref is not None:
        out = run_sdrt(name, config, steps, x, noise, options)[2]
        # At ~1000 steps h is ~0.006 in lambda: 1 - e^{-2h} and e^{-h} - 1 lose ~8 bits, so
        # 1-ulp differences of torch's float32 exp/log/sqrt (not correctly rounded here)
        # show as ~2e-5 after the SDE's 1000 noise injections; with them correctly rounded
        # the runs agree to the last bit (the test below).
        rtol = 1e-4 if over.get("algorithm_type", "").startswith("sde") and steps > 100 else 1e-5
        assert rel_err(out, ref) <= rtol


@pytest.mark.parametrize("name, config, options, steps", params([
    ("dpmpp_2m_sde", ZSNR, {}, 996),
    ("dpmpp_2m_sde", TRAILING, {"solver_type": "heun"}, 1000),
    ("dpmpp_2m_sde", SD21, {"solver_order": 3}, 996),
    ("dpmpp_2m", ZSNR, SDE_DPM, 500),
    ("dpmpp_2m", ZSNR, DPM, 1),                  # 4096 x - ... at the first step: 1e-3 with torch's sqrt
    ("dpmpp_2m", ZSNR, {**DPM, "solver_order": 3}, 25),
    ("dpmpp_2m_exponential", SD15, {}, 1000),
]))
def test_long_and_zero_snr_runs_match_diffusers_bit_for_bit_with_correctly_rounded_math(
        name, config, options, steps, monkeypatch):
    with_correctly_rounded_torch(monkeypatch)
    assert_matches_diffusers(name, config, steps, monkeypatch, options, rtol=1e-6)


@pytest.mark.parametrize("config, steps, hint", [
    (SD15, 1000, "at most 999 steps"),
    (LEADING, 999, "at most 998 steps"),
])
def test_degenerate_step_count_is_refused_with_the_nearest_that_works(config, steps, hint):
    with pytest.raises(InvalidInput, match=f"noise level repeats.*NaN; use {hint}"):
        make_sampler("dpmpp_2m", config, steps)
