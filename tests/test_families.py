"""Model families as data: the artifact's own stage list, manifest format 2 beside
format 1 (sdrt 0.1's folders still load and give the same pixels), optional stages,
and families sdrt does not run refused before any work."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from sdrt.engines.errors import ArtifactError, InvalidInput
from sdrt.engines.families import FAMILIES
from sdrt.engines.manifest import MANIFEST_NAME, load_manifest, read_manifest
from sdrt.engines.specs import STAGE_SPECS, Stage
from sdrt.runtime import Pipeline

PROMPT = "a lighthouse at dusk"


def _as_format_1(folder):
    """Rewrite a three-stage manifest exactly as sdrt 0.1 wrote it (engines/manifest.py
    at format_version 1): stages keyed by name, no family or stage list, no
    unet_in_channels."""
    path = folder / MANIFEST_NAME
    data = json.loads(path.read_text())
    data["format_version"] = 1
    del data["family"]
    del data["model"]["unet_in_channels"]
    data["stages"] = {e["name"]: {k: v for k, v in e.items() if k != "name"} for e in data["stages"]}
    path.write_text(json.dumps(data, indent=2))


@pytest.fixture(scope="module")
def text_only(tiny_sd15, export_into, tmp_path_factory):
    return export_into(tiny_sd15, tmp_path_factory.mktemp("artifacts") / "sd15-text-only", vae_encoder=False)


def test_every_family_stage_has_a_spec_function_and_every_artifact_lists_its_stages(sd15_artifacts, text_only):
    for family in FAMILIES.values():
        assert set(family.stages) <= set(STAGE_SPECS)
    data = json.loads((sd15_artifacts / MANIFEST_NAME).read_text())
    assert data["format_version"] == 2 and data["family"] == "sd1"
    assert [e["name"] for e in data["stages"]] == ["text_encoder", "unet", "vae_encoder", "vae_decoder"]
    assert read_manifest(text_only).stages == (Stage.TEXT_ENCODER, Stage.UNET, Stage.VAE_DECODER)
    assert not (text_only / "vae_encoder.onnx").exists()


def test_format_1_folder_loads_and_gives_the_same_pixels(text_only, tmp_path):
    old = tmp_path / "format1"
    shutil.copytree(text_only, old)
    _as_format_1(old)
    manifest = load_manifest(old)
    assert manifest.format_version == 1 and manifest.stages == read_manifest(text_only).stages
    latents = np.random.default_rng(4).standard_normal(manifest.specs[Stage.VAE_DECODER].inputs[0].shape,
                                                        dtype=np.float32)
    with Pipeline.load(old) as a, Pipeline.load(text_only) as b:
        for scheduler in ("pndm", "euler_a"):
            pa = a(PROMPT, steps=3, scheduler=scheduler, latents=latents, seed=1).pixels
            pb = b(PROMPT, steps=3, scheduler=scheduler, latents=latents, seed=1).pixels
            assert np.array_equal(pa, pb)
        with pytest.raises(InvalidInput, match="exported by sdrt 0.1, without a VAE encoder: export the model again"):
            a(PROMPT, image=np.zeros((128, 128, 3), np.uint8), steps=2)


def test_artifact_without_the_vae_encoder_refuses_images_and_names_the_option(text_only):
    with Pipeline.load(text_only) as pipe:
        with pytest.raises(InvalidInput, match="without the VAE encoder \\(--no-vae-encoder\\)"):
            pipe(PROMPT, image=np.zeros((128, 128, 3), np.uint8), steps=2)


def test_manifest_naming_an_unknown_stage_or_family_is_refused(text_only, tmp_path):
    for edit, words in ((lambda d: d["stages"].append(dict(d["stages"][0], name="refiner")), "stage 'refiner'"),
                        (lambda d: d.update(family="sd9"), "family 'sd9'"),
                        (lambda d: d["stages"].pop(1), "do not fit the Stable Diffusion 1.x family")):
        folder = tmp_path / f"f{len(list(tmp_path.iterdir()))}"
        shutil.copytree(text_only, folder)
        data = json.loads((folder / MANIFEST_NAME).read_text())
        edit(data)
        if data["family"] == "sd9":
            data["model"]["family"] = "sd9"
        (folder / MANIFEST_NAME).write_text(json.dumps(data))
        with pytest.raises(ArtifactError, match=words):
            read_manifest(folder)


def test_inpainting_checkpoint_cannot_leave_out_the_vae_encoder(tmp_path):
    from sdrt.export.config import ExportConfig
    from sdrt.export.exporter import export_artifacts
    from sdrt.export.tiny import make_tiny_model
    model = make_tiny_model(tmp_path / "inpaint", variant="sd15-inpaint")
    with pytest.raises(InvalidInput, match="inpainting checkpoint.*VAE encoder"):
        export_artifacts(ExportConfig(model_dir=model, out_dir=tmp_path / "out", vae_encoder=False))
    assert not (tmp_path / "out").exists()


# -- families sdrt does not run: refused before any work, naming what is unsupported --------


def _tiny_sdxl(folder):
    """A real SDXL layout as diffusers saves it: two text encoders, a text_time U-Net."""
    import diffusers
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from sdrt.export.tiny import write_tokenizer
    from sdrt.export.vocab import EOS
    write_tokenizer(folder.parent / "tok", EOS)
    tok = CLIPTokenizer.from_pretrained(folder.parent / "tok")
    torch.manual_seed(0)
    text = dict(vocab_size=49408, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=77, projection_dim=16)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8, cross_attention_dim=32, attention_head_dim=4, addition_embed_type="text_time",
        addition_time_embed_dim=8, projection_class_embeddings_input_dim=16 + 6 * 8)
    vae = diffusers.AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4, latent_channels=4)
    diffusers.StableDiffusionXLPipeline(
        vae=vae, text_encoder=CLIPTextModel(CLIPTextConfig(**text)),
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**text)), tokenizer=tok, tokenizer_2=tok,
        unet=unet, scheduler=diffusers.EulerDiscreteScheduler()).save_pretrained(folder)
    return folder


def test_sdxl_as_diffusers_writes_it_exports_and_matches_diffusers(tmp_path, export_into):
    """An SDXL folder written here by StableDiffusionXLPipeline.save_pretrained, not by
    sdrt's tiny-model: one-layer text encoders (so the penultimate state is the
    embeddings' output), a default EulerDiscreteScheduler config, 64 px."""
    import diffusers
    import torch
    model = _tiny_sdxl(tmp_path / "sdxl")
    pipe = Pipeline.load(export_into(model, tmp_path / "art"))
    assert pipe.manifest.facts.family == "sdxl" and pipe.manifest.facts.max_clip_skip == 0
    oracle = diffusers.StableDiffusionXLPipeline.from_pretrained(model)
    oracle.set_progress_bar_config(disable=True)
    with torch.no_grad():
        expected = oracle(PROMPT, negative_prompt="blurry", num_inference_steps=3, output_type="np",
                          generator=torch.Generator("cpu").manual_seed(2)).images
    got = pipe(PROMPT, negative_prompt="blurry", steps=3, guidance=5.0, seed=2)
    assert float(np.abs(got.pixels - expected).max()) <= 1e-4


def _patched(tiny_sd15, folder, component, **changes):
    shutil.copytree(tiny_sd15, folder)
    path = folder / component / "config.json" if component != "model_index" else folder / "model_index.json"
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))
    return folder


@pytest.mark.parametrize("case, words", [
    ("sdxl-image-conditions", "an SDXL checkpoint whose U-Net has addition_embed_type 'image'"),
    ("class-conditioned", "class conditioning \\(unCLIP, the x4 upscaler\\) \\(class_embed_type='timestep'\\)"),
    ("image-conditioned", "added conditioning .*addition_embed_type='image'.*an input sdrt does not feed"),
    ("sd3", "StableDiffusion3Pipeline checkpoint: Stable Diffusion 3 .* is not supported"),
    ("unknown", "pipeline class 'KandinskyV22Pipeline' is not supported"),
])
def test_unsupported_family_is_refused_before_any_work(tiny_sd15, tmp_path, case, words):
    from sdrt.export.config import ExportConfig
    from sdrt.export.exporter import export_artifacts
    model = tmp_path / case
    if case == "sdxl-image-conditions":
        _tiny_sdxl(model)
        path = model / "unet" / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "addition_embed_type": "image"}))
    elif case == "class-conditioned":
        _patched(tiny_sd15, model, "unet", class_embed_type="timestep")
    elif case == "image-conditioned":
        _patched(tiny_sd15, model, "unet", addition_embed_type="image")
    elif case == "sd3":
        _patched(tiny_sd15, model, "model_index", _class_name="StableDiffusion3Pipeline")
    else:
        _patched(tiny_sd15, model, "model_index", _class_name="KandinskyV22Pipeline")
    with pytest.raises(InvalidInput, match=words):
        export_artifacts(ExportConfig(model_dir=model, out_dir=tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_build_of_a_stage_the_artifact_lacks_is_refused_before_tensorrt(text_only):
    from sdrt.engines.build import BuildConfig, build_engines
    with pytest.raises(InvalidInput, match="this artifact has no vae_encoder stage: its stages are "
                                           "text_encoder, unet, vae_decoder"):
        build_engines(BuildConfig(text_only, stages=(Stage.VAE_ENCODER,)))
