"""The cuda-bindings layer (engines/cuda.py).

Error translation and the missing-package message run everywhere (with a stand-in
cudart module). Buffers, copies, events and CUDA graphs run for real only where an
NVIDIA GPU and cuda-bindings are present; elsewhere they skip, saying so.
"""

from __future__ import annotations

import enum
from types import SimpleNamespace

import numpy as np
import pytest

from sdrt.engines import cuda
from sdrt.engines.errors import BackendUnavailable
from sdrt.engines.specs import DType, TensorSpec


class _FakeError(enum.IntEnum):
    cudaSuccess = 0
    cudaErrorMemoryAllocation = 2


def _fake_cudart():
    return SimpleNamespace(
        cudaError_t=_FakeError,
        cudaGetErrorName=lambda err: (_FakeError.cudaSuccess, _FakeError(err).name.encode()),
        cudaGetErrorString=lambda err: (_FakeError.cudaSuccess, b"out of memory"),
    )


def test_check_raises_naming_the_call_and_the_cuda_error(monkeypatch):
    monkeypatch.setattr(cuda, "_cudart", _fake_cudart())
    with pytest.raises(cuda.CudaError, match=r"cudaMalloc failed: cudaErrorMemoryAllocation \(out of memory\)"):
        cuda.check((_FakeError.cudaErrorMemoryAllocation, 0), "cudaMalloc")
    assert cuda.check((_FakeError.cudaSuccess, 1234), "cudaMalloc") == 1234
    assert cuda.check((_FakeError.cudaSuccess,), "cudaFree") is None
    assert cuda.check((_FakeError.cudaSuccess, 1, 2), "x") == (1, 2)


def test_missing_cuda_bindings_is_backend_unavailable(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_cuda(name, *args, **kwargs):
        if name.startswith("cuda"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(cuda, "_cudart", None)
    monkeypatch.setattr(builtins, "__import__", no_cuda)
    with pytest.raises(BackendUnavailable, match="cuda-bindings is not installed.*README, GPU section"):
        cuda.cudart()


# --- on a GPU -----------------------------------------------------------------

def _gpu_or_skip():
    try:
        from cuda.bindings import runtime as rt
    except ImportError:
        pytest.skip("cuda-bindings is not installed: CUDA-layer tests need an NVIDIA GPU and cuda-bindings")
    err, count = rt.cudaGetDeviceCount()
    if err != rt.cudaError_t.cudaSuccess or count < 1:
        pytest.skip(f"no usable NVIDIA GPU here (cudaGetDeviceCount: {err}, {count})")
    cuda.set_device(0)


@pytest.fixture
def gpu():
    _gpu_or_skip()
    stream = cuda.Stream()
    yield stream
    stream.close()


SPEC = TensorSpec("latent", (2, 4, 8, 8), DType.FLOAT32)


def test_real_cudart_failure_names_the_call():
    """Runs wherever cuda-bindings is installed, GPU or not: GPU 10000 does not exist
    (cudaErrorInvalidDevice), or there is no driver (cudaErrorInsufficientDriver)."""
    pytest.importorskip("cuda.bindings.runtime", reason="cuda-bindings is not installed")
    rt = cuda.cudart()
    with pytest.raises(cuda.CudaError, match=r"cudaSetDevice failed: cudaError\w+ \("):
        cuda.check(rt.cudaSetDevice(10_000), "cudaSetDevice")


@pytest.mark.gpu
def test_host_device_round_trip_through_pinned_buffers(gpu):
    src, dst = cuda.PinnedBuffer.for_spec(SPEC), cuda.PinnedBuffer.for_spec(SPEC)
    a, b = cuda.DeviceBuffer.for_spec(SPEC), cuda.DeviceBuffer.for_spec(SPEC)
    data = np.random.default_rng(0).standard_normal(SPEC.shape).astype(np.float32)
    np.copyto(src.array, data)
    dst.array[...] = 0
    gpu.upload(a, src)
    gpu.copy_device(b, a)
    gpu.download(dst, b)
    gpu.synchronize()
    assert dst.array.shape == SPEC.shape and dst.array.dtype == np.float32
    np.testing.assert_array_equal(dst.array, data)
    for buf in (src, dst, a, b):
        buf.close()
        buf.close()   # twice is harmless


@pytest.mark.gpu
def test_copy_larger_than_buffer_is_refused(gpu):
    small = cuda.DeviceBuffer(16)
    big = cuda.PinnedBuffer((64,), np.float32)
    with pytest.raises(cuda.CudaError, match="256 bytes into a 16-byte buffer"):
        gpu.upload(small, big)


@pytest.mark.gpu
def test_events_time_work_on_the_stream(gpu):
    host = cuda.PinnedBuffer((1 << 24,), np.float32)   # 64 MiB: measurably long
    dev = cuda.DeviceBuffer(host.nbytes)
    start, end = cuda.Event(), cuda.Event()
    start.record(gpu)
    gpu.upload(dev, host)
    end.record(gpu)
    gpu.synchronize()
    ms = end.ms_since(start)
    assert ms > 0.0


@pytest.mark.gpu
def test_cuda_graph_replays_a_copy_reading_the_captured_addresses(gpu):
    host_in, host_out = cuda.PinnedBuffer.for_spec(SPEC), cuda.PinnedBuffer.for_spec(SPEC)
    a, b = cuda.DeviceBuffer.for_spec(SPEC), cuda.DeviceBuffer.for_spec(SPEC)
    graph = cuda.CudaGraph.capture(gpu, lambda: gpu.copy_device(b, a))
    for value in (1.0, 2.5):   # new input in the same buffer, then one launch
        host_in.array[...] = value
        gpu.upload(a, host_in)
        graph.launch(gpu)
        gpu.download(host_out, b)
        gpu.synchronize()
        assert np.all(host_out.array == value)
    graph.close()


@pytest.mark.gpu
def test_failed_capture_ends_cleanly_and_the_stream_still_works(gpu):
    def broken_enqueue():
        raise RuntimeError("enqueue refused during capture")
    with pytest.raises(RuntimeError, match="enqueue refused"):
        cuda.CudaGraph.capture(gpu, broken_enqueue)
    host = cuda.PinnedBuffer((4,), np.float32)
    dev = cuda.DeviceBuffer(host.nbytes)
    host.array[...] = 3.0
    gpu.upload(dev, host)
    host.array[...] = 0.0
    gpu.download(host, dev)
    gpu.synchronize()
    assert np.all(host.array == 3.0)


@pytest.mark.gpu
def test_device_properties_name_and_compute_capability(gpu):
    name, cc = cuda.device_properties(0)
    major, minor = cc.split(".")
    assert name and int(major) >= 5 and minor.isdigit()
