"""Concise progress lines on stderr with elapsed time (no tqdm at run time)."""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Iterator, TextIO


class Progress:
    def __init__(self, stream: TextIO | None = None, enabled: bool = True):
        self.stream = stream
        self.enabled = enabled
        self.start = time.perf_counter()
        self.durations: dict[str, float] = {}   # step name -> seconds, for benchmarks

    def say(self, message: str) -> None:
        if self.enabled:
            print(f"[{time.perf_counter() - self.start:7.1f}s] {message}", file=self.stream or sys.stderr, flush=True)

    @contextlib.contextmanager
    def step(self, what: str) -> Iterator[None]:
        t0 = time.perf_counter()
        self.say(f"{what} ...")
        yield
        self.durations[what] = time.perf_counter() - t0
        self.say(f"{what}: done in {self.durations[what]:.1f}s")
