"""Euler and Euler ancestral against diffusers' EulerDiscreteScheduler and
EulerAncestralDiscreteScheduler (the oracle), option by option: zero terminal SNR,
the sigma ramps with their bounds, log-linear interpolation, EDM's continuous
timesteps, final_sigmas_type, part-way starts with those options, and which step
counts are refused (exactly those where diffusers' own run breaks)."""

from __future__ import annotations

import inspect

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import test_schedulers_strength as part_way  # noqa: E402
from test_schedulers import SD15, SD21, draws, model, run_diffusers, run_sdrt  # noqa: E402

from sdrt.engines.errors import InvalidInput  # noqa: E402
from sdrt.runtime.schedulers import diffusers_scheduler, make_sampler  # noqa: E402
from sdrt.runtime.schedulers.euler import (  # noqa: E402
    ANCESTRAL_DEFAULTS, EULER_DEFAULTS, make_euler, make_euler_ancestral,
)

RTOL = 1e-5
# Timesteps are compared to 1e-5 absolute besides 1e-6 relative: those interpolated from
# sigmas near t = 0 (sigma_to_t), and EDM's 0.25 * ln(sigma) near sigma = 1, turn the
# last ulp of a training sigma (see ZERO_SNR_RTOL) into a large relative difference of
# a value near 0, 1e-7 in absolute terms; a U-Net cannot tell.
TIMESTEP_ATOL = 1e-5
ZERO_SNR = {**SD21, "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}
# diffusers' float32 square roots come from torch, whose x86 CPU kernel (MKL) is not
# correctly rounded; sdrt's are IEEE. At zero terminal SNR the first step down from
# sigma_max = 4096 cancels ~11 bits, so there one ulp of a square root moves diffusers'
# own result by up to ~2 ulps of sigma_max * max|eps| (measured: 5.3e-4 for Euler at 2
# linspace steps, 1.5e-4 for Euler a at 3; under 4e-5 from 10 steps on).
ZERO_SNR_RTOL = 2e-3


def torch_sqrt_is_ieee() -> bool:
    """Whether this machine's torch float32 sqrt is correctly rounded (then diffusers'
    tables are sdrt's bit for bit)."""
    x = np.random.default_rng(0).uniform(0.5, 2.0, 1 << 16).astype(np.float32)
    x = np.append(x, np.float32(2 ** 24 - 1))          # the zero-SNR sigma_max^2
    return bool(np.array_equal(torch.from_numpy(x).sqrt().numpy(), np.sqrt(x)))


def oracle(name, config, options=None, steps=None):
    cls, over = diffusers_scheduler(name, config, options)
    sched = getattr(diffusers, cls).from_config(config, **over)
    if steps is not None:
        sched.set_timesteps(steps)
    return sched


def diffusers_breaks(name, config, steps, options=None) -> bool:
    """Whether diffusers' own text-to-image loop crashes or ends non-finite."""
    sched = oracle(name, config, options)
    try:
        sched.set_timesteps(steps)
        xt = torch.from_numpy(draws(1)[0]) * sched.init_noise_sigma
        for t in sched.timesteps:
            out = torch.from_numpy(model(sched.scale_model_input(xt, t).numpy(), float(t)))
            xt = sched.step(out, t, xt).prev_sample
    except (IndexError, ValueError, RuntimeError, ZeroDivisionError):
        return True
    return not bool(torch.isfinite(xt).all())


def rel_err(a, ref) -> float:
    return float(np.abs(a - ref).max() / np.abs(ref).max())


def assert_matches_diffusers(name, config, steps, monkeypatch, options=None, rtol=RTOL):
    """test_schedulers.assert_matches_diffusers, timesteps within TIMESTEP_ATOL."""
    x, noise = draws(steps)
    ref_t, ref_sigma, ref_x, ref_draws = run_diffusers(name, config, steps, x, noise, monkeypatch, options)
    t, sigma, out, n_draws = run_sdrt(name, config, steps, x, noise, options)
    assert np.isfinite(ref_x).all(), "the oracle itself diverged: not a useful case"
    assert n_draws == ref_draws, "the sampler draws noise on other calls than diffusers"
    np.testing.assert_allclose(t, ref_t, rtol=1e-6, atol=TIMESTEP_ATOL)
    assert sigma == pytest.approx(ref_sigma, rel=1e-6)
    assert rel_err(out, ref_x) <= rtol, f"max relative error {rel_err(out, ref_x):.2e} after {len(t)} calls"


def assert_part_way_matches_diffusers(name, config, steps, strength, monkeypatch):
    """test_schedulers_strength.assert_part_way_matches_diffusers, timesteps within TIMESTEP_ATOL."""
    image, noise = draws(steps, seed=1)
    x_noise = noise.pop()
    ref_t, ref_sigma, ref_x, ref_noised = part_way.run_diffusers(name, config, steps, strength, image, x_noise,
                                                                 noise, monkeypatch)
    s, out, noised = part_way.run_sdrt(name, config, steps, strength, image, x_noise, noise)
    assert np.isfinite(ref_x).all(), "the oracle itself diverged: not a useful case"
    np.testing.assert_allclose(s.timesteps, ref_t, rtol=1e-6, atol=TIMESTEP_ATOL)
    assert s.begin_index == part_way.t_start_of(steps, strength) * s.order
    assert s.init_noise_sigma == pytest.approx(ref_sigma, rel=1e-6)
    assert len(noised) == len(ref_noised)
    for i, (a, ref) in enumerate(zip(noised, ref_noised)):
        assert rel_err(a, ref) <= part_way.NOISE_RTOL, f"add_noise at call {i}: {rel_err(a, ref):.2e}"
    assert rel_err(out, ref_x) <= RTOL, f"max relative error {rel_err(out, ref_x):.2e} after {len(s.timesteps)} calls"


def schedule_refused(name, config, steps, options=None) -> bool:
    """Whether sdrt refuses this schedule: its config, or the sampler's schedule_problem
    (asked of the record directly: make_sampler would also search for the nearest step
    counts that work, which takes long with beta ramps)."""
    _, over = diffusers_scheduler(name, config, options)
    make = make_euler_ancestral if name == "euler_a" else make_euler
    try:
        return make(config, steps, name=name, **over).schedule_problem() is not None
    except InvalidInput:
        return True


@pytest.mark.parametrize("defaults, cls", [
    (EULER_DEFAULTS, "EulerDiscreteScheduler"), (ANCESTRAL_DEFAULTS, "EulerAncestralDiscreteScheduler")])
def test_options_are_the_diffusers_constructor_keywords_and_defaults(defaults, cls):
    params = inspect.signature(getattr(diffusers, cls).__init__).parameters
    assert defaults == {k: p.default for k, p in params.items() if k != "self"}


# --- zero terminal SNR ----------------------------------------------------------------------

ZERO_SNR_CASES = [
    pytest.param(n, sp, off, k, id=f"{n}-{sp}{off if off is not None else ''}-{k}")
    for n in ("euler", "euler_a")
    for sp, off in (("trailing", None), ("linspace", None), ("leading", None), ("leading", 0))
    for k in (1, 2, 3, 10, 25)
]


def _zero_snr(spacing, offset):
    return {**ZERO_SNR, "timestep_spacing": spacing, **({} if offset is None else {"steps_offset": offset})}


def with_ieee_sqrt(monkeypatch) -> None:
    """Make torch's float32 square roots correctly rounded (through float64, exact for
    float32), as they are on machines whose torch does not take them from MKL."""
    sqrt, power = torch.Tensor.sqrt, torch.Tensor.__pow__

    def ieee_sqrt(t):
        return sqrt(t.double()).float() if t.dtype == torch.float32 else sqrt(t)

    monkeypatch.setattr(torch.Tensor, "sqrt", ieee_sqrt)
    monkeypatch.setattr(torch.Tensor, "__pow__", lambda t, e: ieee_sqrt(t) if e == 0.5 else power(t, e))


@pytest.mark.parametrize("name, spacing, offset, steps", ZERO_SNR_CASES + [
    pytest.param("euler", "trailing", None, 1000, id="euler-trailing-1000"),
    pytest.param("euler_a", "linspace", None, 1000, id="euler_a-linspace-1000")])
def test_zero_snr_v_prediction_matches_diffusers_with_an_ieee_sqrt(name, spacing, offset, steps, monkeypatch):
    """sdrt's float32 arithmetic is diffusers' operation for operation (the rescaled betas,
    the 2^-24 cap, the sigma table, np.interp, sigma_up / sigma_down, the v-prediction
    x0 at sigma ~ 4096): with torch's square roots correctly rounded the trajectories are
    the same to the last bit or two, also where one ulp is visible."""
    with_ieee_sqrt(monkeypatch)
    assert_matches_diffusers(name, _zero_snr(spacing, offset), steps, monkeypatch, rtol=1e-6)


@pytest.mark.parametrize("name, spacing, offset, steps", ZERO_SNR_CASES)
def test_zero_snr_v_prediction_matches_diffusers(name, spacing, offset, steps, monkeypatch):
    """1e-5, but for a schedule that starts at sigma_max = 4096 on a machine whose torch
    float32 sqrt is not IEEE: there diffusers' own result moves with that sqrt's last ulp."""
    config = _zero_snr(spacing, offset)
    from_the_top = make_sampler(name, config, steps).sigmas[0] > 4000
    rtol = ZERO_SNR_RTOL if from_the_top and not torch_sqrt_is_ieee() else RTOL
    assert_matches_diffusers(name, config, steps, monkeypatch, rtol=rtol)


@pytest.mark.parametrize("name", ["euler", "euler_a", "euler_karras"])
@pytest.mark.parametrize("strength", [0.3, 0.75])
def test_zero_snr_part_way_matches_diffusers(name, strength, monkeypatch):
    # Below sigma_max the first step cancels nothing: 1e-5 whatever the sqrt.
    assert_part_way_matches_diffusers(name, ZERO_SNR, 10, strength, monkeypatch)


# --- sigma ramps, interpolation, timestep type, final sigma ---------------------------------

OPTION_CASES = [
    ("euler_exponential", SD15, {"final_sigmas_type": "sigma_min"}),
    ("euler_exponential", SD21, {"sigma_min": 0.05, "sigma_max": 10.0}),
    ("euler_beta", SD15, {"sigma_min": 0.1}),
    ("euler_beta", SD21, {"final_sigmas_type": "sigma_min", "timestep_spacing": "trailing"}),
    ("euler_karras", SD15, {"sigma_max": 12.0, "final_sigmas_type": "sigma_min"}),
    ("euler", SD15, {"interpolation_type": "log_linear"}),
    ("euler", SD21, {"interpolation_type": "log_linear", "final_sigmas_type": "sigma_min"}),
    ("euler_karras", SD15, {"interpolation_type": "log_linear"}),
    ("euler_beta", SD21, {"interpolation_type": "log_linear", "timestep_spacing": "leading"}),
    ("euler", SD21, {"timestep_type": "continuous"}),
    ("euler", SD21, {"timestep_type": "continuous", "timestep_spacing": "leading"}),
    ("euler_karras", SD21, {"timestep_type": "continuous", "final_sigmas_type": "sigma_min"}),
    ("euler", SD21, {"timestep_type": "continuous", "interpolation_type": "log_linear"}),
    ("euler", SD15, {"timestep_type": "continuous"}),          # epsilon: diffusers keeps discrete
    ("euler_exponential", SD21, {"prediction_type": "sample", "beta_schedule": "squaredcos_cap_v2"}),
]


@pytest.mark.parametrize("name, config, options", OPTION_CASES)
@pytest.mark.parametrize("steps", [1, 4, 25])
def test_euler_options_match_diffusers(name, config, options, steps, monkeypatch):
    assert_matches_diffusers(name, config, steps, monkeypatch, options=options)


@pytest.mark.parametrize("name, config, options", [c for c in OPTION_CASES if c[1] is SD21][:6])
@pytest.mark.parametrize("strength", [0.4, 0.8])
def test_euler_options_part_way_match_diffusers(name, config, options, strength, monkeypatch):
    assert_part_way_matches_diffusers(name, {**config, **options}, 12, strength, monkeypatch)


def test_log_linear_ends_at_the_training_sigma_min_as_diffusers_does():
    """diffusers builds steps + 1 log-linear levels for `steps` timesteps, so its last
    step stops at the smallest training sigma rather than 0; sdrt keeps that."""
    s = make_sampler("euler", SD15, 10, options={"interpolation_type": "log_linear"})
    ref = oracle("euler", SD15, {"interpolation_type": "log_linear"}, steps=10)
    assert len(s.timesteps) == len(ref.timesteps) == 10
    np.testing.assert_allclose(s.sigmas, ref.sigmas.numpy(), rtol=1e-6)
    assert s.sigmas[10] == pytest.approx(float(ref.sigmas[10]), rel=1e-6) and s.sigmas[10] > 0


def test_continuous_timesteps_are_a_quarter_log_sigma():
    s = make_sampler("euler_karras", SD21, 8, options={"timestep_type": "continuous"})
    ref = oracle("euler_karras", SD21, {"timestep_type": "continuous"}, steps=8)
    np.testing.assert_allclose(s.timesteps, ref.timesteps.numpy(), rtol=1e-6, atol=TIMESTEP_ATOL)
    np.testing.assert_allclose(s.timesteps, 0.25 * np.log(s.sigmas[:-1]), rtol=1e-6)


@pytest.mark.parametrize("config", [
    {**SD15, "beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02},
    {**SD15, "beta_schedule": "squaredcos_cap_v2", "timestep_spacing": "leading"},
    {**SD15, "trained_betas": np.linspace(1e-4, 0.02, 1000).tolist()},
    {**SD21, "timestep_spacing": "leading", "steps_offset": 7},
    {**SD21, "num_train_timesteps": 500, "timestep_spacing": "trailing"},
])
@pytest.mark.parametrize("steps", [3, 20])
def test_euler_ancestral_config_options_match_diffusers(config, steps, monkeypatch):
    assert_matches_diffusers("euler_a", config, steps, monkeypatch)


def test_euler_ancestral_refuses_sample_prediction_as_diffusers_does():
    sched = oracle("euler_a", {**SD15, "prediction_type": "sample"}, steps=2)
    x = torch.zeros(1, 4, 2, 2)
    with pytest.raises(NotImplementedError):
        sched.step(x, sched.timesteps[0], x)
    with pytest.raises(InvalidInput, match="prediction_type 'sample' is not supported"):
        make_sampler("euler_a", {**SD15, "prediction_type": "sample"}, 2)


# --- ramp bounds ----------------------------------------------------------------------------

@pytest.mark.parametrize("options, words", [
    ({"sigma_min": 0.0}, "sigma_min must be a positive number, got 0.0"),
    ({"sigma_max": float("nan")}, "sigma_max must be a positive number, got nan"),
    ({"sigma_min": "0.1"}, "sigma_min must be a positive number"),
    ({"sigma_min": -1.0}, "sigma_min must be a positive number, got -1.0"),
])
def test_bad_ramp_bounds_are_refused_with_the_value(options, words):
    with pytest.raises(InvalidInput, match=words):
        make_sampler("euler_karras", SD15, 10, options=options)


def test_sigma_min_above_sigma_max_runs_as_diffusers_runs_it(monkeypatch):
    """An ascending ramp inside the training range is odd but well defined in diffusers."""
    assert_matches_diffusers("euler_exponential", SD21, 6, monkeypatch, options={"sigma_min": 1.0, "sigma_max": 0.5})


def test_zero_sigma_min_is_where_diffusers_divides_by_zero():
    assert diffusers_breaks("euler_karras", SD15, 10, {"sigma_min": 0.0})


def test_ramp_bounds_are_ignored_without_a_ramp_as_diffusers_ignores_them(monkeypatch):
    assert_matches_diffusers("euler", SD15, 6, monkeypatch, options={"sigma_min": -1.0, "sigma_max": 0.0})


# --- which step counts are refused ----------------------------------------------------------

@pytest.mark.parametrize("name, config, options, steps", [
    # leading + steps_offset=1 runs t = 1000 at sigma(999), then t = 999 at sigma(999) again:
    # a step of dt = 0, which diffusers takes without harm.
    ("euler", SD15, None, 1000),
    ("euler_a", SD21, {"timestep_spacing": "leading"}, 1000),
    ("euler", SD21, {"timestep_spacing": "linspace"}, 1000),
    ("euler_a", SD15, {"timestep_spacing": "trailing"}, 999),
    ("euler_karras", SD15, {"timestep_spacing": "leading"}, 1000),
    ("euler_exponential", SD21, None, 999),
    # Every timestep past 999 is sigma(999): several steps of dt = 0.
    ("euler", SD15, {"timestep_spacing": "leading", "steps_offset": 500}, 6),
    ("euler_a", SD15, {"timestep_spacing": "leading", "steps_offset": 500}, 6),
])
def test_near_1000_steps_and_repeated_levels_run_as_diffusers_runs_them(name, config, options, steps, monkeypatch):
    assert not schedule_refused(name, config, steps, options)
    assert_matches_diffusers(name, config, steps, monkeypatch, options=options)


@pytest.mark.parametrize("name, config, options, counts", [
    # EDM's timesteps make sigma(999) twice the same timestep: diffusers' lookup of the
    # first timestep then starts one sigma late and indexes past the table.
    ("euler", {**SD21, "timestep_spacing": "leading"}, {"timestep_type": "continuous"}, range(998, 1001)),
    # A sigma_max above the training range sends the first levels all to t = 999.
    ("euler_beta", SD15, {"sigma_max": 20.0}, range(1, 13)),
    ("euler_karras", SD15, {"sigma_max": 40.0}, range(1, 13)),
    # ...and one below it (under sigma_min) all to t = 0.
    ("euler_karras", SD15, {"sigma_max": 0.01}, range(1, 6)),
])
def test_refused_exactly_where_diffusers_breaks(name, config, options, counts):
    seen = {steps: (schedule_refused(name, config, steps, options), diffusers_breaks(name, config, steps, options))
            for steps in counts}
    assert all(a == b for a, b in seen.values()), seen
    assert any(a for a, _ in seen.values()), "no refusal in this range: not a useful case"


def test_refusal_names_the_repeated_timestep_and_a_count_that_works():
    with pytest.raises(InvalidInput, match=r"first timestep -?[\d.]+ repeats at call 1.*use at most 999 steps"):
        make_sampler("euler", {**SD21, "timestep_spacing": "leading"}, 1000,
                     options={"timestep_type": "continuous"})
