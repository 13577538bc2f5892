"""The built-in checkpoints: loadable by diffusers offline, the SD families' topology,
the real CLIP vocabulary, and the same bytes from the same seed."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from sdrt.engines.errors import AlreadyExists, InvalidInput
from sdrt.export import vocab
from sdrt.export.tiny import make_tiny_model

# Token ids of the published openai/clip-vit-large-patch14 tokenizer (the SD 1.x
# tokenizer) for these prompts: an oracle independent of our derivation.
KNOWN_IDS = {
    "a photo of an astronaut riding a horse": [49406, 320, 1125, 539, 550, 18376, 6765, 320, 4558, 49407],
}


@pytest.fixture(scope="module")
def pipes(tiny_sd15, tiny_sd2, monkeypatch_module):
    from diffusers import StableDiffusionPipeline

    monkeypatch_module.setenv("HF_HUB_OFFLINE", "1")
    return {v: StableDiffusionPipeline.from_pretrained(p) for v, p in (("sd15", tiny_sd15), ("sd2", tiny_sd2))}


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_tiny_models_load_offline_in_diffusers_and_generate(pipes):
    for pipe in pipes.values():
        assert pipe.safety_checker is None and pipe.feature_extractor is None
        image = pipe("a red apple", num_inference_steps=2, output_type="np",
                     generator=torch.Generator().manual_seed(0)).images
        size = pipe.unet.config.sample_size * pipe.vae_scale_factor
        assert image.shape == (1, size, size, 3)
        assert np.isfinite(image).all() and image.std() > 0.01


def test_tiny_models_keep_the_sd_topology(pipes):
    for pipe in pipes.values():
        unet = pipe.unet.config
        assert list(unet.down_block_types) == ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
        assert list(unet.up_block_types) == ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3
        assert pipe.vae_scale_factor == 8
        assert pipe.text_encoder.config.max_position_embeddings == 77
        assert pipe.text_encoder.config.vocab_size == 49408
        assert unet.cross_attention_dim == pipe.text_encoder.config.hidden_size
        assert 64 <= unet.sample_size * pipe.vae_scale_factor <= 128


def test_sd2_variant_differs_where_sd2_differs(pipes):
    sd15, sd2 = pipes["sd15"], pipes["sd2"]
    assert sd15.scheduler.config.prediction_type == "epsilon"
    assert sd2.scheduler.config.prediction_type == "v_prediction"
    assert not sd15.unet.config.use_linear_projection and sd2.unet.config.use_linear_projection
    assert isinstance(sd2.unet.config.attention_head_dim, (list, tuple))
    assert sd2.text_encoder.config.hidden_size != sd15.text_encoder.config.hidden_size
    assert sd15.tokenizer.pad_token == "<|endoftext|>" and sd2.tokenizer.pad_token == "!"


def test_sd15_scheduler_config_is_sd15s(pipes):
    cfg = pipes["sd15"].scheduler.config
    assert type(pipes["sd15"].scheduler).__name__ == "PNDMScheduler"
    assert (cfg.beta_schedule, cfg.beta_start, cfg.beta_end) == ("scaled_linear", 0.00085, 0.012)
    assert cfg.steps_offset == 1 and cfg.skip_prk_steps and not cfg.set_alpha_to_one and not cfg.clip_sample


def test_vae_output_is_not_clipped_for_typical_latents(pipes):
    vae = pipes["sd15"].vae
    latent = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0)) / vae.config.scaling_factor
    with torch.no_grad():
        image = vae.decode(latent).sample
    assert (image.abs() > 1).float().mean() < 0.05


def test_derived_vocabulary_has_clips_size_and_layout():
    table = vocab.vocab()
    assert len(table) == 49408 and len(vocab.merges()) == 48894
    assert table["<|startoftext|>"] == 49406 and table["<|endoftext|>"] == 49407
    assert vocab.merges_txt().startswith("#version: 0.2\n")


def test_written_tokenizer_gives_clips_published_ids(tiny_sd15):
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(tiny_sd15 / "tokenizer")
    for prompt, ids in KNOWN_IDS.items():
        assert tok(prompt).input_ids == ids


def test_tokenizer_json_agrees_with_transformers_clip_tokenizer(tiny_sd2):
    """tokenizer.json (what the torch-free runtime reads) tokenizes like transformers'
    CLIPTokenizer built from the same vocab.json/merges.txt."""
    from tokenizers import Tokenizer
    from transformers import CLIPTokenizer

    ref = CLIPTokenizer.from_pretrained(tiny_sd2 / "tokenizer")
    fast = Tokenizer.from_file(str(tiny_sd2 / "tokenizer" / "tokenizer.json"))
    prompts = ["A photo of an astronaut riding a horse on Mars!", "héllo wörld, 1234 — naïve café",
               "  multiple   spaces\tand\nnewlines ", "emoji 🙂 and CJK 漢字", "don't stop-believing"]
    for prompt in prompts:
        assert fast.encode(prompt).ids == ref(prompt).input_ids, prompt


def test_same_seed_gives_the_same_bytes(tiny_sd15, tmp_path):
    again = make_tiny_model(tmp_path / "again", variant="sd15")
    for rel in ("unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
                "text_encoder/model.safetensors", "tokenizer/vocab.json", "tokenizer/merges.txt"):
        assert (again / rel).read_bytes() == (tiny_sd15 / rel).read_bytes(), rel


def test_make_tiny_model_refuses_existing_folder_and_unknown_variant(tmp_path):
    (tmp_path / "mine").mkdir()
    with pytest.raises(AlreadyExists, match="mine"):
        make_tiny_model(tmp_path / "mine")
    with pytest.raises(InvalidInput, match="sd15, sd2"):
        make_tiny_model(tmp_path / "x", variant="sd9")


def test_model_index_lists_no_safety_checker(tiny_sd15):
    index = json.loads((tiny_sd15 / "model_index.json").read_text())
    assert index["safety_checker"] == [None, None] and index["requires_safety_checker"] is False


@pytest.mark.parametrize("variant,unet,vae,text", [
    # Parameter counts of the published checkpoints (runwayml/stable-diffusion-v1-5,
    # stabilityai/stable-diffusion-2-1: U-Net, AutoencoderKL, CLIP text encoder).
    ("sd15-full", 859_520_964, 83_653_863, 123_060_480),
    ("sd21-full", 865_910_724, 83_653_863, 340_387_840),
])
def test_full_size_variants_have_the_published_architectures(variant, unet, vae, text):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from sdrt.export.tiny import _variant

    spec = _variant(variant)
    with torch.device("meta"):  # shapes only: no 3 GB of weights drawn
        modules = (UNet2DConditionModel(**spec.unet), AutoencoderKL(**spec.vae), CLIPTextModel(CLIPTextConfig(**spec.text)))
    assert [sum(p.numel() for p in m.parameters()) for m in modules] == [unet, vae, text]
