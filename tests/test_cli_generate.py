"""`sdrt generate`, `sdrt info` and `sdrt demo` as a user runs them."""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import sys
from importlib import metadata

import numpy as np
import pytest
from PIL import Image

from sdrt.cli.main import main
from sdrt.engines.manifest import read_manifest
from sdrt.runtime import Pipeline
from sdrt.runtime.images import read_parameters

VERSION = metadata.version("sdrt")


def _generate(folder, out, *extra):
    return main(["generate", str(folder), "--prompt", "a watercolor fox", "--negative-prompt", "blurry",
                 "--steps", "3", "--guidance", "6.5", "--scheduler", "euler_a", "--seed", "42",
                 "--out", str(out), *extra])


def test_generate_writes_the_png_with_a_parameters_chunk_and_prints_timings(tiny_sd15, sd15_artifacts, tmp_path,
                                                                           capsys):
    out = tmp_path / "fox.png"
    assert _generate(sd15_artifacts, out) == 0
    printed = capsys.readouterr()
    assert f"wrote {out}" in printed.out
    for row in ("text encoder", "U-Net per step (median)", "scheduler+host per step", "VAE decoder", "total"):
        assert row in printed.out
    assert re.search(r"\[ *[0-9.]+s\] U-Net call 3/3", printed.err)   # progress with elapsed time
    with Image.open(out) as im:
        assert im.format == "PNG" and im.mode == "RGB"
        pixels = np.asarray(im)
    pipe = Pipeline.load(sd15_artifacts)
    assert im.size == (pipe.width, pipe.height)
    # Model hash: AUTOMATIC1111's, the first 10 hex digits of the SHA-256 of the (U-Net) weights;
    # Model: the checkpoint folder's name.
    model_hash = hashlib.sha256((tiny_sd15 / "unet/diffusion_pytorch_model.safetensors").read_bytes()).hexdigest()[:10]
    assert read_parameters(out) == (
        "a watercolor fox\nNegative prompt: blurry\n"
        f"Steps: 3, Sampler: Euler a, Schedule type: Uniform, CFG scale: 6.5, Seed: 42, Size: {pipe.width}x{pipe.height}, "
        f"Model hash: {model_hash}, Model: {tiny_sd15.name}, RNG: CPU, Version: sdrt {VERSION}")
    # The file holds the same image and text the API gives for the same settings.
    api = pipe("a watercolor fox", negative_prompt="blurry", steps=3, guidance=6.5, scheduler="euler_a", seed=42)
    np.testing.assert_array_equal(pixels, np.asarray(api.images[0]))
    assert api.parameters == api.images[0].info["parameters"] == read_parameters(out)


def test_truncated_prompt_is_one_warning_line_saying_how_many_tokens_were_dropped(sd15_artifacts, tmp_path, capsys):
    prompt = "word " * 100   # 100 tokens + start/end: 25 over CLIP's 77
    assert main(["generate", str(sd15_artifacts), "--prompt", prompt, "--steps", "1",
                 "--out", str(tmp_path / "long.png")]) == 0
    warned = [ln for ln in capsys.readouterr().err.splitlines() if "warning" in ln]
    assert len(warned) == 1 and warned[0].startswith("sdrt generate: warning: ")
    assert "100 tokens" in warned[0] and "25 were dropped" in warned[0]


def test_existing_output_is_not_overwritten_without_force(sd15_artifacts, tmp_path, capsys):
    out = tmp_path / "mine.png"
    out.write_bytes(b"user's file")
    assert _generate(sd15_artifacts, out) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"sdrt generate: error: {out} already exists; pass --force to overwrite it"
    assert out.read_bytes() == b"user's file"
    assert _generate(sd15_artifacts, out, "--force") == 0
    assert read_parameters(out).startswith("a watercolor fox")


@pytest.mark.parametrize("args, words", [
    (["--scheduler", "k_lms"], "unknown scheduler 'k_lms': choose one of ddim, pndm"),
    (["--steps", "0"], "steps must be from 1 to 1000, got 0"),
    (["--steps", "100000"], "steps must be from 1 to 1000, got 100000"),
    (["--guidance", "nan"], "guidance must be a finite number from 0 to 100, got nan"),
    (["--seed", str(2**64)], f"seed must be from 0 to 2**64-1 ({2**64 - 1}), got {2**64}"),
    (["--seed", "-3"], "seed must be from 0 to 2**64-1"),
    (["--out", "picture.jpg"], "must end in .png"),
])
def test_bad_settings_exit_2_with_one_line_naming_the_value(sd15_artifacts, tmp_path, capsys, args, words):
    rc = main(["generate", str(sd15_artifacts), "--prompt", "x", "--out", str(tmp_path / "o.png"), *args])
    err = capsys.readouterr().err
    assert rc == 2
    assert len(err.strip().splitlines()) == 1 and words in err, err
    assert not (tmp_path / "o.png").exists()


def test_missing_and_incomplete_folders_exit_2(tmp_path, capsys):
    assert main(["generate", str(tmp_path / "nope"), "--prompt", "x"]) == 2
    assert "nope does not exist" in capsys.readouterr().err
    assert main(["info", str(tmp_path)]) == 2
    assert "has no manifest.json" in capsys.readouterr().err


def test_errors_from_the_installed_command_have_no_traceback(tmp_path):
    # As a user sees it: a real process, its exit status and its whole stderr.
    proc = subprocess.run([sys.executable, "-m", "sdrt.cli.main", "generate", str(tmp_path / "missing"),
                           "--prompt", "x"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"sdrt generate: error: artifact folder {tmp_path / 'missing'} "
                                                f"does not exist"]


def test_info_prints_facts_shapes_stages_and_files(sd15_artifacts, capsys):
    assert main(["info", str(sd15_artifacts), "--check"]) == 0
    out = capsys.readouterr().out
    pipe = Pipeline.load(sd15_artifacts)
    m = pipe.manifest
    assert f"{m.shape.width}x{m.shape.height}" in out and f"batch {m.shape.batch}" in out
    assert f"prediction {m.facts.prediction_type}" in out
    for stage, spec in m.specs.items():
        assert f"{stage.value:<13} {m.precisions[stage].value}" in out
        for t in spec.inputs + spec.outputs:
            assert f"{t.name:<22} {t.dtype.value:<8} {list(t.shape)}" in out
    for rel in m.files:
        assert rel in out
    assert "SHA-256 verified" in out


def _config(prompt="a fox", negative=None, steps=25, guidance=7.5, scheduler="euler_a", seed=42, **kw):
    from sdrt.runtime.config import GenerationConfig
    return GenerationConfig.create(prompt, negative, steps, guidance, scheduler, seed, batch=1, **kw)


def test_parameters_text_follows_the_a1111_convention():
    """The texts AUTOMATIC1111's create_infotext writes for these settings: its key order
    (Steps, Sampler, Schedule type, CFG scale, Seed, Size, Model hash, Model, Denoising
    strength, Clip skip, RNG, extensions' keys, Version), `Clip skip` from 2, values
    holding ',' or ':' JSON-quoted."""
    from sdrt.runtime.config import Task
    from sdrt.runtime.infotext import parameters_text
    v = f"Version: sdrt {VERSION}"
    assert parameters_text(_config(), 768, 512, "sd15", "0123456789") == (
        "a fox\nSteps: 25, Sampler: Euler a, Schedule type: Uniform, CFG scale: 7.5, Seed: 42, Size: 768x512, "
        f"Model hash: 0123456789, Model: sd15, RNG: CPU, {v}")
    assert parameters_text(_config("a\nfox", "blur", 4, 1.0, "dpmpp_2m_karras", 7, generator="numpy", clip_skip=1,
                                   prompt_weighting=False), 64, 64) == (
        "a\nfox\nNegative prompt: blur\nSteps: 4, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 1, Seed: 7, "
        f"Size: 64x64, Clip skip: 2, RNG: NumPy, Emphasis: None, {v}")
    assert parameters_text(_config(steps=10, scheduler="pndm", seed=1, task=Task.INPAINT, strength=0.6, clip_skip=2),
                           64, 64, "sd15", "0123456789") == (
        "a fox\nSteps: 10, Sampler: PLMS, Schedule type: Uniform, CFG scale: 7.5, Seed: 1, Size: 64x64, "
        f"Model hash: 0123456789, Model: sd15, Denoising strength: 0.6, Clip skip: 3, RNG: CPU, Task: inpaint, {v}")
    # A sampler AUTOMATIC1111 lacks keeps its sdrt name; options are one quoted JSON value.
    assert parameters_text(_config(steps=10, scheduler="deis_karras", seed=1,
                                   scheduler_options={"timestep_spacing": "trailing"}), 64, 64) == (
        'a fox\nSteps: 10, Sampler: deis, Schedule type: Karras, CFG scale: 7.5, Seed: 1, Size: 64x64, RNG: CPU, '
        f'Scheduler options: "{{\\"timestep_spacing\\": \\"trailing\\"}}", {v}')
    # Caller-given latents: the seed drew nothing, so none is recorded.
    assert ", Seed:" not in parameters_text(_config(), 64, 64, seed=False)


def test_demo_reuses_a_complete_export_in_its_folder(sd15_artifacts, tmp_path, capsys):
    out = tmp_path / "demo"
    shutil.copytree(sd15_artifacts, out / "artifacts")
    assert main(["demo", "--out", str(out), "--steps", "2", "--seed", "3"]) == 0
    printed = capsys.readouterr()
    assert "reusing the export" in printed.err and "exporting" not in printed.err
    assert f"wrote {out / 'demo.png'}" in printed.out and "U-Net per step" in printed.out
    assert read_parameters(out / "demo.png").startswith("a watercolor fox\nSteps: 2, Sampler: PLMS, Schedule type: Uniform")
    # Its own image is replaced on the next run; the folder is the demo's.
    assert main(["demo", "--out", str(out), "--steps", "2", "--seed", "4"]) == 0
    assert "Seed: 4" in read_parameters(out / "demo.png")


def test_demo_does_not_overwrite_an_image_in_a_folder_it_did_not_make(tmp_path, capsys):
    (tmp_path / "demo.png").write_bytes(b"user's")
    assert main(["demo", "--out", str(tmp_path)]) == 2
    assert "demo.png already exists; pass --force" in capsys.readouterr().err
    assert (tmp_path / "demo.png").read_bytes() == b"user's"


@pytest.mark.slow
def test_demo_makes_exports_and_generates_then_reuses_its_folder(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--steps", "3", "--seed", "1"]) == 0
    printed = capsys.readouterr()
    assert "exporting" in printed.err and f"wrote {out / 'demo.png'}" in printed.out
    assert read_parameters(out / "demo.png").startswith("a watercolor fox\nSteps: 3")
    assert main(["demo", "--out", str(out), "--steps", "2"]) == 0
    assert "reusing the export" in capsys.readouterr().err


def test_generate_image_to_image_and_inpainting_from_the_cli_equal_the_api(sd15_artifacts, tmp_path):
    from PIL import Image as PILImage
    from sdrt.runtime.images import read_parameters
    rng = np.random.default_rng(0)
    PILImage.fromarray(rng.integers(0, 256, (90, 70, 3), dtype=np.uint8)).save(tmp_path / "in.png")
    mask = np.zeros((90, 70), np.uint8)
    mask[20:60, 10:50] = 255
    PILImage.fromarray(mask).save(tmp_path / "mask.png")
    out = tmp_path / "out.png"
    assert main(["generate", str(sd15_artifacts), "--prompt", "a fox", "--image", str(tmp_path / "in.png"),
                 "--mask", str(tmp_path / "mask.png"), "--strength", "0.6", "--steps", "4", "--seed", "3",
                 "--out", str(out)]) == 0
    assert "Denoising strength: 0.6, RNG: CPU, Task: inpaint, Version: " in read_parameters(out)
    api = Pipeline.load(sd15_artifacts)("a fox", image=tmp_path / "in.png", mask_image=tmp_path / "mask.png",
                                        strength=0.6, steps=4, seed=3)
    assert np.array_equal(np.asarray(PILImage.open(out)), np.asarray(api.images[0]))


@pytest.mark.parametrize("extra, words", [
    (["--image", "{tmp}/nope.png"], "does not exist"),
    (["--image", "{tmp}/text.png"], "image"),
    (["--strength", "0.5"], "strength applies to image-to-image"),
    (["--scheduler", "lcm", "--steps", "60"], "at most original_inference_steps=50"),
])
def test_generate_bad_image_settings_are_one_line_exit_2_before_loading(sd15_artifacts, tmp_path, capsys, extra,
                                                                         words):
    (tmp_path / "text.png").write_text("not an image")
    args = [a.format(tmp=tmp_path) for a in extra]
    assert main(["generate", str(sd15_artifacts), "--prompt", "x", "--out", str(tmp_path / "o.png"), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0] and "loading" not in err[0]
    assert not (tmp_path / "o.png").exists()


# -- sdrt generate --from-png ---------------------------------------------------------------


def _pixels(path):
    with Image.open(path) as im:
        return np.asarray(im)


def _png_with_text(path, text, size=(8, 8)):
    from PIL import PngImagePlugin
    info = PngImagePlugin.PngInfo()
    if text is not None:
        info.add_text("parameters", text)
    Image.new("RGB", size).save(path, pnginfo=info)
    return path


SOURCE_FLAGS = ["--prompt", "a fox, (red:1.2)\nin the snow", "--negative-prompt", "blurry, dark", "--steps", "3",
                "--guidance", "6.5", "--scheduler", "DPM++ 2M Karras", "--scheduler-option", "solver_order=3",
                "--clip-skip", "1", "--no-weighting", "--generator", "numpy", "--seed", "7"]


@pytest.fixture(scope="module")
def source_png(sd15_artifacts, tmp_path_factory):
    out = tmp_path_factory.mktemp("from-png") / "source.png"
    assert main(["generate", str(sd15_artifacts), *SOURCE_FLAGS, "--out", str(out)]) == 0
    return out


def test_from_png_gives_the_same_parameters_and_pixels(sd15_artifacts, source_png, tmp_path):
    again = tmp_path / "again.png"
    assert main(["generate", str(sd15_artifacts), "--from-png", str(source_png), "--out", str(again)]) == 0
    assert read_parameters(again) == read_parameters(source_png)
    np.testing.assert_array_equal(_pixels(again), _pixels(source_png))


@pytest.mark.parametrize("override", [["--seed", "8"], ["--steps", "2", "--guidance", "3"],
                                      ["--scheduler", "euler"],   # drops the PNG's DPM-Solver options
                                      ["--scheduler-option", "solver_order=2"],   # replaces the PNG's
                                      ["--scheduler-option", "timestep_spacing=trailing"],   # adds to them
                                      ["--clip-skip", "0"],
                                      ["--prompt", "a cat"], ["--generator", "torch"]])
def test_flags_given_with_from_png_override_its_values(sd15_artifacts, source_png, tmp_path, override):
    """The oracle: the same command with the source's flags and the override given explicitly."""
    via_png, direct = tmp_path / "via.png", tmp_path / "direct.png"
    assert main(["generate", str(sd15_artifacts), "--from-png", str(source_png), *override, "--out", str(via_png)]) == 0
    flags = list(SOURCE_FLAGS)
    if "--scheduler" in override:
        i = flags.index("--scheduler-option")
        del flags[i:i + 2]
    for flag, value in zip(override[::2], override[1::2]):
        same = [i for i, f in enumerate(flags) if f == flag and (flag != "--scheduler-option" or
                                                                  flags[i + 1].split("=")[0] == value.split("=")[0])]
        if same:
            flags[same[0] + 1] = value
        else:
            flags += [flag, value]
    assert main(["generate", str(sd15_artifacts), *flags, "--out", str(direct)]) == 0
    assert read_parameters(via_png) == read_parameters(direct) != read_parameters(source_png)
    np.testing.assert_array_equal(_pixels(via_png), _pixels(direct))


def test_from_png_of_an_image_task_needs_its_input_image_and_then_repeats_it(sd15_artifacts, tmp_path, capsys):
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "in.png")
    source, again = tmp_path / "img2img.png", tmp_path / "again.png"
    assert main(["generate", str(sd15_artifacts), "--prompt", "a fox", "--image", str(tmp_path / "in.png"),
                 "--strength", "0.6", "--steps", "4", "--seed", "3", "--out", str(source)]) == 0
    capsys.readouterr()
    assert main(["generate", str(sd15_artifacts), "--from-png", str(source), "--out", str(again)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"sdrt generate: error: {source} was made by img2img (Denoising strength 0.6): pass --image to " \
                  f"regenerate it"
    assert main(["generate", str(sd15_artifacts), "--from-png", str(source), "--image", str(tmp_path / "in.png"),
                 "--out", str(again)]) == 0
    assert read_parameters(again) == read_parameters(source)
    np.testing.assert_array_equal(_pixels(again), _pixels(source))


def test_an_automatic1111_png_regenerates_as_its_settings_given_as_flags(sd15_artifacts, tmp_path, capsys):
    """AUTOMATIC1111's text (another model's hash: one warning line) gives the image the
    equivalent flags give: its sampler and schedule type, CFG scale, clip skip, CPU noise."""
    shape = read_manifest(sd15_artifacts).shape
    text = ("masterpiece, a castle on a hill,\n(dramatic lighting:1.2)\nNegative prompt: lowres, watermark\n"
            "Steps: 3, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: 1234567890, "
            f"Size: {shape.width}x{shape.height}, Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Clip skip: 2, "
            'RNG: CPU, Lora hashes: "add_detail: 7c6bad76eb54", Version: v1.10.1')
    png = _png_with_text(tmp_path / "a1111.png", text)
    via_png, direct = tmp_path / "via.png", tmp_path / "direct.png"
    assert main(["generate", str(sd15_artifacts), "--from-png", str(png), "--out", str(via_png)]) == 0
    warned = [ln for ln in capsys.readouterr().err.splitlines() if "warning" in ln]
    assert len(warned) == 1 and warned[0].startswith(
        f"sdrt generate: warning: {png} was made with model hash 6ce0161689 (v1-5-pruned-emaonly), this artifact's is ")
    assert main(["generate", str(sd15_artifacts), "--prompt", "masterpiece, a castle on a hill,\n(dramatic lighting:1.2)",
                 "--negative-prompt", "lowres, watermark", "--steps", "3", "--scheduler", "dpmpp_2m_karras",
                 "--guidance", "6.5", "--seed", "1234567890", "--clip-skip", "1", "--out", str(direct)]) == 0
    assert read_parameters(via_png) == read_parameters(direct)
    np.testing.assert_array_equal(_pixels(via_png), _pixels(direct))


A1111_512 = ("a fox\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 965400086, Size: 512x768, "
             "Model hash: 45dee52b")


@pytest.mark.parametrize("text, extra, words", [
    (None, [], "{png} has no 'parameters' text"),
    (A1111_512 + ", RNG: CPU", [], "{png} is 512x768 (its Size), and this artifact generates {w}x{h}: export the "
                                   "model with --width 512 --height 768"),
    (A1111_512.replace("512x768", "{w}x{h}"), [], "{png}: RNG: GPU (AUTOMATIC1111's default when no RNG is recorded)"),
    ("a fox\nSteps: 2, Sampler: Euler, CFG scale: 7, Seed: 1, Size: {w}x{h}, Denoising strength: 0.8, Mask blur: 4, "
     "RNG: CPU", ["--image", "{png}"], "{png} was made by inpaint (Denoising strength 0.8): pass --mask to regenerate"),
    ("a fox\nSteps: 2, Sampler: DPM fast, CFG scale: 7, Size: {w}x{h}, RNG: CPU", [],
     "{png}: Sampler: 'DPM fast': the AUTOMATIC1111 sampler 'DPM fast' is not supported"),
    ("a fox\nSteps: 2000, Sampler: Euler, CFG scale: 7, Size: {w}x{h}, RNG: CPU", [], "steps must be from 1 to 1000"),
])
def test_from_png_errors_are_one_line_exit_2_before_loading(sd15_artifacts, tmp_path, capsys, monkeypatch,
                                                            text, extra, words):
    from sdrt.runtime.pipeline import Pipeline as Loaded

    def no_load(*a, **k):
        raise AssertionError("engines loaded")
    monkeypatch.setattr(Loaded, "load", no_load)
    shape = read_manifest(sd15_artifacts).shape
    png = tmp_path / "src.png"
    fill = dict(png=png, w=shape.width, h=shape.height)
    _png_with_text(png, None if text is None else text.format(**fill))
    args = [a.format(**fill) for a in extra]
    assert main(["generate", str(sd15_artifacts), "--from-png", str(png), *args, "--out", str(tmp_path / "o.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words.format(**fill) in err[0], err
    assert not (tmp_path / "o.png").exists()


def test_without_from_png_a_prompt_is_required(sd15_artifacts, capsys):
    assert main(["generate", str(sd15_artifacts)]) == 2
    assert capsys.readouterr().err.strip() == (
        "sdrt generate: error: the following arguments are required: --prompt (or --from-png IMAGE.png, whose prompt "
        "is used)")


def test_automatic1111_gpu_noise_is_regenerated_with_cpu_noise_when_the_generator_is_given(sd15_artifacts, tmp_path):
    shape = read_manifest(sd15_artifacts).shape
    png = _png_with_text(tmp_path / "gpu.png", A1111_512.replace("512x768", f"{shape.width}x{shape.height}")
                         .replace("Steps: 20", "Steps: 2"))
    out = tmp_path / "cpu.png"
    assert main(["generate", str(sd15_artifacts), "--from-png", str(png), "--generator", "torch",
                 "--out", str(out)]) == 0
    assert "Steps: 2, Sampler: Euler a, Schedule type: Uniform, CFG scale: 7, Seed: 965400086," in read_parameters(out)
