"""The TensorRT backend (engines/tensorrt.py) and `sdrt build` (engines/build.py).

TensorRT cannot be installed here. What runs everywhere:
- TrtEngine's own logic (upload only what changed, CUDA-graph capture after a warm-up
  call and replay, fallback when capture fails, I/O checks) over a stand-in CUDA layer
  whose "device memory" is NumPy and a stand-in execution context that computes a
  known function of its inputs;
- the build flow (strongly typed network, workspace, optimization level, timing
  cache, reuse of current engines, rebuild for another GPU) over a stand-in
  `tensorrt` module that records what it is asked;
- the message when TensorRT is missing.
The real thing (build + generate on a GPU, compared with ONNX Runtime) runs only
where `tensorrt` and a GPU are present, and skips elsewhere, saying so.
"""

from __future__ import annotations

import itertools
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from sdrt.engines import cache
from sdrt.engines import tensorrt as trt_backend
from sdrt.engines.errors import ArtifactError, BackendUnavailable
from sdrt.engines.manifest import read_manifest
from sdrt.engines.specs import (ENCODER_HIDDEN_STATES, LATENT, SAMPLE, TIMESTEP, ModelFacts, ShapeConfig, Stage,
                                stage_specs)

FACTS = ModelFacts(latent_channels=4, vae_scale_factor=2, vae_scaling_factor=0.18215, image_channels=3,
                   text_max_length=77, text_hidden_size=32, unet_sample_size=8, unet_size_multiple=4,
                   prediction_type="epsilon")
SPECS = stage_specs(FACTS, ShapeConfig(height=16, width=16, batch=1, cfg=True))
UNET = SPECS[Stage.UNET]


# --- a stand-in CUDA layer: device memory is NumPy --------------------------------

class FakeCuda:
    """The subset of engines/cuda.py that TrtEngine uses, recording what happens."""

    class CudaError(RuntimeError):
        pass

    def __init__(self, capture_fails: bool = False):
        self.memory: dict[int, np.ndarray] = {}
        self.log: list[str] = []
        self.capture_fails = capture_fails
        ids = itertools.count(1000, 1000)
        fake = self

        class DeviceBuffer:
            def __init__(self, nbytes):
                self.nbytes, self.ptr = nbytes, next(ids)
                fake.memory[self.ptr] = np.zeros(nbytes, np.uint8)

            @classmethod
            def for_spec(cls, spec):
                return cls(spec.nbytes)

            def close(self):
                fake.memory.pop(self.ptr, None)

        class PinnedBuffer:
            def __init__(self, shape, dtype):
                self.array = np.zeros(shape, dtype)
                self.nbytes, self.ptr = self.array.nbytes, next(ids)

            @classmethod
            def for_spec(cls, spec):
                return cls(spec.shape, spec.dtype.numpy)

            def close(self):
                pass

        class Stream:
            def __int__(self):
                return 7

            def upload(self, dst, src):
                fake.log.append(f"upload {src.nbytes}")
                fake.memory[dst.ptr][:] = src.array.view(np.uint8).ravel()

            def download(self, dst, src):
                fake.log.append("download")
                dst.array.view(np.uint8).ravel()[:] = fake.memory[src.ptr]

            def synchronize(self):
                pass

            def close(self):
                fake.log.append("stream closed")

        class Event:
            def record(self, stream):
                pass

            def ms_since(self, start):
                return 2.0

            def close(self):
                pass

        class CudaGraph:
            def __init__(self, enqueue):
                self.enqueue = enqueue

            @classmethod
            def capture(cls, stream, enqueue):
                fake.log.append("capture")
                if fake.capture_fails:
                    raise fake.CudaError("cudaStreamEndCapture failed: cudaErrorStreamCaptureInvalidated")
                return cls(enqueue)   # replay = run the captured work again on the same buffers

            def launch(self, stream):
                fake.log.append("launch")
                self.enqueue()

            def close(self):
                pass

        self.DeviceBuffer, self.PinnedBuffer, self.Stream = DeviceBuffer, PinnedBuffer, Stream
        self.Event, self.CudaGraph = Event, CudaGraph


class FakeUnetContext:
    """latent = sample * 2 + timestep + sum(encoder_hidden_states), read from and
    written to the addresses TensorRT would have been given."""

    def __init__(self, fake: FakeCuda):
        self.fake, self.addresses = fake, {}

    def set_tensor_address(self, name, ptr):
        self.addresses[name] = ptr
        return True

    def _tensor(self, name):
        spec = next(t for t in UNET.inputs + UNET.outputs if t.name == name)
        return self.fake.memory[self.addresses[name]].view(spec.dtype.numpy).reshape(spec.shape)

    def execute_async_v3(self, stream):
        self.fake.log.append("execute")
        out = self._tensor(SAMPLE) * 2 + self._tensor(TIMESTEP)[0] + self._tensor(ENCODER_HIDDEN_STATES).sum()
        self._tensor(LATENT)[...] = out
        return True


def expected(inputs):
    return inputs[SAMPLE] * 2 + inputs[TIMESTEP][0] + inputs[ENCODER_HIDDEN_STATES].sum()


def unet_engine(monkeypatch, cuda_graph=False, capture_fails=False):
    fake = FakeCuda(capture_fails)
    monkeypatch.setattr(trt_backend, "cuda", fake)
    shared = trt_backend._Shared.__new__(trt_backend._Shared)
    shared.stream, shared.block, shared.users = fake.Stream(), None, 0
    engine = trt_backend.TrtEngine(UNET, engine=object(), context=FakeUnetContext(fake), shared=shared,
                                   cuda_graph=cuda_graph)
    return engine, fake


def step_inputs(rng, embeddings, t):
    return {SAMPLE: rng.standard_normal(UNET.input(SAMPLE).shape).astype(np.float32),
            TIMESTEP: np.array([t], np.float32), ENCODER_HIDDEN_STATES: embeddings}


def test_unchanged_text_embeddings_are_uploaded_once(monkeypatch):
    engine, fake = unet_engine(monkeypatch)
    rng = np.random.default_rng(0)
    embeddings = rng.standard_normal(UNET.input(ENCODER_HIDDEN_STATES).shape).astype(np.float32)
    sizes = {t.name: t.nbytes for t in UNET.inputs}
    for step, t in enumerate((999.0, 950.0, 900.0)):
        inputs = step_inputs(rng, embeddings, t)
        before = engine.uploads
        out = engine(inputs)
        np.testing.assert_allclose(out[LATENT], expected(inputs), rtol=1e-6)
        crossed = engine.uploads - before
        assert crossed == sum(sizes.values()) if step == 0 else crossed == sizes[SAMPLE] + sizes[TIMESTEP]
    # New embeddings (next prompt) are uploaded again, even in the same array object.
    embeddings[...] += 1.0
    inputs = step_inputs(rng, embeddings, 850.0)
    before = engine.uploads
    np.testing.assert_allclose(engine(inputs)[LATENT], expected(inputs), rtol=1e-6)
    assert engine.uploads - before == sum(sizes.values())
    assert engine.last_time() == pytest.approx(0.002)
    engine.close()
    engine.close()
    assert fake.log.count("stream closed") == 1


def test_unet_call_is_captured_after_a_warm_up_and_replayed(monkeypatch):
    engine, fake = unet_engine(monkeypatch, cuda_graph=True)
    rng = np.random.default_rng(1)
    embeddings = rng.standard_normal(UNET.input(ENCODER_HIDDEN_STATES).shape).astype(np.float32)
    runs = []
    for t in (999.0, 950.0, 900.0, 850.0):
        fake.log.clear()
        inputs = step_inputs(rng, embeddings, t)
        np.testing.assert_allclose(engine(inputs)[LATENT], expected(inputs), rtol=1e-6)
        runs.append([e for e in fake.log if e in ("execute", "capture", "launch")])
    assert runs[0] == ["execute"]                        # warm-up, uncaptured
    assert runs[1] == ["capture", "launch", "execute"]   # captured, then run by a launch
    assert runs[2] == runs[3] == ["launch", "execute"]   # replays only
    assert engine.graph_captured


def test_failed_capture_falls_back_to_plain_runs_once(monkeypatch, capsys):
    engine, fake = unet_engine(monkeypatch, cuda_graph=True, capture_fails=True)
    rng = np.random.default_rng(2)
    embeddings = rng.standard_normal(UNET.input(ENCODER_HIDDEN_STATES).shape).astype(np.float32)
    for t in (999.0, 950.0, 900.0):
        inputs = step_inputs(rng, embeddings, t)
        np.testing.assert_allclose(engine(inputs)[LATENT], expected(inputs), rtol=1e-6)
    assert fake.log.count("capture") == 1 and "launch" not in fake.log
    assert not engine.graph_captured
    err = capsys.readouterr().err
    assert err.count("CUDA graph capture failed") == 1 and "running without it" in err


class FakeEngine:
    def __init__(self, io):
        self.io = io   # name -> (is_input, shape, dtype name)
        self.num_io_tensors = len(io)

    def get_tensor_name(self, i):
        return list(self.io)[i]

    def get_tensor_mode(self, name):
        return "IN" if self.io[name][0] else "OUT"

    def get_tensor_shape(self, name):
        return self.io[name][1]

    def get_tensor_dtype(self, name):
        return SimpleNamespace(name=self.io[name][2])


FAKE_TRT_IO = SimpleNamespace(TensorIOMode=SimpleNamespace(INPUT="IN"))


def test_engine_io_must_match_the_manifest_specs():
    names = {"float32": "FLOAT", "int32": "INT32"}
    io = {t.name: (True, t.shape, names[t.dtype.value]) for t in UNET.inputs}
    io.update({t.name: (False, t.shape, names[t.dtype.value]) for t in UNET.outputs})
    trt_backend.check_engine_io(FAKE_TRT_IO, FakeEngine(io), UNET, "unet.plan")   # matches
    io[SAMPLE] = (True, (1, 4, 8, 8), "FLOAT")
    with pytest.raises(ArtifactError, match=r"unet.plan: its I/O .*in sample\[1, 4, 8, 8\].*sdrt build --force"):
        trt_backend.check_engine_io(FAKE_TRT_IO, FakeEngine(io), UNET, "unet.plan")
    io[SAMPLE] = (True, UNET.input(SAMPLE).shape, "HALF")
    with pytest.raises(ArtifactError, match="float16"):
        trt_backend.check_engine_io(FAKE_TRT_IO, FakeEngine(io), UNET, "unet.plan")


@pytest.mark.parametrize("name", ["BF16", "FP8", "INT4", "FP4"])
def test_io_types_numpy_cannot_hold_are_refused_by_name(name):
    with pytest.raises(ArtifactError, match=f"TensorRT I/O type {name} is not supported"):
        trt_backend.numpy_dtype(SimpleNamespace(name=name), "tensor 'x'")


# --- the build flow over a stand-in tensorrt module --------------------------------

def fake_tensorrt(version: str, calls: list):
    class Logger:
        WARNING = "warning"

        def __init__(self, level):
            pass

    class TimingCache:
        def __init__(self, data):
            self.data = bytes(data)

        def serialize(self):
            return self.data + b"+timing"

    class Config:
        builder_optimization_level = None

        def set_memory_pool_limit(self, pool, size):
            calls.append(("workspace", pool, size))

        def set_flag(self, flag):
            calls.append(("flag", flag))

        def create_timing_cache(self, data):
            calls.append(("timing cache in", bytes(data)))
            return TimingCache(data)

        def set_timing_cache(self, tc, ignore_mismatch):
            self.tc = tc
            return True

        def get_timing_cache(self):
            return self.tc

    class Network:
        def __init__(self, flags):
            self.flags = flags

    class Parser:
        num_errors = 0

        def __init__(self, network, log):
            pass

        def parse_from_file(self, path):
            calls.append(("parse", path.rsplit("/", 1)[-1]))
            return True

    class Builder:
        def __init__(self, log):
            pass

        def create_network(self, flags):
            calls.append(("network flags", flags))
            return Network(flags)

        def create_builder_config(self):
            return Config()

        def build_serialized_network(self, network, config):
            calls.append(("opt level", config.builder_optimization_level))
            return memoryview(b"plan for " + version.encode())

    return SimpleNamespace(
        __version__=version, Logger=Logger, Builder=Builder, OnnxParser=Parser,
        NetworkDefinitionCreationFlag=SimpleNamespace(STRONGLY_TYPED=1),
        MemoryPoolType=SimpleNamespace(WORKSPACE="workspace"), BuilderFlag=SimpleNamespace(REFIT="refit"),
    )


def test_build_reuses_current_engines_and_rebuilds_for_another_tensorrt(sd15_artifacts, tmp_path, monkeypatch):
    import shutil

    from sdrt.engines import cuda
    from sdrt.engines.build import BuildConfig, build_engines
    from sdrt.engines.progress import Progress

    folder = tmp_path / "artifacts"
    shutil.copytree(sd15_artifacts, folder)
    monkeypatch.setattr(cuda, "set_device", lambda device: None)
    monkeypatch.setattr(cuda, "device_properties", lambda device=0: ("Orin", "8.7"))
    monkeypatch.setattr(trt_backend, "_LOGGER", None)
    config = BuildConfig(folder, workspace_gb=1.5, opt_level=2, verify=False)

    def run(version):
        nonlocal config
        calls: list = []
        monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(version, calls))
        lines: list[str] = []
        progress = Progress(stream=SimpleNamespace(write=lines.append, flush=lambda: None))
        return build_engines(config, progress), calls, "".join(lines)

    stages = list(read_manifest(folder).stages)
    report, calls, log = run("10.3.0.30")
    assert report.built == stages and report.reused == []
    assert ("network flags", 1 << 1) in calls                       # STRONGLY_TYPED
    assert ("workspace", "workspace", int(1.5 * 2**30)) in calls and ("opt level", 2) in calls
    assert {c[1] for c in calls if c[0] == "parse"} == {s.onnx_file for s in stages}
    timing = cache.read_timing_cache(folder / "engines" / "timing.cache")
    assert timing.endswith(b"+timing")                               # saved after the builds
    manifest = read_manifest(folder)
    platform = cache.Platform("10.3.0.30", "Orin", "8.7")
    for stage in stages:
        assert cache.load_plan(folder, cache.expected_key(manifest, stage, platform)) == b"plan for 10.3.0.30"

    report, calls, log = run("10.3.0.30")                            # nothing changed
    assert report.built == [] and report.reused == stages
    assert not [c for c in calls if c[0] == "parse"] and "not rebuilt" in log

    report, calls, log = run("11.4.0.12")                            # TensorRT upgraded
    assert report.built == stages
    assert "engine built for TensorRT 10.3.0.30 / sm_87 Orin; this is TensorRT 11.4.0.12 / sm_87 Orin: rebuilding" in log
    assert ("timing cache in", timing) in calls                      # the saved cache was offered

    report, _, _ = run("11.4.0.12")
    assert report.reused == stages
    config = BuildConfig(folder, force=True, stages=(Stage.UNET,), verify=False)   # --force --stages unet
    report, _, _ = run("11.4.0.12")
    assert report.built == [Stage.UNET] and report.reused == []


def test_build_config_rejects_bad_values_by_name(tmp_path):
    from sdrt.engines.errors import InvalidInput
    from sdrt.engines.build import BuildConfig, parse_stages

    for kwargs, words in (({"workspace_gb": 0}, "workspace"), ({"opt_level": 6}, "from 0 to 5"),
                          ({"opt_level": True}, "optimization level"),
                          ({"device": -1}, "GPU index")):
        with pytest.raises(InvalidInput, match=words):
            BuildConfig(tmp_path, **kwargs).validate()
    with pytest.raises(InvalidInput, match="unknown stage 'vae'.*text_encoder, text_encoder_2, unet, unet_shallow, vae_encoder, vae_decoder"):
        parse_stages(["vae"])


# --- without TensorRT -------------------------------------------------------------

def _tensorrt_missing() -> bool:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return True
    return False


@pytest.mark.skipif(not _tensorrt_missing(), reason="TensorRT is installed here: the missing-package path cannot run")
def test_tensorrt_backend_without_tensorrt_says_where_to_get_it(sd15_artifacts):
    from sdrt.runtime.pipeline import Pipeline

    with pytest.raises(BackendUnavailable, match="TensorRT is not installed.*see README, GPU section"):
        Pipeline.load(sd15_artifacts, backend="tensorrt")


@pytest.mark.skipif(not _tensorrt_missing(), reason="TensorRT is installed here: the missing-package path cannot run")
def test_sdrt_build_without_tensorrt_is_one_line_and_exit_2(sd15_artifacts, capsys):
    from sdrt.cli.main import main

    assert main(["build", str(sd15_artifacts), "--no-verify"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["sdrt build: error: TensorRT is not installed (No module named 'tensorrt'): "
                   "see README, GPU section"]


# --- the real thing, on a GPU with TensorRT ----------------------------------------

@pytest.mark.tensorrt
def test_tensorrt_pipeline_matches_onnxruntime(sd15_artifacts, tmp_path):
    pytest.importorskip("tensorrt", reason="TensorRT is not installed (it needs an NVIDIA GPU; see README)")
    pytest.importorskip("cuda.bindings.runtime", reason="cuda-bindings is not installed")
    import shutil

    from sdrt.engines.build import BuildConfig, build_engines
    from sdrt.runtime.pipeline import Pipeline

    folder = tmp_path / "artifacts"
    shutil.copytree(sd15_artifacts, folder)
    report = build_engines(BuildConfig(folder, workspace_gb=1.0))
    assert report.passed, "TensorRT engines disagree with ONNX Runtime (table above)"
    kwargs = dict(prompt="a red cube", steps=4, seed=3)
    with Pipeline.load(folder, backend="tensorrt") as trt_pipe:
        got = trt_pipe(**kwargs)
        again = trt_pipe(**kwargs)      # the second run replays the CUDA graph
    with Pipeline.load(folder) as ort_pipe:
        want = ort_pipe(**kwargs)
    np.testing.assert_allclose(got.pixels, want.pixels, atol=2e-2)
    np.testing.assert_array_equal(got.pixels, again.pixels)
    assert got.timings.unet and all(t > 0 for t in got.timings.unet)


def test_shared_device_memory_contexts_use_one_user_managed_block():
    calls = []

    class Context:
        def set_device_memory(self, ptr, size):
            calls.append(("set_device_memory", ptr, size))

    class Engine:
        device_memory_size_v2 = 4096

        def create_execution_context(self, strategy=None):
            calls.append(("create", strategy))
            return Context()

    fake_trt = SimpleNamespace(ExecutionContextAllocationStrategy=SimpleNamespace(USER_MANAGED="user-managed"))
    shared = SimpleNamespace(block=SimpleNamespace(ptr=0xABC000))
    trt_backend._context(fake_trt, Engine(), shared)
    assert calls == [("create", "user-managed"), ("set_device_memory", 0xABC000, 4096)]
    calls.clear()
    trt_backend._context(fake_trt, Engine(), SimpleNamespace(block=None))
    assert calls == [("create", None)]   # default: TensorRT allocates per context


# --- refit (LoRA) over a stand-in Refitter ----------------------------------------

def test_refit_sets_new_weights_and_restores_the_exported_ones_exactly(monkeypatch, sd15_artifacts):
    """Every refit names each weight it ever changed: given values, or the exported
    ones read back from the artifact's ONNX file (no residue of an earlier LoRA)."""
    from sdrt.engines.onnx_files import read_initializers
    from sdrt.engines.weightmap import read as read_weight_map

    names = sorted({t.initializer for t in read_weight_map(sd15_artifacts).stages[Stage.UNET].params.values()})[:3]
    exported = read_initializers(sd15_artifacts / "unet.onnx", names)
    refits: list[dict] = []

    class Refitter:
        def __init__(self, engine, log):
            self.pending = {}

        def set_named_weights(self, name, weights):
            self.pending[name] = weights.array.copy()
            return name in exported

        def refit_cuda_engine(self):
            refits.append(self.pending)
            return True

    fake_trt = SimpleNamespace(Refitter=Refitter, Weights=lambda a: SimpleNamespace(array=a),
                               Logger=SimpleNamespace(WARNING=0))
    monkeypatch.setattr(trt_backend, "logger", lambda trt: None)
    engine, fake = unet_engine(monkeypatch)
    engine._engine = SimpleNamespace(refittable=True)
    engine._trt, engine._onnx_path = fake_trt, sd15_artifacts / "unet.onnx"
    a = {names[0]: exported[names[0]] + 1, names[1]: exported[names[1]] * 2}
    b = {names[2]: exported[names[2]] - 1}
    engine.set_weights(a)
    engine.set_weights(b)
    engine.set_weights({})
    engine.set_weights({})   # nothing changed: no refit
    assert [sorted(r) for r in refits] == [sorted(a), sorted(names), [names[2]]]
    assert all(np.array_equal(refits[0][n], a[n]) for n in a)
    assert all(np.array_equal(refits[1][n], exported[n]) for n in names[:2])   # A's weights restored
    assert np.array_equal(refits[1][names[2]], b[names[2]])
    assert np.array_equal(refits[2][names[2]], exported[names[2]])


def test_refit_on_an_engine_built_without_refittable_says_how_to_build_one(monkeypatch):
    engine, _ = unet_engine(monkeypatch)
    engine._engine = SimpleNamespace(refittable=False)
    engine._trt, engine._onnx_path = object(), None
    with pytest.raises(BackendUnavailable, match="sdrt build --refittable"):
        engine.set_weights({"w": np.zeros(1, np.float32)})
    engine.set_weights({})   # restoring nothing needs no refit


def test_refittable_build_sets_refit_on_the_stages_a_lora_changes_and_rebuilds_others(sd15_artifacts, tmp_path,
                                                                                      monkeypatch):
    import shutil

    from sdrt.engines import cuda
    from sdrt.engines.build import BuildConfig, build_engines
    from sdrt.engines.progress import Progress

    folder = tmp_path / "artifacts"
    shutil.copytree(sd15_artifacts, folder)
    monkeypatch.setattr(cuda, "set_device", lambda device: None)
    monkeypatch.setattr(cuda, "device_properties", lambda device=0: ("Orin", "8.7"))
    monkeypatch.setattr(trt_backend, "_LOGGER", None)

    def run(refittable):
        calls: list = []
        monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt("10.3.0.30", calls))
        lines: list[str] = []
        progress = Progress(stream=SimpleNamespace(write=lines.append, flush=lambda: None))
        report = build_engines(BuildConfig(folder, verify=False, refittable=refittable), progress)
        parsed = [c[1] for c in calls if c[0] == "parse"]
        return report, parsed, calls.count(("flag", "refit")), "".join(lines)

    report, parsed, refits, _ = run(False)
    assert refits == 0 and parsed == [s.onnx_file for s in read_manifest(folder).stages]
    report, parsed, refits, log = run(True)    # current, but not refittable: text encoder and U-Net again
    assert parsed == ["text_encoder.onnx", "unet.onnx"] and refits == 2
    assert log.count("not refittable: rebuilding") == 2
    assert cache.built_refittable(folder, Stage.UNET) and not cache.built_refittable(folder, Stage.VAE_DECODER)
    report, parsed, refits, _ = run(True)      # now current and refittable
    assert parsed == [] and refits == 0
