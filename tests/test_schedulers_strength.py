"""Starting part-way (image-to-image, inpainting) against diffusers (the oracle): the
scheduler set up as `StableDiffusionImg2ImgPipeline.get_timesteps` leaves it (the
timesteps sliced at t_start * order, `set_begin_index`), initial latents from
`add_noise` at the first timestep, the sliced loop run with the same model function
and per-step noise, and the inpainting pipeline's `add_noise(image, noise,
timesteps[i + 1])` after each step."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from test_schedulers import (  # noqa: E402
    SD15, SD21, SHAPE, TORCH_ROUNDING_RTOL, correctly_rounded_torch, draws, model, oracle, step_kwargs,
)

from sdrt.engines.errors import InvalidInput, InvalidType  # noqa: E402
from sdrt.runtime.schedulers import (  # noqa: E402
    DIFFUSERS_CLASS, SAMPLERS, default_scheduler, diffusers_scheduler, make_sampler,
)

CONFIGS = {
    "sd15_epsilon": SD15,
    "sd21_v": SD21,
    "sd15_trailing": {**SD15, "timestep_spacing": "trailing"},
}
STRENGTHS = (0.3, 0.75, 1.0)
STEPS = (4, 10, 25)
RTOL = 1e-5          # whole trajectories, as in test_schedulers
NOISE_RTOL = 1e-6    # one add_noise: a single multiply-add per element


def t_start_of(steps: int, strength: float) -> int:
    """StableDiffusionImg2ImgPipeline.get_timesteps, written out."""
    init_timestep = min(int(steps * strength), steps)
    return max(steps - init_timestep, 0)


def sliced_oracle(name, config, steps, strength, noise, monkeypatch):
    """diffusers' scheduler set up as get_timesteps + set_begin_index leave it, each
    `randn_tensor` its module draws being the next of `noise`, in draw order.
    Returns the scheduler, the timesteps run and t_start."""
    sched = oracle(name, config)
    sched.set_timesteps(steps)
    t_start = t_start_of(steps, strength)
    timesteps = sched.timesteps[t_start * sched.order:]
    if hasattr(sched, "set_begin_index"):
        sched.set_begin_index(t_start * sched.order)
    module = __import__(type(sched).__module__, fromlist=["randn_tensor"])
    if hasattr(module, "randn_tensor"):
        taken = iter(noise)
        monkeypatch.setattr(module, "randn_tensor", lambda *a, **k: torch.from_numpy(next(taken)))
    return sched, timesteps, t_start


def run_diffusers(name, config, steps, strength, image, x_noise, noise, monkeypatch):
    """The img2img loop of diffusers' pipelines, with the inpainting pipeline's
    add_noise after each step recorded (4-channel U-Net: the known region is re-noised
    to the next timestep's level)."""
    sched, timesteps, t_start = sliced_oracle(name, config, steps, strength, noise, monkeypatch)
    img, eps = torch.from_numpy(image), torch.from_numpy(x_noise)
    latent_timestep = timesteps[:1].repeat(SHAPE[0])
    xt = sched.add_noise(img, eps, latent_timestep)
    noised = [xt.numpy()]
    for i, t in enumerate(timesteps):
        out = model(sched.scale_model_input(xt, t).numpy(), float(t))
        xt = sched.step(torch.from_numpy(out), t, xt, **step_kwargs(sched)).prev_sample
        if i < len(timesteps) - 1:
            noised.append(sched.add_noise(img, eps, torch.tensor([timesteps[i + 1]])).numpy())
    return timesteps.numpy().astype(np.float32), float(sched.init_noise_sigma), xt.numpy(), noised


def run_sdrt(name, config, steps, strength, image, x_noise, noise):
    s = make_sampler(name, config, steps, strength=strength)
    xt = s.add_noise(image, x_noise, 0)
    noised = [xt]
    state = s.init_state()
    taken = iter(noise)
    for i, t in enumerate(s.timesteps):
        out = model(s.scale_model_input(xt, i), float(t))
        xt, state = s.step(state, i, xt, out, next(taken) if s.draws_noise(i) else None)
        if i < len(s.timesteps) - 1:
            noised.append(s.add_noise(image, x_noise, i + 1))
    return s, xt, noised


def rel_err(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(a - ref).max() / np.abs(ref).max())


def assert_part_way_matches_diffusers(name, config, steps, strength, monkeypatch):
    image, noise = draws(steps, seed=1)
    x_noise = noise.pop()
    ref_t, ref_sigma, ref_x, ref_noised = run_diffusers(name, config, steps, strength, image, x_noise,
                                                        noise, monkeypatch)
    s, out, noised = run_sdrt(name, config, steps, strength, image, x_noise, noise)
    assert np.isfinite(ref_x).all(), "the oracle itself diverged: not a useful case"
    same_t = np.allclose(s.timesteps, ref_t, rtol=1e-6, atol=1e-5)
    assert s.begin_index == t_start_of(steps, strength) * s.order
    assert s.init_noise_sigma == pytest.approx(ref_sigma, rel=1e-6)
    assert len(noised) == len(ref_noised)
    for i, (a, ref) in enumerate(zip(noised, ref_noised)):
        assert a.dtype == np.float32
        assert rel_err(a, ref) <= NOISE_RTOL, f"add_noise at call {i}: max relative error {rel_err(a, ref):.2e}"
    err = rel_err(out, ref_x)
    if err > RTOL or not same_t:   # see test_schedulers.TORCH_ROUNDING_RTOL
        with correctly_rounded_torch():
            ref_t, _, ref_x, _ = run_diffusers(name, config, steps, strength, image, x_noise, noise, monkeypatch)
        np.testing.assert_allclose(s.timesteps, ref_t, rtol=1e-6, atol=1e-5)
        exact = rel_err(out, ref_x)
        assert exact <= RTOL and err <= TORCH_ROUNDING_RTOL, (
            f"max relative error {err:.2e} after {len(s.timesteps)} calls ({exact:.2e} with correctly rounded maths)")


CASES = [
    pytest.param(n, c, st, k, id=f"{n}-{c}-{st}-{k}")
    for n, c, st, k in itertools.product(SAMPLERS, CONFIGS, STRENGTHS, STEPS)
    # LCM and TCD ignore timestep_spacing: one spacing covers them.
    if not (n in ("lcm", "tcd") and c == "sd15_trailing")
]


@pytest.mark.parametrize("name, config_name, strength, steps", CASES)
def test_part_way_trajectory_and_add_noise_match_diffusers(name, config_name, strength, steps, monkeypatch):
    assert_part_way_matches_diffusers(name, CONFIGS[config_name], steps, strength, monkeypatch)


@pytest.mark.parametrize("name, extra", [
    # PRK warm-up: diffusers' counter restarts on the sliced list, so it runs again.
    ("pndm", {"skip_prk_steps": False}),
    # Third order: the warm-up counts from the first step run, lower_order_final
    # (< 15 steps) from the end of the whole schedule.
    ("dpmpp_2m", {"solver_order": 3}),
    ("dpmpp_2m", {"solver_order": 3, "lower_order_final": False, "final_sigmas_type": "sigma_min"}),
    ("dpmpp_2m", {"timestep_spacing": "leading", "euler_at_final": True}),
    ("dpmpp_2m_karras", {"prediction_type": "v_prediction", "final_sigmas_type": "sigma_min"}),
    ("euler", {"use_karras_sigmas": True}),
    ("euler", {"timestep_spacing": "leading", "final_sigmas_type": "sigma_min"}),
    ("euler_a", {"timestep_spacing": "leading", "steps_offset": 3}),
    ("ddim", {"timestep_spacing": "linspace", "set_alpha_to_one": True}),
    ("lcm", {"original_inference_steps": 20, "prediction_type": "v_prediction"}),
])
@pytest.mark.parametrize("strength", [0.5, 0.8])
@pytest.mark.parametrize("steps", [6, 20])
def test_part_way_with_less_common_options_matches_diffusers(name, extra, strength, steps, monkeypatch):
    assert_part_way_matches_diffusers(name, {**SD15, **extra}, steps, strength, monkeypatch)


@pytest.mark.parametrize("name", SAMPLERS)
def test_inpainting_blend_matches_diffusers(name, monkeypatch):
    """The 4-channel inpainting loop: after each step the known half is replaced by the
    image noised to the next call's level."""
    steps, strength = 12, 0.75
    image, noise = draws(steps, seed=2)
    x_noise = noise.pop()
    mask = np.zeros(SHAPE, np.float32)
    mask[..., :, SHAPE[-1] // 2:] = 1          # 1 = repaint, as diffusers' mask

    sched, timesteps, t_start = sliced_oracle(name, SD15, steps, strength, noise, monkeypatch)
    img, eps, m = torch.from_numpy(image), torch.from_numpy(x_noise), torch.from_numpy(mask)
    ref = sched.add_noise(img, eps, timesteps[:1].repeat(SHAPE[0]))
    for i, t in enumerate(timesteps):
        out = model(sched.scale_model_input(ref, t).numpy(), float(t))
        ref = sched.step(torch.from_numpy(out), t, ref, **step_kwargs(sched)).prev_sample
        proper = sched.add_noise(img, eps, torch.tensor([timesteps[i + 1]])) if i < len(timesteps) - 1 else img
        ref = (1 - m) * proper + m * ref

    s = make_sampler(name, SD15, steps, strength=strength)
    x, state = s.add_noise(image, x_noise, 0), s.init_state()
    taken = iter(noise)
    for i, t in enumerate(s.timesteps):
        x, state = s.step(state, i, x, model(s.scale_model_input(x, i), float(t)),
                          next(taken) if s.draws_noise(i) else None)
        proper = s.add_noise(image, x_noise, i + 1) if i < len(s.timesteps) - 1 else image
        x = (1 - mask) * proper + mask * x
    assert rel_err(x, ref.numpy()) <= RTOL


@pytest.mark.parametrize("name", SAMPLERS)
def test_strength_one_is_the_whole_schedule(name):
    full, one = make_sampler(name, SD15, 10), make_sampler(name, SD15, 10, strength=1)
    np.testing.assert_array_equal(one.timesteps, full.timesteps)
    assert one.begin_index == full.begin_index == 0
    x, noise = draws(10)
    a = b = x * full.init_noise_sigma
    sa, sb = full.init_state(), one.init_state()
    for i, t in enumerate(full.timesteps):
        n = noise[i] if full.draws_noise(i) else None
        a, sa = full.step(sa, i, a, model(full.scale_model_input(a, i), float(t)), n)
        b, sb = one.step(sb, i, b, model(one.scale_model_input(b, i), float(t)), n)
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", SAMPLERS)
def test_sampler_tables_are_read_only(name):
    """One sampler serves several threads: nobody can change its tables in place."""
    s = make_sampler(name, SD15, 8, strength=0.5)
    with pytest.raises(ValueError, match="read-only"):
        s.timesteps[0] = 0
    with pytest.raises(AttributeError):
        s.begin_index = 0


# --- strength validation ------------------------------------------------------------------

@pytest.mark.parametrize("strength", [0, 0.0, -0.5, 1.0000001, 2, float("nan"), float("inf")])
def test_strength_out_of_range_names_the_value_and_the_range(strength):
    with pytest.raises(InvalidInput, match=rf"strength must be in \(0, 1\].*got {re_value(strength)}"):
        make_sampler("euler", SD15, 25, strength=strength)


def re_value(v) -> str:
    import re
    return re.escape(repr(v))


@pytest.mark.parametrize("strength", ["0.5", True, [0.5], 1j])
def test_strength_not_a_real_number_is_a_type_error(strength):
    with pytest.raises(InvalidType, match=r"strength must be a real number in \(0, 1\]"):
        make_sampler("ddim", SD15, 25, strength=strength)


@pytest.mark.parametrize("strength", [np.float32(0.5), np.float64(0.5), 1])
def test_numpy_and_integer_strengths_are_accepted(strength):
    assert len(make_sampler("ddim", SD15, 10, strength=strength).timesteps) == int(10 * float(strength))


@pytest.mark.parametrize("strength, steps, hint", [
    (0.01, 25, "raise strength to at least 0.04 or steps to at least 100"),
    (0.3, 3, "raise strength to at least 0.334 or steps to at least 4"),
    (1e-300, 50, "raise strength to at least 0.02$"),     # no step count in range would do
])
def test_strength_that_leaves_no_step_says_what_to_raise(strength, steps, hint):
    with pytest.raises(InvalidInput, match=rf"strength {re_value(strength)} x {steps} steps leaves no "
                                           rf"denoising step.*{hint}"):
        make_sampler("dpmpp_2m", SD15, steps, strength=strength)


@pytest.mark.parametrize("strength, steps", [(0.01, 25), (0.3, 3), (0.49, 2), (0.999, 1)])
def test_the_suggested_values_do_leave_a_step(strength, steps):
    with pytest.raises(InvalidInput) as info:
        make_sampler("euler", SD15, steps, strength=strength)
    msg = str(info.value)
    s_min = float(msg.split("strength to at least ")[1].split()[0])
    k_min = int(msg.split("steps to at least ")[1])
    assert len(make_sampler("euler", SD15, steps, strength=s_min).timesteps) == 1
    assert len(make_sampler("euler", SD15, k_min, strength=strength).timesteps) == 1
    # ... and they are the smallest such values (to the 0.001 the message gives).
    assert int(steps * (s_min - 0.001)) == 0 and int((k_min - 1) * strength) == 0


# --- the sdrt <-> diffusers map ---------------------------------------------------------

def test_diffusers_scheduler_names_the_class_each_sampler_follows():
    """The bare name is the plain spacing (every ramp off); a suffix turns on its ramp."""
    off = {"use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False}
    expected = {
        "ddim": ("DDIMScheduler", {}),
        "pndm": ("PNDMScheduler", {}),
        "euler": ("EulerDiscreteScheduler", off),
        "euler_a": ("EulerAncestralDiscreteScheduler", {}),
        "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", **off}),
        "dpmpp_2m_karras": ("DPMSolverMultistepScheduler",
                            {"algorithm_type": "dpmsolver++", **off, "use_karras_sigmas": True}),
        "dpmpp_2m_sde_beta": ("DPMSolverMultistepScheduler",
                              {"algorithm_type": "sde-dpmsolver++", **off, "use_beta_sigmas": True}),
        "lcm": ("LCMScheduler", {}),
    }
    assert {n: diffusers_scheduler(n, SD15) for n in expected} == expected
    assert DIFFUSERS_CLASS["dpmpp_2m_karras"] == (
        "DPMSolverMultistepScheduler(algorithm_type='dpmsolver++', use_karras_sigmas=True)")
    assert DIFFUSERS_CLASS["euler"] == "EulerDiscreteScheduler"


def test_dpmpp_2m_on_a_karras_checkpoint_is_still_the_plain_ramp(monkeypatch):
    """A checkpoint that ships DPM-Solver with Karras sigmas defaults to dpmpp_2m_karras;
    asking for dpmpp_2m gives the plain ramp, as diffusers with use_karras_sigmas=False."""
    config = {**SD15, "_class_name": "DPMSolverMultistepScheduler", "use_karras_sigmas": True}
    assert default_scheduler(config) == "dpmpp_2m_karras"
    plain, karras = make_sampler("dpmpp_2m", config, 10), make_sampler("dpmpp_2m_karras", config, 10)
    assert not np.array_equal(plain.timesteps, karras.timesteps)
    assert_part_way_matches_diffusers("dpmpp_2m", config, 10, 1.0, monkeypatch)


@pytest.mark.parametrize("config, expected", [
    ({"_class_name": "PNDMScheduler"}, "pndm"),
    ({"_class_name": "DDIMScheduler"}, "ddim"),
    ({"_class_name": "EulerDiscreteScheduler"}, "euler"),
    ({"_class_name": "EulerDiscreteScheduler", "use_exponential_sigmas": True}, "euler_exponential"),
    ({"_class_name": "EulerAncestralDiscreteScheduler"}, "euler_a"),
    ({"_class_name": "DPMSolverMultistepScheduler"}, "dpmpp_2m"),
    ({"_class_name": "DPMSolverMultistepScheduler", "use_karras_sigmas": True}, "dpmpp_2m_karras"),
    ({"_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "sde-dpmsolver++",
      "use_karras_sigmas": True}, "dpmpp_2m_sde_karras"),
    ({"_class_name": "LCMScheduler"}, "lcm"),
    ({"_class_name": "EDMEulerScheduler"}, "euler"),        # not followed: the documented fallback
    ({}, "euler"),
])
def test_default_scheduler_follows_the_checkpoints_class(config, expected):
    assert default_scheduler(config) == expected


def test_map_helpers_reject_bad_arguments():
    with pytest.raises(InvalidInput, match="unknown scheduler 'k_heun'"):
        diffusers_scheduler("k_heun", SD15)
    with pytest.raises(InvalidType, match="scheduler_config must be a mapping"):
        default_scheduler(["PNDMScheduler"])
    with pytest.raises(InvalidType, match="scheduler_config must be a mapping"):
        diffusers_scheduler("ddim", None)


def test_part_way_schedules_have_the_step_count_get_timesteps_returns():
    """Sanity of the slicing itself over many (steps, strength): the sampler runs
    steps - t_start steps, i.e. the whole schedule's calls from t_start * order on
    (PNDM's skip_prk_steps list has one call more from 2 steps on; Heun and KDPM2 make
    two calls per step but the last)."""
    for steps, strength in itertools.product((1, 2, 3, 7, 25, 50), (0.05, 0.2, 0.5, 0.51, 0.99, 1.0)):
        t_start = t_start_of(steps, strength)
        if steps - t_start < 1:
            continue
        for name in SAMPLERS:
            s, full = make_sampler(name, SD15, steps, strength=strength), make_sampler(name, SD15, steps)
            calls = full.order * steps - (full.order - 1) + (1 if name == "pndm" and steps > 1 else 0)
            assert len(full.timesteps) == calls, (name, steps)
            assert s.begin_index == t_start * full.order
            np.testing.assert_array_equal(s.timesteps, full.timesteps[t_start * full.order:])
