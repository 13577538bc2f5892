"""fp16 graphs for strongly typed TensorRT (export/precision.py), checked without a GPU.

The oracle is the exported fp32 graph (itself checked against diffusers/transformers
by export's tests), run with `onnx.reference.ReferenceEvaluator`: NumPy semantics, so
an fp16 node really rounds to fp16. The bound is a relative L2 error of 5e-3, about
ten fp16 unit roundoffs (2**-11): every tiny stage meets it with margin (measured
1.0e-3..2.7e-3), while the deliberately broken conversions below exceed it.
Figures print with `pytest -s tests/test_fp16.py`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, numpy_helper
from onnx.reference import ReferenceEvaluator

from sdrt.engines.errors import ArtifactError
from sdrt.engines.families import FAMILIES
from sdrt.engines.manifest import load_manifest, read_manifest
from sdrt.engines.specs import DType, Precision, Stage
from sdrt.export import precision as fp16
from sdrt.export.verify import random_inputs

REL_BOUND = 5e-3
VARIANTS = ("sd15", "sd2")


# The stages of the default SD 1.x/2.x artifacts these tests convert (SDXL adds
# text_encoder_2; an export with --deepcache adds unet_shallow, converted in
# test_deepcache.py; --controlnet and a checkpoint's safety checker add their stages,
# which their exports verify in fp16 against torch).
STAGES = [s for s in FAMILIES["sd1"].stages
          if s not in (Stage.UNET_SHALLOW, Stage.CONTROLNET, Stage.SAFETY_CHECKER)]


def rel_error(got: np.ndarray, ref: np.ndarray) -> float:
    ref = ref.astype(np.float64)
    return float(np.linalg.norm(got.astype(np.float64) - ref) / np.linalg.norm(ref))


def psnr(got: np.ndarray, ref: np.ndarray) -> float:
    ref = ref.astype(np.float64)
    rmse = np.sqrt(np.mean((got.astype(np.float64) - ref) ** 2))
    return float(20 * np.log10(np.abs(ref).max() / rmse)) if rmse > 0 else float("inf")


def stage_inputs(folder: Path, stage: Stage) -> dict[str, np.ndarray]:
    manifest = read_manifest(folder)
    inputs = random_inputs(manifest.specs[stage], manifest.facts, seed=1)
    if stage is Stage.UNET:
        # The worst case for the timestep embedding: t * freq near 1000, where fp16's
        # spacing is 0.5.
        inputs["timestep"] = np.array([999.0], np.float32)
    return inputs


def load_fp32(folder: Path, stage: Stage) -> onnx.ModelProto:
    return onnx.load(str(folder / stage.onnx_file), load_external_data=False)


@pytest.fixture(scope="module")
def fp16_graphs(request, tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """variant -> (fp32 artifact folder, folder of the fp16 graphs convert_stage wrote)."""
    out = {}
    for variant in VARIANTS:
        src = request.getfixturevalue(f"{variant}_artifacts")
        dst = tmp_path_factory.mktemp(f"fp16-{variant}")
        for stage in STAGES:
            fp16.convert_stage(src / stage.onnx_file, dst / stage.onnx_file, stage)
        out[variant] = (src, dst)
    return out


@pytest.mark.parametrize("stage", STAGES, ids=lambda s: s.value)
@pytest.mark.parametrize("variant", VARIANTS)
def test_fp16_graph_matches_fp32_graph_under_onnx_reference(fp16_graphs, variant, stage):
    src, dst = fp16_graphs[variant]
    inputs = stage_inputs(src, stage)
    ref = ReferenceEvaluator(str(src / stage.onnx_file)).run(None, inputs)[0]
    got = ReferenceEvaluator(str(dst / stage.onnx_file)).run(None, inputs)[0]
    assert got.dtype == np.float32 and got.shape == ref.shape   # float32 boundary kept
    rel, db = rel_error(got, ref), psnr(got, ref)
    print(f"\nfp16 vs fp32 graph [{variant} {stage.value}]: rel L2 {rel:.2e}, PSNR {db:.1f} dB, "
          f"max|diff| {np.abs(got - ref).max():.2e} at scale {np.abs(ref).max():.2f}")
    assert np.all(np.isfinite(got))
    assert rel < REL_BOUND


@pytest.mark.parametrize("stage", STAGES, ids=lambda s: s.value)
def test_fp16_graph_is_typed_as_intended(fp16_graphs, stage):
    """Heavy ops compute in fp16, sensitive ones in fp32, I/O as the manifest says."""
    src, dst = fp16_graphs["sd15"]
    model = onnx.load(str(dst / stage.onnx_file))
    fp16.check_graph(dst / stage.onnx_file)   # onnx.checker + strict shape inference
    types = fp16._tensor_types(onnx.shape_inference.infer_shapes(model))
    spec = read_manifest(src).specs[stage]
    elem = {DType.FLOAT32: TensorProto.FLOAT, DType.INT32: TensorProto.INT32}
    assert [(i.name, i.type.tensor_type.elem_type) for i in model.graph.input] == \
        [(t.name, elem[t.dtype]) for t in spec.inputs]
    assert [(o.name, o.type.tensor_type.elem_type) for o in model.graph.output] == \
        [(t.name, elem[t.dtype]) for t in spec.outputs]
    first_input_type = {n.name: types[n.input[0]] for n in model.graph.node if n.input and n.input[0]}
    heavy = [n for n in model.graph.node if n.op_type in ("Conv", "MatMul", "Gemm")]
    assert heavy and all(first_input_type[n.name] == TensorProto.FLOAT16 for n in heavy)
    kept = [n for n in model.graph.node if n.op_type in fp16.KEEP_FP32_OPS]
    assert kept and all(first_input_type[n.name] == TensorProto.FLOAT for n in kept)
    # Weights are stored in fp16 (the file halves), not cast at run time.
    sizes = {t.data_type: 0 for t in model.graph.initializer}
    for t in model.graph.initializer:
        sizes[t.data_type] += int(np.prod(t.dims))
    assert sizes.get(TensorProto.FLOAT16, 0) > 10 * sizes.get(TensorProto.FLOAT, 0)


def test_timestep_embedding_stays_exact_where_naive_fp16_breaks_it(fp16_graphs):
    """The sinusoidal embedding of t=999 is computed in fp32 (bit-identical to the fp32
    graph); an all-fp16 conversion gets sin/cos wrong by ~0.1."""
    src, dst = fp16_graphs["sd15"]
    inputs = stage_inputs(src, Stage.UNET)
    fp32 = onnx.load(str(src / Stage.UNET.onnx_file))
    names = [n.output[0] for n in fp32.graph.node if n.op_type in ("Sin", "Cos")]
    assert names, "the U-Net graph has no sinusoidal timestep embedding"
    ref = ReferenceEvaluator(fp32).run(names, inputs)
    ours = ReferenceEvaluator(str(dst / Stage.UNET.onnx_file)).run(names, inputs)
    naive_model = fp16.convert_model(load_fp32(src, Stage.UNET), base_dir=src, keep_fp32_ops=())
    naive = ReferenceEvaluator(naive_model).run(names, inputs)
    ours_err = max(float(np.abs(o.astype(np.float64) - r).max()) for o, r in zip(ours, ref))
    naive_err = max(float(np.abs(o.astype(np.float64) - r).max()) for o, r in zip(naive, ref))
    print(f"\ntimestep embedding at t=999: max|diff| ours {ours_err:.1e}, all-fp16 {naive_err:.1e}")
    assert ours_err == 0.0
    assert naive_err > 1e-2


@pytest.mark.parametrize("stage", STAGES, ids=lambda s: s.value)
def test_bound_rejects_a_broken_conversion(fp16_graphs, stage):
    """Negative control: the fp16 graph with two same-shaped weights swapped (the bug a
    name clash in a converter makes) must fail the bound the correct graph meets."""
    src, dst = fp16_graphs["sd15"]
    model = onnx.load(str(dst / stage.onnx_file))
    by_shape: dict[tuple, list] = {}
    for t in model.graph.initializer:
        if t.data_type == TensorProto.FLOAT16 and len(t.dims) >= 2:
            by_shape.setdefault(tuple(t.dims), []).append(t)
    a, b = next(ts for ts in by_shape.values() if len(ts) >= 2)[:2]
    wa, wb = numpy_helper.to_array(a), numpy_helper.to_array(b)
    a.CopyFrom(numpy_helper.from_array(wb, a.name))
    b.CopyFrom(numpy_helper.from_array(wa, b.name))
    inputs = stage_inputs(src, stage)
    ref = ReferenceEvaluator(str(src / stage.onnx_file)).run(None, inputs)[0]
    got = ReferenceEvaluator(model).run(None, inputs)[0]
    rel = rel_error(got, ref)
    print(f"\nbroken fp16 graph [{stage.value}]: rel L2 {rel:.2e}, PSNR {psnr(got, ref):.1f} dB")
    assert rel > REL_BOUND


@pytest.mark.parametrize("stage", STAGES, ids=lambda s: s.value)
def test_fp16_graph_runs_on_onnxruntime_cpu(fp16_graphs, stage):
    import onnxruntime as ort

    src, dst = fp16_graphs["sd2"]
    inputs = stage_inputs(src, stage)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(dst / stage.onnx_file), options, providers=["CPUExecutionProvider"])
    got = session.run(None, inputs)[0]
    ref = ReferenceEvaluator(str(src / stage.onnx_file)).run(None, inputs)[0]
    atol, rtol = fp16.verify_tolerance(stage, Precision.FP16)
    assert np.abs(got - ref).max() <= atol + rtol * np.abs(ref).max()


def test_unet_weights_go_to_a_data_file_named_after_the_graph(fp16_graphs):
    _, dst = fp16_graphs["sd15"]
    model = onnx.load(str(dst / "unet.onnx"), load_external_data=False)
    locations = {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {"unet.onnx.data"}
    assert not [p.name for p in dst.iterdir() if p.name.startswith(".sdrt-tmp-")]


def test_missing_source_graph_is_an_artifact_error(tmp_path):
    with pytest.raises(ArtifactError, match="no such ONNX file"):
        fp16.convert_stage(tmp_path / "unet.onnx", tmp_path / "out.onnx", Stage.UNET)


def test_fp16_export_records_each_stage_precision(tiny_sd15, export_into, tmp_path):
    """Through the real exporter, verified there against torch: fp16 text encoder and
    U-Net with the fp32 VAE choice; the manifest records each stage's precision."""
    folder = export_into(tiny_sd15, tmp_path / "fp16", height=64, width=64,
                         precision=Precision.FP16, vae_precision=Precision.FP32)
    manifest = load_manifest(folder)
    assert dict(manifest.precisions) == {Stage.TEXT_ENCODER: Precision.FP16, Stage.UNET: Precision.FP16,
                                         Stage.VAE_ENCODER: Precision.FP32, Stage.VAE_DECODER: Precision.FP32}
    stated = json.loads((folder / "manifest.json").read_text())
    assert {v["name"]: v["precision"] for v in stated["stages"]} == \
        {"text_encoder": "fp16", "unet": "fp16", "vae_encoder": "fp32", "vae_decoder": "fp32"}
    for stage in manifest.stages:
        check = manifest.verification[stage.value]
        assert check["passed"] and check["precision"] == manifest.precisions[stage].value


def test_weight_shared_by_fp16_and_fp32_nodes_gets_one_copy_per_dtype(tmp_path):
    """S is LayerNormalization's scale (kept fp32) and also a factor in fp16: both consumers
    get it in their own dtype, the graph stays valid, and the result matches fp32."""
    from onnx import helper

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), "W")
    s = numpy_helper.from_array(rng.uniform(0.5, 1.5, 8).astype(np.float32), "S")
    b = numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "B")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["h"]),
         helper.make_node("Mul", ["h", "S"], ["m"]),
         helper.make_node("LayerNormalization", ["m", "S", "B"], ["y"], axis=-1)],
        "shared", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])], [w, s, b])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    converted = fp16.convert_model(model)
    fp16.save_model(converted, tmp_path / "g.onnx", external_data=False)   # runs the strict checker
    dtypes = {t.name: t.data_type for t in converted.graph.initializer}
    assert dtypes["W"] == TensorProto.FLOAT16 and dtypes["S"] == TensorProto.FLOAT
    assert TensorProto.FLOAT16 in {dtypes[n] for n in dtypes if n.startswith("S/")}
    x = rng.standard_normal((2, 8)).astype(np.float32)
    ref = ReferenceEvaluator(model).run(None, {"x": x})[0]
    got = ReferenceEvaluator(str(tmp_path / "g.onnx")).run(None, {"x": x})[0]
    assert got.dtype == np.float32 and rel_error(got, ref) < REL_BOUND
