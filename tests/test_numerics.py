"""A stage that produces NaN or Inf stops the generation with NumericsError naming
the stage (and the step, for the U-Net); no image is returned or saved.

The faults are planted in copies of the exported SD 1.5 folder by editing the graphs
with the `onnx` package and re-recording them in the manifest, as a re-export would:
- the VAE decoder's output times +inf: what an fp16 VAE overflow does (the "black
  image" bug); the error must suggest the fp32 VAE;
- the U-Net's output plus NaN once the timestep falls below a threshold: NaN from a
  given step on, so the message must name that step (found from diffusers' own
  timesteps, the oracle, not from our sampler).
"""

from __future__ import annotations

import dataclasses
import re
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from sdrt.engines.errors import NumericsError
from sdrt.engines.manifest import file_record, read_manifest, write_manifest
from sdrt.engines.specs import IMAGES, LATENT, TEXT_EMBEDDINGS, TIMESTEP, Stage
from sdrt.cli.main import main
from sdrt.runtime.pipeline import Pipeline

STEPS = 4
NAN_BELOW_TIMESTEP = 400.0


def _rewrite_output(folder: Path, stage: Stage, output: str, make_nodes) -> None:
    """Rename the stage's graph output to `<output>_raw` and compute `output` from it
    with the nodes `make_nodes(raw_name, out_name)` returns; re-record the manifest."""
    path = folder / stage.onnx_file
    model = onnx.load(str(path), load_external_data=False)
    raw = f"{output}_raw"
    for node in model.graph.node:
        node.output[:] = [raw if o == output else o for o in node.output]
    nodes, initializers = make_nodes(raw, output)
    model.graph.node.extend(nodes)
    model.graph.initializer.extend(initializers)
    onnx.save(model, str(path))
    manifest = read_manifest(folder)
    records = dict(manifest.files)
    records[stage.onnx_file] = file_record(folder, stage.onnx_file)
    write_manifest(folder, dataclasses.replace(manifest, files=records))


def _times_inf(raw: str, out: str):
    inf = numpy_helper.from_array(np.array(np.inf, dtype=np.float32), "plant_inf")
    return [helper.make_node("Mul", [raw, "plant_inf"], [out])], [inf]


def _nan_below_timestep(raw: str, out: str):
    consts = [numpy_helper.from_array(np.array([NAN_BELOW_TIMESTEP], np.float32), "plant_threshold"),
              numpy_helper.from_array(np.array(np.nan, np.float32), "plant_nan"),
              numpy_helper.from_array(np.array(0.0, np.float32), "plant_zero")]
    nodes = [helper.make_node("Less", [TIMESTEP, "plant_threshold"], ["plant_late"]),
             helper.make_node("Where", ["plant_late", "plant_nan", "plant_zero"], ["plant_add"]),
             helper.make_node("Add", [raw, "plant_add"], [out])]
    return nodes, consts


@pytest.fixture
def copy_of(sd15_artifacts, tmp_path):
    def make(name: str) -> Path:
        folder = tmp_path / name
        shutil.copytree(sd15_artifacts, folder, ignore=shutil.ignore_patterns(".sdrt-cache"))
        return folder
    return make


def _generate_cli(folder: Path, out: Path, capsys, scheduler: str = "ddim") -> list[str]:
    capsys.readouterr()
    code = main(["generate", str(folder), "--prompt", "a fox", "--steps", str(STEPS), "--scheduler", scheduler,
                 "--seed", "1", "--out", str(out)])
    assert code == 2
    return [ln for ln in capsys.readouterr().err.splitlines() if not re.match(r"\[\s*[\d.]+ ?s\] ", ln)]


def test_vae_overflow_is_reported_with_the_fp32_fix_and_no_image_is_saved(copy_of, tmp_path, capsys):
    folder = copy_of("vae-inf")
    _rewrite_output(folder, Stage.VAE_DECODER, IMAGES, _times_inf)
    with Pipeline.load(folder, cache=False) as pipe, pytest.raises(NumericsError) as e:
        pipe("a fox", steps=STEPS, seed=1)
    assert "VAE decoder" in str(e.value) and "--vae-precision fp32" in str(e.value)

    out = tmp_path / "image.png"
    errors = _generate_cli(folder, out, capsys)
    assert len(errors) == 1 and "VAE decoder" in errors[0] and "--vae-precision fp32" in errors[0], errors
    assert not out.exists() and not list(tmp_path.glob("*.png"))


def test_unet_nan_names_the_step_where_it_appeared(copy_of, tmp_path, capsys):
    from diffusers import DDIMScheduler

    folder = copy_of("unet-nan")
    _rewrite_output(folder, Stage.UNET, LATENT, _nan_below_timestep)
    oracle = DDIMScheduler.from_pretrained(folder / "scheduler")
    oracle.set_timesteps(STEPS)
    first_bad = next(i for i, t in enumerate(oracle.timesteps.tolist()) if t < NAN_BELOW_TIMESTEP)
    assert first_bad > 0, "the fault must appear after the first step for the check to mean anything"
    expected = f"U-Net at step {first_bad + 1} of {STEPS}"

    steps_done = []
    with Pipeline.load(folder, cache=False) as pipe, pytest.raises(NumericsError, match=expected):
        pipe("a fox", steps=STEPS, scheduler="ddim", seed=1, on_step=lambda i, n: steps_done.append(i))
    assert steps_done == list(range(1, first_bad + 1)), "it must stop at the bad step, not run on"

    out = tmp_path / "image.png"
    errors = _generate_cli(folder, out, capsys)
    assert len(errors) == 1 and expected in errors[0], errors
    assert not out.exists()


def test_text_encoder_inf_is_reported_before_denoising(copy_of):
    folder = copy_of("text-inf")
    _rewrite_output(folder, Stage.TEXT_ENCODER, TEXT_EMBEDDINGS, _times_inf)
    steps_done = []
    with Pipeline.load(folder, cache=False) as pipe, pytest.raises(NumericsError, match="text encoder"):
        pipe("a fox", steps=STEPS, seed=1, on_step=lambda i, n: steps_done.append(i))
    assert steps_done == []


def test_huge_but_finite_latents_never_yield_a_nan_image(sd15_artifacts):
    """Latents of 1e30 are accepted (finite), but whatever the stages make of them,
    the pipeline either returns finite pixels or raises NumericsError."""
    with Pipeline.load(sd15_artifacts) as pipe:
        latents = np.full(pipe.latent_shape, 1e30, dtype=np.float32)
        try:
            result = pipe("a fox", steps=2, seed=1, latents=latents)
        except NumericsError:
            return
        assert np.isfinite(result.pixels).all()
