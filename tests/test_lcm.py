"""LCM-distilled U-Nets (time_cond_proj_dim): the guidance scale enters the U-Net as
an embedding (`timestep_cond`) and no classifier-free guidance runs, as diffusers'
LatentConsistencyModelPipeline does. Same seed, same image as that pipeline on CPU.

Before this, such a checkpoint was refused at export; the first release exported it
without `timestep_cond` and applied CFG, off by up to 0.063 in pixels.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from sdrt.engines.errors import InvalidInput
from sdrt.engines.specs import TIMESTEP_COND, Stage
from sdrt.runtime import Pipeline
from sdrt.runtime.artifact import IgnoredSetting
from sdrt.runtime.pipeline import guidance_embedding

TOL = 1e-4


@pytest.fixture(scope="module")
def lcm_model(tmp_path_factory):
    from sdrt.export.tiny import make_tiny_model
    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-lcm", variant="lcm")


@pytest.fixture(scope="module")
def lcm(lcm_model, tmp_path_factory, export_into):
    return Pipeline.load(export_into(lcm_model, tmp_path_factory.mktemp("artifacts") / "lcm"))


@pytest.fixture(scope="module")
def diffusers_lcm(lcm_model):
    import diffusers
    pipe = diffusers.LatentConsistencyModelPipeline.from_pretrained(
        lcm_model, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)

    def run(prompt, seed, **kw):
        import torch
        with torch.no_grad():
            return pipe(prompt, generator=torch.Generator("cpu").manual_seed(seed), output_type="np", **kw).images
    run.pipe = pipe
    return run


def test_the_built_in_lcm_checkpoint_is_what_diffusers_writes(lcm_model):
    index = json.loads((lcm_model / "model_index.json").read_text())
    assert index["_class_name"] == "LatentConsistencyModelPipeline"
    assert json.loads((lcm_model / "unet" / "config.json").read_text())["time_cond_proj_dim"] == 32


def test_export_takes_timestep_cond_and_leaves_cfg_off(lcm):
    facts, shape = lcm.manifest.facts, lcm.manifest.shape
    assert facts.time_cond_proj_dim == 32 and not shape.cfg
    spec = lcm.manifest.specs[Stage.UNET]
    assert spec.input(TIMESTEP_COND).shape == (1, 32)
    assert spec.input("sample").shape[0] == 1


@pytest.mark.parametrize("steps,guidance", [(None, None), (1, 8.5), (2, 1.0), (8, 3.0)])
def test_same_seed_same_image_as_latent_consistency_pipeline(lcm, diffusers_lcm, steps, guidance):
    kw = {} if steps is None else dict(num_inference_steps=steps, guidance_scale=guidance)
    expected = diffusers_lcm("a watercolor fox", 21, **kw)   # diffusers' defaults: 4 steps, 8.5
    got = lcm("a watercolor fox", seed=21, steps=steps, guidance=guidance)
    assert (got.config.steps, got.config.guidance) == ((4, 8.5) if steps is None else (steps, guidance))
    assert float(np.abs(got.pixels - expected).max()) <= TOL


def test_guidance_embedding_is_diffusers_own(diffusers_lcm):
    """Equal up to float32 rounding: torch's and NumPy's float32 exp may differ by an ulp
    (6e-8 relative) in a frequency, which the angle w * 1000 * freq (up to 7500 rad
    here) carries into sin/cos as up to 7500 * 6e-8 = 4.5e-4; the pixels still match
    diffusers to 1e-4 (above)."""
    import torch
    for w, dim in ((8.5, 32), (1.0, 256), (3.25, 33)):
        want = diffusers_lcm.pipe.get_guidance_scale_embedding(torch.tensor(w - 1).repeat(2), embedding_dim=dim)
        got = guidance_embedding(w, dim, 2)
        assert got.shape == (2, dim) and got.dtype == np.float32
        bound = max(abs(w - 1) * 1000 * 2 * 2.0 ** -23, 1e-6)
        np.testing.assert_allclose(got, want.numpy(), rtol=0, atol=bound)


def test_guidance_changes_the_image(lcm):
    a, b = lcm("a fox", seed=1, guidance=8.5), lcm("a fox", seed=1, guidance=2.0)
    assert float(np.abs(a.pixels - b.pixels).max()) > 1e-3


def test_negative_prompt_is_reported_ignored_and_not_recorded(lcm):
    with pytest.warns(IgnoredSetting, match="negative prompt is ignored: this LCM model takes the guidance scale"):
        result = lcm("a fox", negative_prompt="blurry", seed=1)
    assert result.config.negative_prompt == ""
    assert "Negative prompt" not in result.parameters
    assert np.array_equal(result.pixels, lcm("a fox", seed=1).pixels)


def test_export_with_cfg_is_refused_naming_the_embedding(lcm_model, tmp_path):
    from sdrt.export.config import ExportConfig
    from sdrt.export.exporter import export_artifacts
    with pytest.raises(InvalidInput, match="takes the guidance scale as an embedding \\(time_cond_proj_dim 32"):
        export_artifacts(ExportConfig(model_dir=lcm_model, out_dir=tmp_path / "out", cfg=True))
    assert not (tmp_path / "out").exists()
