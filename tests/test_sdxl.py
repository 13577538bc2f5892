"""SDXL base text-to-image: same seed, same image as diffusers' StableDiffusionXLPipeline
on CPU with `generator=torch.Generator("cpu").manual_seed(s)`, on the built-in tiny SDXL
checkpoint (`sdrt tiny-model --variant sdxl`).

What the oracle does that sdrt must follow (diffusers' pipeline_stable_diffusion_xl.py):
- both text encoders' penultimate hidden states, concatenated on the feature axis; the
  pooled `text_embeds` from the second (CLIPTextModelWithProjection) only;
- prompt_2 / negative_prompt_2 default to prompt / negative_prompt (`or`: "" too);
- negative_prompt None with force_zeros_for_empty_prompt: all-zero negative embeddings
  and pooled embedding; negative_prompt "" is encoded like any other prompt;
- time ids: original_size + crops_coords_top_left + target_size, defaulting to the
  image's (height, width), (0, 0), (height, width), the same for the negative half;
- clip_skip n: hidden_states[-(n + 2)] for the prompts, [-2] still for the negatives;
- guidance <= 1: no CFG, the conditional half only.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image, ImageDraw

from sdrt.runtime import Pipeline
from sdrt.runtime.schedulers import diffusers_scheduler

TOL = 1e-4   # max abs on pixels in [0, 1] (the bar)
PROMPT = "a watercolor fox, highly detailed"
PROMPT_2 = "an oil painting of a harbour at dusk"
NEGATIVE = "blurry"
NEGATIVE_2 = "low contrast, jpeg artifacts"
WIDE = (64, 128)   # (height, width) of the non-square export


class Oracle:
    """diffusers' StableDiffusionXLPipeline of one checkpoint folder, the scheduler
    swapped per call (None: the checkpoint's own)."""

    def __init__(self, model_dir):
        import diffusers
        # No invisible watermark: diffusers adds it when the package is installed.
        self.pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(model_dir, add_watermarker=False)
        self.pipe.set_progress_bar_config(disable=True)
        self.own = type(self.pipe.scheduler)
        self.config = self.pipe.scheduler.config

    def __call__(self, scheduler, seed, size, **kw):
        """size: the artifact's (height, width)."""
        import diffusers
        import torch
        if scheduler is None:
            self.pipe.scheduler = self.own.from_config(self.config)
        else:
            cls_name, overrides = diffusers_scheduler(scheduler, self.config)
            self.pipe.scheduler = getattr(diffusers, cls_name).from_config(self.config, **overrides)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)   # see test_pipeline.Diffusers: spinning OpenMP threads on 2 cores
        try:
            with torch.no_grad():
                return self.pipe(generator=torch.Generator("cpu").manual_seed(seed), output_type="np",
                                 height=size[0], width=size[1], **kw).images
        finally:
            torch.set_num_threads(threads)


def _max_diff(a, b):
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max())


@pytest.fixture(scope="module")
def oracle(tiny_sdxl):
    return Oracle(tiny_sdxl)


@pytest.fixture(scope="module")
def sdxl(tiny_sdxl, export_into, tmp_path_factory):
    """The default export: native 128x128, batch 1, CFG."""
    return Pipeline.load(export_into(tiny_sdxl, tmp_path_factory.mktemp("artifacts") / "sdxl"))


@pytest.fixture(scope="module")
def sdxl_wide(tiny_sdxl, export_into, tmp_path_factory):
    return Pipeline.load(export_into(tiny_sdxl, tmp_path_factory.mktemp("artifacts") / "sdxl-wide",
                                     height=WIDE[0], width=WIDE[1]))


def _ours(pipe, prompt=PROMPT, negative_prompt=None, steps=4, guidance=5.0, scheduler=None, seed=3, **kw):
    return pipe(prompt, negative_prompt=negative_prompt, steps=steps, guidance=guidance, scheduler=scheduler,
                seed=seed, **kw).pixels


def _want(oracle, pipe, prompt=PROMPT, negative_prompt=None, steps=4, guidance=5.0, scheduler=None, seed=3, **kw):
    return oracle(scheduler, seed, (pipe.height, pipe.width), prompt=prompt, negative_prompt=negative_prompt,
                  num_inference_steps=steps, guidance_scale=guidance, **kw)


# -- the checkpoint ---------------------------------------------------------------------------


def test_tiny_sdxl_has_sdxl_base_layout(oracle):
    """Two encoders of different widths (a swap or a missing one changes the shapes), the
    pooled embedding narrower than the second encoder's hidden state, and the base
    model's scheduler, VAE scaling and empty-prompt zeros."""
    pipe = oracle.pipe
    te1, te2, unet = pipe.text_encoder.config, pipe.text_encoder_2.config, pipe.unet.config
    assert type(pipe.text_encoder).__name__ == "CLIPTextModel"
    assert type(pipe.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    assert te1.hidden_size != te2.hidden_size and te2.projection_dim != te2.hidden_size
    assert unet.cross_attention_dim == te1.hidden_size + te2.hidden_size
    assert unet.addition_embed_type == "text_time"
    assert unet.projection_class_embeddings_input_dim == 6 * unet.addition_time_embed_dim + te2.projection_dim
    assert list(unet.down_block_types) == ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]
    assert te1.vocab_size == te2.vocab_size == 49408
    assert pipe.tokenizer.pad_token == "<|endoftext|>" and pipe.tokenizer_2.pad_token == "!"
    assert pipe.vae_scale_factor == 8 and 64 <= unet.sample_size * 8 <= 128
    assert pipe.vae.config.scaling_factor == 0.13025 and pipe.vae.config.force_upcast
    assert pipe.config.force_zeros_for_empty_prompt
    assert type(pipe.scheduler).__name__ == "EulerDiscreteScheduler"
    cfg = pipe.scheduler.config
    assert (cfg.beta_schedule, cfg.beta_start, cfg.beta_end, cfg.steps_offset) == ("scaled_linear", 0.00085, 0.012, 1)
    assert (cfg.timestep_spacing, cfg.prediction_type, cfg.use_karras_sigmas) == ("leading", "epsilon", False)


def test_tiny_model_cli_writes_the_sdxl_checkpoint_diffusers_loads(tiny_sdxl, tmp_path, capsys):
    import diffusers

    from sdrt.cli.main import main
    out = tmp_path / "xl"
    assert main(["tiny-model", str(out), "--variant", "sdxl"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline" and index["force_zeros_for_empty_prompt"] is True
    # scheduler_config.json as stable-diffusion-xl-base-1.0 ships it, leftovers included.
    sched = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert {k: sched[k] for k in ("clip_sample", "set_alpha_to_one", "skip_prk_steps", "sample_max_value")} == {
        "clip_sample": False, "set_alpha_to_one": False, "skip_prk_steps": True, "sample_max_value": 1.0}
    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(out)
    assert type(pipe.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    for rel in ("unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
                "text_encoder/model.safetensors", "text_encoder_2/model.safetensors",
                "tokenizer_2/tokenizer_config.json"):
        assert (out / rel).read_bytes() == (tiny_sdxl / rel).read_bytes(), rel


# -- same seed, same image ----------------------------------------------------------------------


@pytest.mark.parametrize("negative", [None, NEGATIVE], ids=["zeros", "negative"])
@pytest.mark.parametrize("scheduler", [None, "dpmpp_2m_karras", "euler_a", "ddim"])
def test_sdxl_text_to_image_matches_diffusers(oracle, sdxl, scheduler, negative):
    """None: the checkpoint's own EulerDiscreteScheduler; no negative prompt: diffusers'
    force_zeros_for_empty_prompt zeros for both the embeddings and the pooled one."""
    ours = _ours(sdxl, negative_prompt=negative, scheduler=scheduler)
    want = _want(oracle, sdxl, negative_prompt=negative, scheduler=scheduler)
    assert _max_diff(ours, want) <= TOL


def test_empty_negative_prompt_is_encoded_not_zeroed_as_in_diffusers(oracle, sdxl):
    """diffusers zeroes the negative half only for negative_prompt=None; "" is encoded."""
    want = _want(oracle, sdxl, negative_prompt="", seed=5)
    assert _max_diff(want, _want(oracle, sdxl, negative_prompt=None, seed=5)) > 1e-3
    assert _max_diff(_ours(sdxl, negative_prompt="", seed=5), want) <= TOL


def test_second_prompts_go_to_the_second_text_encoder(oracle, sdxl):
    kw = dict(prompt_2=PROMPT_2, negative_prompt=NEGATIVE, negative_prompt_2=NEGATIVE_2, seed=7)
    want = _want(oracle, sdxl, **kw)
    assert _max_diff(want, _want(oracle, sdxl, negative_prompt=NEGATIVE, seed=7)) > 1e-3
    assert _max_diff(_ours(sdxl, **kw), want) <= TOL
    # prompt_2 alone, negative prompts zeroed.
    ours = _ours(sdxl, prompt_2=PROMPT_2, scheduler="euler_a", seed=8)
    assert _max_diff(ours, _want(oracle, sdxl, prompt_2=PROMPT_2, scheduler="euler_a", seed=8)) <= TOL


@pytest.mark.parametrize("conditions", [
    dict(original_size=(96, 160), crops_coords_top_left=(8, 24), target_size=(112, 80)),
    dict(original_size=(1024, 1024)),             # target_size still the artifact's size
    dict(crops_coords_top_left=(32, 0)),
], ids=["all", "original-size", "crop"])
def test_size_and_crop_conditions_match_diffusers(oracle, sdxl, conditions):
    want = _want(oracle, sdxl, negative_prompt=NEGATIVE, seed=11, **conditions)
    assert _max_diff(want, _want(oracle, sdxl, negative_prompt=NEGATIVE, seed=11)) > 1e-3
    assert _max_diff(_ours(sdxl, negative_prompt=NEGATIVE, seed=11, **conditions), want) <= TOL


@pytest.mark.parametrize("negative", [None, NEGATIVE], ids=["zeros", "negative"])
def test_clip_skip_counts_from_the_penultimate_layer_for_the_prompts_only(oracle, sdxl, negative):
    """diffusers' SDXL takes hidden_states[-(clip_skip + 2)] of both encoders for the
    prompts but always hidden_states[-2] for the negative prompts."""
    want = _want(oracle, sdxl, negative_prompt=negative, seed=19, clip_skip=1)
    assert _max_diff(want, _want(oracle, sdxl, negative_prompt=negative, seed=19)) > 1e-3
    assert _max_diff(_ours(sdxl, negative_prompt=negative, seed=19, clip_skip=1), want) <= TOL


@pytest.mark.parametrize("guidance", [1.0, 0.5])
def test_guidance_at_most_one_runs_without_cfg_as_in_diffusers(oracle, sdxl, guidance):
    ours = _ours(sdxl, guidance=guidance, scheduler="euler_a", seed=13)
    assert _max_diff(ours, _want(oracle, sdxl, guidance=guidance, scheduler="euler_a", seed=13)) <= TOL


@pytest.mark.slow   # an export of its own (30 s): the default run stays under 20 minutes
@pytest.mark.parametrize("scheduler", [None, "dpmpp_2m_karras"])
def test_non_square_export_matches_diffusers(oracle, sdxl_wide, scheduler):
    """64 high, 128 wide: the latents, the VAE and the default time ids (original and
    target size = the image's (height, width)) all follow the export's size."""
    assert (sdxl_wide.height, sdxl_wide.width, sdxl_wide.latent_shape) == (*WIDE, (1, 4, 8, 16))
    kw = dict(negative_prompt=NEGATIVE, prompt_2=PROMPT_2, scheduler=scheduler, seed=17)
    assert _max_diff(_ours(sdxl_wide, **kw), _want(oracle, sdxl_wide, **kw)) <= TOL
    kw = dict(scheduler=scheduler, seed=17, original_size=(256, 512), crops_coords_top_left=(0, 64))
    assert _max_diff(_ours(sdxl_wide, **kw), _want(oracle, sdxl_wide, **kw)) <= TOL


# -- image-to-image and inpainting -------------------------------------------------------------

def _picture(height, width):
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x / width, y / height, 0.5 + 0.5 * np.sin(x / 7.0 + y / 5.0)], axis=-1)
    return Image.fromarray((rgb * 255).round().astype(np.uint8))


def _box(height, width):
    mask = Image.new("L", (width, height), 0)
    ImageDraw.Draw(mask).rectangle([width // 4, height // 3, 3 * width // 4, 2 * height // 3], fill=255)
    return mask


def _image_pipe(oracle, cls_name, scheduler):
    import diffusers
    pipe = getattr(diffusers, cls_name)(**oracle.pipe.components)
    pipe.set_progress_bar_config(disable=True)
    if scheduler is None:   # the checkpoint's own (the oracle may hold another from an earlier test)
        pipe.scheduler = oracle.own.from_config(oracle.config)
    else:
        cls, over = diffusers_scheduler(scheduler, oracle.config)
        pipe.scheduler = getattr(diffusers, cls).from_config(oracle.config, **over)
    return pipe


@pytest.mark.parametrize("scheduler,strength", [(None, None), (None, 0.7), ("euler_a", 0.6), ("dpmpp_2m", 0.9)])
def test_sdxl_image_to_image_matches_diffusers(oracle, sdxl, scheduler, strength):
    import torch
    image = _picture(sdxl.height, sdxl.width)
    pipe = _image_pipe(oracle, "StableDiffusionXLImg2ImgPipeline", scheduler)
    kw = {} if strength is None else {"strength": strength}   # None: diffusers' default, 0.3
    with torch.no_grad():
        expected = pipe(PROMPT, negative_prompt="blurry", image=image, num_inference_steps=6, guidance_scale=5.0,
                        output_type="np", generator=torch.Generator("cpu").manual_seed(8), **kw).images
    got = sdxl(PROMPT, negative_prompt="blurry", image=image, steps=6, scheduler=scheduler, seed=8, **kw)
    assert got.config.strength == (0.3 if strength is None else strength) and got.config.guidance == 5.0
    assert _max_diff(got.pixels, expected) <= TOL


@pytest.mark.parametrize("scheduler,strength", [(None, None), (None, 1.0), ("euler_a", 0.75)])
def test_sdxl_inpainting_matches_diffusers(oracle, sdxl, scheduler, strength):
    import torch
    h, w = sdxl.height, sdxl.width
    image, mask = _picture(h, w), _box(h, w)
    pipe = _image_pipe(oracle, "StableDiffusionXLInpaintPipeline", scheduler)
    kw = {} if strength is None else {"strength": strength}   # None: diffusers' default, 0.9999
    with torch.no_grad():
        expected = pipe(PROMPT, image=image, mask_image=mask, height=h, width=w, num_inference_steps=6,
                        output_type="np", generator=torch.Generator("cpu").manual_seed(9), **kw).images
    got = sdxl(PROMPT, image=image, mask_image=mask, steps=6, scheduler=scheduler, seed=9, **kw)
    # diffusers' StableDiffusionXLInpaintPipeline defaults: strength 0.9999, guidance 7.5 (not 5.0)
    assert got.config.strength == (0.9999 if strength is None else strength) and got.config.guidance == 7.5
    assert _max_diff(got.pixels, expected) <= TOL


@pytest.mark.slow   # an export of its own (30 s): the default run stays under 20 minutes
def test_fp16_export_keeps_a_force_upcast_vae_in_fp32(tiny_sdxl, export_into, tmp_path):
    from sdrt.engines.specs import Precision, Stage
    folder = export_into(tiny_sdxl, tmp_path / "fp16", precision=Precision.FP16, verify=False)
    manifest = Pipeline.load(folder).manifest
    assert manifest.precisions[Stage.UNET] is Precision.FP16
    assert manifest.precisions[Stage.VAE_DECODER] is Precision.FP32 is manifest.precisions[Stage.VAE_ENCODER]


@pytest.mark.slow   # an export of its own (30 s): the default run stays under 20 minutes
@pytest.mark.parametrize("strength", [None, 1.0, 0.6])
def test_sdxl_inpainting_checkpoint_9_channels_matches_diffusers(tmp_path_factory, export_into, strength):
    import diffusers
    import torch
    from sdrt.export.tiny import make_tiny_model
    root = tmp_path_factory.getbasetemp() / "sdxl-inpaint"
    if not (root / "art" / "manifest.json").is_file():
        make_tiny_model(root / "model", variant="sdxl-inpaint", force=True)
        export_into(root / "model", root / "art", force=True)
    pipe = Pipeline.load(root / "art")
    assert pipe.manifest.facts.inpainting and pipe.manifest.facts.family == "sdxl"
    h, w = pipe.height, pipe.width
    image, mask = _picture(h, w), _box(h, w)
    oracle = diffusers.StableDiffusionXLInpaintPipeline.from_pretrained(root / "model")
    oracle.set_progress_bar_config(disable=True)
    kw = {} if strength is None else {"strength": strength}
    with torch.no_grad():
        expected = oracle(PROMPT, negative_prompt="blurry", image=image, mask_image=mask, height=h, width=w,
                          num_inference_steps=5, output_type="np", generator=torch.Generator("cpu").manual_seed(2),
                          **kw).images
    got = pipe(PROMPT, negative_prompt="blurry", image=image, mask_image=mask, steps=5, seed=2, **kw)
    assert _max_diff(got.pixels, expected) <= TOL


@pytest.mark.slow   # an export of its own (30 s): the default run stays under 20 minutes
@pytest.mark.parametrize("steps", [1, 4])
def test_sdxl_turbo_style_no_cfg_trailing_euler_a_matches_diffusers(tiny_sdxl, export_into, tmp_path_factory, steps):
    """SDXL-Turbo as its model card runs it: no CFG (guidance_scale=0.0), 1 to 4 steps,
    EulerAncestralDiscreteScheduler with trailing spacing (its scheduler_config)."""
    import diffusers
    import torch
    root = tmp_path_factory.getbasetemp() / "sdxl-turbo"
    if not (root / "art" / "manifest.json").is_file():
        root.mkdir(exist_ok=True)
        model = root / "model"
        shutil.copytree(tiny_sdxl, model)
        config = json.loads((model / "scheduler" / "scheduler_config.json").read_text())
        config.update(_class_name="EulerAncestralDiscreteScheduler", timestep_spacing="trailing")
        (model / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
        index = json.loads((model / "model_index.json").read_text())
        index["scheduler"] = ["diffusers", "EulerAncestralDiscreteScheduler"]
        (model / "model_index.json").write_text(json.dumps(index))
        export_into(model, root / "art", cfg=False)
    pipe = Pipeline.load(root / "art")
    oracle = diffusers.StableDiffusionXLPipeline.from_pretrained(root / "model", add_watermarker=False)
    oracle.set_progress_bar_config(disable=True)
    assert type(oracle.scheduler).__name__ == "EulerAncestralDiscreteScheduler"
    with torch.no_grad():
        expected = oracle(PROMPT, num_inference_steps=steps, guidance_scale=0.0, output_type="np",
                          generator=torch.Generator("cpu").manual_seed(6)).images
    got = pipe(PROMPT, steps=steps, seed=6)   # the no-CFG artifact's default guidance
    assert got.config.scheduler == "euler_a" and got.config.guidance == 1.0
    assert _max_diff(got.pixels, expected) <= TOL
