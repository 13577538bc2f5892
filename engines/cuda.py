"""A thin layer over cuda-bindings (`from cuda.bindings import runtime as cudart`):
device and page-locked host buffers, a stream, events and CUDA graphs. No torch,
no pycuda.

Every cudart call returns `(err, *results)`; `check` turns a failure into a
`CudaError` naming the call and CUDA's error name, so nothing fails silently.
cuda-bindings is imported on first use: importing this module never needs a GPU,
and a machine without it gets BackendUnavailable when a TensorRT pipeline opens.
"""

from __future__ import annotations

import ctypes
from typing import Any, Callable

import numpy as np

from .errors import BackendUnavailable, SdrtError
from .specs import TensorSpec

_cudart: Any = None


class CudaError(SdrtError, RuntimeError):
    """A CUDA runtime call failed."""


def cudart() -> Any:
    """The cuda-bindings runtime module, imported once."""
    global _cudart
    if _cudart is None:
        try:
            from cuda.bindings import runtime  # cuda-bindings >= 12.6; `cuda.cudart` is gone in 13
        except ImportError as e:
            raise BackendUnavailable(
                f"cuda-bindings is not installed ({e}): pip install 'cuda-bindings~=12.9' for CUDA 12 "
                f"drivers (JetPack 6) or 'cuda-bindings>=13' for drivers >= 580; see README, GPU section"
            ) from None
        _cudart = runtime
    return _cudart


def check(result: Any, call: str) -> Any:
    """Raise CudaError unless `result` (a cudart return tuple) reports success; return
    the results: None, the single value, or a tuple."""
    rt = cudart()
    if isinstance(result, tuple):
        err, rest = result[0], result[1:]
    else:
        err, rest = result, ()
    if err != rt.cudaError_t.cudaSuccess:
        raise CudaError(f"{call} failed: {error_name(err)}")
    if not rest:
        return None
    return rest[0] if len(rest) == 1 else rest


def error_name(err: Any) -> str:
    rt = cudart()
    try:
        code, name = rt.cudaGetErrorName(err)
        text = name.decode() if isinstance(name, bytes) else str(name)
        _, desc = rt.cudaGetErrorString(err)
        desc = desc.decode() if isinstance(desc, bytes) else str(desc)
        return f"{text} ({desc})"
    except Exception:  # an unknown code: still say which
        return repr(err)


def device_count() -> int:
    return int(check(cudart().cudaGetDeviceCount(), "cudaGetDeviceCount"))


def device_properties(device: int = 0) -> tuple[str, str]:
    """(name, compute capability "major.minor") of a GPU."""
    props = check(cudart().cudaGetDeviceProperties(device), "cudaGetDeviceProperties")
    name = props.name
    name = name.split(b"\0", 1)[0].decode() if isinstance(name, bytes) else str(name)
    return name.strip(), f"{props.major}.{props.minor}"


def set_device(device: int) -> None:
    check(cudart().cudaSetDevice(device), "cudaSetDevice")


class DeviceBuffer:
    """`nbytes` of device memory (cudaMalloc), freed by close()."""

    def __init__(self, nbytes: int):
        self.nbytes = int(nbytes)
        self.ptr: int = int(check(cudart().cudaMalloc(max(self.nbytes, 1)), "cudaMalloc"))

    @classmethod
    def for_spec(cls, spec: TensorSpec) -> "DeviceBuffer":
        return cls(spec.nbytes)

    def close(self) -> None:
        if self.ptr:
            ptr, self.ptr = self.ptr, 0
            check(cudart().cudaFree(ptr), "cudaFree")

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


class PinnedBuffer:
    """A page-locked host array (cudaMallocHost): async copies from it really overlap,
    and they are only async from pinned memory."""

    def __init__(self, shape: tuple[int, ...], dtype: np.dtype):
        self.dtype = np.dtype(dtype)
        self.shape = tuple(shape)
        self.nbytes = int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize
        self.ptr: int = int(check(cudart().cudaMallocHost(max(self.nbytes, 1)), "cudaMallocHost"))
        raw = (ctypes.c_ubyte * max(self.nbytes, 1)).from_address(self.ptr)
        self.array: np.ndarray = np.frombuffer(raw, dtype=np.uint8, count=self.nbytes).view(self.dtype).reshape(self.shape)

    @classmethod
    def for_spec(cls, spec: TensorSpec) -> "PinnedBuffer":
        return cls(spec.shape, spec.dtype.numpy)

    def close(self) -> None:
        if self.ptr:
            ptr, self.ptr = self.ptr, 0
            self.array = np.empty((0,), self.dtype)   # no view may outlive the memory
            check(cudart().cudaFreeHost(ptr), "cudaFreeHost")

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


class Stream:
    """One non-blocking stream: work on it never serialises with the legacy default stream."""

    def __init__(self) -> None:
        rt = cudart()
        # cudaStreamNonBlocking is 0x01 in cuda_runtime_api.h; read it from the module where exposed.
        flags = int(getattr(rt, "cudaStreamNonBlocking", 1))
        self.handle = check(rt.cudaStreamCreateWithFlags(flags), "cudaStreamCreateWithFlags")

    def __int__(self) -> int:   # TensorRT's execute_async_v3 takes the raw handle
        return int(self.handle)

    def upload(self, dst: DeviceBuffer, src: PinnedBuffer) -> None:
        self._copy(dst.ptr, src.ptr, src.nbytes, dst.nbytes, "HostToDevice")

    def download(self, dst: PinnedBuffer, src: DeviceBuffer) -> None:
        self._copy(dst.ptr, src.ptr, dst.nbytes, src.nbytes, "DeviceToHost")

    def copy_device(self, dst: DeviceBuffer, src: DeviceBuffer) -> None:
        self._copy(dst.ptr, src.ptr, src.nbytes, dst.nbytes, "DeviceToDevice")

    def _copy(self, dst: int, src: int, nbytes: int, room: int, kind: str) -> None:
        if nbytes > room:
            raise CudaError(f"cudaMemcpyAsync refused: {nbytes} bytes into a {room}-byte buffer")
        rt = cudart()
        check(rt.cudaMemcpyAsync(dst, src, nbytes, getattr(rt.cudaMemcpyKind, f"cudaMemcpy{kind}"), self.handle),
              f"cudaMemcpyAsync({kind})")

    def synchronize(self) -> None:
        check(cudart().cudaStreamSynchronize(self.handle), "cudaStreamSynchronize")

    def close(self) -> None:
        if self.handle is not None:
            handle, self.handle = self.handle, None
            check(cudart().cudaStreamDestroy(handle), "cudaStreamDestroy")


class Event:
    def __init__(self) -> None:
        self.handle = check(cudart().cudaEventCreate(), "cudaEventCreate")

    def record(self, stream: Stream) -> None:
        check(cudart().cudaEventRecord(self.handle, stream.handle), "cudaEventRecord")

    def ms_since(self, start: "Event") -> float:
        """Milliseconds from `start` to this event (both recorded, this one completed)."""
        return float(check(cudart().cudaEventElapsedTime(start.handle, self.handle), "cudaEventElapsedTime"))

    def close(self) -> None:
        if self.handle is not None:
            handle, self.handle = self.handle, None
            check(cudart().cudaEventDestroy(handle), "cudaEventDestroy")


class CudaGraph:
    """Work enqueued on a stream, captured once and replayed with one launch.

    Replays read and write the same device addresses as the capture, so callers copy
    new inputs into the same fixed buffers before each launch.
    """

    def __init__(self, graph: Any, exec_: Any):
        self.graph, self.exec = graph, exec_

    @classmethod
    def capture(cls, stream: Stream, enqueue: Callable[[], None]) -> "CudaGraph":
        """Capture what `enqueue()` puts on `stream`. On failure the capture is ended
        (the stream is usable again) and CudaError says why: callers fall back."""
        rt = cudart()
        check(rt.cudaStreamBeginCapture(stream.handle, rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal),
              "cudaStreamBeginCapture")
        try:
            enqueue()
        except BaseException:
            _end_capture_quietly(stream)
            raise
        graph = check(rt.cudaStreamEndCapture(stream.handle), "cudaStreamEndCapture")
        try:
            exec_ = check(rt.cudaGraphInstantiate(graph, 0), "cudaGraphInstantiate")
        except CudaError:
            rt.cudaGraphDestroy(graph)
            raise
        return cls(graph, exec_)

    def launch(self, stream: Stream) -> None:
        check(cudart().cudaGraphLaunch(self.exec, stream.handle), "cudaGraphLaunch")

    def close(self) -> None:
        rt = cudart()
        if self.exec is not None:
            exec_, self.exec = self.exec, None
            check(rt.cudaGraphExecDestroy(exec_), "cudaGraphExecDestroy")
        if self.graph is not None:
            graph, self.graph = self.graph, None
            check(rt.cudaGraphDestroy(graph), "cudaGraphDestroy")


def _end_capture_quietly(stream: Stream) -> None:
    rt = cudart()
    result = rt.cudaStreamEndCapture(stream.handle)
    if result[0] == rt.cudaError_t.cudaSuccess and result[1] is not None:
        rt.cudaGraphDestroy(result[1])
    rt.cudaGetLastError()   # clear the sticky capture error, so the next call is judged alone
