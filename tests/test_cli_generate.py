"""`sdrt generate`, `sdrt info` and `sdrt demo` as a user runs them."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdrt.runtime import Pipeline
from sdrt.cli.main import main
from sdrt.runtime.images import read_parameters


def _generate(folder, out, *extra):
    return main(["generate", str(folder), "--prompt", "a watercolor fox", "--negative-prompt", "blurry",
                 "--steps", "3", "--guidance", "6.5", "--scheduler", "euler_a", "--seed", "42",
                 "--out", str(out), *extra])


def test_generate_writes_the_png_with_a_parameters_chunk_and_prints_timings(sd15_artifacts, tmp_path, capsys):
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
    assert read_parameters(out) == (
        "a watercolor fox\nNegative prompt: blurry\n"
        f"Steps: 3, Sampler: Euler a, Schedule type: Uniform, CFG scale: 6.5, Seed: 42, Size: {pipe.width}x{pipe.height}, "
        f"Model: {Path(pipe.manifest.source).name}, RNG: CPU")
    # The file holds the same image the API gives for the same settings.
    api = pipe("a watercolor fox", negative_prompt="blurry", steps=3, guidance=6.5, scheduler="euler_a", seed=42)
    np.testing.assert_array_equal(pixels, np.asarray(api.images[0]))


def test_truncated_prompt_is_one_warning_line_saying_how_many_tokens_were_dropped(sd15_artifacts, tmp_path, capsys):
    prompt = "word " * 100   # 100 tokens + start/end: 25 over CLIP's 77
    assert main(["generate", str(sd15_artifacts), "--prompt", prompt, "--steps", "1",
                 "--out", str(tmp_path / "long.png")]) == 0
    warned = [ln for ln in capsys.readouterr().err.splitlines() if "warning" in ln]
    assert len(warned) == 1 and warned[0].startswith("sdrt generate: warning: 25 token(s)")


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


def test_parameters_text_follows_the_a1111_convention():
    from sdrt.runtime.images import parameters_text
    assert parameters_text("a fox", "", 25, "euler_a", 7.5, 42, 768, 512, "sd15") == (
        "a fox\nSteps: 25, Sampler: Euler a, Schedule type: Uniform, CFG scale: 7.5, Seed: 42, Size: 768x512, "
        "Model: sd15, RNG: CPU")
    assert parameters_text("a\nfox", "blur", 4, "dpmpp_2m_karras", 1.0, None, 64, 64, generator="numpy") == (
        "a\nfox\nNegative prompt: blur\nSteps: 4, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 1, "
        "Size: 64x64, RNG: NumPy")
    assert parameters_text("a fox", "", 10, "pndm", 7.5, 1, 64, 64, task="inpaint", strength=0.6) == (
        "a fox\nSteps: 10, Sampler: PLMS, Schedule type: Uniform, CFG scale: 7.5, Seed: 1, Size: 64x64, "
        "Denoising strength: 0.6, Task: inpaint, RNG: CPU")
    # A sampler AUTOMATIC1111 lacks keeps its sdrt name; options are one quoted JSON value.
    assert parameters_text("a fox", "", 10, "ddim", 7.5, 1, 64, 64,
                           scheduler_options=(("timestep_spacing", "trailing"),)) == (
        'a fox\nSteps: 10, Sampler: DDIM, Schedule type: Uniform, CFG scale: 7.5, Seed: 1, Size: 64x64, '
        'Scheduler options: "{\\"timestep_spacing\\": \\"trailing\\"}", RNG: CPU')


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
    assert "Denoising strength: 0.6, Task: inpaint, RNG: CPU" in read_parameters(out)
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
