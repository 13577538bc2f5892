"""Exported artifacts against diffusers/transformers (the oracle) and against the
one home of shape facts, engines/specs.py."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from sdrt.engines.manifest import load_manifest
from sdrt.engines.specs import DEFAULT_EMBEDDING_SLOTS, Precision, ShapeConfig, Stage, stage_specs
from sdrt.export.checkpoint import open_checkpoint

ATOL = 1e-4  # the fp32 bound, per stage


def _session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _diffusers_modules(model_dir):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    return (CLIPTextModel.from_pretrained(model_dir / "text_encoder").eval(),
            UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet").eval(),
            AutoencoderKL.from_pretrained(model_dir, subfolder="vae").eval())


def _check_against_diffusers(model_dir, artifacts, seed):
    """Run each ONNX stage and the diffusers module on the same fresh random inputs."""
    manifest = load_manifest(artifacts)
    specs = manifest.specs
    text, unet, vae = _diffusers_modules(model_dir)
    rng = np.random.default_rng(seed)
    errors = {}

    ids_spec = specs[Stage.TEXT_ENCODER].inputs[0]
    ids = rng.integers(0, 49408, size=ids_spec.shape).astype(np.int32)
    session = _session(artifacts / "text_encoder.onnx")
    most = manifest.facts.max_clip_skip
    assert most == text.config.num_hidden_layers - 1
    for skip in sorted({0, min(1, most), most}):
        # One clip skip per row: the last row gets `skip`, the others none.
        skips = np.zeros(ids.shape[0], dtype=np.int32)
        skips[-1] = skip
        feed = {"input_ids": ids, "clip_skip": skips}
        if "token_embeddings" in {t.name for t in specs[Stage.TEXT_ENCODER].inputs}:   # no embedding used
            feed["token_embeddings"] = np.zeros(specs[Stage.TEXT_ENCODER].input("token_embeddings").shape, np.float32)
        (got,) = session.run(None, feed)
        with torch.no_grad():
            out = text(torch.from_numpy(ids).long(), output_hidden_states=True)
            norm = getattr(text, "text_model", text).final_layer_norm
            want = out.last_hidden_state.numpy().copy()
            want[-1] = norm(out.hidden_states[-(skip + 1)][-1]).numpy()
        errors["text_encoder"] = max(errors.get("text_encoder", 0), np.abs(got - want).max())

    u = specs[Stage.UNET]
    sample = rng.standard_normal(u.input("sample").shape).astype(np.float32)
    hidden = rng.standard_normal(u.input("encoder_hidden_states").shape).astype(np.float32)
    t = np.array([417.25], dtype=np.float32)
    (got,) = _session(artifacts / "unet.onnx").run(None, {"sample": sample, "timestep": t, "encoder_hidden_states": hidden})
    with torch.no_grad():
        want = unet(torch.from_numpy(sample), torch.tensor(417.25), encoder_hidden_states=torch.from_numpy(hidden)).sample.numpy()
    errors["unet"] = np.abs(got - want).max()

    latent = (rng.standard_normal(specs[Stage.VAE_DECODER].inputs[0].shape) / vae.config.scaling_factor).astype(np.float32)
    (got,) = _session(artifacts / "vae_decoder.onnx").run(None, {"latent": latent})
    with torch.no_grad():
        want = vae.decode(torch.from_numpy(latent)).sample.numpy()
    errors["vae_decoder"] = np.abs(got - want).max()
    return errors


@pytest.mark.parametrize("variant", ["sd15", "sd2"])
def test_exported_stages_match_diffusers_within_1e_4(variant, request):
    model_dir = request.getfixturevalue(f"tiny_{variant}")
    artifacts = request.getfixturevalue(f"{variant}_artifacts")
    errors = _check_against_diffusers(model_dir, artifacts, seed=123)
    assert all(e <= ATOL for e in errors.values()), errors


@pytest.mark.parametrize("variant", ["sd15", "sd2"])
def test_manifest_verification_passed_within_1e_4_for_every_stage(variant, request):
    manifest = load_manifest(request.getfixturevalue(f"{variant}_artifacts"))
    assert list(manifest.verification) == [s.value for s in manifest.stages]
    for stage, v in manifest.verification.items():
        assert v["passed"] and v["max_abs"] <= ATOL, (stage, v)
        assert v["max_rel"] >= 0 and v["tolerance"]["atol"] > 0


@pytest.mark.parametrize("variant", ["sd15", "sd2"])
def test_graphs_have_the_specs_static_names_shapes_and_dtypes(variant, request):
    artifacts = request.getfixturevalue(f"{variant}_artifacts")
    manifest = load_manifest(artifacts)
    for stage, spec in manifest.specs.items():
        model = onnx.load(str(artifacts / stage.onnx_file), load_external_data=False)
        assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
        for values, tensors in ((model.graph.input, spec.inputs), (model.graph.output, spec.outputs)):
            got = [(v.name, tuple(d.dim_value for d in v.type.tensor_type.shape.dim),
                    onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type)) for v in values]
            assert got == [(t.name, t.shape, t.dtype.numpy) for t in tensors], stage
            assert all(d.HasField("dim_value") for v in values for d in v.type.tensor_type.shape.dim)


def test_manifest_facts_come_from_the_checkpoint_configs(tiny_sd2, sd2_artifacts):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd2)
    facts = load_manifest(sd2_artifacts).facts
    assert facts.prediction_type == pipe.scheduler.config.prediction_type == "v_prediction"
    assert facts.vae_scaling_factor == pipe.vae.config.scaling_factor
    assert facts.vae_scale_factor == pipe.vae_scale_factor
    assert facts.latent_channels == pipe.unet.config.in_channels
    assert facts.text_hidden_size == pipe.text_encoder.config.hidden_size
    assert facts.text_max_length == pipe.tokenizer.model_max_length
    assert facts.native_image_size == pipe.unet.config.sample_size * pipe.vae_scale_factor


def test_unet_weights_live_in_one_external_file_with_the_fixed_name(sd15_artifacts):
    model = onnx.load(str(sd15_artifacts / "unet.onnx"), load_external_data=False)
    locations = set()
    for init in model.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL:
            locations.add({e.key: e.value for e in init.external_data}["location"])
    assert locations == {Stage.UNET.data_file}
    for stage in (Stage.TEXT_ENCODER, Stage.VAE_DECODER):
        m = onnx.load(str(sd15_artifacts / stage.onnx_file), load_external_data=False)
        assert not any(i.data_location == onnx.TensorProto.EXTERNAL for i in m.graph.initializer)


def test_manifest_lists_every_file_the_runtime_reads(sd15_artifacts):
    manifest = load_manifest(sd15_artifacts)
    listed = set(manifest.files)
    on_disk = {str(p.relative_to(sd15_artifacts)) for p in sd15_artifacts.rglob("*")
               if p.is_file() and p.name != "manifest.json"
               # hidden names (stamps, the ORT cache other tests' loads create) are not artifacts
               and not any(part.startswith(".") for part in p.relative_to(sd15_artifacts).parts)}
    assert listed == on_disk
    assert {"text_encoder.onnx", "unet.onnx", "unet.onnx.data", "vae_decoder.onnx",
            "scheduler/scheduler_config.json", "tokenizer/vocab.json", "tokenizer/merges.txt",
            "tokenizer/tokenizer.json"} <= listed
    assert {"sdrt", "torch", "diffusers", "transformers", "onnx", "onnxruntime"} <= set(manifest.tools)
    assert all(p.value == "fp32" for p in manifest.precisions.values())
    for rel, record in manifest.files.items():  # hashed independently of the manifest's stamps
        data = (sd15_artifacts / rel).read_bytes()
        assert (record.sha256, record.size) == (hashlib.sha256(data).hexdigest(), len(data)), rel


def test_copied_runtime_files_equal_the_checkpoints(tiny_sd15, sd15_artifacts):
    for rel in ("scheduler/scheduler_config.json", "tokenizer/vocab.json", "tokenizer/merges.txt",
                "tokenizer/tokenizer_config.json"):
        assert (sd15_artifacts / rel).read_bytes() == (tiny_sd15 / rel).read_bytes()


@pytest.mark.parametrize("stage", [Stage.UNET, Stage.VAE_DECODER])
def test_graph_cleanup_leaves_outputs_unchanged(stage, tiny_sd15, tmp_path):
    from sdrt.export import graphs
    from sdrt.export.checkpoint import load_module
    from sdrt.export.verify import random_inputs

    ckpt = open_checkpoint(tiny_sd15)
    facts = ckpt.facts()
    spec = stage_specs(facts, ShapeConfig(facts.native_image_size, facts.native_image_size))[stage]
    inputs = random_inputs(spec, facts, seed=7)
    (tmp_path / "raw").mkdir()
    graphs.export_raw(graphs.wrap(stage, load_module(ckpt, stage), spec, ckpt.facts()), spec, inputs, tmp_path / "raw" / "model.onnx")
    graphs.clean_file(tmp_path / "raw" / "model.onnx", tmp_path / "clean.onnx", stage.data_file)
    raw = onnx.load(str(tmp_path / "raw" / "model.onnx"), load_external_data=False)
    cleaned = onnx.load(str(tmp_path / "clean.onnx"), load_external_data=False)
    assert len(cleaned.graph.node) < len(raw.graph.node)
    assert not any(n.op_type in ("Constant", "Identity") for n in cleaned.graph.node)
    before = _session(tmp_path / "raw" / "model.onnx").run(None, inputs)
    after = _session(tmp_path / "clean.onnx").run(None, inputs)
    np.testing.assert_allclose(after[0], before[0], rtol=0, atol=1e-6)


def test_cleanup_streams_per_weight_files_into_the_one_data_file(tiny_sd15, tmp_path):
    """Torch writes a graph over 2 GB with one external file per weight; clean-up must
    gather them into unet.onnx.data without changing outputs."""
    from sdrt.export import graphs
    from sdrt.export.checkpoint import load_module
    from sdrt.export.verify import random_inputs

    ckpt = open_checkpoint(tiny_sd15)
    facts = ckpt.facts()
    spec = stage_specs(facts, ShapeConfig(facts.native_image_size, facts.native_image_size))[Stage.UNET]
    inputs = random_inputs(spec, facts, seed=3)
    graphs.export_raw(graphs.wrap(Stage.UNET, load_module(ckpt, Stage.UNET), spec, ckpt.facts()), spec, inputs, tmp_path / "inline.onnx")
    (tmp_path / "raw").mkdir()
    onnx.save_model(onnx.load(str(tmp_path / "inline.onnx")), str(tmp_path / "raw" / "model.onnx"),
                    save_as_external_data=True, all_tensors_to_one_file=False, size_threshold=0)
    assert len(list((tmp_path / "raw").iterdir())) > 100
    (tmp_path / "out").mkdir()
    graphs.clean_file(tmp_path / "raw" / "model.onnx", tmp_path / "out" / "unet.onnx", "unet.onnx.data")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["unet.onnx", "unet.onnx.data"]
    before = _session(tmp_path / "inline.onnx").run(None, inputs)
    after = _session(tmp_path / "out" / "unet.onnx").run(None, inputs)
    np.testing.assert_allclose(after[0], before[0], rtol=0, atol=1e-6)


def test_trace_returns_the_modules_eager_outputs_as_the_reference(tiny_sd2, tmp_path):
    """Verification compares ONNX with the outputs torch computed while tracing; they
    must be what diffusers' VAE computes for the same latent."""
    from sdrt.export import graphs
    from sdrt.export.checkpoint import load_module
    from sdrt.export.verify import random_inputs

    ckpt = open_checkpoint(tiny_sd2)
    facts = ckpt.facts()
    spec = stage_specs(facts, ShapeConfig(64, 64))[Stage.VAE_DECODER]
    inputs = random_inputs(spec, facts, seed=11)
    reference = graphs.export_raw(graphs.wrap(Stage.VAE_DECODER, load_module(ckpt, Stage.VAE_DECODER), spec, ckpt.facts()), spec,
                                  inputs, tmp_path / "vae.onnx")
    _, _, vae = _diffusers_modules(tiny_sd2)
    with torch.no_grad():
        want = vae.decode(torch.from_numpy(inputs["latent"])).sample.numpy()
    np.testing.assert_allclose(reference["images"], want, rtol=0, atol=1e-6)


@pytest.mark.slow   # 16 s; batch 2 shapes run by default (test_batch_2_with_cfg_doubles_the_text_and_unet_batch)
def test_batch_2_without_cfg_at_a_non_square_size_gives_the_specs_shapes(tiny_sd2, export_into, tmp_path):
    out = export_into(tiny_sd2, tmp_path / "a", batch=2, cfg=False, height=64, width=128)
    manifest = load_manifest(out)
    assert manifest.shape == ShapeConfig(height=64, width=128, batch=2, cfg=False,
                                         embedding_slots=DEFAULT_EMBEDDING_SLOTS)
    specs = manifest.specs
    assert specs[Stage.UNET].input("sample").shape == (2, 4, 8, 16)
    assert specs[Stage.VAE_DECODER].outputs[0].shape == (2, 3, 64, 128)
    for stage, spec in specs.items():
        session = _session(out / stage.onnx_file)
        assert [(i.name, tuple(i.shape)) for i in session.get_inputs()] == [(t.name, t.shape) for t in spec.inputs]
        assert [(o.name, tuple(o.shape)) for o in session.get_outputs()] == [(t.name, t.shape) for t in spec.outputs]
    errors = _check_against_diffusers(tiny_sd2, out, seed=5)
    assert all(e <= ATOL for e in errors.values()), errors


def test_batch_2_with_cfg_doubles_the_text_and_unet_batch(tiny_sd15, export_into, tmp_path):
    out = export_into(tiny_sd15, tmp_path / "b", batch=2, verify=False)
    manifest = load_manifest(out)
    assert manifest.verification == {}
    for stage, batch in ((Stage.TEXT_ENCODER, 4), (Stage.UNET, 4), (Stage.VAE_DECODER, 2)):
        session = _session(out / stage.onnx_file)
        assert session.get_inputs()[0].shape[0] == batch
    assert json.loads((out / "manifest.json").read_text())["shape"]["batch"] == 2


def test_size_multiple_follows_the_unets_down_blocks(tiny_sd15):
    facts = open_checkpoint(tiny_sd15).facts()
    assert facts.unet_size_multiple == 8 and facts.image_size_multiple == 64


@pytest.mark.slow   # 14 s: a full export; fp16 conversion runs by default in tests/test_fp16.py
def test_vae_precision_fp16_converts_only_the_vae_and_records_it(tiny_sd2, export_into, tmp_path):
    out = export_into(tiny_sd2, tmp_path / "h", vae_precision=Precision.FP16)
    manifest = load_manifest(out)
    assert {s: p.value for s, p in manifest.precisions.items()} == {
        Stage.TEXT_ENCODER: "fp32", Stage.UNET: "fp32", Stage.VAE_ENCODER: "fp16", Stage.VAE_DECODER: "fp16"}
    assert manifest.verification["vae_decoder"]["precision"] == "fp16" and manifest.verification["vae_decoder"]["passed"]

    def weight_types(stage):
        model = onnx.load(str(out / stage.onnx_file))
        return {i.data_type for i in model.graph.initializer if len(i.dims) > 1}

    assert onnx.TensorProto.FLOAT16 in weight_types(Stage.VAE_DECODER)
    assert onnx.TensorProto.FLOAT16 not in weight_types(Stage.TEXT_ENCODER)
    # I/O stays float32: the graphs still have the specs' signature.
    session = _session(out / "vae_decoder.onnx")
    assert session.get_inputs()[0].type == "tensor(float)" and session.get_outputs()[0].type == "tensor(float)"


def test_a_config_outside_the_built_in_pair_exports_and_matches_diffusers(tiny_sd15, export_into, tmp_path):
    """Three U-Net levels (latent multiple 4), a three-level VAE (4 pixels per latent),
    another text width and head layout: nothing may be hard-wired to the built-ins."""
    import shutil

    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    model = tmp_path / "odd"
    shutil.copytree(tiny_sd15, model)
    torch.manual_seed(1)
    UNet2DConditionModel(
        sample_size=12, block_out_channels=(16, 32, 32), layers_per_block=1, norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=40, attention_head_dim=(2, 4, 4), use_linear_projection=True,
    ).save_pretrained(model / "unet")
    AutoencoderKL(block_out_channels=(8, 16, 16), down_block_types=("DownEncoderBlock2D",) * 3,
                  up_block_types=("UpDecoderBlock2D",) * 3, norm_num_groups=4, layers_per_block=1,
                  scaling_factor=0.13025).save_pretrained(model / "vae")
    CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=40, intermediate_size=80, num_hidden_layers=1,
                                 num_attention_heads=5, max_position_embeddings=77)).save_pretrained(model / "text_encoder")
    facts = open_checkpoint(model).facts()
    assert (facts.vae_scale_factor, facts.unet_size_multiple, facts.native_image_size) == (4, 4, 48)
    out = export_into(model, tmp_path / "a", width=64)
    assert load_manifest(out).specs[Stage.VAE_DECODER].outputs[0].shape == (1, 3, 48, 64)
    errors = _check_against_diffusers(model, out, seed=9)
    assert all(e <= ATOL for e in errors.values()), errors
