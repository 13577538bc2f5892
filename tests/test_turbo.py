"""SD-Turbo-style few-step generation: a --no-cfg artifact, the checkpoint's Euler
scheduler with trailing spacing, 1 to 4 steps at its default guidance. Same seed, same
image as diffusers' StableDiffusionPipeline run as the SD-Turbo model card says
(`num_inference_steps=1, guidance_scale=0.0`)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from sdrt.runtime import Pipeline

TOL = 1e-4
# stabilityai/sd-turbo scheduler/scheduler_config.json
TURBO_SCHEDULER = {
    "_class_name": "EulerDiscreteScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "beta_start": 0.00085, "clip_sample": False, "interpolation_type": "linear", "num_train_timesteps": 1000,
    "prediction_type": "epsilon", "sample_max_value": 1.0, "set_alpha_to_one": False, "skip_prk_steps": True,
    "steps_offset": 1, "timestep_spacing": "trailing", "trained_betas": None, "use_karras_sigmas": False,
}


@pytest.fixture(scope="module")
def turbo_model(tiny_sd2, tmp_path_factory):
    """The tiny SD 2 model (SD-Turbo is SD 2.1's architecture) with SD-Turbo's scheduler."""
    folder = tmp_path_factory.mktemp("models") / "tiny-sd-turbo"
    shutil.copytree(tiny_sd2, folder)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(TURBO_SCHEDULER))
    # diffusers loads the scheduler class model_index.json names (as SD-Turbo's does).
    index = json.loads((folder / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", "EulerDiscreteScheduler"]
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


@pytest.fixture(scope="module")
def turbo(turbo_model, tmp_path_factory, export_into):
    return Pipeline.load(export_into(turbo_model, tmp_path_factory.mktemp("artifacts") / "turbo", cfg=False))


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_turbo_few_steps_match_diffusers_without_guidance(turbo_model, turbo, steps):
    import diffusers
    import torch
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(turbo_model, safety_checker=None,
                                                             requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe.scheduler).__name__ == "EulerDiscreteScheduler"
    with torch.no_grad():
        expected = pipe("a cinematic fox", num_inference_steps=steps, guidance_scale=0.0, output_type="np",
                        generator=torch.Generator("cpu").manual_seed(31)).images
    got = turbo("a cinematic fox", steps=steps, seed=31)   # no guidance given: the artifact's, no CFG
    assert got.config.scheduler == "euler" and got.config.guidance == 1.0
    assert float(np.abs(got.pixels - expected).max()) <= TOL
