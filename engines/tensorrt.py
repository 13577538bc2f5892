"""The TensorRT backend: one `TrtEngine` per stage, loaded from the engine cache
(`engines/cache.py`) that `sdrt build` fills.

Written from the TensorRT 10.3 (JetPack 6) .. 11.x API and none of what 11 removed
(tests/test_trt_api_scan.py checks that): engines are strongly typed, so precision
comes from the ONNX file; I/O is addressed by tensor name (`set_tensor_address`,
`execute_async_v3`); device memory for a shared block is sized with
`device_memory_size_v2` and contexts are created USER_MANAGED.

Per stage: device buffers are allocated once from the manifest's static specs, with
page-locked host staging buffers and one non-default stream shared by the three
stages. An input is uploaded only when its bytes differ from the last upload, so in
the denoising loop the text embeddings cross once per generation and only the
latents (and the 4-byte timestep) cross per step. The U-Net call is captured as a
CUDA graph on its second call (after a warm-up run) and replayed after that; if
capture fails the engine says so once and keeps running uncaptured.

Not run on real hardware during development: TensorRT is not installable on the
development machines. See README, GPU section.
"""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from . import cache, cuda
from .base import Engine
from .errors import ArtifactError, BackendUnavailable, InvalidInput, SdrtError
from .options import check_bool, check_index, option
from .specs import Stage, StageSpec, check_io

NAME = "tensorrt"
SUMMARY = "TensorRT: NVIDIA GPUs (and Jetson), engines built by `sdrt build`"
EXTRA = "tensorrt"

# TensorRT DataType names -> numpy. An explicit map: trt.nptype() raises for BF16 and
# FP8, and our graphs keep float32/int32 I/O anyway.
TRT_TO_NUMPY = {
    "FLOAT": np.dtype(np.float32),
    "HALF": np.dtype(np.float16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "INT8": np.dtype(np.int8),
    "UINT8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}

_LOGGER: Any = None


@dataclass(frozen=True)
class Options:
    cuda_graph: bool = option(True, "capture the U-Net call as a CUDA graph after one warm-up call", type=bool)
    shared_device_memory: bool = option(False, "one activation memory block for all stages (small Jetson boards)",
                                        type=bool)
    device: int = option(0, "GPU index", type=int, metavar="N")

    def __post_init__(self) -> None:
        check_bool("cuda_graph", self.cuda_graph)
        check_bool("shared_device_memory", self.shared_device_memory)
        check_index("device", self.device)


def unavailable() -> str | None:
    """Cheap: whether the packages are there (a GPU is looked for by `unready`)."""
    if importlib.util.find_spec("tensorrt") is None:
        return "TensorRT is not installed: see README, GPU section"
    try:
        found = importlib.util.find_spec("cuda.bindings") is not None
    except ImportError:   # no `cuda` package at all
        found = False
    return None if found else "cuda-bindings is not installed: see README, GPU section"


def unready(folder: str | Path, manifest: Any, options: "Options | None" = None) -> str | None:
    """Why this artifact's engines cannot be opened here now (no GPU, or `sdrt build`
    has not built current engines for this artifact, TensorRT and GPU), or None."""
    device = (options or Options()).device
    try:
        trt = import_tensorrt()
        platform = current_platform(trt, device)
    except SdrtError as e:
        return str(e)
    for stage in manifest.stages:
        state = cache.check(folder, cache.expected_key(manifest, stage, platform), verify_hash=False)
        if not state.current:
            return f"{state.reason} (run `sdrt build {folder}`)"
    return None


def device_memory_used() -> int:
    """Bytes in use on the current GPU, all processes (cudaMemGetInfo: total - free)."""
    free, total = cuda.check(cuda.cudart().cudaMemGetInfo(), "cudaMemGetInfo")
    return int(total) - int(free)


def import_tensorrt() -> Any:
    """The tensorrt module, or BackendUnavailable saying where to get it."""
    try:
        import tensorrt as trt
    except ImportError as e:
        raise BackendUnavailable(f"TensorRT is not installed ({e}): see README, GPU section") from None
    except OSError as e:   # the Python package is there but libnvinfer is not (or is the wrong CUDA)
        raise BackendUnavailable(f"TensorRT is installed but cannot load its libraries ({e}): "
                                 f"see README, GPU section") from None
    return trt


def logger(trt: Any) -> Any:
    global _LOGGER
    if _LOGGER is None:
        _LOGGER = trt.Logger(trt.Logger.WARNING)
    return _LOGGER


def current_platform(trt: Any, device: int = 0) -> cache.Platform:
    name, cc = cuda.device_properties(device)
    return cache.Platform(tensorrt=str(trt.__version__), gpu=name, compute_capability=cc)


def numpy_dtype(trt_dtype: Any, where: str) -> np.dtype:
    name = getattr(trt_dtype, "name", str(trt_dtype).rsplit(".", 1)[-1])
    if name not in TRT_TO_NUMPY:
        raise ArtifactError(f"{where}: TensorRT I/O type {name} is not supported "
                            f"(supported: {', '.join(TRT_TO_NUMPY)})")
    return TRT_TO_NUMPY[name]


def engine_io(trt: Any, engine: Any) -> dict[str, tuple[bool, tuple[int, ...], np.dtype]]:
    """name -> (is_input, shape, numpy dtype) of a deserialized engine."""
    io = {}
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        is_input = engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
        io[name] = (is_input, tuple(int(d) for d in engine.get_tensor_shape(name)),
                    numpy_dtype(engine.get_tensor_dtype(name), f"tensor {name!r}"))
    return io


def check_engine_io(trt: Any, engine: Any, spec: StageSpec, where: str) -> None:
    io = engine_io(trt, engine)
    check_io(spec, {k: (v[1], np.dtype(v[2]).name) for k, v in io.items() if v[0]},
             {k: (v[1], np.dtype(v[2]).name) for k, v in io.items() if not v[0]}, where, "run `sdrt build --force`")


class _Shared:
    """What the three stages share: the stream, and optionally one device-memory block
    for their activations (they never run at once). Freed when the last user closes."""

    def __init__(self, memory_bytes: int = 0):
        self.stream = cuda.Stream()
        self.block = cuda.DeviceBuffer(memory_bytes) if memory_bytes else None
        self.users = 0

    def release(self) -> None:
        self.users -= 1
        if self.users <= 0:
            if self.block is not None:
                self.block.close()
            self.stream.close()


class TrtEngine(Engine):
    backend_title = "TensorRT"

    def __init__(self, spec: StageSpec, engine: Any, context: Any, shared: _Shared,
                 cuda_graph: bool = False, runtime: Any = None, trt: Any = None, onnx_path: Path | None = None):
        super().__init__(spec)
        self._trt, self._onnx_path = trt, onnx_path
        self._refitted: set[str] = set()    # initializers that hold other than the exported values
        self._engine, self._context, self._runtime = engine, context, runtime
        self._shared = shared
        self._stream = shared.stream
        tensors = list(spec.inputs) + list(spec.outputs)
        self._device = {t.name: cuda.DeviceBuffer.for_spec(t) for t in tensors}
        self._host = {t.name: cuda.PinnedBuffer.for_spec(t) for t in tensors}
        for name, buf in self._device.items():
            if not context.set_tensor_address(name, buf.ptr):
                raise ArtifactError(f"{spec.stage.value}: TensorRT refused the address of tensor {name!r}")
        self._uploaded: set[str] = set()     # inputs whose pinned buffer mirrors the device copy
        self._start, self._ran, self._end = cuda.Event(), cuda.Event(), cuda.Event()
        self._use_graph = cuda_graph
        self._graph: cuda.CudaGraph | None = None
        self._calls = 0
        self._last_ms: float | None = None
        self.last_compute_ms: float | None = None
        self.uploads = 0                     # bytes copied host -> device, for tests and benchmarks
        shared.users += 1                    # last: a failed __init__ holds no share

    def _run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._context is None:
            raise InvalidInput(f"{self.spec.stage.value} engine is closed")
        stream = self._stream
        self._start.record(stream)
        for t in self.spec.inputs:
            host = self._host[t.name]
            new = np.ascontiguousarray(inputs[t.name])
            # Unchanged bytes (the text embeddings, every step) stay on the device.
            if t.name in self._uploaded and np.array_equal(host.array.view(np.uint8), new.view(np.uint8)):
                continue
            np.copyto(host.array, new)
            stream.upload(self._device[t.name], host)
            self._uploaded.add(t.name)
            self.uploads += host.nbytes
        self._enqueue()
        self._ran.record(stream)
        for t in self.spec.outputs:
            stream.download(self._host[t.name], self._device[t.name])
        self._end.record(stream)
        stream.synchronize()
        self._calls += 1
        self._last_ms = self._end.ms_since(self._start)
        self.last_compute_ms = self._ran.ms_since(self._start)
        return {t.name: self._host[t.name].array.copy() for t in self.spec.outputs}

    def _execute(self) -> None:
        if not self._context.execute_async_v3(int(self._stream)):
            raise cuda.CudaError(f"{self.spec.stage.value}: TensorRT execute_async_v3 failed (see the TensorRT log above)")

    def _enqueue(self) -> None:
        if self._graph is not None:
            self._graph.launch(self._stream)
            return
        if self._use_graph and self._calls >= 1:   # the first call was the warm-up
            self._use_graph = False                # one attempt only
            try:
                self._graph = cuda.CudaGraph.capture(self._stream, self._execute)
            except Exception as e:  # CudaError, or TensorRT refusing to enqueue while capturing
                print(f"sdrt: {self.spec.stage.value}: CUDA graph capture failed ({e}); "
                      f"running without it", file=sys.stderr)
            else:
                self._graph.launch(self._stream)   # capture only records: run it now
                return
        self._execute()

    def set_weights(self, weights: Mapping[str, np.ndarray]) -> None:
        """Refit (an engine built with `sdrt build --refittable`): the named weights get
        the given values, and those changed before but not named now get the exported
        values back, read from the artifact's ONNX files. Refitting LoRA B over LoRA A
        from the current weights would leave A's residue (TensorRT issue #3628); here
        every weight is either given or exported, so the result is exact."""
        if self._context is None:
            raise InvalidInput(f"{self.spec.stage.value} engine is closed")
        names = set(weights) | self._refitted
        if not names:
            return
        if self._trt is None or self._onnx_path is None or not self._engine.refittable:
            raise BackendUnavailable(f"{self.spec.stage.value}: this TensorRT engine was built without --refittable, "
                                     f"so its weights cannot change; run `sdrt build --refittable` on the artifact")
        from .onnx_files import read_initializers

        restore = sorted(self._refitted - set(weights))
        exported = read_initializers(self._onnx_path, restore) if restore else {}
        refitter = self._trt.Refitter(self._engine, logger(self._trt))
        keep = []   # the host arrays must live until refit_cuda_engine has copied them
        for name in sorted(names):
            value = np.ascontiguousarray(weights[name] if name in weights else exported[name])
            keep.append(value)
            if not refitter.set_named_weights(name, self._trt.Weights(value)):
                raise ArtifactError(f"{self.spec.stage.value}: the TensorRT engine has no refittable weight {name!r}; "
                                    f"rebuild it with `sdrt build --refittable --force`")
        self._stream.synchronize()
        if not refitter.refit_cuda_engine():
            self._refitted = names   # unknown state: restore everything on the next call
            raise ArtifactError(f"{self.spec.stage.value}: TensorRT refit failed (see the TensorRT log above)")
        del keep
        self._refitted = set(weights)
        if self._graph is not None:   # a captured graph may hold the old weights' kernels: capture again
            self._graph.close()
            self._graph = None
            self._use_graph, self._calls = True, 0

    @property
    def graph_captured(self) -> bool:
        return self._graph is not None

    def last_time(self) -> float | None:
        """Seconds of the last call on the GPU (CUDA events): uploads, run, downloads."""
        return None if self._last_ms is None else self._last_ms / 1000.0

    def close(self) -> None:
        if self._context is None:
            return
        self._stream.synchronize()
        if self._graph is not None:
            self._graph.close()
            self._graph = None
        for ev in (self._start, self._ran, self._end):
            ev.close()
        self._context = None    # before the memory it points into
        self._engine = None
        self._runtime = None    # after the engine it deserialized
        for buf in list(self._device.values()) + list(self._host.values()):
            buf.close()
        self._shared.release()


def open_engines(folder: str | Path, manifest: Any, options: Options = Options(),
                 stages: Sequence[Stage] | None = None) -> dict[Stage, Engine]:
    """Open the engines `sdrt build` made for this artifact folder on GPU `options.device`
    (see `Options`: CUDA-graph capture of the U-Net, one shared activation block)."""
    cuda_graph, shared_device_memory, device = options.cuda_graph, options.shared_device_memory, options.device
    trt = import_tensorrt()
    cuda.cudart()   # BackendUnavailable before any work if cuda-bindings is missing
    count = cuda.device_count()
    if device >= count:
        raise InvalidInput(f"GPU {device} does not exist: this machine has {count} (0..{count - 1})")
    cuda.set_device(device)
    folder = Path(folder)
    platform = current_platform(trt, device)
    runtime = trt.Runtime(logger(trt))
    specs = manifest.specs
    wanted = list(stages or manifest.stages)
    loaded = {}
    for stage in wanted:
        plan = cache.load_plan(folder, cache.expected_key(manifest, stage, platform))
        engine = runtime.deserialize_cuda_engine(plan)
        del plan
        if engine is None:
            raise ArtifactError(f"{stage.value}: TensorRT could not load {cache.plan_path(folder, stage)} "
                                f"(see the TensorRT log above); run `sdrt build --force {folder}`")
        check_engine_io(trt, engine, specs[stage], str(cache.plan_path(folder, stage)))
        loaded[stage] = engine
    block = max(int(e.device_memory_size_v2) for e in loaded.values()) if shared_device_memory else 0
    shared = _Shared(block)
    engines: dict[Stage, Engine] = {}
    try:
        for stage, engine in loaded.items():
            context = _context(trt, engine, shared)
            engines[stage] = TrtEngine(specs[stage], engine, context, shared,
                                       cuda_graph=cuda_graph and stage is Stage.UNET, runtime=runtime, trt=trt,
                                       onnx_path=folder / stage.onnx_file)
    except BaseException:
        for e in engines.values():
            e.close()
        if not engines:
            shared.users = 1
            shared.release()
        raise
    return engines


def _context(trt: Any, engine: Any, shared: _Shared) -> Any:
    if shared.block is None:
        context = engine.create_execution_context()
    else:
        context = engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        if context is not None:
            size = int(engine.device_memory_size_v2)
            if hasattr(context, "set_device_memory"):     # 10.1+: pointer and size
                context.set_device_memory(shared.block.ptr, size)
            else:
                context.device_memory = shared.block.ptr
    if context is None:
        raise BackendUnavailable("TensorRT could not create an execution context (out of GPU memory?)")
    return context
