"""End to end: `Pipeline` pixels equal diffusers' StableDiffusionPipeline (the oracle)
given the same weights, prompts, guidance, scheduler and initial latents.

diffusers multiplies the latents it is given by its scheduler's init_noise_sigma, as
sdrt does, so both get the same unscaled standard-normal array.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
from PIL import Image

from sdrt.engines.errors import InvalidInput, NumericsError
from sdrt.engines.specs import Stage
from sdrt.runtime import Pipeline
from sdrt.runtime.artifact import IgnoredSetting
from sdrt.runtime.schedulers import diffusers_scheduler

TOL = 1e-4   # max abs on pixels in [0, 1], fp32 on CPU (the bar)
PROMPT = "a watercolor fox, highly detailed"
NEGATIVE = "blurry, low quality"

DETERMINISTIC = ("ddim", "pndm", "euler", "dpmpp_2m", "dpmpp_2m_karras")


class Diffusers:
    """The oracle: one StableDiffusionPipeline per model folder, scheduler swapped per call."""

    def __init__(self):
        self.pipes, self.configs = {}, {}

    def __call__(self, model_dir, prompt, latents, steps, guidance, scheduler, negative_prompt=None):
        import diffusers
        import torch
        if model_dir not in self.pipes:
            pipe = diffusers.StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None,
                                                                     requires_safety_checker=False)
            pipe.set_progress_bar_config(disable=True)
            self.pipes[model_dir], self.configs[model_dir] = pipe, pipe.scheduler.config
        pipe = self.pipes[model_dir]
        cls_name, overrides = diffusers_scheduler(scheduler, self.configs[model_dir])
        pipe.scheduler = getattr(diffusers, cls_name).from_config(self.configs[model_dir], **overrides)
        # One torch thread: on a shared 2-core machine, torch's OpenMP threads spin
        # against each other and the other test processes (measured: 0.5 s vs 10-20 s
        # for 10 tiny-model steps). Results differ only by float rounding order.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with torch.no_grad():
                return pipe(prompt, negative_prompt=negative_prompt, num_inference_steps=steps,
                            guidance_scale=guidance, latents=torch.from_numpy(latents.copy()), output_type="np").images
        finally:
            torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def oracle():
    return Diffusers()


@pytest.fixture(scope="module")
def variants(tiny_sd15, tiny_sd2, sd15_artifacts, sd2_artifacts):
    """variant -> (diffusers model folder, loaded sdrt Pipeline)."""
    return {"sd15": (tiny_sd15, Pipeline.load(sd15_artifacts)), "sd2": (tiny_sd2, Pipeline.load(sd2_artifacts))}


def _latents(pipe, seed):
    return np.random.default_rng(seed).standard_normal(pipe.latent_shape, dtype=np.float32)


def _max_diff(a, b):
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a.astype(np.float64) - b).max())


@pytest.mark.parametrize("scheduler", list(DETERMINISTIC))
@pytest.mark.parametrize("variant", ["sd15", "sd2"])
def test_pixels_match_diffusers_for_each_deterministic_scheduler(variants, oracle, variant, scheduler):
    model_dir, pipe = variants[variant]
    latents = _latents(pipe, seed=11)
    result = pipe(PROMPT, negative_prompt=NEGATIVE, steps=10, guidance=7.5, scheduler=scheduler, latents=latents)
    want = oracle(model_dir, PROMPT, latents, 10, 7.5, scheduler, NEGATIVE)
    assert result.pixels.dtype == np.float32
    assert _max_diff(result.pixels, want) <= TOL


def test_default_scheduler_25_steps_without_negative_prompt_matches_diffusers(variants, oracle):
    # The checkpoint's own scheduler (PNDM for SD 1.5) is the default, as in diffusers.
    model_dir, pipe = variants["sd15"]
    assert pipe.default_scheduler == "pndm"
    latents = _latents(pipe, seed=3)
    result = pipe("an old lighthouse at dusk", steps=25, guidance=5.0, latents=latents)
    want = oracle(model_dir, "an old lighthouse at dusk", latents, 25, 5.0, "pndm")
    assert _max_diff(result.pixels, want) <= TOL


def test_v_prediction_checkpoint_defaults_to_its_ddim_and_matches_diffusers(variants, oracle):
    model_dir, pipe = variants["sd2"]
    assert pipe.default_scheduler == "ddim"
    latents = _latents(pipe, seed=5)
    result = pipe("", steps=7, guidance=12.0, latents=latents)   # the empty prompt too
    want = oracle(model_dir, "", latents, 7, 12.0, "ddim")
    assert _max_diff(result.pixels, want) <= TOL


@pytest.mark.parametrize("guidance", [1.0, 0.5])
def test_guidance_at_most_one_equals_diffusers_without_guidance(variants, oracle, guidance):
    model_dir, pipe = variants["sd15"]
    latents = _latents(pipe, seed=8)
    result = pipe(PROMPT, negative_prompt=NEGATIVE, steps=6, guidance=guidance, scheduler="euler", latents=latents)
    want = oracle(model_dir, PROMPT, latents, 6, 1.0, "euler", NEGATIVE)   # diffusers skips CFG at <= 1
    assert _max_diff(result.pixels, want) <= TOL


@pytest.fixture(scope="module")
def batch2(sd15_batch2_artifacts):
    return sd15_batch2_artifacts


def test_batch_artifact_matches_diffusers_with_a_prompt_list(tiny_sd15, batch2, oracle):
    pipe = Pipeline.load(batch2)
    prompts, negatives = ["a red cube", "a blue sphere"], ["", "green"]
    latents = _latents(pipe, seed=21)
    result = pipe(prompts, negative_prompt=negatives, steps=5, guidance=6.0, scheduler="ddim", latents=latents)
    want = oracle(tiny_sd15, prompts, latents, 5, 6.0, "ddim", negatives)
    assert len(result.images) == 2
    assert _max_diff(result.pixels, want) <= TOL


def test_cli_writes_one_png_per_batch_item(batch2, tmp_path):
    # Here rather than in test_cli_generate.py to share the batch export.
    from sdrt.cli.main import main
    from sdrt.runtime.images import read_parameters
    assert main(["generate", str(batch2), "--prompt", "a fox", "--steps", "2", "--seed", "5",
                 "--out", str(tmp_path / "img.png")]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img-1.png", "img.png"]
    pixels = Pipeline.load(batch2)("a fox", steps=2, seed=5).images
    for i, name in enumerate(["img.png", "img-1.png"]):
        assert read_parameters(tmp_path / name).startswith("a fox\nSteps: 2, Sampler: PLMS, Schedule type: Uniform, CFG scale: 7.5, Seed: 5")
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / name)), np.asarray(pixels[i]))


def test_each_batch_image_carries_the_text_of_its_own_prompts(batch2):
    """image.info["parameters"] names that image's prompt and negative prompt; the
    result's text is the first image's. Initial latents given by the caller were not
    drawn from the seed, so no seed is recorded."""
    from sdrt.runtime.infotext import parse
    result = Pipeline.load(batch2)(["a red cube", "a blue sphere"], negative_prompt=["", "green"], steps=2, seed=5)
    read = [parse(image.info["parameters"]) for image in result.images]
    assert [(r.prompt, r.negative_prompt) for r in read] == [("a red cube", ""), ("a blue sphere", "green")]
    assert all(r.fields["Seed"] == "5" and r.fields["Steps"] == "2" for r in read)
    assert result.parameters == result.images[0].info["parameters"]
    pipe = Pipeline.load(batch2)
    given = pipe("a fox", steps=2, seed=5, latents=_latents(pipe, seed=1))
    assert "Seed" not in parse(given.parameters).fields and "Steps" in parse(given.parameters).fields


def test_no_cfg_artifact_runs_batch_one_and_refuses_guidance(tiny_sd15, export_into, tmp_path_factory, oracle):
    # verify=False: export checks its own graphs in its tests; here only the shapes differ.
    folder = export_into(tiny_sd15, tmp_path_factory.mktemp("nocfg") / "sd15-nocfg", cfg=False, verify=False)
    pipe = Pipeline.load(folder)
    assert pipe.engines[Stage.UNET].spec.inputs[0].shape[0] == 1
    latents = _latents(pipe, seed=2)
    result = pipe(PROMPT, steps=5, guidance=1.0, scheduler="dpmpp_2m", latents=latents)
    assert _max_diff(result.pixels, oracle(tiny_sd15, PROMPT, latents, 5, 1.0, "dpmpp_2m")) <= TOL
    with pytest.raises(InvalidInput, match="guidance 7.5 needs classifier-free guidance.*--no-cfg"):
        pipe(PROMPT, guidance=7.5)
    # No guidance asked: the artifact's default (1.0, no CFG) just works.
    default = pipe(PROMPT, steps=5, scheduler="dpmpp_2m", latents=latents)
    assert default.config.guidance == 1.0 and np.array_equal(default.pixels, result.pixels)
    # A negative prompt cannot be used without CFG: said, and not recorded.
    with pytest.warns(IgnoredSetting, match="negative prompt is ignored: this artifact was exported with --no-cfg"):
        ignored = pipe(PROMPT, negative_prompt="blurry", steps=5, scheduler="dpmpp_2m", latents=latents)
    assert ignored.config.negative_prompt == "" and np.array_equal(ignored.pixels, result.pixels)


def test_result_holds_images_pixels_timings_and_settings(variants):
    _, pipe = variants["sd15"]
    result = pipe(PROMPT, steps=4, scheduler="euler", seed=1234)
    b, h, w = pipe.batch, pipe.height, pipe.width
    assert result.pixels.shape == (b, h, w, 3) and result.pixels.dtype == np.float32
    assert 0.0 <= result.pixels.min() and result.pixels.max() <= 1.0
    assert [im.size for im in result.images] == [(w, h)] * b and result.images[0].mode == "RGB"
    # 8-bit images are the pixels rounded the way diffusers' numpy_to_pil does it.
    np.testing.assert_array_equal(np.asarray(result.images[0]), (result.pixels[0] * 255).round().astype(np.uint8))
    t = result.timings
    assert len(t.steps) == len(t.unet) == 4
    assert all(u <= s for u, s in zip(t.unet, t.steps))
    assert t.total >= t.text_encoder + sum(t.steps) + t.vae_decoder
    assert result.seed == 1234 and result.config.scheduler == "euler" and result.config.steps == 4


@pytest.mark.parametrize("scheduler", ["euler_a", "lcm", "ddim"])
def test_same_seed_gives_the_same_image_and_another_seed_a_different_one(variants, scheduler):
    _, pipe = variants["sd15"]
    a = pipe(PROMPT, steps=4, scheduler=scheduler, seed=42).pixels
    b = pipe(PROMPT, steps=4, scheduler=scheduler, seed=42).pixels
    c = pipe(PROMPT, steps=4, scheduler=scheduler, seed=43).pixels
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-3


def test_stochastic_sampler_draws_fresh_noise_from_the_seed(variants):
    # With the initial latents fixed, only the per-step noise depends on the seed.
    _, pipe = variants["sd15"]
    latents = _latents(pipe, seed=0)
    a = pipe(PROMPT, steps=4, scheduler="euler_a", seed=1, latents=latents).pixels
    b = pipe(PROMPT, steps=4, scheduler="euler_a", seed=2, latents=latents).pixels
    assert np.abs(a - b).max() > 1e-3


def test_seed_draws_the_initial_latents_as_torchs_cpu_generator_does(variants):
    import torch
    _, pipe = variants["sd2"]
    from_seed = pipe(PROMPT, steps=3, scheduler="ddim", seed=99).pixels
    drawn = torch.randn(pipe.latent_shape, generator=torch.Generator("cpu").manual_seed(99)).numpy()
    np.testing.assert_array_equal(from_seed, pipe(PROMPT, steps=3, scheduler="ddim", latents=drawn).pixels)
    # generator="numpy": sdrt 0.1's numpy.random.default_rng(seed)
    from_numpy = pipe(PROMPT, steps=3, scheduler="ddim", seed=99, generator="numpy").pixels
    np.testing.assert_array_equal(from_numpy, pipe(PROMPT, steps=3, scheduler="ddim",
                                                   latents=_latents(pipe, seed=99)).pixels)


def test_no_seed_draws_a_random_one_and_reports_it(variants):
    _, pipe = variants["sd2"]
    first = pipe(PROMPT, steps=2, scheduler="euler")
    again = pipe(PROMPT, steps=2, scheduler="euler", seed=first.seed)
    assert 0 <= first.seed < 2**64
    np.testing.assert_array_equal(first.pixels, again.pixels)


def test_threads_sharing_one_pipeline_each_get_their_own_image(variants):
    _, pipe = variants["sd2"]
    seeds = [1, 2, 3, 4]
    alone = {s: pipe(PROMPT, steps=3, scheduler="euler_a", seed=s).pixels for s in seeds}
    shared = {}

    def work(s):
        shared[s] = pipe(PROMPT, steps=3, scheduler="euler_a", seed=s).pixels

    threads = [threading.Thread(target=work, args=(s,)) for s in seeds]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for s in seeds:
        np.testing.assert_array_equal(shared[s], alone[s])


class _Poisoned:
    """Wraps an engine so one output becomes NaN (what an fp16 overflow looks like)."""

    def __init__(self, engine, call=0):
        self.engine, self.calls, self.bad_call = engine, 0, call
        self.spec = engine.spec

    def __call__(self, inputs):
        out = self.engine(inputs)
        self.calls += 1
        if self.calls - 1 == self.bad_call:
            out = {k: np.full_like(v, np.nan) for k, v in out.items()}
        return out

    def last_time(self):
        return None


@pytest.mark.parametrize("stage, words", [
    (Stage.TEXT_ENCODER, "the text encoder produced"),
    (Stage.UNET, "the U-Net at step 3 of 4"),
    (Stage.VAE_DECODER, "the VAE decoder produced .*--vae-precision fp32"),
])
def test_nan_from_a_stage_is_a_numerics_error_naming_it(sd15_artifacts, stage, words):
    pipe = Pipeline.load(sd15_artifacts)
    pipe.engines[stage] = _Poisoned(pipe.engines[stage], call=2 if stage is Stage.UNET else 0)
    with pytest.raises(NumericsError, match=words):
        pipe(PROMPT, steps=4, scheduler="euler", seed=0)


class _Constant(_Poisoned):
    """Wraps an engine so one call's outputs become a constant."""

    def __init__(self, engine, call, value):
        super().__init__(engine, call)
        self.value = value

    def __call__(self, inputs):
        out = self.engine(inputs)
        self.calls += 1
        return {k: np.full_like(v, self.value) for k, v in out.items()} if self.calls - 1 == self.bad_call else out


@pytest.mark.parametrize("scheduler", ["ddim", "pndm", "euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras", "lcm"])
@pytest.mark.parametrize("where", ["middle", "last"])
def test_unet_nan_reaches_the_check_for_every_sampler_at_any_call(sd15_artifacts, scheduler, where):
    """The pipeline checks the latents once per step; that is enough only if a NaN from
    the U-Net enters every sampler's update, the last one (coefficients 0 or 1) included."""
    pipe = Pipeline.load(sd15_artifacts)
    calls = len(pipe.artifact.sampler(scheduler, 4).timesteps)
    bad = 1 if where == "middle" else calls - 1
    pipe.engines[Stage.UNET] = _Poisoned(pipe.engines[Stage.UNET], call=bad)
    with pytest.raises(NumericsError, match=rf"the U-Net at step {bad + 1} of {calls} "):
        pipe(PROMPT, steps=4, scheduler=scheduler, seed=0)


def test_finite_unet_output_overflowing_in_the_sampler_is_blamed_on_the_sampler(sd15_artifacts):
    pipe = Pipeline.load(sd15_artifacts)
    # Finite, but sigma * output overflows float32 in Euler's first update.
    pipe.engines[Stage.UNET] = _Constant(pipe.engines[Stage.UNET], call=0, value=3e38)
    with pytest.raises(NumericsError, match="the sampler at step 1 of 4"):
        pipe(PROMPT, steps=4, guidance=1.0, scheduler="euler", seed=0)


def test_onnxruntime_engine_time_is_the_run_itself_not_the_callers_checks(sd15_artifacts):
    import time

    pipe = Pipeline.load(sd15_artifacts)
    engine = pipe.engines[Stage.UNET]
    assert engine.last_time() is None
    inputs = {t.name: np.zeros(t.shape, t.dtype.numpy) for t in engine.spec.inputs}
    start = time.perf_counter()
    engine(inputs)
    wall = time.perf_counter() - start
    assert 0 < engine.last_time() < wall
    result = pipe(PROMPT, steps=3, scheduler="euler", seed=0)
    assert all(0 < u < s for u, s in zip(result.timings.unet, result.timings.steps))
