"""The SDXL refiner and the base -> refiner hand-off ("ensemble of expert denoisers"):
same seed, same image as diffusers' StableDiffusionXLPipeline(denoising_end=f,
output_type="latent") followed by StableDiffusionXLImg2ImgPipeline(denoising_start=f),
one torch.Generator passed to both; and the refiner alone on an image, as
StableDiffusionXLImg2ImgPipeline with its aesthetic-score time ids."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from sdrt.cli.main import main
from sdrt.engines.errors import InvalidInput
from sdrt.engines.specs import TIME_IDS, Stage
from sdrt.runtime import Pipeline
from sdrt.runtime.schedulers import diffusers_scheduler

TOL = 1e-4
STEPS = 6


@pytest.fixture(scope="module")
def models(tiny_sdxl, tiny_sdxl_refiner):
    return tiny_sdxl, tiny_sdxl_refiner


@pytest.fixture(scope="module")
def pipes(models, tmp_path_factory, export_into):
    root = tmp_path_factory.mktemp("artifacts")
    # verify=False: export checks its graphs in its own tests; these compare pixels with diffusers
    base, refiner = (export_into(m, root / m.name, verify=False) for m in models)
    return Pipeline.load(base), Pipeline.load(refiner)


class Diffusers:
    def __init__(self, models):
        import diffusers
        self.base = diffusers.StableDiffusionXLPipeline.from_pretrained(models[0])
        self.refiner = diffusers.StableDiffusionXLImg2ImgPipeline.from_pretrained(models[1])
        for p in (self.base, self.refiner):
            p.set_progress_bar_config(disable=True)
        self.configs = (self.base.scheduler.config, self.refiner.scheduler.config)

    def schedulers(self, name):
        import diffusers
        for pipe, config in zip((self.base, self.refiner), self.configs):
            cls, over = diffusers_scheduler(name, config)
            pipe.scheduler = getattr(diffusers, cls).from_config(config, **over)

    def ensemble(self, seed, frac, **kw):
        import torch
        g = torch.Generator("cpu").manual_seed(seed)
        with torch.no_grad():
            latents = self.base(num_inference_steps=STEPS, denoising_end=frac, output_type="latent", generator=g,
                                **kw).images
            return self.refiner(image=latents, num_inference_steps=STEPS, denoising_start=frac, output_type="np",
                                generator=g, **kw).images


@pytest.fixture(scope="module")
def oracle(models):
    return Diffusers(models)


def test_refiner_checkpoint_is_diffusers_layout_and_exports_its_own_family(models, pipes):
    index = json.loads((models[1] / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLImg2ImgPipeline" and index["text_encoder"] == [None, None]
    assert index["requires_aesthetics_score"] is True
    refiner = pipes[1]
    assert refiner.manifest.facts.family == "sdxl-refiner"
    assert refiner.manifest.stages == (Stage.TEXT_ENCODER_2, Stage.UNET, Stage.VAE_ENCODER, Stage.VAE_DECODER)
    assert refiner.manifest.specs[Stage.UNET].input(TIME_IDS).shape[1] == 5   # size, crop, aesthetic score


@pytest.mark.parametrize("scheduler,frac", [(None, 0.8), (None, 0.5), ("euler_a", 0.8), ("dpmpp_2m", 0.7)])
def test_base_to_refiner_hand_off_matches_diffusers(oracle, pipes, scheduler, frac):
    if scheduler:
        oracle.schedulers(scheduler)
    try:
        expected = oracle.ensemble(7, frac, prompt="a fox", negative_prompt="blurry", guidance_scale=5.0)
    finally:
        oracle.schedulers("euler")   # both checkpoints' own class
    base, refiner = pipes
    got = base.refine(refiner, "a fox", high_noise_frac=frac, negative_prompt="blurry", steps=STEPS, guidance=5.0,
                      seed=7, scheduler=scheduler)
    assert float(np.abs(got.pixels - expected).max()) <= TOL


def test_base_stops_at_denoising_end_and_returns_latents(pipes):
    base, _ = pipes
    result = base("a fox", steps=STEPS, seed=1, denoising_end=0.8)
    assert result.images == [] and result.pixels is None
    # Euler, "leading" spacing with steps_offset 1: timesteps 831, 665, 499, 333, 167, 1;
    # diffusers keeps those >= round(1000 - 0.8 * 1000) = 200.
    assert result.latents.shape == base.latent_shape and len(result.timings.unet) == 4


def test_refiner_alone_is_sdxl_img2img_with_aesthetic_scores(oracle, pipes):
    import torch
    _, refiner = pipes
    h, w = refiner.height, refiner.width
    y, x = np.mgrid[0:h, 0:w]
    image = Image.fromarray((np.stack([x / w, y / h, 0.5 + 0.5 * np.sin(x / 5.0)], -1) * 255).astype(np.uint8))
    with torch.no_grad():
        expected = oracle.refiner("a fox", image=image, strength=0.5, num_inference_steps=STEPS, guidance_scale=5.0,
                                  aesthetic_score=7.0, negative_aesthetic_score=2.0, output_type="np",
                                  generator=torch.Generator("cpu").manual_seed(4)).images
    got = refiner("a fox", image=image, strength=0.5, steps=STEPS, guidance=5.0, seed=4, aesthetic_score=7.0,
                  negative_aesthetic_score=2.0)
    assert float(np.abs(got.pixels - expected).max()) <= TOL


def test_refiner_refuses_text_to_image_and_hand_off_checks_before_running(pipes):
    base, refiner = pipes
    with pytest.raises(InvalidInput, match="cannot do txt2img"):
        refiner("a fox", steps=2)
    with pytest.raises(InvalidInput, match="not an SDXL refiner"):
        base.refine(base, "a fox", steps=2)
    with pytest.raises(InvalidInput, match="denoising_end must be in \\(0, 1\\)"):
        base.refine(refiner, "a fox", high_noise_frac=1.5, steps=2)


def test_cli_runs_base_and_refiner_in_one_command(pipes, tmp_path, capsys):
    base, refiner = pipes
    out = tmp_path / "fox.png"
    assert main(["generate", str(base.folder), "--refiner", str(refiner.folder), "--prompt", "a fox",
                 "--steps", str(STEPS), "--guidance", "5", "--seed", "7", "--out", str(out)]) == 0
    expected = base.refine(refiner, "a fox", steps=STEPS, guidance=5.0, seed=7)
    with Image.open(out) as im:
        assert np.array_equal(np.asarray(im), np.asarray(expected.images[0]))
        text = im.info["parameters"]
    assert text == expected.parameters
    assert ", Refiner: " in text and ", Refiner switch at: 0.8, " in text and "Denoising strength" not in text
