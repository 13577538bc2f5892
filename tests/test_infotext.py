"""PNG metadata as AUTOMATIC1111 writes and reads it (runtime/infotext.py), the model
name and hash recorded at export, and what a third-party reader makes of sdrt's PNGs.

Oracles: sd-parsers (a metadata reader whose authors are not us), hashlib over the
checkpoint's own files, and AUTOMATIC1111 parameter texts written out by hand with the
values they mean."""

from __future__ import annotations

import dataclasses

import hashlib
import json
import shutil
from importlib import metadata
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sdrt.cli.main import main
from sdrt.engines.errors import ArtifactError, InvalidInput
from sdrt.engines.manifest import CheckpointInfo, model_name, read_manifest
from sdrt.runtime import Pipeline, infotext
from sdrt.runtime.config import GenerationConfig, Task
from sdrt.runtime.images import read_parameters
from sdrt.runtime.schedulers import SCHEDULERS, option_keys

UNET_WEIGHTS = "unet/diffusion_pytorch_model.safetensors"
VERSION = metadata.version("sdrt")


def _sha256(*paths: Path) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.read_bytes())
    return digest.hexdigest()


# -- what export records ---------------------------------------------------------------


def test_model_hash_is_the_sha256_of_the_unet_weights_and_model_the_folder_name(tiny_sd15, sd15_artifacts):
    checkpoint = read_manifest(sd15_artifacts).checkpoint
    sha = _sha256(tiny_sd15 / UNET_WEIGHTS)
    assert checkpoint == CheckpointInfo(tiny_sd15.name, sha, (UNET_WEIGHTS,))
    assert checkpoint.model_hash == sha[:10]   # AUTOMATIC1111's short hash: 10 hex digits
    data = json.loads((sd15_artifacts / "manifest.json").read_text())["checkpoint"]
    assert data["name"] == "tiny-sd15" and data["model_hash"] == sha[:10]


def test_a_sharded_unet_is_hashed_as_its_shards_in_number_order(tmp_path):
    from sdrt.export.checkpoint import Checkpoint, Weights
    from sdrt.export.exporter import checkpoint_info
    unet = tmp_path / "my-model" / "unet"
    unet.mkdir(parents=True)
    shards = {"diffusion_pytorch_model-00001-of-00002.safetensors": b"first shard bytes",
              "diffusion_pytorch_model-00002-of-00002.safetensors": b"second shard"}
    for name, data in shards.items():
        (unet / name).write_bytes(data)
    # Tensor names sort the other way round: the shard order is the shards' numbers.
    index = {"weight_map": {"a.weight": "diffusion_pytorch_model-00002-of-00002.safetensors",
                            "b.weight": "diffusion_pytorch_model-00001-of-00002.safetensors"}}
    (unet / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    ckpt = Checkpoint(tmp_path / "my-model", {}, {}, {},
                      {"unet": Weights("diffusion_pytorch_model.safetensors.index.json", True, None)})
    info = checkpoint_info(ckpt)
    assert info.sha256 == hashlib.sha256(b"first shard bytes" + b"second shard").hexdigest()
    assert info.name == "my-model"
    assert info.weights == tuple(f"unet/{n}" for n in sorted(shards))


@pytest.mark.parametrize("path, name", [
    ("/cache/huggingface/hub/models--runwayml--stable-diffusion-v1-5/snapshots/" + "a" * 40, "stable-diffusion-v1-5"),
    ("/cache/hub/models--tiny-sd/snapshots/" + "0123456789abcdef" * 2 + "01234567", "tiny-sd"),
    ("/models/dreamshaper_8", "dreamshaper_8"),
    ("/models/snapshots/" + "b" * 40, "b" * 40),        # not a hub cache: the folder's own name
    ("/models/my model, v2: final", "my model_ v2_ final"),   # what would break the text becomes "_"
])
def test_model_name_is_the_hub_repo_name_or_the_folder_name(path, name):
    assert model_name(path) == name


def test_a_hub_cache_snapshot_is_named_after_its_repo_at_export(tiny_sd15, tmp_path):
    from sdrt.export.checkpoint import open_checkpoint
    from sdrt.export.exporter import checkpoint_info
    snapshot = tmp_path / "hub" / "models--my-org--my-model" / "snapshots" / ("c0ffee" * 7)[:40]
    shutil.copytree(tiny_sd15, snapshot)
    info = checkpoint_info(open_checkpoint(snapshot))
    assert info.name == "my-model"
    assert info.sha256 == _sha256(tiny_sd15 / UNET_WEIGHTS)
    assert checkpoint_info(open_checkpoint(snapshot), "Chosen Name").name == "Chosen Name"


@pytest.mark.parametrize("name, words", [
    ("a, b", "holds ','"), ("v1:5", "holds ':'"), ("two\nlines", "holds '\\n'"), ('say "hi"', "holds '\"'"),
    ("", "non-empty"), (" padded", "spaces"),
])
def test_export_refuses_a_model_name_that_would_break_the_text_before_any_work(tiny_sd15, tmp_path, capsys,
                                                                                name, words):
    out = tmp_path / "art"
    assert main(["export", str(tiny_sd15), "--out", str(out), "--model-name", name]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model name" in err[0] and words in err[0], err
    assert not out.exists()


def test_model_name_given_at_export_is_the_pngs_model(tiny_sd15, export_into, tmp_path_factory):
    folder = export_into(tiny_sd15, tmp_path_factory.mktemp("named") / "art", model_name="My Model v2", verify=False)
    result = Pipeline.load(folder)("a fox", steps=1, seed=1)
    assert f"Model hash: {_sha256(tiny_sd15 / UNET_WEIGHTS)[:10]}, Model: My Model v2," in result.parameters


def _edit_manifest(folder: Path, edit) -> None:
    path = folder / "manifest.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def test_an_older_manifest_without_checkpoint_names_the_model_from_its_source(sd15_artifacts, tmp_path):
    folder = tmp_path / "old"
    shutil.copytree(sd15_artifacts, folder)
    hub = "/home/me/.cache/huggingface/hub/models--org--cool-model/snapshots/" + "d" * 40

    def older(data):
        del data["checkpoint"]
        data["source"] = hub
    _edit_manifest(folder, older)
    pipe = Pipeline.load(folder)
    result = pipe("a fox", steps=1, seed=1)
    assert f", Size: {pipe.width}x{pipe.height}, Model: cool-model, RNG: CPU," in result.parameters   # no Model hash
    assert "Model hash" not in result.parameters


@pytest.mark.parametrize("checkpoint, words", [
    ({"name": "evil\nSteps: 1"}, "holds '\\n'"),
    ({"name": "m", "sha256": "xyz"}, "64 lowercase hex digits"),
    ({"name": "m", "sha256": "a" * 64, "model_hash": "b" * 10}, "first 10 digits"),
    ("just a string", "must be an object"),
])
def test_a_hand_edited_checkpoint_entry_is_refused(sd15_artifacts, tmp_path, checkpoint, words):
    folder = tmp_path / "edited"
    shutil.copytree(sd15_artifacts, folder)
    _edit_manifest(folder, lambda data: data.update(checkpoint=checkpoint))
    with pytest.raises(ArtifactError, match="checkpoint") as e:
        read_manifest(folder)
    assert words in str(e.value)


# -- what a third-party reader makes of sdrt's PNGs ---------------------------------------


def test_sd_parsers_reads_prompt_sampler_seed_size_and_model_hash_from_sdrt_pngs(tiny_sd15, sd15_artifacts,
                                                                                  tmp_path):
    from sd_parsers import ParserManager
    from sd_parsers.data import Generators
    out = tmp_path / "fox.png"
    assert main(["generate", str(sd15_artifacts), "--prompt", "a watercolor fox, (red:1.2)\nsecond line",
                 "--negative-prompt", "blurry, low quality", "--steps", "3", "--guidance", "6.5",
                 "--scheduler", "DPM++ 2M Karras", "--scheduler-option", "solver_order=3", "--clip-skip", "1",
                 "--seed", "42", "--out", str(out)]) == 0
    info = ParserManager().parse(out)
    assert info is not None and info.generator is Generators.AUTOMATIC1111
    (sampler,) = info.samplers
    assert [p.value for p in sampler.prompts] == ["a watercolor fox, (red:1.2)\nsecond line"]
    assert [p.value for p in sampler.negative_prompts] == ["blurry, low quality"]
    assert sampler.name == "DPM++ 2M"
    assert sampler.parameters == {"steps": "3", "cfg_scale": "6.5", "seed": "42", "scheduler": "Karras"}
    assert sampler.model.hash == _sha256(tiny_sd15 / UNET_WEIGHTS)[:10]
    assert sampler.model.name == "tiny-sd15"
    shape = read_manifest(sd15_artifacts).shape
    assert info.metadata["Size"] == f"{shape.width}x{shape.height}" and info.metadata["Clip skip"] == "2"
    assert info.metadata["Version"] == f"sdrt {VERSION}"


def test_images_from_the_python_api_carry_the_text_sd_parsers_reads(sd15_artifacts, tmp_path):
    from sd_parsers import ParserManager

    from sdrt.runtime.images import write_pngs
    result = Pipeline.load(sd15_artifacts)("a fox", negative_prompt="fog", steps=2, seed=3, scheduler="euler_a",
                                           generator="numpy", prompt_weighting=False)
    image = result.images[0]
    assert image.info["parameters"] == result.parameters
    write_pngs([tmp_path / "api.png"], result.images)   # each image's own text
    assert read_parameters(tmp_path / "api.png") == result.parameters
    (sampler,) = ParserManager().parse(tmp_path / "api.png").samplers
    assert (sampler.name, sampler.parameters["seed"], sampler.prompts[0].value) == ("Euler a", "3", "a fox")
    fields = infotext.parse(result.parameters).fields
    assert (fields["RNG"], fields["Emphasis"]) == ("NumPy", "None")


# -- AUTOMATIC1111's texts, read ---------------------------------------------------------

# The example in AUTOMATIC1111's own parse_generation_parameters docstring (an older
# web UI: no Schedule type, no RNG: its default GPU noise).
A1111_DOCSTRING = """girl with an artist's beret, determined, blue eyes, desert scene, computer monitors, heavy makeup, by Alphonse Mucha and Charlie Bowater, ((eyeshadow)), (coquettish), detailed, intricate
Negative prompt: ugly, fat, obese, chubby, (((deformed))), [blurry], bad anatomy, disfigured, poorly drawn face, mutation, mutated, (extra_limb), (ugly), (poorly drawn hands), messy drawing
Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 965400086, Size: 512x512, Model hash: 45dee52b"""

# A web UI 1.10 txt2img text: multi-line prompts, BREAK, a separate schedule type, clip
# skip, CPU noise, and extension keys with JSON-quoted values.
A1111_MODERN = """masterpiece, best quality, a castle on a hill,
(dramatic lighting:1.2), BREAK
sunset sky
Negative prompt: lowres, bad anatomy,
watermark
Steps: 30, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: 1234567890, Size: 512x768, Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Clip skip: 2, RNG: CPU, Lora hashes: "add_detail: 7c6bad76eb54, more_details: 3b8aa1d351ef", TI hashes: "easynegative: c74b4e810b03", Version: v1.10.1"""

# img2img inpainting (Mask blur is written for inpainting only), with the "No norm" emphasis.
A1111_INPAINT = """a red fox in the snow
Steps: 25, Sampler: Euler, Schedule type: Automatic, CFG scale: 7, Seed: 77, Size: 512x512, Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Denoising strength: 0.75, Mask blur: 4, Inpaint area: Only masked, Masked area padding: 32, RNG: CPU, Emphasis: No norm, Version: v1.9.4"""

# txt2img with the hires fix: its Denoising strength belongs to the second pass.
A1111_HIRES = """portrait of an old sailor
Steps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7.5, Seed: 5, Size: 512x512, Model hash: 6ce0161689, Denoising strength: 0.7, Hires upscale: 2, Hires steps: 10, Hires upscaler: Latent, RNG: NumPy, Version: v1.6.0"""


def test_automatic1111_text_is_split_into_prompt_negative_and_fields():
    info = infotext.parse(A1111_MODERN)
    assert info.prompt == "masterpiece, best quality, a castle on a hill,\n(dramatic lighting:1.2), BREAK\nsunset sky"
    assert info.negative_prompt == "lowres, bad anatomy,\nwatermark"
    assert info.fields["Lora hashes"] == "add_detail: 7c6bad76eb54, more_details: 3b8aa1d351ef"
    assert info.fields["Size"] == "512x768" and info.fields["Version"] == "v1.10.1"
    assert list(info.fields)[:4] == ["Steps", "Sampler", "Schedule type", "CFG scale"]


def test_automatic1111_text_gives_the_pipeline_arguments():
    s = infotext.settings(A1111_MODERN)
    assert s.kwargs == dict(
        prompt="masterpiece, best quality, a castle on a hill,\n(dramatic lighting:1.2), BREAK\nsunset sky",
        negative_prompt="lowres, bad anatomy,\nwatermark", steps=30, guidance=6.5, seed=1234567890,
        scheduler="dpmpp_2m_karras", clip_skip=1, prompt_weighting=True, generator="torch")
    assert (s.task, s.size, s.model, s.model_hash) == (
        Task.TEXT_TO_IMAGE, (512, 768), "v1-5-pruned-emaonly", "6ce0161689")
    # the embeddings are files the text names only by hash: the user must pass them
    assert s.notes == ("the image used textual-inversion embeddings (easynegative: c74b4e810b03): pass them with "
                       "--embedding FILE to reproduce it",)


def test_automatic1111_default_gpu_noise_is_refused_unless_the_generator_is_given():
    with pytest.raises(InvalidInput, match=r"RNG: GPU \(AUTOMATIC1111's default.*cannot reproduce.*--generator"):
        infotext.settings(A1111_DOCSTRING)
    s = infotext.settings(A1111_DOCSTRING, skip={"generator"})
    assert s.kwargs == dict(
        prompt=A1111_DOCSTRING.split("\n")[0], negative_prompt=A1111_DOCSTRING.split("\n")[1][len("Negative prompt: "):],
        steps=20, guidance=7.0, seed=965400086, scheduler="euler_a", prompt_weighting=True)
    assert s.model_hash == "45dee52b" and s.model == ""
    with pytest.raises(InvalidInput, match="RNG: NV: .*GPU generator"):
        infotext.settings(A1111_MODERN.replace("RNG: CPU", "RNG: NV"))


def test_automatic1111_inpainting_and_hires_texts_say_what_is_not_reproduced():
    inpaint = infotext.settings(A1111_INPAINT)
    assert inpaint.task is Task.INPAINT
    assert inpaint.kwargs["strength"] == 0.75 and inpaint.kwargs["scheduler"] == "euler"
    assert inpaint.notes == ("Emphasis: No norm is not followed: sdrt weights prompts as AUTOMATIC1111's default "
                             "emphasis ('Original') does",)
    hires = infotext.settings(A1111_HIRES)
    assert hires.task is Task.TEXT_TO_IMAGE and "strength" not in hires.kwargs
    assert hires.kwargs["scheduler"] == "dpmpp_2m_karras" and hires.kwargs["generator"] == "numpy"
    assert len(hires.notes) == 1 and "hires fix" in hires.notes[0] and "Hires upscale: 2" in hires.notes[0]


def test_a_text_with_fewer_than_three_fields_is_all_prompt_as_in_automatic1111():
    info = infotext.parse("a fox\nSteps: 20, Seed: 3")
    assert info.prompt == "a fox\nSteps: 20, Seed: 3" and info.fields == {}


@pytest.mark.parametrize("edit, words", [
    (("Steps: 30", "Steps: many"), "Steps: 'many' is not an integer"),
    (("CFG scale: 6.5", "CFG scale: high"), "CFG scale: 'high' is not a number"),
    (("Size: 512x768", "Size: big"), "Size: 'big' is not WIDTHxHEIGHT"),
    (("Sampler: DPM++ 2M,", "Sampler: DPM fast,"), "'DPM fast' is not supported"),
    (("Clip skip: 2", "Clip skip: 0"), "Clip skip: 0 must be 1 or more"),
    (("RNG: CPU", "RNG: Quantum"), "RNG: 'Quantum' is not a generator"),
])
def test_bad_values_are_refused_naming_the_key_and_value(edit, words):
    with pytest.raises(InvalidInput) as e:
        infotext.settings(A1111_MODERN.replace(*edit))
    assert words in str(e.value)


def test_quote_is_json_for_values_that_would_split_and_unquote_inverts_it():
    assert infotext.quote("Euler a") == "Euler a"
    assert infotext.quote('{"a": 1}') == '"{\\"a\\": 1}"'
    assert infotext.quote("ünïcode, kept") == '"ünïcode, kept"'   # ensure_ascii=False, as AUTOMATIC1111
    for text in ("a, b", "k: v", "two\nlines", 'say "x", y'):
        assert infotext.unquote(infotext.quote(text)) == text


# -- the text written, read back: every setting survives --------------------------------

_line = st.text(st.characters(blacklist_categories=("Cs", "Cc", "Zl", "Zp")), max_size=30).map(str.strip).filter(
    lambda s: not s.startswith("Negative prompt:"))
# A leading empty line is not kept: AUTOMATIC1111 strips the whole text first.
_prompt = st.lists(_line, min_size=1, max_size=3).map("\n".join).filter(lambda p: not p.startswith("\n"))


@st.composite
def configs(draw):
    scheduler = draw(st.sampled_from(sorted(SCHEDULERS)))
    task = draw(st.sampled_from(list(Task)))
    options = None
    if draw(st.booleans()) and "timestep_spacing" in option_keys(scheduler):
        options = {"timestep_spacing": draw(st.sampled_from(["trailing", "leading", "linspace"]))}
    return GenerationConfig.create(
        draw(_prompt), draw(st.none() | _prompt), draw(st.integers(1, 1000)),
        draw(st.floats(0, 100, allow_nan=False)), scheduler, draw(st.integers(0, 2**64 - 1)), batch=1, task=task,
        strength=draw(st.floats(0, 1, exclude_min=True)) if task.takes_image else None,
        generator=draw(st.sampled_from(["torch", "numpy"])), scheduler_options=options,
        prompt_weighting=draw(st.booleans()), clip_skip=draw(st.integers(0, 11)))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(config=configs(), size=st.tuples(st.integers(8, 4096), st.integers(8, 4096)))
def test_every_setting_survives_the_text_written_and_read_back(config, size):
    text = infotext.parameters_text(config, *size, model="tiny-sd15", model_hash="0123456789")
    s = infotext.settings(text)
    kw = s.kwargs
    again = GenerationConfig.create(kw["prompt"], kw.get("negative_prompt"), kw["steps"], kw["guidance"],
                                    kw["scheduler"], kw["seed"], batch=1, task=s.task, strength=kw.get("strength"),
                                    generator=kw["generator"], scheduler_options=kw.get("scheduler_options"),
                                    prompt_weighting=kw["prompt_weighting"], clip_skip=kw.get("clip_skip"))
    # The text cannot tell an explicit empty negative prompt from none (AUTOMATIC1111
    # writes no line for either); only SDXL's force_zeros_for_empty_prompt tells them apart.
    assert again == dataclasses.replace(config, negative_given=any(config.negative_prompts))
    assert (s.size, s.model, s.model_hash) == (size, "tiny-sd15", "0123456789")
