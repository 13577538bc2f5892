"""The OpenVINO backend (engines/openvino.py) and the backend registry (engines/registry.py).

The oracle for OpenVINO is the ONNX Runtime backend on the same artifact: both run the
same ONNX graphs, so in f32 their images agree to kernel order (<= 1e-4), for every
model family and task. The registry tests check what a user sees: what `auto` picks
and why, the one-line reason a backend cannot run, another backend's option refused
by name, and `--help` listing backends and options.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdrt.engines import registry
from sdrt.engines.errors import BackendUnavailable, InvalidInput
from sdrt.engines.manifest import read_manifest
from sdrt.engines.specs import Precision

ov = pytest.importorskip("openvino", reason="openvino is not installed (pip install 'sdrt[openvino]')")

from sdrt.engines import openvino as ovb  # noqa: E402
from sdrt.runtime.pipeline import Pipeline  # noqa: E402

PIXEL_TOLERANCE = 1e-4   # f32: the bound for OpenVINO against ONNX Runtime
# An fp16 artifact's graphs compute in fp16 on ONNX Runtime, while OpenVINO's CPU plugin
# at its f32 inference precision upcasts them to f32: the two differ by fp16 rounding
# (measured 1.9e-3), inside export's fp16 bound (engines/verify.py verify_tolerance).
FP16_PIXEL_TOLERANCE = 1e-2
STEPS = 3


def _export(variant: str, root: Path, model: Path | None = None, **kw) -> Path:
    from sdrt.export.config import ExportConfig
    from sdrt.export.exporter import export_artifacts
    from sdrt.export.tiny import make_tiny_model
    model = model or make_tiny_model(root / f"model-{variant}", variant=variant)
    # verify=False: export checks its graphs in its own tests; here only the backends differ.
    export_artifacts(ExportConfig(model_dir=model, out_dir=root / f"art-{variant}", verify=False, **kw))
    return root / f"art-{variant}"


@pytest.fixture(scope="module")
def artifacts(sd15_artifacts, sd2_artifacts, tiny_sd15, tiny_sdxl, tiny_sdxl_refiner, export_into, tmp_path_factory):
    """name -> artifact folder, one per family (exported once for this module)."""
    root = tmp_path_factory.mktemp("ov")
    out = {"sd15": sd15_artifacts, "sd2": sd2_artifacts,
           "fp16": export_into(tiny_sd15, root / "fp16", precision=Precision.FP16, verify=False)}
    for variant, model in (("sd15-inpaint", None), ("lcm", None), ("sdxl", tiny_sdxl),
                           ("sdxl-refiner", tiny_sdxl_refiner)):
        out[variant] = _export(variant, root, model)
    return out


def _image(shape, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (shape.height, shape.width, 3), dtype=np.uint8))


def _mask(shape) -> Image.Image:
    m = np.zeros((shape.height, shape.width), np.uint8)
    m[shape.height // 4: 3 * shape.height // 4, shape.width // 4: 3 * shape.width // 4] = 255
    return Image.fromarray(m)


# family/task -> (artifact, the call's keyword arguments given the artifact's shape)
CASES = {
    "sd15-text-to-image": ("sd15", lambda s: {}),
    "sd15-img2img": ("sd15", lambda s: {"image": _image(s, 1), "strength": 0.7}),
    "sd15-inpaint-4ch": ("sd15", lambda s: {"image": _image(s, 2), "mask_image": _mask(s)}),
    "sd15-inpaint-9ch": ("sd15-inpaint", lambda s: {"image": _image(s, 3), "mask_image": _mask(s)}),
    "sd2-v-prediction": ("sd2", lambda s: {}),
    "sdxl-text-to-image": ("sdxl", lambda s: {}),
    "sdxl-img2img": ("sdxl", lambda s: {"image": _image(s, 4), "strength": 0.6}),
    "sdxl-refiner": ("sdxl-refiner", lambda s: {"image": _image(s, 5), "strength": 0.5}),
    "lcm": ("lcm", lambda s: {}),
    "fp16-artifact": ("fp16", lambda s: {}),
}
MEASURED: dict[str, float] = {}


@pytest.mark.parametrize("case", list(CASES))
def test_openvino_pixels_match_onnxruntime(artifacts, case):
    name, kwargs = CASES[case]
    folder = artifacts[name]
    with Pipeline.load(folder, backend="onnxruntime") as ort_pipe, \
            Pipeline.load(folder, backend="openvino") as ov_pipe:
        assert ov_pipe.backend == "openvino" and all(isinstance(e, ovb.OvEngine) for e in ov_pipe.engines.values())
        args = dict(prompt="a red cube", steps=STEPS, seed=7, **kwargs(ort_pipe.manifest.shape))
        want = ort_pipe(**args).pixels
        got = ov_pipe(**args).pixels
    assert got.shape == want.shape and got.dtype == want.dtype
    diff = float(np.abs(got.astype(np.float64) - want).max())
    MEASURED[case] = diff
    print(f"\n{case}: max |openvino - onnxruntime| = {diff:.2e}")
    bound = FP16_PIXEL_TOLERANCE if name == "fp16" else PIXEL_TOLERANCE
    assert diff <= bound, f"{case}: OpenVINO differs from ONNX Runtime by {diff:.3g} (> {bound})"
    assert float(np.abs(want - 0.5).max()) > 0.05   # a real image, not a constant the two could share


def test_engine_returns_copies_and_times_the_call(sd15_artifacts):
    manifest = read_manifest(sd15_artifacts)
    engines = registry.open_engines(sd15_artifacts, manifest, "openvino", cache=False)
    unet = next(e for s, e in engines.items() if s.value == "unet")
    rng = np.random.default_rng(0)
    x = {t.name: rng.standard_normal(t.shape).astype(t.dtype.numpy) for t in unet.spec.inputs}
    first = unet(x)
    kept = {k: v.copy() for k, v in first.items()}
    unet({k: v + 1 for k, v in x.items()})
    for k in kept:   # the second call did not overwrite the first call's arrays
        np.testing.assert_array_equal(first[k], kept[k])
    assert unet.last_time() is not None and unet.last_time() > 0
    for e in engines.values():
        e.close()
    with pytest.raises(InvalidInput, match="closed"):
        unet(x)


def test_engine_refuses_a_graph_that_is_not_its_spec(sd15_artifacts, tmp_path):
    from sdrt.engines.errors import ArtifactError
    folder = tmp_path / "swapped"
    shutil.copytree(sd15_artifacts, folder, ignore=shutil.ignore_patterns(".sdrt-cache"))
    manifest = read_manifest(folder)
    # the VAE decoder's graph where the text encoder's should be
    shutil.copy(folder / "vae_decoder.onnx", folder / "text_encoder.onnx")
    with pytest.raises(ArtifactError, match="text_encoder.onnx: its I/O .* differs from the text_encoder stage spec"):
        registry.open_engines(folder, manifest, "openvino", cache=False)


# --- the compiled-model cache -----------------------------------------------------

def test_second_load_reads_compiled_models_from_the_cache(sd15_artifacts, tmp_path):
    folder = tmp_path / "art"
    shutil.copytree(sd15_artifacts, folder, ignore=shutil.ignore_patterns(".sdrt-cache"))
    manifest = read_manifest(folder)
    first = registry.open_engines(folder, manifest, "openvino")
    assert not any(e.cached for e in first.values())
    entries = sorted((folder / ovb.CACHE_DIR).iterdir())
    assert sorted(p.name.split("-")[0] for p in entries) == sorted(s.value for s in manifest.stages)
    assert all(list(p.glob("*.blob")) for p in entries)
    second = registry.open_engines(folder, manifest, "openvino")
    assert all(e.cached for e in second.values())
    unet = [s for s in manifest.stages if s.value == "unet"][0]
    rng = np.random.default_rng(1)
    x = {t.name: rng.standard_normal(t.shape).astype(t.dtype.numpy) for t in manifest.specs[unet].inputs}
    for name, value in second[unet](x).items():
        np.testing.assert_array_equal(value, first[unet](x)[name])
    off = registry.open_engines(folder, manifest, "openvino", cache=False)
    assert not any(e.cached for e in off.values())


def test_read_only_artifact_folder_loads_uncached(sd15_artifacts, tmp_path, monkeypatch):
    # Simulated: the tests may run as root, who ignores file modes.
    folder = tmp_path / "ro"
    shutil.copytree(sd15_artifacts, folder, ignore=shutil.ignore_patterns(".sdrt-cache"))
    manifest = read_manifest(folder)

    def refuse(self, *a, **k):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "mkdir", refuse)
    engines = registry.open_engines(folder, manifest, "openvino")
    monkeypatch.undo()
    assert not any(e.cached for e in engines.values())
    assert not (folder / ovb.CACHE_DIR).exists()


# --- precision ----------------------------------------------------------------------

@pytest.mark.parametrize("precision", ["bf16", "f16"])
def test_reduced_precision_runs_only_where_the_cpu_has_it_and_its_error_is_measured(sd15_artifacts, precision):
    capability = ovb.InferencePrecision(precision).capability
    has = capability in [str(c) for c in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")]
    if not has:
        with pytest.raises(InvalidInput, match=f"precision {precision}: this CPU does not run {capability} "
                                               f"natively \\(its OpenVINO capabilities: .*\\); use precision f32"):
            Pipeline.load(sd15_artifacts, backend="openvino", precision=precision, cache=False)
        return
    args = dict(prompt="a red cube", steps=STEPS, seed=7)
    with Pipeline.load(sd15_artifacts, backend="openvino", precision=precision, cache=False) as low, \
            Pipeline.load(sd15_artifacts, backend="openvino") as exact:
        unet = next(e for s, e in low.engines.items() if s.value == "unet")
        assert str(unet.compiled.get_property("INFERENCE_PRECISION_HINT")).lower().startswith(
            {"bf16": "<type: 'bfloat16'", "f16": "<type: 'float16'"}[precision])
        diff = float(np.abs(low(**args).pixels.astype(np.float64) - exact(**args).pixels).max())
    print(f"\n{precision}: max |{precision} - f32| pixels = {diff:.2e}")
    assert np.isfinite(diff) and diff < 0.25   # reduced precision, still the same picture


def test_precision_value_is_checked_by_name():
    with pytest.raises(InvalidInput, match="precision must be one of f32, bf16, f16, got 'fp8'"):
        ovb.Options(precision="fp8")
    with pytest.raises(InvalidInput, match="threads must be a positive integer or None, got 0"):
        ovb.Options(threads=0)


# --- the registry -------------------------------------------------------------------

def test_auto_picks_openvino_on_a_cpu_and_says_why(sd15_artifacts, monkeypatch):
    from sdrt.engines import tensorrt
    monkeypatch.setattr(tensorrt, "unavailable", lambda: "TensorRT is not installed")
    with Pipeline.load(sd15_artifacts, backend="auto", threads=1) as pipe:
        assert pipe.backend == "openvino"
        assert pipe.backend_reason == "auto picked openvino (tensorrt: TensorRT is not installed)"
        assert all(isinstance(e, ovb.OvEngine) for e in pipe.engines.values())


def test_auto_falls_back_to_onnxruntime_and_leaves_out_options_it_does_not_take(sd15_artifacts, monkeypatch):
    from sdrt.engines import tensorrt
    monkeypatch.setattr(tensorrt, "unavailable", lambda: "TensorRT is not installed")
    monkeypatch.setattr(ovb, "unavailable", lambda: "openvino is not installed (pip install 'sdrt[openvino]')")
    choice = registry.resolve("auto", sd15_artifacts, read_manifest(sd15_artifacts), threads=1, precision="bf16")
    assert choice.name == "onnxruntime" and choice.options.threads == 1
    assert choice.reason == ("auto picked onnxruntime (tensorrt: TensorRT is not installed; openvino: openvino is "
                             "not installed (pip install 'sdrt[openvino]')); leaving out precision, not options "
                             "of onnxruntime")


def test_auto_picks_tensorrt_only_where_its_engines_are_built(sd15_artifacts, monkeypatch):
    from sdrt.engines import tensorrt
    monkeypatch.setattr(tensorrt, "unavailable", lambda: None)
    monkeypatch.setattr(tensorrt, "unready", lambda folder, manifest, options: "unet: no engine built yet")
    choice = registry.resolve("auto", sd15_artifacts, read_manifest(sd15_artifacts))
    assert choice.name == "openvino" and choice.reason == "auto picked openvino (tensorrt: unet: no engine built yet)"
    monkeypatch.setattr(tensorrt, "unready", lambda folder, manifest, options: None)
    assert registry.resolve("auto", sd15_artifacts, read_manifest(sd15_artifacts)).name == "tensorrt"


def test_unavailable_backend_asked_for_says_why_in_one_line(sd15_artifacts, monkeypatch):
    monkeypatch.setattr(ovb, "unavailable", lambda: "openvino is not installed (pip install 'sdrt[openvino]')")
    with pytest.raises(BackendUnavailable) as e:
        Pipeline.load(sd15_artifacts, backend="openvino")
    assert str(e.value) == ("the openvino backend cannot run here: openvino is not installed "
                            "(pip install 'sdrt[openvino]')")


@pytest.mark.parametrize("backend, option, words", [
    ("openvino", {"cuda_graph": False}, "option 'cuda_graph' belongs to the tensorrt backend, not openvino"),
    ("tensorrt", {"threads": 2}, "option 'threads' belongs to the onnxruntime and openvino backends, not tensorrt"),
    ("onnxruntime", {"precision": "bf16"}, "option 'precision' belongs to the openvino backend, not onnxruntime"),
    ("openvino", {"turbo": True}, "unknown option 'turbo' for the openvino backend: it takes threads, precision, cache"),
    ("auto", {"turbo": True}, "unknown option 'turbo': the backends take"),
])
def test_an_option_of_another_backend_is_refused_naming_the_backend(sd15_artifacts, backend, option, words):
    with pytest.raises(InvalidInput, match=words):
        Pipeline.load(sd15_artifacts, backend=backend, **option)


def test_an_options_record_is_taken_as_it_is(sd15_artifacts):
    with Pipeline.load(sd15_artifacts, backend="openvino", options=ovb.Options(threads=1, cache=False)) as pipe:
        assert pipe.backend == "openvino"
    from sdrt.engines import onnxruntime
    with pytest.raises(InvalidInput, match="options are the onnxruntime backend's Options, not the openvino"):
        Pipeline.load(sd15_artifacts, backend="openvino", options=onnxruntime.Options())


# --- the CLI ------------------------------------------------------------------------

def test_generate_help_lists_the_backends_and_their_options(capsys):
    from sdrt.cli.main import main
    assert main(["generate", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--backend {auto,onnxruntime,openvino,tensorrt}" in out
    for name in registry.names():
        assert f"{name} backend:" in out
    for flag in ("--provider", "--threads", "--no-cache", "--spinning", "--precision", "--no-cuda-graph",
                 "--shared-device-memory", "--device"):
        assert out.count(f"  {flag}") == 1, flag     # one flag per option, shared ones included
    assert "Available here" in out


@pytest.mark.parametrize("argv, words", [
    (["--backend", "openvino", "--no-cuda-graph"], "--no-cuda-graph belongs to the tensorrt backend, not openvino"),
    (["--backend", "tensorrt", "--threads", "2"], "--threads belongs to the onnxruntime and openvino backends, "
                                                  "not tensorrt"),
    (["--backend", "onnxruntime", "--precision", "bf16"], "--precision belongs to the openvino backend, "
                                                         "not onnxruntime"),
])
def test_cli_flag_of_another_backend_is_one_line(sd15_artifacts, tmp_path, capsys, argv, words):
    from sdrt.cli.main import main
    rc = main(["generate", str(sd15_artifacts), "--prompt", "x", "--out", str(tmp_path / "x.png"), *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err == [f"sdrt generate: error: {words}"]


def test_cli_generates_a_png_on_openvino_and_auto_says_what_it_picked(sd15_artifacts, tmp_path, capsys,
                                                                      monkeypatch):
    from sdrt.cli.main import main
    from sdrt.engines import tensorrt
    out = tmp_path / "ov.png"
    assert main(["generate", str(sd15_artifacts), "--prompt", "a fox", "--steps", "2", "--seed", "1",
                 "--backend", "openvino", "--threads", "1", "--out", str(out)]) == 0
    assert Image.open(out).size == (read_manifest(sd15_artifacts).shape.width,
                                    read_manifest(sd15_artifacts).shape.height)
    capsys.readouterr()
    monkeypatch.setattr(tensorrt, "unavailable", lambda: "TensorRT is not installed")
    assert main(["generate", str(sd15_artifacts), "--prompt", "a fox", "--steps", "2", "--seed", "1",
                 "--backend", "auto", "--out", str(tmp_path / "auto.png")]) == 0
    assert "sdrt generate: auto picked openvino (tensorrt: TensorRT is not installed)" in capsys.readouterr().err
    np.testing.assert_array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(tmp_path / "auto.png")))
