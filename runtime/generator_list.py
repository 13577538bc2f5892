"""One seed per batch item: diffusers' list of generators.

Given `generator=[torch.Generator("cpu").manual_seed(s) for s in seeds]`, diffusers'
`randn_tensor(shape, generator=...)` (diffusers/utils/torch_utils.py) draws batch item
i's rows from generator i with shape (1, *shape[1:]) and joins them; a list of one is
used as a single generator. So item i gets the numbers a batch of one would get from
seed i, except where a pipeline draws for fewer rows than the batch: the inpainting
pipelines' `_encode_vae_image` samples their one input image (shape (1, ...)), which
takes the first generator only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["GeneratorList"]


class GeneratorList:
    """Per-item generators (TorchGenerator or numpy.random.Generator, one per batch
    item) behind the one call the pipeline draws with, `standard_normal(shape, dtype)`."""

    def __init__(self, generators: Sequence[Any]):
        if not generators:
            raise ValueError("GeneratorList needs at least one generator")
        self.generators = tuple(generators)

    def __repr__(self) -> str:
        return f"GeneratorList({list(self.generators)!r})"

    def __len__(self) -> int:
        return len(self.generators)

    def standard_normal(self, size: Sequence[int], dtype=np.float32) -> np.ndarray:
        shape = tuple(size)
        if len(self.generators) == 1:
            return self.generators[0].standard_normal(shape, dtype=dtype)
        rows = shape[0]
        if rows > len(self.generators):   # diffusers' generator[i] would raise IndexError
            raise ValueError(f"a draw of {rows} rows needs {rows} generators, this list has {len(self.generators)}")
        row = (1, *shape[1:])
        return np.concatenate([g.standard_normal(row, dtype=dtype) for g in self.generators[:rows]], axis=0)
