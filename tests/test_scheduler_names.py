"""What users call samplers and how they set them up: AUTOMATIC1111 names both ways,
the sigma-ramp shorthands, scheduler options on top of the checkpoint's config (as
diffusers' `from_config(config, **options)`), the checkpoint's own class as default
(or a one-line notice and the documented fallback), and degenerate step counts
refused before any engine loads."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from test_schedulers import SD15, SD21, assert_matches_diffusers, draws, model, step_kwargs  # noqa: E402

from sdrt.cli.main import main  # noqa: E402
from sdrt.engines.errors import InvalidInput, InvalidType  # noqa: E402
from sdrt.runtime.schedulers import (  # noqa: E402
    FALLBACK_SCHEDULER, SAMPLERS, SCHEDULERS, SchedulerFallback, a1111_name, canonical_name,
    checkpoint_default, make_sampler, names, option_keys, resolved_name,
)

# --- names --------------------------------------------------------------------------

# The AUTOMATIC1111 sampler list as the diffusers scheduler overview maps it to classes
# (docs/source/en/api/schedulers/overview.md), in the old combined "name + schedule" form.
A1111_COMBINED = {
    "DPM++ 2M": "dpmpp_2m",
    "DPM++ 2M Karras": "dpmpp_2m_karras",
    "DPM++ 2M SDE": "dpmpp_2m_sde",
    "DPM++ 2M SDE Karras": "dpmpp_2m_sde_karras",
    "DPM2": "kdpm2",
    "DPM2 Karras": "kdpm2_karras",
    "DPM2 a": "kdpm2_a",
    "DPM2 a Karras": "kdpm2_a_karras",
    "Euler": "euler",
    "Euler a": "euler_a",
    "Heun": "heun",
    "LMS": "lms",
    "LMS Karras": "lms_karras",
    "DDIM": "ddim",
    "PLMS": "pndm",
    "UniPC": "unipc",
    "LCM": "lcm",
}


@pytest.mark.parametrize("a1111, expected", A1111_COMBINED.items())
def test_automatic1111_names_map_to_the_sampler_and_ramp_diffusers_documents(a1111, expected):
    assert canonical_name(a1111) == expected
    assert canonical_name(a1111.lower().replace(" ", "  ")) == expected     # case and spacing forgiven


@pytest.mark.parametrize("sampler, schedule, expected", [
    ("DPM++ 2M", "Karras", "dpmpp_2m_karras"),
    ("DPM++ 2M SDE", "Exponential", "dpmpp_2m_sde_exponential"),
    ("Euler", "Beta", "euler_beta"),
    ("Euler a", "Automatic", "euler_a"),
    # "Automatic" is the sampler's own default schedule in the web UI 1.9+
    # (sd_samplers_kdiffusion.py: DPM++ 2M karras, DPM++ 2M SDE exponential).
    ("DPM++ 2M", "Automatic", "dpmpp_2m_karras"),
    ("DPM++ 2M SDE", "Automatic", "dpmpp_2m_sde_exponential"),
    ("dpmpp_2m", "automatic", "dpmpp_2m_karras"),
    ("DPM++ 2M", None, "dpmpp_2m"),               # before 1.9 no schedule type: "DPM++ 2M" was uniform
    ("DPM++ 2M", "Uniform", "dpmpp_2m"),
    ("heun", "karras", "heun_karras"),           # an sdrt sampler with an AUTOMATIC1111 schedule type
])
def test_sampler_with_a_separate_schedule_type(sampler, schedule, expected):
    assert canonical_name(sampler, schedule) == expected


@pytest.mark.parametrize("name", SCHEDULERS)
def test_every_name_round_trips_through_its_automatic1111_name(name):
    label, schedule = a1111_name(name)
    assert canonical_name(label, schedule) == name
    if label in names.A1111_SAMPLERS:
        assert names.A1111_SAMPLERS[label] == names.split(name)[0]


@pytest.mark.parametrize("text, words", [
    ("DPM++ 2S a Karras", "'DPM++ 2S a' is not supported: it is ancestral"),
    ("DPM fast", "'DPM fast' is not supported"),
    ("DPM++ SDE Karras", "'DPM++ SDE' is not supported: its Brownian-tree noise depends on torch's"),
    ("Euler a Karras", "euler_a has no karras sigma ramp"),
    ("ddim_karras", "unknown scheduler 'ddim_karras'"),
    ("k_lms", "unknown scheduler 'k_lms': choose one of " + ", ".join(SAMPLERS)),
])
def test_names_sdrt_cannot_follow_are_refused_with_the_reason(text, words):
    with pytest.raises(InvalidInput, match=words.replace("+", r"\+").replace("(", r"\(")):
        canonical_name(text)


def test_unknown_schedule_type_lists_the_supported_ones():
    with pytest.raises(InvalidInput, match="unknown or unsupported schedule type 'Align Your Steps'.*Karras"):
        canonical_name("DPM++ 2M", "Align Your Steps")


# --- options --------------------------------------------------------------------------

@pytest.mark.parametrize("name, options", [
    ("dpmpp_2m", {"solver_order": 3, "final_sigmas_type": "sigma_min"}),
    ("dpmpp_2m", {"use_karras_sigmas": True}),                 # options win over the bare name
    ("euler", {"timestep_spacing": "trailing", "steps_offset": 0}),
    ("ddim", {"set_alpha_to_one": True, "timestep_spacing": "linspace"}),
    ("euler_a", {"rescale_betas_zero_snr": False, "timestep_spacing": "leading"}),
])
@pytest.mark.parametrize("config", [SD15, SD21], ids=["sd15", "sd21"])
def test_options_apply_on_top_of_the_config_as_from_config_does(name, options, config, monkeypatch):
    """The oracle here is built directly, not through sdrt's map:
    Class.from_config(config, **name's overrides, **options)."""
    assert_matches_diffusers(name, config, 12, monkeypatch, options=options)


def test_options_change_the_recorded_name_when_they_turn_a_ramp_on():
    assert resolved_name("dpmpp_2m", SD15, {"use_karras_sigmas": True}) == "dpmpp_2m_karras"
    assert make_sampler("dpmpp_2m", SD15, 10, options={"use_karras_sigmas": True}).name == "dpmpp_2m_karras"
    assert resolved_name("dpmpp_2m_karras", SD15, {"use_karras_sigmas": False}) == "dpmpp_2m"
    assert resolved_name("ddim", SD15, {"timestep_spacing": "trailing"}) == "ddim"


def test_unknown_option_is_refused_listing_the_accepted_keys():
    with pytest.raises(InvalidInput) as e:
        make_sampler("ddim", SD15, 10, options={"use_karras_sigmas": True})
    msg = str(e.value)
    assert "scheduler 'ddim' (DDIMScheduler) has no option 'use_karras_sigmas'" in msg
    assert all(k in msg for k in option_keys("ddim"))
    assert "timestep_spacing" in option_keys("ddim")


@pytest.mark.parametrize("options, words", [
    ({"use_karras_sigmas": "yes"}, "use_karras_sigmas='yes' must be a bool"),
    ({"solver_order": 2.0}, "solver_order=2.0 must be a int"),
    ({"solver_order": True}, "solver_order=True must be a int"),
    ({"timestep_spacing": 3}, "timestep_spacing=3 must be a str"),
])
def test_option_of_the_wrong_type_is_a_type_error(options, words):
    with pytest.raises(InvalidType, match=words):
        make_sampler("dpmpp_2m", SD15, 10, options=options)


def test_option_values_diffusers_rejects_are_refused_naming_them():
    with pytest.raises(InvalidInput, match="timestep_spacing 'sometimes'"):
        make_sampler("euler", SD15, 10, options={"timestep_spacing": "sometimes"})
    with pytest.raises(InvalidInput, match="only one of use_karras_sigmas, use_beta_sigmas can be on"):
        make_sampler("euler_karras", SD15, 10, options={"use_beta_sigmas": True})


# --- the checkpoint's own scheduler ----------------------------------------------------------

# scheduler_config.json files as checkpoints ship them (keys as diffusers saves them).
CHECKPOINT_CONFIGS = {
    "UniPCMultistepScheduler": {"solver_order": 2, "solver_type": "bh2", "predict_x0": True,
                                "lower_order_final": True, "disable_corrector": []},
    "DPMSolverMultistepScheduler": {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True,
                                    "solver_order": 2},
    "DPMSolverSinglestepScheduler": {"solver_order": 2, "algorithm_type": "dpmsolver++"},
    "EulerDiscreteScheduler": {"timestep_spacing": "trailing", "use_karras_sigmas": False},
    "EulerAncestralDiscreteScheduler": {"timestep_spacing": "linspace"},
    "HeunDiscreteScheduler": {"use_karras_sigmas": True},
    "LMSDiscreteScheduler": {},
    "KDPM2DiscreteScheduler": {},
    "KDPM2AncestralDiscreteScheduler": {"use_karras_sigmas": True},
    "DDPMScheduler": {"variance_type": "fixed_small", "clip_sample": False},
    "DEISMultistepScheduler": {"solver_order": 2},
    "DDIMScheduler": {"timestep_spacing": "trailing", "rescale_betas_zero_snr": True,
                      "prediction_type": "v_prediction"},
    "PNDMScheduler": {"skip_prk_steps": True},
    "LCMScheduler": {"original_inference_steps": 50},
    "TCDScheduler": {"original_inference_steps": 50},
}


@pytest.mark.parametrize("cls", CHECKPOINT_CONFIGS)
@pytest.mark.parametrize("base", [SD15, SD21], ids=["sd15", "sd21"])
def test_checkpoints_own_scheduler_class_runs_as_diffusers_runs_it(cls, base):
    """What a checkpoint's scheduler_config.json names runs without a --scheduler, and
    gives diffusers' trajectory for `Class.from_config(config)` (no sdrt map involved)."""
    config = {**base, **CHECKPOINT_CONFIGS[cls], "_class_name": cls}
    default = checkpoint_default(config)
    assert default.notice is None
    s = make_sampler(default.name, config, 8, options=default.options)
    ref = getattr(diffusers, cls).from_config(config)
    ref.set_timesteps(8)
    np.testing.assert_allclose(s.timesteps, ref.timesteps.numpy().astype(np.float32), rtol=1e-6)
    x, noise = draws(8)
    taken, ref_taken = iter(noise), iter(noise)
    module = __import__(type(ref).__module__, fromlist=["randn_tensor"])
    saved = getattr(module, "randn_tensor", None)
    if saved is not None:
        module.randn_tensor = lambda *a, **k: torch.from_numpy(next(ref_taken))
    try:
        xt, state = x * s.init_noise_sigma, s.init_state()
        rt = torch.from_numpy(x) * ref.init_noise_sigma
        for i, t in enumerate(s.timesteps):
            xt, state = s.step(state, i, xt, model(s.scale_model_input(xt, i), float(t)),
                               next(taken) if s.draws_noise(i) else None)
            tt = ref.timesteps[i]
            rt = ref.step(torch.from_numpy(model(ref.scale_model_input(rt, tt).numpy(), float(tt))), tt, rt,
                          **step_kwargs(ref)).prev_sample
    finally:
        if saved is not None:
            module.randn_tensor = saved
    assert np.abs(xt - rt.numpy()).max() / np.abs(rt.numpy()).max() <= 1e-5


@pytest.mark.parametrize("config", [
    {"_class_name": "EDMEulerScheduler", "sigma_min": 0.002, "sigma_max": 80.0},
    {"_class_name": "FlowMatchEulerDiscreteScheduler"},
    {"_class_name": "MyCustomScheduler"},
    {"beta_schedule": "scaled_linear"},                     # no _class_name at all
])
def test_a_class_sdrt_does_not_follow_gets_a_one_line_notice_and_the_documented_fallback(config):
    default = checkpoint_default(config)
    assert default.name == FALLBACK_SCHEDULER == "euler"
    assert "\n" not in default.notice and "sdrt does not follow" in default.notice
    assert repr(config.get("_class_name", "without _class_name")).strip("'") in default.notice


@pytest.fixture(scope="module")
def edm_artifact(tiny_sd15, tmp_path_factory, export_into):
    """The tiny SD 1.5 checkpoint shipping a scheduler class sdrt does not follow."""
    model = tmp_path_factory.mktemp("models") / "edm"
    shutil.copytree(tiny_sd15, model, dirs_exist_ok=True)
    path = model / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "_class_name": "EDMEulerScheduler"}))
    return export_into(model, tmp_path_factory.mktemp("artifacts") / "edm", vae_encoder=False, verify=False)


def test_generate_prints_the_fallback_notice_once_and_runs(edm_artifact, tmp_path, capsys):
    assert main(["generate", str(edm_artifact), "--prompt", "x", "--steps", "2", "--seed", "1",
                 "--out", str(tmp_path / "o.png")]) == 0
    notices = [line for line in capsys.readouterr().err.splitlines() if "does not follow" in line]
    assert notices == ["sdrt generate: warning: the checkpoint ships scheduler class 'EDMEulerScheduler', which "
                       "sdrt does not follow; using 'euler' (EulerDiscreteScheduler) with its config instead "
                       "(choose another with --scheduler)"]


def test_api_fallback_is_a_scheduler_fallback_warning_and_a_chosen_scheduler_is_silent(edm_artifact):
    import warnings

    from sdrt.runtime.artifact import Artifact
    art = Artifact.open(edm_artifact)
    with pytest.warns(SchedulerFallback, match="'EDMEulerScheduler'"):
        request = art.request("a fox", steps=3, seed=0)
    assert request.config.scheduler == "euler"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert art.request("a fox", steps=3, seed=0, scheduler="ddim").config.scheduler == "ddim"


# --- degenerate step counts -----------------------------------------------------------------

def _diffusers_fails(cls_name, config, overrides, steps):
    """Whether diffusers' own scheduler crashes or ends non-finite on this schedule."""
    sched = getattr(diffusers, cls_name).from_config(config, **overrides)
    try:
        sched.set_timesteps(steps)
        x = torch.from_numpy(draws(1)[0])
        xt = x * sched.init_noise_sigma
        for t in sched.timesteps:
            out = torch.from_numpy(model(sched.scale_model_input(xt, t).numpy(), float(t)))
            xt = sched.step(out, t, xt).prev_sample
    except (IndexError, ValueError, RuntimeError, ZeroDivisionError):
        return True
    return not bool(torch.isfinite(xt).all())


@pytest.mark.parametrize("name, config, steps", [
    ("dpmpp_2m", SD15, 1000),
    ("ddim", SD15, 1000),                         # leading + steps_offset=1 reaches t = 1000
    ("pndm", SD21, 1000),
    ("pndm", {**SD15, "skip_prk_steps": False}, 3),
    ("pndm", {**SD15, "skip_prk_steps": False}, 501),
])
def test_degenerate_schedules_are_refused_where_diffusers_fails(name, config, steps):
    from sdrt.runtime.schedulers import diffusers_scheduler
    cls_name, overrides = diffusers_scheduler(name, config)
    assert _diffusers_fails(cls_name, config, overrides, steps) or name == "pndm" and steps == 501
    with pytest.raises(InvalidInput, match=rf"scheduler '{name}' with {steps} steps: .*; use at (most|least) \d+"):
        make_sampler(name, config, steps)


def test_the_suggested_step_count_works_and_is_the_nearest():
    with pytest.raises(InvalidInput, match=r"use at most (\d+) steps") as e:
        make_sampler("ddim", SD15, 1000)
    n = int(str(e.value).rsplit("at most ", 1)[1].split()[0])
    assert make_sampler("ddim", SD15, n).schedule_problem() is None
    assert n == 999


@pytest.mark.parametrize("args, words", [
    (["--scheduler", "pndm", "--steps", "3", "--scheduler-option", "skip_prk_steps=false"],
     "needs 4 to 500 steps; use at least 4 steps"),
    (["--scheduler", "dpmpp_2m", "--steps", "1000"], "with 1000 steps: its"),
    (["--scheduler", "euler", "--scheduler-option", "solver_order=3"], "has no option 'solver_order'"),
    (["--scheduler", "euler", "--scheduler-option", "use_karras_sigmas"], "expected KEY=VALUE"),
    (["--scheduler", "DPM++ 2S a"], "'DPM++ 2S a' is not supported"),
    (["--scheduler", "euler", "--scheduler-option", "steps_offset=1", "--scheduler-option", "steps_offset=0"],
     "--scheduler-option steps_offset is given twice"),
])
def test_generate_refuses_bad_scheduler_settings_in_one_line_before_loading(sd15_artifacts, tmp_path, capsys,
                                                                            monkeypatch, args, words):
    from sdrt.runtime.pipeline import Pipeline

    def no_load(*a, **k):
        raise AssertionError("engines loaded")
    monkeypatch.setattr(Pipeline, "load", no_load)
    assert main(["generate", str(sd15_artifacts), "--prompt", "x", "--out", str(tmp_path / "o.png"), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0], err
    assert not (tmp_path / "o.png").exists()


def test_generate_with_options_and_an_automatic1111_name_equals_the_api(sd15_artifacts, tmp_path, capsys):
    from PIL import Image

    from sdrt.runtime.images import read_parameters
    from sdrt.runtime.pipeline import Pipeline
    out = tmp_path / "o.png"
    assert main(["generate", str(sd15_artifacts), "--prompt", "a fox", "--steps", "3", "--seed", "5",
                 "--scheduler", "DPM++ 2M Karras", "--scheduler-option", "solver_order=3",
                 "--scheduler-option", "timestep_spacing=trailing", "--out", str(out)]) == 0
    api = Pipeline.load(sd15_artifacts)("a fox", steps=3, seed=5, scheduler="dpmpp_2m_karras",
                                         scheduler_options={"solver_order": 3, "timestep_spacing": "trailing"})
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(api.images[0]))
    text = read_parameters(out)
    assert "Sampler: DPM++ 2M, Schedule type: Karras" in text
    assert 'Scheduler options: "{\\"solver_order\\": 3, \\"timestep_spacing\\": \\"trailing\\"}"' in text


@pytest.mark.parametrize("name", ["euler", "ddim", "heun", "dpmpp_2m", "unipc"])
def test_config_keys_listed_in_use_default_values_take_the_class_default(name, monkeypatch):
    """A config saved from a live scheduler lists the values it never set in
    `_use_default_values`; from_config drops those keys, so the class default applies."""
    config = {**SD15, "timestep_spacing": "trailing", "steps_offset": 1,
              "_use_default_values": ["timestep_spacing", "steps_offset"]}
    ref = getattr(diffusers, diffusers_class_of(name)).from_config(config)
    assert ref.config.get("timestep_spacing") != "trailing"
    assert_matches_diffusers(name, config, 9, monkeypatch)


def diffusers_class_of(name):
    from sdrt.runtime.schedulers import diffusers_scheduler
    return diffusers_scheduler(name, SD15)[0]


def test_beta_quantiles_equal_scipys():
    """The runtime's scipy-free Beta(0.6, 0.6) quantiles (diffusers' use_beta_sigmas), over
    every ramp point up to 1000 steps and the tails."""
    stats = pytest.importorskip("scipy.stats")
    from sdrt.runtime.schedulers import tables
    q = np.concatenate([1 - np.linspace(0, 1, 1000), np.random.default_rng(0).random(2000),
                        np.logspace(-12, -1, 100), 1 - np.logspace(-12, -1, 100)])
    ref = stats.beta.ppf(q, 0.6, 0.6)
    np.testing.assert_allclose(tables.beta_ppf(q, 0.6, 0.6), ref, rtol=1e-13, atol=1e-300)
