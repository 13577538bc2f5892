"""Progress lines on stderr: `[   1.2s] message`, the time since the command started.

One format for every command (export, build, generate, demo, bench) and benchmark,
so `sdrt demo`, which exports and then generates, reads as one log. Standard
library only: export, the CLI and the benchmarks all import it (no tqdm at run time).
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from typing import Iterator, TextIO

HEARTBEAT_SECONDS = 15.0


def progress_line(elapsed_s: float, message: str) -> str:
    return f"[{elapsed_s:7.1f}s] {message}"


class Progress:
    """`say(message)` (or call it) prints one line with the elapsed time.

    stream: None writes to whatever `sys.stderr` is when a line is printed (so
    redirections made after construction are followed). start: a `time.perf_counter()`
    reading to count from, to continue the clock of work that started earlier.
    """

    def __init__(self, stream: TextIO | None = None, enabled: bool = True, start: float | None = None):
        self.stream = stream
        self.enabled = enabled
        self.start = time.perf_counter() if start is None else start
        self.durations: dict[str, float] = {}   # step name -> seconds, for benchmarks

    def say(self, message: str) -> None:
        if self.enabled:
            print(progress_line(time.perf_counter() - self.start, message), file=self.stream or sys.stderr, flush=True)

    __call__ = say   # where a plain `progress(message)` callable is expected

    @contextlib.contextmanager
    def step(self, what: str) -> Iterator[None]:
        """`what ...` before the block, `what: done in 1.2s` after it."""
        t0 = time.perf_counter()
        self.say(f"{what} ...")
        yield
        self.durations[what] = time.perf_counter() - t0
        self.say(f"{what}: done in {self.durations[what]:.1f}s")

    @contextlib.contextmanager
    def heartbeat(self, what: str, every: float = HEARTBEAT_SECONDS) -> Iterator[None]:
        """A line every `every` seconds while the block runs, for long calls that report
        nothing themselves (a TensorRT build), so a user can see the command is alive."""
        stop = threading.Event()
        start = time.perf_counter()

        def beat() -> None:
            while not stop.wait(every):
                self.say(f"{what} ({time.perf_counter() - start:.0f}s)")
        thread = threading.Thread(target=beat, daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
