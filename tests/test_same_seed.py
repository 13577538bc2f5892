"""Same seed, same image as diffusers: `Pipeline(..., seed=s)` against diffusers on CPU
with `generator=torch.Generator("cpu").manual_seed(s)`, for text-to-image with every
sampler, image-to-image and inpainting (9-channel and 4-channel U-Nets), on the SD 1
and SD 2 tiny models and on a model written here (non-square size, a VAE that
downscales by 4) that no other test uses.

Every draw (initial latents, the VAE encoder's latent sample, image-to-image noise,
each stochastic step) must come from the seed in diffusers' order for these to match.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image, ImageDraw

from sdrt.engines.errors import InvalidInput
from sdrt.runtime import Pipeline
from sdrt.runtime.schedulers import SAMPLERS, diffusers_scheduler

TOL = 1e-4   # max abs on pixels in [0, 1] (the bar)
PROMPT = "a watercolor fox, highly detailed"
NEGATIVE = "blurry"


class Oracle:
    """diffusers pipelines of one checkpoint folder, the scheduler swapped per call."""

    def __init__(self, model_dir):
        import diffusers
        self.model_dir = model_dir
        index = json.loads((model_dir / "model_index.json").read_text())
        self.inpainting = index["_class_name"] == "StableDiffusionInpaintPipeline"
        base = getattr(diffusers, index["_class_name"]).from_pretrained(
            model_dir, safety_checker=None, requires_safety_checker=False)
        self.config = base.scheduler.config
        self.pipes = {"inpaint": diffusers.StableDiffusionInpaintPipeline(**base.components)}
        if not self.inpainting:
            self.pipes["txt2img"] = diffusers.StableDiffusionPipeline(**base.components)
            self.pipes["img2img"] = diffusers.StableDiffusionImg2ImgPipeline(**base.components)
        for p in self.pipes.values():
            p.set_progress_bar_config(disable=True)

    def __call__(self, task, scheduler, seed, size, **kw):
        """size: the artifact's (height, width); inputs of another size are resized to it
        by diffusers' own preprocessing (img2img takes no size, so it gets the image
        already resized by its image processor)."""
        import diffusers
        import torch
        pipe = self.pipes[task]
        if task == "img2img":
            kw["image"] = pipe.image_processor.resize(kw["image"], height=size[0], width=size[1])
        else:
            kw.update(height=size[0], width=size[1])
        cls_name, overrides = diffusers_scheduler(scheduler, self.config)
        pipe.scheduler = getattr(diffusers, cls_name).from_config(self.config, **overrides)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)   # see test_pipeline.Diffusers: spinning OpenMP threads on 2 cores
        try:
            with torch.no_grad():
                return pipe(generator=torch.Generator("cpu").manual_seed(seed), output_type="np", **kw).images
        finally:
            torch.set_num_threads(threads)


def _max_diff(a, b):
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max())


def _photo(width, height, seed=0):
    """A smooth test picture with some texture, of a size other than the artifact's."""
    y, x = np.mgrid[0:height, 0:width]
    rng = np.random.default_rng(seed)
    rgb = np.stack([x / width, y / height, 0.5 + 0.5 * np.sin(x / 7.0 + y / 11.0)], axis=-1)
    rgb = np.clip(rgb + rng.normal(0, 0.05, rgb.shape), 0, 1)
    return Image.fromarray((rgb * 255).round().astype(np.uint8))


def _mask(kind, width, height):
    m = Image.new("L", (width, height), 0)
    d = ImageDraw.Draw(m)
    if kind == "rectangle":
        d.rectangle([width // 4, height // 3, 3 * width // 4, 2 * height // 3], fill=255)
    elif kind == "circle":
        d.ellipse([width // 5, height // 5, 4 * width // 5, 4 * height // 5], fill=255)
    elif kind == "blobs":   # several soft-edged regions: binarized at 0.5 as diffusers does
        rng = np.random.default_rng(3)
        for _ in range(4):
            cx, cy, r = rng.integers(0, width), rng.integers(0, height), rng.integers(4, max(5, width // 4))
            d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=int(rng.integers(100, 256)))
    elif kind == "left-half":
        d.rectangle([0, 0, width // 2, height], fill=255)
    return m


@pytest.fixture(scope="module")
def sd15(tiny_sd15, sd15_artifacts):
    return Oracle(tiny_sd15), Pipeline.load(sd15_artifacts)


@pytest.fixture(scope="module")
def sd2(tiny_sd2, sd2_artifacts):
    return Oracle(tiny_sd2), Pipeline.load(sd2_artifacts)


@pytest.fixture(scope="module")
def sd15_inpaint(tmp_path_factory, export_into):
    from sdrt.export.tiny import make_tiny_model
    model = make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-sd15-inpaint", variant="sd15-inpaint")
    art = export_into(model, tmp_path_factory.mktemp("artifacts") / "sd15-inpaint")
    return Oracle(model), Pipeline.load(art)


@pytest.fixture(scope="module")
def other(tmp_path_factory, export_into):
    """An SD 1-family checkpoint no other test uses: a VAE with three levels (4 pixels per
    latent), an Euler config with trailing spacing, exported non-square (96 wide, 64 high)."""
    import diffusers
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from sdrt.export.tiny import write_tokenizer
    from sdrt.export.vocab import EOS
    folder = tmp_path_factory.mktemp("models") / "other"
    torch.manual_seed(7)
    unet = diffusers.UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        norm_num_groups=8, cross_attention_dim=24, attention_head_dim=4)
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=1, norm_num_groups=4, sample_size=64, scaling_factor=0.13025)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=24, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, max_position_embeddings=77, hidden_act="gelu"))
    write_tokenizer(tmp_path_factory.mktemp("tok") / "t", EOS)
    scheduler = diffusers.EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                                 timestep_spacing="trailing", steps_offset=1)
    tok_dir = next(tmp_path_factory.getbasetemp().glob("tok*/t"))
    pipe = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=CLIPTokenizer.from_pretrained(tok_dir),
                                             unet=unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)
    pipe.save_pretrained(folder)
    # transformers 5's save_pretrained writes tokenizer.json + tokenizer_config.json only.
    assert sorted(p.name for p in (folder / "tokenizer").iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    art = export_into(folder, tmp_path_factory.mktemp("artifacts") / "other", height=64, width=96)
    return Oracle(folder), Pipeline.load(art)


# -- text to image ------------------------------------------------------------------------


# Every sampler, and each sigma ramp on one sampler that takes them.
@pytest.mark.parametrize("scheduler", SAMPLERS + ("dpmpp_2m_karras", "euler_exponential", "dpmpp_2m_sde_beta"))
def test_text_to_image_with_a_seed_matches_diffusers_for_every_scheduler(sd15, scheduler):
    oracle, pipe = sd15
    ours = pipe(PROMPT, negative_prompt=NEGATIVE, steps=4, guidance=7.5, scheduler=scheduler, seed=42).pixels
    want = oracle("txt2img", scheduler, 42, (pipe.height, pipe.width), prompt=PROMPT, negative_prompt=NEGATIVE, num_inference_steps=4,
                  guidance_scale=7.5)
    assert _max_diff(ours, want) <= TOL


# Not pndm: this config has no skip_prk_steps, so PNDM runs its Runge-Kutta warm-up, which
# needs 4 steps (3 crash diffusers and are refused by sdrt).
@pytest.mark.parametrize("scheduler", tuple(s for s in SAMPLERS if s != "pndm") + ("dpmpp_2m_karras",))
def test_text_to_image_with_a_seed_matches_diffusers_on_a_v_prediction_model(sd2, scheduler):
    oracle, pipe = sd2
    ours = pipe(PROMPT, steps=3, guidance=5.0, scheduler=scheduler, seed=2**40 + 3).pixels
    want = oracle("txt2img", scheduler, 2**40 + 3, (pipe.height, pipe.width), prompt=PROMPT, num_inference_steps=3, guidance_scale=5.0)
    assert _max_diff(ours, want) <= TOL


def test_seeds_equal_below_32_bits_give_one_image_as_in_torch_and_numpy_gives_another(sd15):
    """torch's CPU generator seeds MT19937 with the seed's low 32 bits, so diffusers gives
    one image for 5 and 5 + 2**32; sdrt 0.1's NumPy generator remains selectable."""
    _, pipe = sd15
    a = pipe(PROMPT, steps=2, scheduler="euler_a", seed=5).pixels
    assert _max_diff(a, pipe(PROMPT, steps=2, scheduler="euler_a", seed=5 + 2**32).pixels) == 0
    assert _max_diff(a, pipe(PROMPT, steps=2, scheduler="euler_a", seed=6).pixels) > 1e-3
    numpy_image = pipe(PROMPT, steps=2, scheduler="euler_a", seed=5, generator="numpy").pixels
    assert _max_diff(a, numpy_image) > 1e-3
    # sdrt 0.1's draw: the initial latents are numpy.random.default_rng(seed)'s first normals.
    latents = np.random.default_rng(5).standard_normal(pipe.latent_shape, dtype=np.float32)
    assert _max_diff(pipe(PROMPT, steps=2, scheduler="ddim", seed=5, generator="numpy").pixels,
                     pipe(PROMPT, steps=2, scheduler="ddim", latents=latents).pixels) == 0


# -- image to image -----------------------------------------------------------------------


@pytest.mark.parametrize("strength", [0.3, 0.75, 1.0])
@pytest.mark.parametrize("scheduler", ["euler_a", "dpmpp_2m", "pndm", "lcm", "heun", "kdpm2_a", "dpmpp_2m_sde",
                                       "unipc", "ddpm"])
def test_image_to_image_matches_diffusers(sd15, scheduler, strength):
    oracle, pipe = sd15
    image = _photo(100, 70)   # resized to the artifact's 128x128 as diffusers does
    ours = pipe(PROMPT, negative_prompt=NEGATIVE, image=image, strength=strength, steps=6, guidance=7.5,
                scheduler=scheduler, seed=11).pixels
    want = oracle("img2img", scheduler, 11, (pipe.height, pipe.width), prompt=PROMPT, negative_prompt=NEGATIVE, image=image, strength=strength,
                  num_inference_steps=6, guidance_scale=7.5)
    assert _max_diff(ours, want) <= TOL


def test_image_as_uint8_array_equals_the_pil_image(sd15):
    _, pipe = sd15
    image = _photo(128, 128)
    a = pipe(PROMPT, image=image, strength=0.5, steps=4, seed=1).pixels
    b = pipe(PROMPT, image=np.asarray(image), strength=0.5, steps=4, seed=1).pixels
    assert _max_diff(a, b) == 0


# -- inpainting -----------------------------------------------------------------------------


@pytest.mark.parametrize("strength", [1.0, 0.6])
@pytest.mark.parametrize("mask", ["rectangle", "circle", "blobs"])
def test_inpainting_checkpoint_matches_diffusers(sd15_inpaint, mask, strength):
    oracle, pipe = sd15_inpaint
    image, mask_image = _photo(128, 128, seed=1), _mask(mask, 128, 128)
    for scheduler in ("euler_a", "ddim"):
        ours = pipe(PROMPT, negative_prompt=NEGATIVE, image=image, mask_image=mask_image, strength=strength, steps=5,
                    scheduler=scheduler, seed=3).pixels
        want = oracle("inpaint", scheduler, 3, (pipe.height, pipe.width), prompt=PROMPT, negative_prompt=NEGATIVE, image=image,
                      mask_image=mask_image, strength=strength, num_inference_steps=5)
        assert _max_diff(ours, want) <= TOL, scheduler


@pytest.mark.parametrize("strength", [1.0, 0.6])
@pytest.mark.parametrize("mask", ["rectangle", "blobs"])
def test_inpainting_with_a_regular_checkpoint_matches_diffusers(sd15, mask, strength):
    oracle, pipe = sd15
    image, mask_image = _photo(90, 140, seed=2), _mask(mask, 90, 140)
    for scheduler in ("euler_a", "dpmpp_2m"):
        ours = pipe(PROMPT, image=image, mask_image=mask_image, strength=strength, steps=5, scheduler=scheduler,
                    seed=8).pixels
        want = oracle("inpaint", scheduler, 8, (pipe.height, pipe.width), prompt=PROMPT, image=image, mask_image=mask_image, strength=strength,
                      num_inference_steps=5)
        assert _max_diff(ours, want) <= TOL, scheduler


def test_inpainting_artifact_refuses_text_to_image_and_image_to_image(sd15_inpaint):
    _, pipe = sd15_inpaint
    with pytest.raises(InvalidInput, match="inpainting model"):
        pipe(PROMPT, steps=2, seed=1)
    with pytest.raises(InvalidInput, match="inpainting model"):
        pipe(PROMPT, image=_photo(128, 128), steps=2, seed=1)


# -- a model written here: non-square, VAE downscale 4, trailing Euler ----------------------


def test_other_model_non_square_saved_by_transformers_5_matches_diffusers_in_every_task(other):
    oracle, pipe = other
    assert (pipe.height, pipe.width, pipe.latent_shape) == (64, 96, (1, 4, 16, 24))
    size = (64, 96)
    for scheduler in ("euler", "euler_a"):
        ours = pipe(PROMPT, steps=3, scheduler=scheduler, seed=9).pixels
        want = oracle("txt2img", scheduler, 9, size, prompt=PROMPT, num_inference_steps=3)
        assert _max_diff(ours, want) <= TOL, ("txt2img", scheduler)
    image, mask = _photo(120, 80), _mask("left-half", 120, 80)
    ours = pipe(PROMPT, image=image, strength=0.7, steps=4, scheduler="euler_a", seed=9).pixels
    want = oracle("img2img", "euler_a", 9, size, prompt=PROMPT, image=image, strength=0.7, num_inference_steps=4)
    assert _max_diff(ours, want) <= TOL, "img2img"
    ours = pipe(PROMPT, image=image, mask_image=mask, strength=1.0, steps=4, scheduler="euler_a", seed=9).pixels
    want = oracle("inpaint", "euler_a", 9, size, prompt=PROMPT, image=image, mask_image=mask, num_inference_steps=4)
    assert _max_diff(ours, want) <= TOL, "inpaint"


# -- outpainting: inpainting of the extended canvas under its own mask ---------------------


@pytest.mark.parametrize("model", ["sd15_inpaint", "sd15"])
def test_outpainting_equals_diffusers_inpainting_the_extended_canvas(request, model):
    """The canvas (edge-extended fill) and mask (new area plus a feathered seam) come
    from `inputs.outpaint_canvas`; what is generated from them must be diffusers'
    inpainting of exactly that canvas and mask."""
    from sdrt.runtime.inputs import outpaint_canvas
    oracle, pipe = request.getfixturevalue(model)
    image, margins = _photo(96, 80, seed=4), (16, 48, 16, 0)   # grown upwards and sideways to 128x128
    canvas, mask = outpaint_canvas(image, margins)
    assert canvas.size == (128, 128) and mask.size == canvas.size
    ours = pipe(PROMPT, image=image, outpaint="16,48,16,0", steps=4, scheduler="euler_a", seed=12)
    want = oracle("inpaint", "euler_a", 12, (pipe.height, pipe.width), prompt=PROMPT, image=canvas, mask_image=mask,
                  num_inference_steps=4)
    assert _max_diff(ours.pixels, want) <= TOL
    assert ours.config.task.value == "outpaint" and ours.config.strength == 1.0
    with pytest.raises(InvalidInput, match="margins 16,48,16,16 give the model's aspect ratio"):
        pipe(PROMPT, image=_photo(96, 64), outpaint=(16, 32, 16, 0), steps=2)


def test_batch_of_two_with_one_image_matches_diffusers(sd15, sd15_batch2_artifacts):
    """One input image for every batch item: encoded once (one latent-sample draw) and
    repeated, then one noise draw for the whole batch, as diffusers does."""
    oracle, _ = sd15
    pipe = Pipeline.load(sd15_batch2_artifacts)
    prompts = [PROMPT, "a red barn"]
    image, mask = _photo(128, 128, seed=5), _mask("circle", 128, 128)
    ours = pipe(prompts, image=image, strength=0.8, steps=5, scheduler="euler_a", seed=21).pixels
    want = oracle("img2img", "euler_a", 21, (128, 128), prompt=prompts, image=image, strength=0.8,
                  num_inference_steps=5)
    assert ours.shape[0] == 2 and _max_diff(ours, want) <= TOL
    ours = pipe(prompts, image=image, mask_image=mask, strength=0.6, steps=5, scheduler="dpmpp_2m", seed=21).pixels
    want = oracle("inpaint", "dpmpp_2m", 21, (128, 128), prompt=prompts, image=image, mask_image=mask, strength=0.6,
                  num_inference_steps=5)
    assert _max_diff(ours, want) <= TOL
