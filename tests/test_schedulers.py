"""The NumPy samplers against diffusers' schedulers (the oracle): same model function,
same initial latents, same per-step noise -> the same whole trajectory, the same
U-Net timesteps and the same initial noise scale."""

from __future__ import annotations

import contextlib
import inspect
import itertools
from types import SimpleNamespace

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from sdrt.engines.errors import InvalidInput, InvalidType  # noqa: E402
from sdrt.runtime.schedulers import SAMPLERS, SCHEDULERS, diffusers_scheduler, make_sampler, names  # noqa: E402

# The scheduler configs shipped with the two checkpoint families sdrt targets.
SD15 = {  # runwayml/stable-diffusion-v1-5 scheduler/scheduler_config.json
    "_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "beta_start": 0.00085, "num_train_timesteps": 1000, "set_alpha_to_one": False,
    "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None, "clip_sample": False,
}
SD21 = {  # stabilityai/stable-diffusion-2-1 scheduler/scheduler_config.json
    "_class_name": "DDIMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "beta_start": 0.00085, "clip_sample": False, "num_train_timesteps": 1000,
    "prediction_type": "v_prediction", "set_alpha_to_one": False, "skip_prk_steps": True,
    "steps_offset": 1, "trained_betas": None,
}
CONFIGS = {"sd15_epsilon": SD15, "sd21_v": SD21}

SPACINGS = (None, "leading", "linspace", "trailing")   # None: whatever the config / class says
STEPS = (1, 2, 7, 25, 50)
SHAPE = (2, 4, 8, 8)
RTOL = 1e-5


def model(x: np.ndarray, t: float) -> np.ndarray:
    """A smooth stand-in for the U-Net that depends on both x and t, so a wrong
    scaling, timestep or history term shows in the trajectory."""
    return (0.5 * x * np.cos(t / 300.0) + 0.1 * np.sin(x) + 0.05 * np.sin(t / 100.0)).astype(np.float32)


def draws(steps: int, seed: int = 0) -> tuple[np.ndarray, list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(SHAPE, dtype=np.float32)
    return x, [rng.standard_normal(SHAPE, dtype=np.float32) for _ in range(2 * steps + 2)]


def oracle(name: str, config: dict, options: dict | None = None):
    """The diffusers scheduler sampler `name` follows, built as sdrt says to build it."""
    cls_name, overrides = diffusers_scheduler(name, config, options)
    return getattr(diffusers, cls_name).from_config(config, **overrides)


# How far stock diffusers may sit from sdrt when the whole gap is torch's float32 maths:
# on x86 torch takes float32 sqrt/exp/log from MKL (<= 1 ulp off in 1-19 % of arguments,
# not correctly rounded; NumPy's are), and a few ill-conditioned steps (sigma_down =
# sqrt(s_to^2 - s_up^2) into sigma 0, the first step from a zero-SNR sigma of 4096) amplify
# one ulp to 1e-4 and more. Such a case must match diffusers run with correctly rounded
# maths to the full bound (`correctly_rounded_torch`), and stock diffusers to this one.
TORCH_ROUNDING_RTOL = 2e-3


@contextlib.contextmanager
def correctly_rounded_torch():
    """torch's float32 sqrt, `** 0.5`, exp and log computed in float64 and rounded once,
    as NumPy (and so sdrt) computes them."""
    def rounded(fn):
        return lambda t, *a: fn(t.double(), *a).float() if t.dtype == torch.float32 else fn(t, *a)
    saved = {(torch.Tensor, n): getattr(torch.Tensor, n) for n in ("sqrt", "exp", "log", "__pow__")}
    saved.update({(torch, n): getattr(torch, n) for n in ("sqrt", "exp", "log")})
    power = torch.Tensor.__pow__
    try:
        for (owner, n), fn in saved.items():
            if n != "__pow__":
                setattr(owner, n, rounded(fn))
        sqrt = torch.Tensor.sqrt
        torch.Tensor.__pow__ = lambda t, e: sqrt(t) if isinstance(e, float) and e == 0.5 else power(t, e)
        yield
    finally:
        for (owner, n), fn in saved.items():
            setattr(owner, n, fn)


def step_kwargs(sched) -> dict:
    """The extra step() kwargs a plain `StableDiffusionPipeline(...)(prompt)` call gives this
    scheduler (prepare_extra_step_kwargs): the pipeline's `eta` default, 0.0, to schedulers
    whose step takes eta (DDIM, TCD); the generator is the harness's injected noise."""
    eta = inspect.signature(diffusers.StableDiffusionPipeline.__call__).parameters["eta"].default
    kwargs = diffusers.StableDiffusionPipeline.prepare_extra_step_kwargs(SimpleNamespace(scheduler=sched), None, eta)
    kwargs.pop("generator", None)
    return kwargs


def run_diffusers(name, config, steps, x, noise, monkeypatch, options=None):
    """diffusers' scheduler on the model above; each `randn_tensor` the scheduler module
    draws is the next of `noise`, in draw order (returns how many it took)."""
    sched = oracle(name, config, options)
    sched.set_timesteps(steps)
    module = __import__(type(sched).__module__, fromlist=["randn_tensor"])
    taken = iter(noise)
    used = []
    if hasattr(module, "randn_tensor"):
        monkeypatch.setattr(module, "randn_tensor",
                            lambda *a, **k: used.append(1) or torch.from_numpy(next(taken)))
    xt = torch.from_numpy(x) * sched.init_noise_sigma
    for t in sched.timesteps:
        out = model(sched.scale_model_input(xt, t).numpy(), float(t))
        xt = sched.step(torch.from_numpy(out), t, xt, **step_kwargs(sched)).prev_sample
    return sched.timesteps.numpy().astype(np.float32), float(sched.init_noise_sigma), xt.numpy(), len(used)


def diffusers_finite(name, config, steps, monkeypatch, options=None, errors=(RuntimeError, IndexError)) -> bool:
    """Whether diffusers' own run ends finite: False where it returns NaN/inf or raises one
    of `errors` (the failures a degenerate schedule gives that scheduler class)."""
    x, noise = draws(steps)
    try:
        return bool(np.isfinite(run_diffusers(name, config, steps, x, noise, monkeypatch, options)[2]).all())
    except errors:
        return False


def run_sdrt(name, config, steps, x, noise, options=None):
    s = make_sampler(name, config, steps, options=options)
    xt = x * s.init_noise_sigma
    state = s.init_state()
    taken = iter(noise)
    used = 0
    for i, t in enumerate(s.timesteps):
        out = model(s.scale_model_input(xt, i), float(t))
        draw = s.draws_noise(i)
        used += draw
        xt, state = s.step(state, i, xt, out, next(taken) if draw else None)
    return s.timesteps, s.init_noise_sigma, xt, used


def _config(base: dict, spacing: str | None) -> dict:
    return dict(base) if spacing is None else {**base, "timestep_spacing": spacing}


CASES = [
    pytest.param(n, c, sp, k, id=f"{n}-{c}-{sp or 'default'}-{k}")
    for n, c, sp, k in itertools.product(SAMPLERS, CONFIGS, SPACINGS, STEPS)
    # LCM and TCD pick their own timesteps (spacing is ignored), so one spacing covers them.
    if not (n in ("lcm", "tcd") and sp is not None)
]
# Every sigma ramp on every sampler that takes one ("dpmpp_2m_karras", "heun_beta", ...).
RAMP_CASES = [
    pytest.param(n, c, k, id=f"{n}-{c}-{k}")
    for n, c, k in itertools.product([n for n in SCHEDULERS if names.split(n)[1]], CONFIGS, (1, 4, 25))
]


def assert_matches_diffusers(name, config, steps, monkeypatch, options=None, rtol=RTOL):
    x, noise = draws(steps)
    ref_t, ref_sigma, ref_x, ref_draws = run_diffusers(name, config, steps, x, noise, monkeypatch, options)
    t, sigma, out, n_draws = run_sdrt(name, config, steps, x, noise, options)
    assert np.isfinite(ref_x).all(), "the oracle itself diverged: not a useful case"
    assert n_draws == ref_draws, "the sampler draws noise on other calls than diffusers"
    assert sigma == pytest.approx(ref_sigma, rel=1e-6)
    err = np.abs(out - ref_x).max() / np.abs(ref_x).max()
    # Integer timesteps are equal; interpolated ones (Karras, log-sigma) may differ by an
    # ulp of a sigma, which near t = 0 is more than a relative 1e-6.
    same_t = np.allclose(t, ref_t, rtol=1e-6, atol=1e-5)
    if err > rtol or not same_t:
        with correctly_rounded_torch():
            ref_t, _, exact_x, _ = run_diffusers(name, config, steps, x, noise, monkeypatch, options)
        np.testing.assert_allclose(t, ref_t, rtol=1e-6, atol=1e-5)
        exact = np.abs(out - exact_x).max() / np.abs(exact_x).max()
        assert exact <= rtol and err <= TORCH_ROUNDING_RTOL, (
            f"max relative error {err:.2e} after {len(t)} calls ({exact:.2e} with correctly rounded torch maths)")


@pytest.mark.parametrize("name, config_name, spacing, steps", CASES)
def test_trajectory_matches_diffusers(name, config_name, spacing, steps, monkeypatch):
    assert_matches_diffusers(name, _config(CONFIGS[config_name], spacing), steps, monkeypatch)


@pytest.mark.parametrize("name, config_name, steps", RAMP_CASES)
def test_sigma_ramp_trajectory_matches_diffusers(name, config_name, steps, monkeypatch):
    assert_matches_diffusers(name, CONFIGS[config_name], steps, monkeypatch)


@pytest.mark.parametrize("strength", [None, 0.6])
@pytest.mark.parametrize("name", SAMPLERS)
def test_step_does_not_change_sampler_or_state(name, strength):
    """Two interleaved generations with one sampler give the results of two separate runs:
    no hidden state in the sampler, the state object is never mutated."""
    s = make_sampler(name, SD15, 6, strength=strength)
    x, noise = draws(6)
    a = b = x * s.init_noise_sigma
    sa, sb = s.init_state(), s.init_state()
    for i, t in enumerate(s.timesteps):
        na = noise[i] if s.draws_noise(i) else None
        a, sa = s.step(sa, i, a, model(s.scale_model_input(a, i), float(t)), na)
        b2, sb2 = s.step(sb, i, b, model(s.scale_model_input(b, i), float(t)), na)
        b3, _ = s.step(sb, i, b, model(s.scale_model_input(b, i), float(t)), na)  # same state again
        np.testing.assert_array_equal(b2, b3)
        b, sb = b2, sb2
    np.testing.assert_array_equal(a, b)
    assert a.dtype == np.float32


@pytest.mark.parametrize("steps", [5, 25])
def test_pndm_prk_warmup_matches_diffusers(steps, monkeypatch):
    """PNDM's Runge-Kutta warm-up (skip_prk_steps=False, the class default)."""
    assert_matches_diffusers("pndm", {**SD15, "skip_prk_steps": False}, steps, monkeypatch)


@pytest.mark.parametrize("name, extra", [
    ("ddim", {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02, "clip_sample": True,
              "set_alpha_to_one": True}),
    ("ddim", {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing", "prediction_type": "v_prediction"}),
    ("ddim", {"thresholding": True, "prediction_type": "sample", "sample_max_value": 1.5}),
    ("euler", {"beta_schedule": "squaredcos_cap_v2", "final_sigmas_type": "sigma_min"}),
    ("euler", {"use_karras_sigmas": True}),
    ("euler", {"prediction_type": "sample", "timestep_spacing": "trailing"}),
    # Not euler_a with rescale_betas_zero_snr: its sigma_max is 4096 and diffusers'
    # float32 sigma_down = sqrt(s_to^2 - s_up^2) cancels catastrophically there, so 1-ulp
    # differences in torch's (not correctly rounded) float32 sqrt show as ~2e-5.
    ("euler_a", {"beta_schedule": "squaredcos_cap_v2", "timestep_spacing": "leading", "steps_offset": 3}),
    ("dpmpp_2m", {"solver_order": 3}),
    ("dpmpp_2m", {"solver_order": 1, "lambda_min_clipped": -5.1, "beta_schedule": "squaredcos_cap_v2"}),
    ("dpmpp_2m", {"solver_type": "heun", "final_sigmas_type": "sigma_min", "lower_order_final": False}),
    ("dpmpp_2m", {"euler_at_final": True, "prediction_type": "sample"}),
    ("dpmpp_2m_karras", {"prediction_type": "v_prediction", "final_sigmas_type": "sigma_min"}),
    ("lcm", {"original_inference_steps": 20, "timestep_scaling": 5.0, "prediction_type": "v_prediction"}),
    ("lcm", {"clip_sample": True, "set_alpha_to_one": False}),
])
@pytest.mark.parametrize("steps", [4, 20])
def test_less_common_config_options_match_diffusers(name, extra, steps, monkeypatch):
    assert_matches_diffusers(name, {**SD15, **extra}, steps, monkeypatch)


def test_unknown_scheduler_lists_the_known_ones():
    with pytest.raises(InvalidInput, match="unknown scheduler 'k_heun'.*ddim.*euler_a.*lcm"):
        make_sampler("k_heun", SD15, 10)


@pytest.mark.parametrize("steps", [0, -3, 1001])
def test_steps_out_of_range_is_rejected_with_the_value(steps):
    with pytest.raises(InvalidInput, match=rf"steps must be in 1\.\.1000, got {steps}"):
        make_sampler("euler", SD15, steps)


@pytest.mark.parametrize("steps", [2.5, "10", True, None])
def test_steps_not_an_integer_is_a_type_error(steps):
    with pytest.raises(InvalidType, match="steps must be an integer"):
        make_sampler("ddim", SD15, steps)


def test_steps_above_num_train_timesteps_is_rejected():
    with pytest.raises(InvalidInput, match=r"1\.\.100, got 101"):
        make_sampler("ddim", {**SD15, "num_train_timesteps": 100}, 101)


def test_lcm_rejects_more_steps_than_it_was_distilled_with():
    with pytest.raises(InvalidInput, match="original_inference_steps=50 steps, got 51"):
        make_sampler("lcm", SD15, 51)


@pytest.mark.parametrize("key, value, accepted", [
    ("beta_schedule", "cubic", "squaredcos_cap_v2"),
    ("prediction_type", "flow", "v_prediction"),
    ("timestep_spacing", "random", "trailing"),
])
def test_bad_config_values_name_the_value_and_the_choices(key, value, accepted):
    with pytest.raises(InvalidInput, match=rf"{key}.*{value!r}.*{accepted}"):
        make_sampler("euler", {**SD15, key: value}, 10)


def test_unsupported_diffusers_option_is_rejected_not_ignored():
    with pytest.raises(InvalidInput, match="use_flow_sigmas=True is not supported"):
        make_sampler("dpmpp_2m", {**SD15, "use_flow_sigmas": True}, 10)
