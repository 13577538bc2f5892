"""The ONNX Runtime backend on small hand-built graphs whose math is known in NumPy,
so these tests need no export: every stage's I/O follows `stage_specs`, and the
expected outputs come from a NumPy formula, not from ONNX Runtime itself."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from sdrt.engines import files
from sdrt.engines import onnxruntime as ortb
from sdrt.engines.registry import open_engines
from sdrt.engines.errors import ArtifactError, BackendUnavailable, InvalidInput, InvalidType
from sdrt.engines.manifest import Manifest, file_record
from sdrt.engines.specs import (ENCODER_HIDDEN_STATES, IMAGES, INPUT_IDS, LATENT, SAMPLE, TEXT_EMBEDDINGS,
                                TIMESTEP, ModelFacts, Precision, ShapeConfig, Stage, TensorSpec)

FACTS = ModelFacts(latent_channels=4, vae_scale_factor=8, vae_scaling_factor=0.18215, image_channels=3,
                   text_max_length=7, text_hidden_size=5, unet_sample_size=2, unet_size_multiple=1,
                   prediction_type="epsilon")
SHAPE = ShapeConfig(height=16, width=24, batch=1, cfg=True)
STAGES = (Stage.TEXT_ENCODER, Stage.UNET, Stage.VAE_DECODER)   # a text-to-image artifact
RNG = np.random.default_rng(0)
TEXT_W = RNG.standard_normal((1, 1, FACTS.text_hidden_size)).astype(np.float32)
VAE_W = RNG.standard_normal((FACTS.latent_channels, FACTS.image_channels, 8, 8)).astype(np.float32)

_ONNX_TYPES = {"float32": TensorProto.FLOAT, "int32": TensorProto.INT32}


def _vi(t: TensorSpec):
    return helper.make_tensor_value_info(t.name, _ONNX_TYPES[t.dtype.value], list(t.shape))


def _graphs(specs):
    """Stage graphs: text = float(ids) * w; unet = sample * t + mean(ehs); vae = 8x8 stride-8 ConvTranspose."""
    te, un, va = specs[Stage.TEXT_ENCODER], specs[Stage.UNET], specs[Stage.VAE_DECODER]
    text = helper.make_graph(
        [helper.make_node("Cast", [INPUT_IDS], ["f"], to=TensorProto.FLOAT),
         helper.make_node("Unsqueeze", ["f", "axes"], ["u"]),
         helper.make_node("Mul", ["u", "w"], [TEXT_EMBEDDINGS])],
        "text", [_vi(t) for t in te.inputs], [_vi(t) for t in te.outputs],
        [numpy_helper.from_array(TEXT_W, "w"), numpy_helper.from_array(np.array([-1], np.int64), "axes")])
    unet = helper.make_graph(
        [helper.make_node("Mul", [SAMPLE, TIMESTEP], ["st"]),
         helper.make_node("ReduceMean", [ENCODER_HIDDEN_STATES], ["m"], keepdims=0),
         helper.make_node("Add", ["st", "m"], [LATENT])],
        "unet", [_vi(t) for t in un.inputs], [_vi(t) for t in un.outputs])
    vae = helper.make_graph(
        [helper.make_node("ConvTranspose", [LATENT, "w"], [IMAGES], strides=[8, 8])],
        "vae", [_vi(t) for t in va.inputs], [_vi(t) for t in va.outputs], [numpy_helper.from_array(VAE_W, "w")])
    return {Stage.TEXT_ENCODER: text, Stage.UNET: unet, Stage.VAE_DECODER: vae}


def _oracle(stage, x):
    if stage is Stage.TEXT_ENCODER:
        return {TEXT_EMBEDDINGS: x[INPUT_IDS].astype(np.float32)[..., None] * TEXT_W}
    if stage is Stage.UNET:
        return {LATENT: x[SAMPLE] * x[TIMESTEP] + x[ENCODER_HIDDEN_STATES].mean()}
    # ConvTranspose with kernel == stride: each latent pixel paints one 8x8 block.
    return {IMAGES: np.einsum("bchw,cokl->bohkwl", x[LATENT], VAE_W).reshape(
        x[LATENT].shape[0], FACTS.image_channels, SHAPE.height, SHAPE.width)}


def _make_folder(folder, graphs=None):
    manifest_stub = Manifest(FACTS, SHAPE, {s: Precision.FP32 for s in STAGES}, {})
    graphs = graphs or _graphs(manifest_stub.specs)
    for stage, graph in graphs.items():
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        if stage.data_file:
            onnx.save(model, folder / stage.onnx_file, save_as_external_data=True, location=stage.data_file,
                      size_threshold=0, all_tensors_to_one_file=True)
            if not (folder / stage.data_file).exists():
                (folder / stage.data_file).write_bytes(b"")
        else:
            onnx.save(model, folder / stage.onnx_file)
    records = {}
    for stage in STAGES:
        for name in (stage.onnx_file, stage.data_file):
            if name:
                records[name] = file_record(folder, name)
    return Manifest(FACTS, SHAPE, manifest_stub.precisions, records)


def _inputs(spec, rng):
    out = {}
    for t in spec.inputs:
        if t.dtype.value == "int32":
            out[t.name] = rng.integers(0, 1000, t.shape, dtype=np.int32)
        else:
            out[t.name] = rng.standard_normal(t.shape, dtype=np.float32)
    return out


@pytest.fixture
def folder(tmp_path):
    manifest = _make_folder(tmp_path)
    return tmp_path, manifest


def test_each_stage_computes_its_graph_like_numpy(folder):
    path, manifest = folder
    engines = open_engines(path, manifest, "onnxruntime", cache=False)
    rng = np.random.default_rng(1)
    for stage, engine in engines.items():
        x = _inputs(engine.spec, rng)
        got = engine(x)
        want = _oracle(stage, x)
        assert set(got) == set(want)
        for name in want:
            assert got[name].dtype == np.float32 and got[name].shape == want[name].shape
            np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("change, error, words", [
    (lambda x: x.pop(SAMPLE), InvalidInput, "missing ['sample']"),
    (lambda x: x.update(extra=np.zeros(1, np.float32)), InvalidInput, "unexpected ['extra']"),
    (lambda x: x.update(sample=x[SAMPLE].astype(np.float64)), InvalidType, "'sample' must be float32, got float64"),
    (lambda x: x.update(timestep=np.zeros((2,), np.float32)), InvalidInput, "'timestep' must have shape (1,)"),
    (lambda x: x.update(sample=x[SAMPLE].tolist()), InvalidType, "must be a numpy array"),
])
def test_engine_rejects_wrong_inputs_naming_the_tensor(folder, change, error, words):
    path, manifest = folder
    unet = open_engines(path, manifest, "onnxruntime", cache=False, stages=[Stage.UNET])[Stage.UNET]
    x = _inputs(unet.spec, np.random.default_rng(2))
    change(x)
    with pytest.raises(error) as e:
        unet(x)
    assert words in str(e.value)


def test_graph_that_does_not_match_the_manifest_is_refused_at_load(tmp_path):
    manifest = _make_folder(tmp_path)
    wrong = Manifest(FACTS, ShapeConfig(height=24, width=24, batch=1, cfg=True), manifest.precisions,
                     manifest.files)
    with pytest.raises(ArtifactError, match="unet.onnx: its I/O .* differs from the unet stage spec.*export the model again"):
        open_engines(tmp_path, wrong, "onnxruntime", cache=False)


def test_corrupt_onnx_file_is_an_artifact_error(folder):
    path, manifest = folder
    (path / Stage.VAE_DECODER.onnx_file).write_bytes(b"not a protobuf")
    # engines.onnx_files reads the protobuf before ORT does, so its message may come first.
    with pytest.raises(ArtifactError, match="vae_decoder.onnx: (ONNX Runtime cannot load it|not a valid ONNX model)"):
        open_engines(path, manifest, "onnxruntime", cache=False, stages=[Stage.VAE_DECODER])


def test_optimized_graph_cache_is_written_once_then_reused_with_same_outputs(folder):
    path, manifest = folder
    rng = np.random.default_rng(3)
    first = open_engines(path, manifest, "onnxruntime")
    inputs = {s: _inputs(e.spec, rng) for s, e in first.items()}
    assert not any(e.cached for e in first.values())
    entries = sorted(p.name for p in (path / ortb.CACHE_DIR).iterdir())
    assert [e.split("-")[0] for e in entries] == sorted(s.value for s in STAGES)  # one per stage, no temporaries
    second = open_engines(path, manifest, "onnxruntime")
    assert all(e.cached for e in second.values())
    for stage in STAGES:
        want = _oracle(stage, inputs[stage])
        for name, value in second[stage](inputs[stage]).items():
            np.testing.assert_allclose(value, want[name], rtol=1e-5, atol=1e-5)
    # The VAE weight is over the external-initializer threshold: saved beside the graph.
    vae_entry = next((path / ortb.CACHE_DIR).glob("vae_decoder-*"))
    assert (vae_entry / "vae_decoder.onnx.data").is_file()


def test_cache_key_changes_with_the_onnx_file(folder):
    path, manifest = folder
    key = ortb._cache_key(manifest, Stage.UNET, ["CPUExecutionProvider"])
    changed = Manifest(manifest.facts, manifest.shape, manifest.precisions,
                       {**manifest.files, "unet.onnx": type(manifest.files["unet.onnx"])("0" * 64, 1)})
    assert ortb._cache_key(changed, Stage.UNET, ["CPUExecutionProvider"]) != key
    assert ortb._cache_key(manifest, Stage.UNET, ["CUDAExecutionProvider", "CPUExecutionProvider"]) != key


def test_damaged_cache_entry_is_rebuilt(folder):
    path, manifest = folder
    open_engines(path, manifest, "onnxruntime", stages=[Stage.UNET])
    entry = next((path / ortb.CACHE_DIR).glob("unet-*"))
    (entry / "unet.onnx").write_bytes(b"garbage")
    engine = open_engines(path, manifest, "onnxruntime", stages=[Stage.UNET])[Stage.UNET]
    assert not engine.cached
    x = _inputs(engine.spec, np.random.default_rng(4))
    np.testing.assert_allclose(engine(x)[LATENT], _oracle(Stage.UNET, x)[LATENT], rtol=1e-5, atol=1e-5)


def test_unwritable_cache_falls_back_to_an_uncached_session(folder, monkeypatch):
    # A read-only artifact folder (simulated: the tests may run as root, who ignores modes).
    path, manifest = folder

    def refuse(*a, **k):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(files.tempfile, "mkdtemp", refuse)
    engines = open_engines(path, manifest, "onnxruntime")
    assert not any(e.cached for e in engines.values())
    x = _inputs(engines[Stage.UNET].spec, np.random.default_rng(5))
    np.testing.assert_allclose(engines[Stage.UNET](x)[LATENT], _oracle(Stage.UNET, x)[LATENT], rtol=1e-5, atol=1e-5)
    assert not any(p.is_dir() for p in (path / ortb.CACHE_DIR).iterdir())


def test_unknown_provider_lists_the_accepted_names():
    with pytest.raises(InvalidInput, match="unknown ONNX Runtime provider 'metal'.*cpu, cuda"):
        ortb.resolve_providers("metal")


@pytest.mark.skipif("CUDAExecutionProvider" in ortb.ort.get_available_providers(), reason="CUDA is present")
def test_cuda_provider_absent_is_backend_unavailable():
    with pytest.raises(BackendUnavailable, match="CUDAExecutionProvider is not available.*onnxruntime-gpu"):
        ortb.resolve_providers(["cuda"])


def test_cpu_is_always_the_fallback_provider():
    assert ortb.resolve_providers(None) == ["CPUExecutionProvider"]
    assert ortb.resolve_providers("CPUExecutionProvider") == ["CPUExecutionProvider"]


def test_threads_must_be_positive(folder):
    path, manifest = folder
    with pytest.raises(InvalidInput, match="threads must be a positive integer"):
        open_engines(path, manifest, "onnxruntime", threads=0)


def test_sessions_do_not_busy_wait_unless_asked(folder):
    # Spinning threads collapse latency on shared cores (see session_options).
    path, manifest = folder
    key = "session.intra_op.allow_spinning"
    quiet = open_engines(path, manifest, "onnxruntime", cache=False, stages=[Stage.UNET])[Stage.UNET]
    spin = open_engines(path, manifest, "onnxruntime", cache=False, spinning=True, stages=[Stage.UNET])[Stage.UNET]
    assert quiet.session.get_session_options().get_session_config_entry(key) == "0"
    with pytest.raises(Exception, match="does not have configuration"):   # ORT's default: spin
        spin.session.get_session_options().get_session_config_entry(key)
