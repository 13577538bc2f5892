"""The engine interface: named NumPy arrays in, named NumPy arrays out.

Every backend (ONNX Runtime, OpenVINO, TensorRT) subclasses `Engine` and implements
`_run`; the input checks live here once, so every backend rejects a wrong name, dtype
or shape with the same message before any device work starts. Which backends exist,
and how an artifact's engines are opened on one, is engines/registry.py.
"""

from __future__ import annotations

import abc
from typing import Any, Mapping

import numpy as np

from .errors import BackendUnavailable, InvalidInput, InvalidType
from .specs import StageSpec


class Engine(abc.ABC):
    """One compiled stage. Call it with a mapping of input name to array."""

    # Whether the backend loaded this stage from its cache of prepared graphs (ONNX
    # Runtime's optimized graph, OpenVINO's compiled model): True / False, or None where
    # the backend keeps no such cache (TensorRT's engines are built ahead by `sdrt build`).
    cached: bool | None = None
    load_seconds: float = 0.0   # seconds this stage took to open
    backend_title = "this backend"   # for messages

    def __init__(self, spec: StageSpec):
        self.spec = spec
        # (name, dtype, shape) per input: the per-call check runs once per denoising
        # step, so it compares against these instead of re-deriving them from the spec.
        self._expected = tuple((t.name, t.dtype.numpy, t.shape) for t in spec.inputs)

    def __call__(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if not self._inputs_match(inputs):
            check_inputs(self.spec, inputs)   # raises the message naming what is wrong
        return self._run(inputs)

    def _inputs_match(self, inputs: Mapping[str, np.ndarray]) -> bool:
        """The common case, exact arrays of the right dtype and shape, in a few
        comparisons; anything else goes to `check_inputs` (subclasses of ndarray too)."""
        if len(inputs) != len(self._expected):
            return False
        for name, dtype, shape in self._expected:
            a = inputs.get(name)
            if type(a) is not np.ndarray or a.shape != shape or a.dtype != dtype:
                return False
        return True

    @abc.abstractmethod
    def _run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run on checked inputs; return every output of the spec by name."""

    def last_time(self) -> float | None:
        """Seconds the backend itself spent in the last call, where it measures that
        (CUDA events); None where only the caller's wall clock is available."""
        return None

    def set_weights(self, weights: Mapping[str, np.ndarray]) -> None:
        """From the next call on, use these values for the named initializers (ONNX
        names, in the graph's dtype and layout) and the exported values for all others;
        `{}` restores the exported weights exactly. A LoRA applied per call goes through
        here (runtime/loras.py). Backends that cannot change weights once loaded say so."""
        raise BackendUnavailable(f"{self.backend_title} cannot change weights once an engine is loaded; "
                                 f"run LoRAs on the onnxruntime backend, on TensorRT engines built with "
                                 f"`sdrt build --refittable`, or merge them with `sdrt export --lora FILE:SCALE`")

    def close(self) -> None:
        """Release device memory and sessions. Safe to call twice."""

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def check_inputs(spec: StageSpec, inputs: Mapping[str, np.ndarray]) -> None:
    stage = spec.stage.value
    expected = {t.name for t in spec.inputs}
    given = set(inputs)
    if given != expected:
        missing, extra = sorted(expected - given), sorted(given - expected)
        parts = ([f"missing {missing}"] if missing else []) + ([f"unexpected {extra}"] if extra else [])
        raise InvalidInput(f"{stage}: wrong inputs ({'; '.join(parts)}); it takes {sorted(expected)}")
    for t in spec.inputs:
        a = inputs[t.name]
        if not isinstance(a, np.ndarray):
            raise InvalidType(f"{stage} input {t.name!r} must be a numpy array, got {type(a).__name__}")
        if a.dtype != t.dtype.numpy:
            raise InvalidType(f"{stage} input {t.name!r} must be {t.dtype.value}, got {a.dtype}")
        if a.shape != t.shape:
            raise InvalidInput(f"{stage} input {t.name!r} must have shape {t.shape}, got {a.shape}")
