"""The lean runtime: tokenizer, NumPy schedulers, pipeline. Never imports torch."""

from __future__ import annotations

from typing import Any

__all__ = ["Pipeline", "GenerationResult"]


def __getattr__(name: str) -> Any:
    # Lazy, so `import sdrt.runtime` (and `sdrt --help`) stays fast: onnxruntime is
    # only imported when a pipeline is built.
    if name in __all__:
        from . import pipeline
        return getattr(pipeline, name)
    raise AttributeError(f"module 'sdrt.runtime' has no attribute {name!r}")
