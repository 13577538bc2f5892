"""ControlNet against diffusers (the oracle): StableDiffusionControlNetPipeline with one
ControlNetModel and with two (MultiControlNetModel), conditioning scales, guidance
windows and guess mode, and the Img2Img and Inpaint ControlNet pipelines, all on the
tiny SD 1.5 model with tiny random ControlNets (export/tiny.py), same seed, pixels
within 1e-4. Then the shapes the specs derive for the residuals against diffusers'
own ControlNetModel, and bad inputs refused in one line."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from sdrt.engines.errors import InvalidInput, InvalidType, MissingFile  # noqa: E402
from sdrt.engines.specs import (CONTROL_SCALES, MID_BLOCK_RESIDUAL, ShapeConfig, Stage,  # noqa: E402
                                controlnet_residuals, down_block_residual)
from sdrt.runtime import Pipeline  # noqa: E402
from sdrt.runtime.artifact import Artifact  # noqa: E402
from sdrt.runtime.controlnet import ControlSettings, scale_table  # noqa: E402

TOL = 1e-4
PROMPT = "a watercolor fox"
STEPS = 6


def _image(seed: int, size: tuple[int, int], blocks: int = 0) -> Image.Image:
    """A control image: noise, or coloured blocks (edge-map-like structure)."""
    rng = np.random.default_rng(seed)
    w, h = size
    if blocks:
        a = np.kron(rng.random((h // blocks, w // blocks, 3)), np.ones((blocks, blocks, 1)))
    else:
        a = rng.random((h, w, 3))
    return Image.fromarray((a * 255).astype(np.uint8))


# Another size and aspect than the artifact's 128x128: both sides resize it the same way.
IMAGE_0 = _image(0, (160, 96))
IMAGE_1 = _image(1, (128, 128), blocks=16)


@pytest.fixture(scope="module")
def controlnets(tmp_path_factory):
    from sdrt.export.tiny import make_tiny_controlnet
    root = tmp_path_factory.mktemp("controlnets")
    return make_tiny_controlnet(root / "cn0", seed=0), make_tiny_controlnet(root / "cn1", seed=1)


@pytest.fixture(scope="module")
def one(tiny_sd15, controlnets, export_into, tmp_path_factory):
    """An artifact with one ControlNet, and the diffusers pipeline with the same one."""
    out = export_into(tiny_sd15, tmp_path_factory.mktemp("artifacts") / "cn1", controlnets=controlnets[:1])
    return Pipeline.load(out), _oracle(tiny_sd15, diffusers.ControlNetModel.from_pretrained(controlnets[0]))


@pytest.fixture(scope="module")
def two(tiny_sd15, controlnets, export_into, tmp_path_factory):
    out = export_into(tiny_sd15, tmp_path_factory.mktemp("artifacts") / "cn2", controlnets=controlnets)
    nets = [diffusers.ControlNetModel.from_pretrained(c) for c in controlnets]
    return Pipeline.load(out), _oracle(tiny_sd15, nets)


def _oracle(model, controlnet):
    pipe = diffusers.StableDiffusionControlNetPipeline.from_pretrained(
        model, controlnet=controlnet, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _diffusers(pipe, seed, **kw):
    # One torch thread: the machine is shared (see test_pipeline.Diffusers).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            return pipe(PROMPT, height=128, width=128, generator=torch.Generator("cpu").manual_seed(seed),
                        output_type="np", **kw).images
    finally:
        torch.set_num_threads(threads)


def _diff(a, b):
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a.astype(np.float64) - b).max())


def _compare(pipeline, oracle, seed, steps=STEPS, guidance=7.5, **kw):
    """sdrt and diffusers with the same settings (diffusers' names for the ControlNet
    ones); returns sdrt's pixels."""
    image = kw.pop("control_image")
    ours = pipeline(PROMPT, steps=steps, guidance=guidance, seed=seed, control_image=image, **kw).pixels
    want = _diffusers(oracle, seed, image=image, num_inference_steps=steps, guidance_scale=guidance, **kw)
    assert _diff(ours, want) <= TOL
    return ours


def test_one_controlnet_matches_diffusers(one):
    pipeline, oracle = one
    with_control = _compare(pipeline, oracle, seed=1, control_image=IMAGE_0)
    # The ControlNet changes the image: parity is not that of two images it leaves alone.
    assert _diff(with_control, pipeline(PROMPT, steps=STEPS, seed=1).pixels) > 0.05


def test_conditioning_scale_matches_diffusers(one):
    pipeline, oracle = one
    half = _compare(pipeline, oracle, seed=2, control_image=IMAGE_0, controlnet_conditioning_scale=0.4)
    full = pipeline(PROMPT, steps=STEPS, seed=2, control_image=IMAGE_0).pixels
    assert _diff(half, full) > 0.02


def test_two_controlnets_match_multicontrolnet(two):
    pipeline, oracle = two
    _compare(pipeline, oracle, seed=3, control_image=[IMAGE_0, IMAGE_1], controlnet_conditioning_scale=[0.5, 1.3])


def test_guidance_window_matches_controlnet_keep(two):
    """Per-ControlNet start/end over a second-order sampler's calls (Heun: 2 calls a step
    but the first, diffusers' len(timesteps)), a single end broadcast to both."""
    pipeline, oracle = two
    pipeline_kw = dict(control_image=[IMAGE_0, IMAGE_1], control_guidance_start=[0.25, 0.0],
                       control_guidance_end=0.6)
    ours = pipeline(PROMPT, steps=STEPS, seed=4, scheduler="heun", **pipeline_kw).pixels
    oracle.scheduler = diffusers.HeunDiscreteScheduler.from_config(oracle.scheduler.config)
    try:
        want = _diffusers(oracle, 4, image=pipeline_kw["control_image"], num_inference_steps=STEPS,
                          control_guidance_start=[0.25, 0.0], control_guidance_end=0.6)
    finally:
        oracle.scheduler = diffusers.PNDMScheduler.from_config(oracle.scheduler.config)
    assert _diff(ours, want) <= TOL
    whole = pipeline(PROMPT, steps=STEPS, seed=4, scheduler="heun", control_image=[IMAGE_0, IMAGE_1]).pixels
    assert _diff(ours, whole) > 0.02


def test_guess_mode_matches_diffusers(two):
    """Guess mode with CFG: the ControlNets see the conditional half only."""
    pipeline, oracle = two
    _compare(pipeline, oracle, seed=5, guidance=4.0, control_image=[IMAGE_0, IMAGE_1], guess_mode=True,
             controlnet_conditioning_scale=[0.8, 1.2])


def test_img2img_controlnet_matches_diffusers(one):
    """StableDiffusionControlNetImg2ImgPipeline: its default conditioning scale (0.8), and
    the guidance window counts the calls the strength leaves."""
    pipeline, oracle = one
    pipe = diffusers.StableDiffusionControlNetImg2ImgPipeline.from_pipe(oracle)
    init = _image(7, (128, 128), blocks=8)
    ours = pipeline(PROMPT, steps=10, seed=6, image=init, strength=0.6, control_image=IMAGE_1,
                    control_guidance_end=0.5).pixels
    want = _diffusers(pipe, 6, image=init, control_image=IMAGE_1, strength=0.6, num_inference_steps=10,
                      control_guidance_end=0.5)
    assert _diff(ours, want) <= TOL


def test_inpaint_controlnet_matches_diffusers(one):
    """StableDiffusionControlNetInpaintPipeline with a text-to-image U-Net (the latents
    outside the mask are the image's, re-noised each step), at its default conditioning
    scale (0.5)."""
    pipeline, oracle = one
    pipe = diffusers.StableDiffusionControlNetInpaintPipeline.from_pipe(oracle)
    init = _image(8, (128, 128), blocks=8)
    mask = np.zeros((128, 128), np.uint8)
    mask[32:96, 40:112] = 255
    mask = Image.fromarray(mask, "L")
    ours = pipeline(PROMPT, steps=STEPS, seed=7, image=init, mask_image=mask, control_image=IMAGE_0).pixels
    want = _diffusers(pipe, 7, image=init, mask_image=mask, control_image=IMAGE_0, num_inference_steps=STEPS)
    assert _diff(ours, want) <= TOL


def test_no_control_image_runs_the_base_model(two, tiny_sd15):
    """Without control_image the U-Net gets zero residuals: StableDiffusionPipeline's image."""
    pipeline, _ = two
    base = diffusers.StableDiffusionPipeline.from_pretrained(tiny_sd15, safety_checker=None,
                                                             requires_safety_checker=False)
    base.set_progress_bar_config(disable=True)
    ours = pipeline(PROMPT, steps=STEPS, seed=8).pixels
    assert _diff(ours, _diffusers(base, 8, num_inference_steps=STEPS)) <= TOL


def test_parameters_text_records_each_controlnet(two):
    result = two[0](PROMPT, steps=2, seed=9, control_image=[IMAGE_0, IMAGE_1], controlnet_conditioning_scale=[0.5, 1],
                    control_guidance_start=0.1)
    from sdrt.runtime.infotext import parse
    fields = parse(result.parameters).fields
    assert fields["ControlNet 0"] == "Module: none, Weight: 0.5, Resize Mode: Just Resize, Guidance Start: 0.1, " \
                                     "Guidance End: 1"
    assert fields["ControlNet 1"].startswith("Module: none, Weight: 1, ")


# -- shapes and weights ------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["sd15", "sd2", "sd15-full", "sd21-full"])
def test_residual_specs_are_controlnetmodels_outputs(variant):
    """Names, channels and count of the residuals the specs derive from the U-Net config
    are ControlNetModel's (`controlnet_down_blocks`, `controlnet_mid_block`), also for the
    full-size SD 1.5 (12 down residuals) and SD 2.1 architectures, built without weights."""
    from sdrt.export.checkpoint import per_block
    from sdrt.export.tiny import _variant
    unet = _variant(variant).unet
    blocks = tuple(unet["block_out_channels"])
    from sdrt.engines.specs import ModelFacts
    facts = ModelFacts(latent_channels=4, vae_scale_factor=8, vae_scaling_factor=0.18215, image_channels=3,
                       text_max_length=77, text_hidden_size=unet["cross_attention_dim"],
                       unet_sample_size=unet["sample_size"], unet_size_multiple=2 ** (len(blocks) - 1),
                       prediction_type="epsilon", unet_block_out_channels=blocks,
                       unet_layers_per_block=per_block(unet["layers_per_block"], len(blocks)))
    size = facts.native_image_size
    specs = controlnet_residuals(facts, ShapeConfig(size, size, controlnets=1).validate(facts))
    with torch.device("meta"):
        net = diffusers.ControlNetModel.from_unet(diffusers.UNet2DConditionModel(**unet),
                                                  load_weights_from_unet=False)
    assert [t.shape[1] for t in specs[:-1]] == [b.out_channels for b in net.controlnet_down_blocks]
    assert specs[-1].shape[1] == net.controlnet_mid_block.out_channels
    assert [t.name for t in specs] == [down_block_residual(i) for i in range(len(specs) - 1)] + [MID_BLOCK_RESIDUAL]


def test_residual_shapes_are_the_tiny_controlnets_outputs(controlnets, two):
    pipeline, _ = two
    net = diffusers.ControlNetModel.from_pretrained(controlnets[0])
    spec = pipeline.manifest.specs[Stage.CONTROLNET]
    gb = pipeline.manifest.shape.guided_batch
    with torch.no_grad():
        down, mid = net(torch.zeros(gb, 4, 16, 16), torch.tensor([10.0]), torch.zeros(gb, 77, 32),
                        torch.zeros(gb, 3, 128, 128), return_dict=False)
    assert [t.shape for t in spec.outputs] == [tuple(r.shape) for r in (*down, mid)]
    assert pipeline.manifest.specs[Stage.UNET].inputs[-len(spec.outputs):] == spec.outputs
    assert spec.input(CONTROL_SCALES).shape == (2, gb, len(spec.outputs))


@pytest.mark.parametrize("residuals", [9, 13, 17, 26])
def test_guess_mode_ramp_is_torch_logspace(residuals):
    """Guess mode's weights are float32 `torch.logspace(-1, 0, n) * scale`, as
    ControlNetModel computes them, and the unconditional rows are 0."""
    settings = ControlSettings.create(1, 0.7, guess_mode=True)
    table = scale_table(settings, calls=1, batch=2, cfg_graph=True, use_cfg=True, residuals=residuals)
    want = (torch.logspace(-1, 0, residuals) * 0.7).numpy()
    assert np.array_equal(table[0, 0, 2:], np.stack([want, want]))
    assert not table[0, 0, :2].any()


def test_guidance_window_is_diffusers_controlnet_keep():
    """controlnet_keep as StableDiffusionControlNetPipeline writes it, for 7 calls."""
    settings = ControlSettings.create(2, [1.0, 0.5], [0.2, 0.0], [0.8, 0.5])
    calls = 7
    table = scale_table(settings, calls, batch=1, cfg_graph=True, use_cfg=True, residuals=3)
    for i in range(calls):
        keep = [1.0 - float(i / calls < s or (i + 1) / calls > e) for s, e in ((0.2, 0.8), (0.0, 0.5))]
        assert table[i, :, :, 0].tolist() == [[keep[0]] * 2, [0.5 * keep[1]] * 2]


# -- refusals ----------------------------------------------------------------------------

BAD_REQUESTS = [
    (dict(control_image=[IMAGE_0]), InvalidInput, "control_image has 1 images but this artifact has 2"),
    (dict(control_image=IMAGE_0), InvalidInput, "pass control_image as a list of 2 images"),
    (dict(control_image=[IMAGE_0, None]), InvalidInput, "control image 1 is None"),
    (dict(control_image=[IMAGE_0, IMAGE_1], controlnet_conditioning_scale=11), InvalidInput, "from 0 to 10"),
    (dict(control_image=[IMAGE_0, IMAGE_1], controlnet_conditioning_scale=[1, -0.5]), InvalidInput,
     "controlnet_conditioning_scale of ControlNet 1 must be from 0"),
    (dict(control_image=[IMAGE_0, IMAGE_1], controlnet_conditioning_scale=[1, 1, 1]), InvalidInput,
     "has 3 values but this artifact has 2"),
    (dict(control_image=[IMAGE_0, IMAGE_1], controlnet_conditioning_scale=float("nan")), InvalidInput,
     "must be finite"),
    (dict(control_image=[IMAGE_0, IMAGE_1], controlnet_conditioning_scale="1"), InvalidType, "must be a number"),
    (dict(control_image=[IMAGE_0, IMAGE_1], control_guidance_start=0.6, control_guidance_end=0.6), InvalidInput,
     "control_guidance_start of ControlNet 0 0.6 must be below control_guidance_end 0.6"),
    (dict(control_image=[IMAGE_0, IMAGE_1], control_guidance_end=1.5), InvalidInput, "must be in (0, 1]"),
    (dict(control_image=[IMAGE_0, IMAGE_1], guess_mode=1), InvalidType, "guess_mode must be True or False"),
    (dict(control_image=["/nonexistent/edges.png", IMAGE_1]), MissingFile, "control image 0 file"),
    (dict(controlnet_conditioning_scale=0.5), InvalidInput,
     "controlnet_conditioning_scale apply to ControlNets: pass control_image too"),
    (dict(control_image=[IMAGE_0, IMAGE_1], cache_interval=2), InvalidInput, "DeepCache"),
]


@pytest.mark.parametrize("kwargs,error,message", BAD_REQUESTS)
def test_bad_controlnet_requests_are_refused_in_one_line(two, kwargs, error, message):
    with pytest.raises(error) as e:
        two[0].artifact.request(PROMPT, **kwargs)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_control_image_on_an_artifact_without_controlnets_is_refused(sd15_artifacts):
    with pytest.raises(InvalidInput, match="has none: export it with --controlnet") as e:
        Artifact.open(sd15_artifacts).request(PROMPT, control_image=IMAGE_0)
    assert "\n" not in str(e.value)


def test_plain_export_has_no_controlnet_inputs(sd15_artifacts):
    manifest = Artifact.open(sd15_artifacts).manifest
    assert manifest.shape.controlnets == 0 and Stage.CONTROLNET not in manifest.stages
    assert [t.name for t in manifest.specs[Stage.UNET].inputs] == ["sample", "timestep", "encoder_hidden_states"]


def _refused_export(tmp_path, model, error, message, **kw):
    from sdrt.export.config import ExportConfig
    from sdrt.export.exporter import export_artifacts
    out = tmp_path / "out"
    with pytest.raises(error) as e:
        export_artifacts(ExportConfig(model_dir=model, out_dir=out, **kw))
    assert message in str(e.value) and "\n" not in str(e.value)
    assert not out.exists()   # refused before anything was written


def test_controlnet_of_another_family_is_refused_at_export(tiny_sd15, tmp_path):
    from sdrt.export.tiny import make_tiny_controlnet
    sd2_net = make_tiny_controlnet(tmp_path / "sd2-cn", base_variant="sd2")
    _refused_export(tmp_path, tiny_sd15, InvalidInput, "ControlNet block_out_channels [16, 24, 48, 48] differs from "
                    "the U-Net's [16, 32, 32, 32]", controlnets=(sd2_net,))


def test_bad_controlnet_exports_are_refused(tiny_sd15, controlnets, tmp_path):
    _refused_export(tmp_path, tiny_sd15, MissingFile, "ControlNet folder", controlnets=(tmp_path / "none",))
    _refused_export(tmp_path, tiny_sd15, MissingFile, "config.json is missing", controlnets=(tmp_path,))
    _refused_export(tmp_path, tiny_sd15, InvalidInput, "DeepCache and ControlNet cannot be combined",
                    controlnets=controlnets[:1], deepcache=True)
    _refused_export(tmp_path, tiny_sd15, InvalidInput, "max prompt chunks 1", controlnets=controlnets[:1],
                    prompt_chunks=2)
    _refused_export(tmp_path, tiny_sd15, InvalidType, "not one path", controlnets=controlnets[0])


# -- command line ------------------------------------------------------------------------

def test_cli_generate_takes_control_images_and_settings(two, tmp_path, capsys):
    from sdrt.cli.main import main
    from sdrt.runtime.images import read_parameters
    pipeline, _ = two
    paths = [tmp_path / "edges.png", tmp_path / "blocks.png"]
    IMAGE_0.save(paths[0])
    IMAGE_1.save(paths[1])
    out = tmp_path / "out.png"
    code = main(["generate", str(pipeline.folder), "--prompt", PROMPT, "--steps", "3", "--seed", "11", "--out",
                 str(out), "--control-image", str(paths[0]), "--control-image", str(paths[1]),
                 "--control-scale", "0.5", "1.3", "--control-end", "0.8", "--guess-mode", "--guidance", "4"])
    assert code == 0
    want = pipeline(PROMPT, steps=3, seed=11, guidance=4.0, control_image=[IMAGE_0, IMAGE_1],
                    controlnet_conditioning_scale=[0.5, 1.3], control_guidance_end=0.8, guess_mode=True)
    with Image.open(out) as im:
        assert np.array_equal(np.asarray(im), np.asarray(want.images[0]))
    assert read_parameters(out) == want.parameters
    assert 'ControlNet 1: "Module: none, Weight: 1.3, Resize Mode: Just Resize, Guidance Start: 0, ' \
           'Guidance End: 0.8, Guess Mode: True"' in want.parameters


def test_cli_refuses_a_control_image_count_that_does_not_fit(two, tmp_path, capsys):
    from sdrt.cli.main import main
    path = tmp_path / "edges.png"
    IMAGE_0.save(path)
    code = main(["generate", str(two[0].folder), "--prompt", PROMPT, "--out", str(tmp_path / "x.png"),
                 "--control-image", str(path)])
    err = capsys.readouterr().err.strip()
    assert code != 0 and "control_image has 1 images but this artifact has 2 ControlNet(s)" in err
    assert len(err.splitlines()) == 1 and not (tmp_path / "x.png").exists()


def test_cli_export_passes_controlnet_folders(tiny_sd15, tmp_path, capsys):
    from sdrt.cli.main import main
    code = main(["export", str(tiny_sd15), "--out", str(tmp_path / "a"), "--controlnet", str(tmp_path / "nope")])
    err = capsys.readouterr().err.strip()
    assert code != 0 and f"ControlNet folder {tmp_path / 'nope'} does not exist" in err and len(err.splitlines()) == 1


def test_cli_tiny_model_writes_the_tiny_controlnet(controlnets, tmp_path):
    from sdrt.cli.main import main
    assert main(["tiny-model", str(tmp_path / "cn"), "--variant", "controlnet"]) == 0
    for name in ("config.json", "diffusion_pytorch_model.safetensors"):   # seed 0: the fixture's bytes
        assert (tmp_path / "cn" / name).read_bytes() == (controlnets[0] / name).read_bytes()
