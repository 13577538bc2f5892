"""LoRAs per call on an exported artifact, against diffusers' fuse_lora on the same
checkpoint and seed; exact switching; merged export; refusals.

The LoRA files are made the way users' files are made (export/tiny_lora.py: peft
adapters saved by diffusers' save_lora_weights, and kohya's sd-scripts naming); how
each format's keys are read is tested parameter by parameter in test_lora_files.py.
"""

from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pytest

from sdrt.engines.errors import ArtifactError, BackendUnavailable, InvalidInput, MissingFile
from sdrt.runtime.loras import LoraChoice
from sdrt.runtime.pipeline import Pipeline

PROMPT = "a watercolor fox"
STEPS = 4
SEED = 7
PIXELS = 1e-4   # the bound; measured ~2e-6


@pytest.fixture(scope="module")
def lora_files(tmp_path_factory):
    from sdrt.export.tiny_lora import make_tiny_lora

    d = tmp_path_factory.mktemp("loras")
    return {
        "peft": make_tiny_lora(d / "peft.safetensors", format="peft", rank=4, alpha=8, seed=1),
        "kohya": make_tiny_lora(d / "kohya.safetensors", format="kohya", rank=4, alpha=2, seed=2),
        "locon": make_tiny_lora(d / "locon.safetensors", format="kohya", rank=2, conv=True, seed=3),
        "unet_only": make_tiny_lora(d / "unet.safetensors", format="peft", text_encoder=False, seed=4),
    }


@pytest.fixture(scope="module")
def pipe(sd15_artifacts):
    with Pipeline.load(sd15_artifacts) as p:
        yield p


def _diffusers(model_dir, loras):
    """diffusers' images with `loras` [(file, scale)] fused (set_adapters + fuse_lora)."""
    import torch
    from diffusers import StableDiffusionPipeline

    ref = StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None)
    ref.set_progress_bar_config(disable=True)
    if loras:
        names = [f"lora{i}" for i in range(len(loras))]
        for name, (path, _) in zip(names, loras):
            ref.load_lora_weights(str(path), adapter_name=name)
        ref.set_adapters(names, [scale for _, scale in loras])
        ref.fuse_lora()
    return ref(PROMPT, num_inference_steps=STEPS, generator=torch.Generator("cpu").manual_seed(SEED),
               output_type="np").images


def _ours(pipe, loras=None):
    return pipe(PROMPT, steps=STEPS, seed=SEED, loras=loras).pixels


@pytest.mark.parametrize("fmt,scale", [("peft", 0.5), ("peft", 1.0), ("kohya", 1.5), ("locon", 1.0)])
def test_lora_matches_diffusers_fuse_lora(pipe, tiny_sd15, lora_files, fmt, scale):
    path = lora_files[fmt]
    got = _ours(pipe, [(path, scale)])
    want = _diffusers(tiny_sd15, [(path, scale)])
    assert np.abs(got - want).max() <= PIXELS
    # and it did change the image: the LoRA is not a no-op at this size
    assert np.abs(got - _ours(pipe)).max() > 1e-3


def test_text_encoder_lora_is_applied(pipe, tiny_sd15, lora_files):
    from sdrt.runtime.lora import read_lora

    layers = read_lora(lora_files["kohya"], pipe.loras.weight_map.targets()).layers
    assert {layer.component for layer in layers} == {"unet", "text_encoder"}
    # The text encoder's part alone changes the conditioning: with and without it differ.
    with_text = _ours(pipe, [(lora_files["peft"], 1.0)])
    unet_only = _ours(pipe, [(lora_files["unet_only"], 1.0)])
    assert np.abs(with_text - unet_only).max() > 1e-3


def test_two_loras_add_up_as_diffusers_set_adapters(pipe, tiny_sd15, lora_files):
    loras = [(lora_files["peft"], 0.7), (lora_files["kohya"], 1.2)]
    assert np.abs(_ours(pipe, loras) - _diffusers(tiny_sd15, loras)).max() <= PIXELS


def test_switching_is_bit_identical_to_fresh_loads(sd15_artifacts, lora_files):
    a, b = [(lora_files["peft"], 1.0)], [(lora_files["kohya"], 0.8)]
    sequence = [None, a, b, a + b, None]
    with Pipeline.load(sd15_artifacts) as p:
        switched = [_ours(p, loras) for loras in sequence]
    for loras, got in zip(sequence, switched):
        with Pipeline.load(sd15_artifacts, check_hashes=False) as fresh:
            assert np.array_equal(got, _ours(fresh, loras))


def test_scale_zero_changes_nothing_but_runs_the_lora_path(pipe, lora_files):
    base = _ours(pipe)
    zero = _ours(pipe, [(lora_files["peft"], 0.0)])
    # the overridable session's kernels differ from the optimized one's by rounding only
    assert np.abs(zero - base).max() <= 1e-5


def test_merged_export_matches_the_per_call_lora(pipe, tiny_sd15, lora_files, export_into, tmp_path):
    from sdrt.engines.manifest import load_manifest

    path = lora_files["peft"]
    out = export_into(tiny_sd15, tmp_path / "merged", loras=((path, 0.8),))
    assert [m["name"] for m in load_manifest(out).merged_loras] == ["peft"]
    with Pipeline.load(out) as merged:
        got = _ours(merged)
    assert np.abs(got - _ours(pipe, [(path, 0.8)])).max() <= 1e-5
    assert np.abs(got - _diffusers(tiny_sd15, [(path, 0.8)])).max() <= PIXELS


def test_bad_lora_is_refused_before_any_engine_runs_and_the_pipeline_keeps_working(pipe, tmp_path, lora_files):
    base = _ours(pipe)
    foreign = tmp_path / "foreign.safetensors"
    from safetensors.numpy import save_file

    save_file({"lora_unet_no_such_block_to_q.lora_down.weight": np.zeros((4, 8), np.float32),
               "lora_unet_no_such_block_to_q.lora_up.weight": np.zeros((8, 4), np.float32)}, str(foreign))
    with pytest.raises(InvalidInput, match="no_such_block"):
        _ours(pipe, [(foreign, 1.0)])
    with pytest.raises(MissingFile):
        _ours(pipe, [(tmp_path / "missing.safetensors", 1.0)])
    with pytest.raises(InvalidInput, match="scale"):
        _ours(pipe, [(lora_files["peft"], float("nan"))])
    assert np.array_equal(_ours(pipe), base)


def test_artifact_without_weight_map_refuses_loras_naming_the_fix(sd15_artifacts, tmp_path, lora_files):
    from sdrt.engines.weightmap import WEIGHT_MAP
    from sdrt.runtime.loras import LoraWeights

    old = tmp_path / "old"
    shutil.copytree(sd15_artifacts, old)
    (old / WEIGHT_MAP).unlink()
    with pytest.raises(ArtifactError, match="export it again"):
        LoraWeights(old, {}).weight_map


def test_openvino_refuses_loras_in_one_line(sd15_artifacts, lora_files):
    pytest.importorskip("openvino")
    with Pipeline.load(sd15_artifacts, backend="openvino") as p:
        with pytest.raises(BackendUnavailable, match="sdrt export --lora") as e:
            _ours(p, [(lora_files["peft"], 1.0)])
        assert "\n" not in str(e.value)


def test_cli_lora_flag_gives_the_api_image(pipe, sd15_artifacts, lora_files, tmp_path):
    from PIL import Image

    out = tmp_path / "cli.png"
    cmd = [sys.executable, "-m", "sdrt.cli.main", "generate", str(sd15_artifacts), "--prompt", PROMPT,
           "--steps", str(STEPS), "--seed", str(SEED), "--lora", f"{lora_files['kohya']}:0.6", "--out", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    api = pipe(PROMPT, steps=STEPS, seed=SEED, loras=[(lora_files["kohya"], 0.6)]).images[0]
    assert np.array_equal(np.asarray(Image.open(out).convert("RGB")), np.asarray(api))


def test_lcm_lora_runs_few_steps_on_the_base_model_as_diffusers(pipe, tiny_sd15, lora_files):
    """LCM-LoRA: a LoRA (LoCon, kohya keys, as latent-consistency/lcm-lora-sdv1-5 ships)
    on a plain SD 1.5 artifact, with the LCM sampler, 4 steps and guidance 1, as its
    model card runs it in diffusers."""
    import torch
    from diffusers import LCMScheduler, StableDiffusionPipeline

    path = lora_files["locon"]
    ref = StableDiffusionPipeline.from_pretrained(tiny_sd15, safety_checker=None)
    ref.scheduler = LCMScheduler.from_config(ref.scheduler.config)
    ref.set_progress_bar_config(disable=True)
    ref.load_lora_weights(str(path))
    ref.fuse_lora()
    want = ref(PROMPT, num_inference_steps=4, guidance_scale=1.0, generator=torch.Generator("cpu").manual_seed(SEED),
               output_type="np").images
    got = pipe(PROMPT, steps=4, guidance=1.0, scheduler="lcm", seed=SEED, loras=[(path, 1.0)]).pixels
    assert np.abs(got - want).max() <= PIXELS


def test_every_linear_and_conv_weight_is_linked_to_the_graph_weight_that_holds_it(sd15_artifacts, tiny_sd15):
    """weights.json, checked against the checkpoint's own modules: every Linear and
    Conv2d weight of the U-Net and the text encoder (what LoRAs change) names an ONNX
    initializer holding exactly that weight (transposed for a MatMul)."""
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    from sdrt.engines.onnx_files import read_initializers
    from sdrt.engines.specs import Stage
    from sdrt.engines.weightmap import read

    recorded = read(sd15_artifacts)
    modules = {Stage.UNET: UNet2DConditionModel.from_pretrained(tiny_sd15, subfolder="unet"),
               Stage.TEXT_ENCODER: CLIPTextModel.from_pretrained(tiny_sd15 / "text_encoder")}
    for stage, module in modules.items():
        params = recorded.stages[stage].params
        wanted = {f"{name}.weight": m.weight for name, m in module.named_modules()
                  if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
        assert set(wanted) <= set(params), sorted(set(wanted) - set(params))[:3]
        values = read_initializers(sd15_artifacts / stage.onnx_file, {params[p].initializer for p in wanted})
        for name, weight in wanted.items():
            target = params[name]
            expected = weight.detach().numpy()
            assert target.shape == expected.shape
            got = values[target.initializer]
            assert np.array_equal(got.T if target.transposed else got, expected), name


@pytest.mark.slow
def test_sdxl_kohya_lora_on_both_text_encoders_matches_diffusers(export_into, tmp_path):
    """SDXL: a kohya LoRA in the generative-models names (lora_unet_input_blocks_...)
    with lora_te1_/lora_te2_ layers, against StableDiffusionXLPipeline + fuse_lora."""
    import torch
    from diffusers import StableDiffusionXLPipeline

    from sdrt.export.tiny import make_tiny_model
    from sdrt.export.tiny_lora import make_tiny_lora

    model = make_tiny_model(tmp_path / "sdxl", variant="sdxl")
    path = make_tiny_lora(tmp_path / "xl.safetensors", variant="sdxl", format="kohya", rank=4, alpha=2, seed=5)
    with Pipeline.load(export_into(model, tmp_path / "art")) as p:
        layers = p.loras.read((LoraChoice(str(path), 0.9),))[0].layers
        assert {layer.component for layer in layers} == {"unet", "text_encoder", "text_encoder_2"}
        got = p(PROMPT, steps=STEPS, seed=SEED, guidance=5.0, loras=[(path, 0.9)]).pixels
    ref = StableDiffusionXLPipeline.from_pretrained(model, add_watermarker=False)
    ref.set_progress_bar_config(disable=True)
    ref.load_lora_weights(str(path))
    ref.fuse_lora(lora_scale=0.9)
    want = ref(PROMPT, num_inference_steps=STEPS, guidance_scale=5.0, height=got.shape[1], width=got.shape[2],
               generator=torch.Generator("cpu").manual_seed(SEED), output_type="np").images
    assert np.abs(got - want).max() <= PIXELS


@pytest.mark.slow
def test_lora_reaches_deepcaches_shallow_unet(tiny_sd15, lora_files, export_into, tmp_path):
    """With DeepCache the shallow U-Net holds some of the U-Net's weights: the LoRA
    changes them too. Against the authors' DeepCacheSDHelper on diffusers with the LoRA
    fused, interval 2."""
    import DeepCache
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    path = lora_files["locon"]
    with Pipeline.load(export_into(tiny_sd15, tmp_path / "dc", deepcache=True)) as p:
        got = p(PROMPT, steps=STEPS, seed=SEED, scheduler="euler", cache_interval=2, loras=[(path, 1.0)]).pixels
    ref = StableDiffusionPipeline.from_pretrained(tiny_sd15, safety_checker=None)
    ref.scheduler = EulerDiscreteScheduler.from_config(ref.scheduler.config)
    ref.set_progress_bar_config(disable=True)
    ref.load_lora_weights(str(path))
    ref.fuse_lora()
    helper = DeepCache.DeepCacheSDHelper(pipe=ref)
    helper.set_params(cache_interval=2, cache_branch_id=0)
    helper.enable()
    try:
        want = ref(PROMPT, num_inference_steps=STEPS, generator=torch.Generator("cpu").manual_seed(SEED),
                   output_type="np").images
    finally:
        helper.disable()
    assert np.abs(got - want).max() <= PIXELS
