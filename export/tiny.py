"""Built-in checkpoints that need no download: tiny SD 1.5 / SD 2.x / SDXL look-alikes
for tests and demos, and the published full-size architectures (random weights) for
the export benchmark.

Every variant is a diffusers-layout folder (model_index.json, unet/, vae/,
text_encoder/, tokenizer/, scheduler/, and for SDXL text_encoder_2/ and tokenizer_2/)
with safetensors weights drawn from a fixed seed, so every machine writes the same
bytes, and the real 49,408-token CLIP vocabulary (see vocab.py). The tiny ones keep
the family topology (SD 1/2: four U-Net levels, three with cross-attention; SDXL:
three levels, the last two with cross-attention, and the added text/time conditions;
four VAE levels, so 8 pixels per latent; 77 text positions) at widths small enough
that a U-Net call takes milliseconds.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdrt.engines.errors import AlreadyExists, InvalidInput
from sdrt.engines.files import fsync_tree, temp_folder

from . import vocab
from sdrt.engines.progress import Progress

VARIANTS = ("sd15", "sd2", "sd15-inpaint", "lcm", "sdxl", "sdxl-refiner", "sdxl-inpaint", "sd15-safety",
            "sd15-full", "sd21-full", "sdxl-full")
# `sdrt tiny-model --variant controlnet`: a ControlNetModel folder for the sd15 variant
# (make_tiny_controlnet), not a pipeline checkpoint.
CONTROLNET_VARIANTS = ("controlnet",)
MAX_SEED = 2**32 - 1

_DOWN = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
_UP = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")

# Scheduler configs as the published checkpoints ship them.
# runwayml/stable-diffusion-v1-5 scheduler/scheduler_config.json
_SD15_SCHEDULER = {
    "_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "set_alpha_to_one": False,
    "skip_prk_steps": True, "steps_offset": 1, "clip_sample": False, "trained_betas": None,
    "prediction_type": "epsilon", "timestep_spacing": "leading",
}
# stabilityai/stable-diffusion-2-1 scheduler/scheduler_config.json
_SD2_SCHEDULER = {
    "_class_name": "DDIMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "set_alpha_to_one": False,
    "steps_offset": 1, "clip_sample": False, "trained_betas": None,
    "prediction_type": "v_prediction", "timestep_spacing": "leading",
}

# SimianLuo/LCM_Dreamshaper_v7 scheduler/scheduler_config.json
_LCM_SCHEDULER = {
    "_class_name": "LCMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "original_inference_steps": 50,
    "set_alpha_to_one": True, "steps_offset": 1, "clip_sample": False, "trained_betas": None,
    "prediction_type": "epsilon", "timestep_spacing": "leading", "timestep_scaling": 10.0,
}

# stabilityai/stable-diffusion-xl-base-1.0 scheduler/scheduler_config.json. Its last four
# keys are DDIM/PNDM leftovers that EulerDiscreteScheduler does not take; they are kept
# in the written file (see Variant.scheduler_extra), since loaders meet them in the wild.
_SDXL_SCHEDULER = {
    "_class_name": "EulerDiscreteScheduler", "beta_start": 0.00085, "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "steps_offset": 1,
    "trained_betas": None, "prediction_type": "epsilon", "timestep_spacing": "leading",
    "interpolation_type": "linear", "use_karras_sigmas": False,
}
_SDXL_SCHEDULER_EXTRA = {
    "clip_sample": False, "sample_max_value": 1.0, "set_alpha_to_one": False, "skip_prk_steps": True,
}

# SDXL's U-Net: three levels, cross-attention on the last two only.
_XL_DOWN = ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
_XL_UP = ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")


@dataclass(frozen=True)
class Variant:
    unet: dict[str, Any]
    vae: dict[str, Any]
    text: dict[str, Any]
    scheduler: dict[str, Any]
    pad_token: str
    extra_unet: dict[str, Any] = field(default_factory=dict)
    pipeline: str = "StableDiffusionPipeline"   # the diffusers class model_index.json names
    # SDXL: the second text encoder (CLIPTextModelWithProjection) and its tokenizer's padding.
    text_2: dict[str, Any] | None = None
    pad_token_2: str = "!"
    refiner: bool = False     # SDXL refiner: text_encoder_2 alone, aesthetic-score time ids
    # Keys written into scheduler_config.json that the scheduler class does not take.
    scheduler_extra: dict[str, Any] = field(default_factory=dict)
    safety: bool = False      # with a (tiny) StableDiffusionSafetyChecker and its feature extractor


def _vae(block_out: tuple[int, ...], groups: int, layers: int, sample_size: int,
         scaling_factor: float = 0.18215, **extra: Any) -> dict[str, Any]:
    return dict(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=block_out,
        down_block_types=("DownEncoderBlock2D",) * len(block_out),
        up_block_types=("UpDecoderBlock2D",) * len(block_out),
        layers_per_block=layers, norm_num_groups=groups, sample_size=sample_size,
        scaling_factor=scaling_factor, **extra,
    )


def _clip(hidden: int, intermediate: int, layers: int, heads: int, act: str, projection: int) -> dict[str, Any]:
    """A CLIP text encoder config with the real vocabulary and CLIP's 77 positions."""
    return dict(vocab_size=vocab.VOCAB_SIZE, hidden_size=hidden, intermediate_size=intermediate,
                num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=77,
                hidden_act=act, projection_dim=projection)


def _variant(name: str) -> Variant:
    if name == "sd15-safety":
        # The tiny SD 1.5 with a safety checker, as the published SD 1.x checkpoints ship one.
        return dataclasses.replace(_variant("sd15"), safety=True)
    if name in ("sd15", "sd15-inpaint", "lcm"):
        # sd15-inpaint: runwayml/stable-diffusion-inpainting's layout, whose U-Net takes
        # 9 channels (latents, mask, masked-image latents). lcm: an LCM-distilled SD 1.5
        # (LCM_Dreamshaper_v7's layout): the U-Net takes the guidance scale as an
        # embedding (time_cond_proj_dim), with the LCM scheduler.
        inpaint, lcm = name == "sd15-inpaint", name == "lcm"
        return Variant(
            unet=dict(sample_size=16, in_channels=9 if inpaint else 4, out_channels=4, down_block_types=_DOWN,
                      up_block_types=_UP, block_out_channels=(16, 32, 32, 32), layers_per_block=1,
                      norm_num_groups=8, cross_attention_dim=32, attention_head_dim=4,
                      **(dict(time_cond_proj_dim=32) if lcm else {})),
            vae=_vae((8, 16, 16, 16), groups=4, layers=1, sample_size=128),
            text=dict(vocab_size=vocab.VOCAB_SIZE, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
                      hidden_act="quick_gelu", projection_dim=32),
            scheduler=_LCM_SCHEDULER if lcm else _SD15_SCHEDULER, pad_token=vocab.EOS,
            pipeline="StableDiffusionInpaintPipeline" if inpaint else
            "LatentConsistencyModelPipeline" if lcm else "StableDiffusionPipeline")
    if name == "sd2":
        # SD 2.x differences: v-prediction, linear projections in the transformer
        # blocks, per-level head counts, a wider text encoder with GELU, "!" padding.
        return Variant(
            unet=dict(sample_size=8, in_channels=4, out_channels=4, down_block_types=_DOWN,
                      up_block_types=_UP, block_out_channels=(16, 24, 48, 48), layers_per_block=2,
                      norm_num_groups=8, cross_attention_dim=48, attention_head_dim=(2, 3, 6, 6),
                      use_linear_projection=True),
            vae=_vae((8, 16, 16, 16), groups=4, layers=1, sample_size=64),
            text=dict(vocab_size=vocab.VOCAB_SIZE, hidden_size=48, intermediate_size=96,
                      num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=77,
                      hidden_act="gelu", projection_dim=32),
            scheduler=_SD2_SCHEDULER, pad_token="!")
    if name in ("sdxl", "sdxl-refiner", "sdxl-inpaint"):
        # stabilityai/stable-diffusion-xl-base-1.0's layout: two text encoders whose
        # penultimate hidden states are concatenated (cross_attention_dim = 32 + 48; the
        # widths differ so a swapped or missing encoder cannot go unnoticed), the second
        # one's projected pooled output (40 wide, not its hidden 48, for the same reason)
        # and six time ids (original size, crop top-left, target size) embedded
        # addition_time_embed_dim wide as the U-Net's added conditions; per-level head
        # counts, linear projections and more transformer layers deeper down; the SDXL
        # VAE's scaling factor with force_upcast (it overflows in fp16); the first
        # encoder is CLIP ViT-L (quick_gelu, <|endoftext|> padding), the second OpenCLIP
        # bigG (gelu, "!" padding). Three and four layers: SDXL's clip_skip counts from the
        # penultimate one, so clip_skip 1 still leaves a layer, and the counts differ too.
        # sdxl-refiner: stabilityai/stable-diffusion-xl-refiner-1.0's layout: the second
        # encoder alone (the base's, as the published pair shares it), a U-Net
        # conditioned on its 48 wide states and five time ids (original size, crop
        # top-left, aesthetic score), StableDiffusionXLImg2ImgPipeline with
        # requires_aesthetics_score.
        # sdxl-inpaint: diffusers/stable-diffusion-xl-1.0-inpainting-0.1's layout, a
        # 9-channel U-Net (latents, mask, masked-image latents).
        time_dim, pooled_dim = 8, 40
        refiner, inpaint = name == "sdxl-refiner", name == "sdxl-inpaint"
        return Variant(
            unet=dict(sample_size=16, in_channels=9 if inpaint else 4, out_channels=4, down_block_types=_XL_DOWN,
                      up_block_types=_XL_UP, block_out_channels=(16, 32, 32), layers_per_block=1 if refiner else 2,
                      transformer_layers_per_block=(1, 1, 2), norm_num_groups=8,
                      cross_attention_dim=48 if refiner else 32 + 48,
                      attention_head_dim=(2, 4, 8), use_linear_projection=True,
                      addition_embed_type="text_time", addition_time_embed_dim=time_dim,
                      projection_class_embeddings_input_dim=(5 if refiner else 6) * time_dim + pooled_dim),
            vae=_vae((8, 16, 16, 16), groups=4, layers=1, sample_size=128, scaling_factor=0.13025,
                     force_upcast=True),
            text=_clip(32, 64, layers=3, heads=4, act="quick_gelu", projection=32),
            text_2=_clip(48, 96, layers=4, heads=4, act="gelu", projection=pooled_dim),
            scheduler=_SDXL_SCHEDULER, scheduler_extra=_SDXL_SCHEDULER_EXTRA,
            pad_token=vocab.EOS, pad_token_2="!", refiner=refiner,
            pipeline="StableDiffusionXLImg2ImgPipeline" if refiner else
            "StableDiffusionXLInpaintPipeline" if inpaint else "StableDiffusionXLPipeline")
    if name == "sdxl-full":
        # stabilityai/stable-diffusion-xl-base-1.0: unet/vae/text_encoder/text_encoder_2
        # config.json values (2.6 B U-Net parameters, 10.3 GB in fp32).
        return Variant(
            unet=dict(sample_size=128, in_channels=4, out_channels=4, down_block_types=_XL_DOWN,
                      up_block_types=_XL_UP, block_out_channels=(320, 640, 1280), layers_per_block=2,
                      transformer_layers_per_block=(1, 2, 10), norm_num_groups=32, cross_attention_dim=2048,
                      attention_head_dim=(5, 10, 20), use_linear_projection=True,
                      addition_embed_type="text_time", addition_time_embed_dim=256,
                      projection_class_embeddings_input_dim=2816),
            vae=_vae((128, 256, 512, 512), groups=32, layers=2, sample_size=1024, scaling_factor=0.13025,
                     force_upcast=True),
            text=_clip(768, 3072, layers=12, heads=12, act="quick_gelu", projection=768),    # CLIP ViT-L
            text_2=_clip(1280, 5120, layers=32, heads=20, act="gelu", projection=1280),     # OpenCLIP bigG
            scheduler=_SDXL_SCHEDULER, scheduler_extra=_SDXL_SCHEDULER_EXTRA,
            pad_token=vocab.EOS, pad_token_2="!", pipeline="StableDiffusionXLPipeline")
    if name == "sd15-full":
        # runwayml/stable-diffusion-v1-5: unet/vae/text_encoder config.json values.
        return Variant(
            unet=dict(sample_size=64, in_channels=4, out_channels=4, down_block_types=_DOWN,
                      up_block_types=_UP, block_out_channels=(320, 640, 1280, 1280),
                      layers_per_block=2, norm_num_groups=32, cross_attention_dim=768,
                      attention_head_dim=8),
            vae=_vae((128, 256, 512, 512), groups=32, layers=2, sample_size=512),
            text=dict(vocab_size=vocab.VOCAB_SIZE, hidden_size=768, intermediate_size=3072,
                      num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
                      hidden_act="quick_gelu", projection_dim=768),
            scheduler=_SD15_SCHEDULER, pad_token=vocab.EOS)
    if name == "sd21-full":
        # stabilityai/stable-diffusion-2-1: the text encoder is OpenCLIP ViT-H/14 with
        # its last layer dropped (23 of 24), as diffusers ships it.
        return Variant(
            unet=dict(sample_size=96, in_channels=4, out_channels=4, down_block_types=_DOWN,
                      up_block_types=_UP, block_out_channels=(320, 640, 1280, 1280),
                      layers_per_block=2, norm_num_groups=32, cross_attention_dim=1024,
                      attention_head_dim=(5, 10, 20, 20), use_linear_projection=True,
                      upcast_attention=True),
            vae=_vae((128, 256, 512, 512), groups=32, layers=2, sample_size=768),
            text=dict(vocab_size=vocab.VOCAB_SIZE, hidden_size=1024, intermediate_size=4096,
                      num_hidden_layers=23, num_attention_heads=16, max_position_embeddings=77,
                      hidden_act="gelu", projection_dim=512),
            scheduler=_SD2_SCHEDULER, pad_token="!")
    raise InvalidInput(f"unknown tiny-model variant {name!r}: choose one of {', '.join(VARIANTS)}")


# The tiny safety checker: CLIP ViT with 8-pixel patches on 32-pixel crops, a
# 16-wide projection, and a feature extractor that resizes the shortest edge to 36
# and crops 32 (real checkpoints: 224 and 224), so both steps do something.
SAFETY_IMAGE_SIZE = 32
SAFETY_RESIZE = 36


def _tiny_safety_checker(seed: int) -> dict[str, Any]:
    """StableDiffusionSafetyChecker and CLIPImageProcessor parts of a pipeline. Its
    concept embeddings are random (the class initialises them to ones, every concept
    alike) and every threshold is 1.0, which a cosine cannot pass: nothing is flagged
    until a test lowers them (tests/test_safety_checker.py)."""
    import torch
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    config = CLIPConfig(
        text_config=dict(vocab_size=1000, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=77),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=SAFETY_IMAGE_SIZE, patch_size=8, hidden_act="quick_gelu"),
        projection_dim=16)
    torch.manual_seed(seed)
    checker = StableDiffusionSafetyChecker(config).eval()
    with torch.no_grad():
        checker.concept_embeds.normal_()
        checker.special_care_embeds.normal_()
        checker.concept_embeds_weights.fill_(1.0)
        checker.special_care_embeds_weights.fill_(1.0)
    extractor = CLIPImageProcessor(size={"shortest_edge": SAFETY_RESIZE},
                                   crop_size={"height": SAFETY_IMAGE_SIZE, "width": SAFETY_IMAGE_SIZE})
    return dict(safety_checker=checker, feature_extractor=extractor, requires_safety_checker=True)


def quiet_libraries() -> None:
    """diffusers/transformers progress bars and load-time notices (torchvision,
    accelerate) would drown sdrt's own progress lines."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()


def write_tokenizer(folder: Path, pad_token: str) -> None:
    """vocab.json, merges.txt and configs as the SD checkpoints ship them, plus the
    `tokenizers` library's tokenizer.json (what a torch-free runtime loads)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(vocab.vocab_json(), encoding="utf-8")
    (folder / "merges.txt").write_text(vocab.merges_txt(), encoding="utf-8")
    config = {
        "add_prefix_space": False, "bos_token": vocab.BOS, "do_lower_case": True,
        "eos_token": vocab.EOS, "errors": "replace", "model_max_length": 77,
        "pad_token": pad_token, "tokenizer_class": "CLIPTokenizer", "unk_token": vocab.EOS,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    special = {"bos_token": vocab.BOS, "eos_token": vocab.EOS, "pad_token": pad_token, "unk_token": vocab.EOS}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n", encoding="utf-8")
    from transformers import CLIPTokenizer

    CLIPTokenizer.from_pretrained(folder).backend_tokenizer.save(str(folder / "tokenizer.json"))


def make_tiny_model(out_dir: str | os.PathLike[str], variant: str = "sd15", seed: int = 0,
                    force: bool = False, progress: Progress | None = None) -> Path:
    """Write the built-in checkpoint `variant` to `out_dir` and return its path.

    The folder appears complete or not at all: it is written beside `out_dir` under a
    temporary name and renamed into place.
    """
    if variant in CONTROLNET_VARIANTS:
        return make_tiny_controlnet(out_dir, seed=seed, force=force)
    spec = _variant(variant)
    out_dir = _writable_folder(out_dir, seed, force, "model_index.json", "a diffusers checkpoint")
    progress = progress or Progress(enabled=variant.endswith("-full"))  # the tiny ones take seconds
    quiet_libraries()
    import diffusers
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.schedulers import DDIMScheduler, EulerDiscreteScheduler, LCMScheduler, PNDMScheduler
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    # One seed per component, so changing one component's config leaves the others' bytes alone.
    with progress.step(f"{variant}: drawing random weights (seed {seed})"):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**spec.unet)
        torch.manual_seed(seed + 1)
        vae = AutoencoderKL(**spec.vae)
        torch.manual_seed(seed + 2)
        text_encoder = None if spec.refiner else CLIPTextModel(CLIPTextConfig(**spec.text))
        if spec.text_2 is not None:
            torch.manual_seed(seed + 3)
            text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**spec.text_2))
    safety_parts = _tiny_safety_checker(seed + 4) if spec.safety else {}
    sched_cls = {"PNDMScheduler": PNDMScheduler, "DDIMScheduler": DDIMScheduler, "LCMScheduler": LCMScheduler,
                 "EulerDiscreteScheduler": EulerDiscreteScheduler}[spec.scheduler["_class_name"]]
    scheduler = sched_cls.from_config({k: v for k, v in spec.scheduler.items() if k != "_class_name"})

    with temp_folder(out_dir.parent) as tmp:
        tokenizer = None
        if not spec.refiner:
            write_tokenizer(tmp / "tokenizer", spec.pad_token)
            tokenizer = CLIPTokenizer.from_pretrained(tmp / "tokenizer")
        parts = dict(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler)
        if spec.text_2 is None:
            parts.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
            parts.update(safety_parts)
        else:   # SDXL has no safety checker; force_zeros_for_empty_prompt as the published models ship it
            write_tokenizer(tmp / "tokenizer_2", spec.pad_token_2)
            parts.update(text_encoder_2=text_encoder_2, tokenizer_2=CLIPTokenizer.from_pretrained(tmp / "tokenizer_2"),
                         force_zeros_for_empty_prompt=not spec.refiner, add_watermarker=False)
            if spec.refiner:
                parts.update(requires_aesthetics_score=True)
        pipe = getattr(diffusers, spec.pipeline)(**parts)
        with progress.step(f"{variant}: writing {out_dir}"):
            pipe.save_pretrained(tmp / "pipe", safe_serialization=True)
        # The tokenizers were written above: transformers 5's save_pretrained would keep
        # only tokenizer.json and tokenizer_config.json of them.
        names = ["unet", "vae", "scheduler", "model_index.json"] + ([] if spec.refiner else ["text_encoder"])
        names += ["safety_checker", "feature_extractor"] if spec.safety else []
        for name in names + (["text_encoder_2"] if spec.text_2 is not None else []):
            os.replace(tmp / "pipe" / name, tmp / name)
        if spec.safety:   # transformers 5 without torchvision names its PIL class; the checkpoints name this one
            index = json.loads((tmp / "model_index.json").read_text(encoding="utf-8"))
            index["feature_extractor"] = ["transformers", "CLIPImageProcessor"]
            (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        shutil.rmtree(tmp / "pipe")
        if spec.scheduler_extra:
            path = tmp / "scheduler" / "scheduler_config.json"
            config = json.loads(path.read_text(encoding="utf-8"))
            config.update(spec.scheduler_extra)
            path.write_text(json.dumps(dict(sorted(config.items())), indent=2) + "\n", encoding="utf-8")
        fsync_tree(tmp)
        if out_dir.exists():  # force: replace an earlier checkpoint (checked above)
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    return out_dir


def _writable_folder(out_dir: str | os.PathLike[str], seed: Any, force: bool, marker: str, what: str) -> Path:
    """Check a built-in model's seed and output folder: an existing folder is replaced
    only with `force`, and only when it holds `marker` (it is `what`, not a user's folder)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        # torch.manual_seed(seed + 2) must not overflow; a bare RuntimeError named no value.
        raise InvalidInput(f"seed must be an integer from 0 to {MAX_SEED}, got {seed!r:.40}")
    out_dir = Path(out_dir)
    if out_dir.exists():
        if not force:
            raise AlreadyExists(f"{out_dir} already exists; choose another folder or pass --force")
        if not (out_dir / marker).is_file():
            raise AlreadyExists(f"{out_dir} exists and is not {what}; refusing to replace it")
    return out_dir


def make_tiny_controlnet(out_dir: str | os.PathLike[str], base_variant: str = "sd15", seed: int = 0,
                         force: bool = False) -> Path:
    """Write a random-weight diffusers ControlNetModel folder (config.json and
    diffusion_pytorch_model.safetensors) that fits `base_variant`'s U-Net, and return its path.

    It is `ControlNetModel.from_unet` of that U-Net's architecture, as ControlNets are
    trained, with every weight drawn from `seed` (different seeds give different
    ControlNets for the same model). Training starts the zero convolutions (the outputs
    of the conditioning embedding and of each residual) at zero, which would make a
    ControlNet that adds nothing; here they are random too, so its residuals are of the
    order of the U-Net's own features and change the image.
    """
    spec = _variant(base_variant)
    if spec.text_2 is not None or spec.unet["in_channels"] != 4:
        raise InvalidInput(f"tiny ControlNets are made for sd15, sd2 and lcm, not {base_variant!r}")
    out_dir = _writable_folder(out_dir, seed, force, "config.json", "a ControlNet folder")
    quiet_libraries()
    import torch
    from diffusers import ControlNetModel, UNet2DConditionModel

    # The conditioning embedding halves the image once per channel entry but the first:
    # as often as the VAE does, so its output lands on the latent grid.
    levels = len(spec.vae["block_out_channels"])
    embedding = tuple(8 * 2 ** min(i, 1) for i in range(levels))
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**spec.unet)
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=embedding,
                                           load_weights_from_unet=False)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        zero = [controlnet.controlnet_cond_embedding.conv_out, controlnet.controlnet_mid_block,
                *controlnet.controlnet_down_blocks]
        for module in zero:
            fan_in = module.weight[0].numel()
            module.weight.copy_(torch.randn(module.weight.shape, generator=generator) / fan_in ** 0.5)
            module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=generator))
    with temp_folder(out_dir.parent) as tmp:
        controlnet.save_pretrained(tmp / "controlnet", safe_serialization=True)
        fsync_tree(tmp / "controlnet")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp / "controlnet", out_dir)
    return out_dir


EMBEDDING_FORMATS = ("a1111", "diffusers")


def make_tiny_embedding(out: str | os.PathLike[str], variant: str = "sd15", vectors: int = 2,
                        format: str = "a1111", token: str | None = None, seed: int = 0,
                        force: bool = False) -> Path:
    """Write a textual-inversion embedding of `vectors` random vectors for the text
    encoder(s) of the built-in `variant`, as a .safetensors file: AUTOMATIC1111's
    format (`emb_params`; SDXL: `clip_l` + `clip_g`, its trigger the file's name) or
    diffusers' (`{token: vectors}`, token default "<file name>"). The vectors are drawn
    like CLIP's token embeddings (normal, std 0.02) from `seed`."""
    import numpy as np
    from safetensors.numpy import save

    from sdrt.engines.files import atomic_write_bytes

    spec = _variant(variant)
    if format not in EMBEDDING_FORMATS:
        raise InvalidInput(f"embedding format {format!r} is not one of {', '.join(EMBEDDING_FORMATS)}")
    if isinstance(vectors, bool) or not isinstance(vectors, int) or not 1 <= vectors <= 75:
        raise InvalidInput(f"vectors must be an integer from 1 to 75, got {vectors!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise InvalidInput(f"seed must be an integer from 0 to {MAX_SEED}, got {seed!r:.40}")
    out = Path(out)
    if out.suffix != ".safetensors":
        raise InvalidInput(f"{out}: an embedding file's name must end in .safetensors")
    if out.exists() and not force:
        raise AlreadyExists(f"{out} already exists; choose another name or pass --force")
    rng = np.random.default_rng(seed)

    def draw(width: int) -> np.ndarray:
        return (0.02 * rng.standard_normal((vectors, width))).astype(np.float32)

    if spec.text_2 is not None:   # SDXL: one set per text encoder, AUTOMATIC1111's pair
        if format != "a1111":
            raise InvalidInput("SDXL embeddings are AUTOMATIC1111's clip_l + clip_g files: use format a1111")
        tensors = {"clip_l": draw(spec.text["hidden_size"]), "clip_g": draw(spec.text_2["hidden_size"])}
    elif format == "a1111":
        tensors = {"emb_params": draw(spec.text["hidden_size"])}
    else:
        tensors = {token or f"<{out.stem}>": draw(spec.text["hidden_size"])}
    atomic_write_bytes(out, save(tensors))
    return out
