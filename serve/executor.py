"""What the HTTP layer needs from whatever runs the jobs: the models served, readiness,
`submit`, progress and interrupt. Two implementations: local.py (engines loaded in
this process) and remote.py (Celery workers on other machines, `--queue redis://`).
"""

from __future__ import annotations

import abc
import asyncio
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable, Sequence

from sdrt.engines.errors import InvalidInput, SdrtError

from .config import ServeConfig
from .jobs import Job, JobResult
from .metrics import Metrics

POLL_S = 0.1   # how often a waiting request looks at its client and its deadline


class QueueFull(SdrtError):
    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


class NotReady(SdrtError):
    def __init__(self, message: str, retry_after: int = 5):
        super().__init__(message)
        self.retry_after = retry_after


class UnknownModel(InvalidInput):
    pass


@dataclass(frozen=True)
class Model:
    """A served artifact, opened without its engines (manifest, tokenizer, scheduler
    config): enough to list it and to validate requests before they are queued."""

    name: str
    folder: Path
    artifact: Any   # sdrt.runtime.artifact.Artifact

    @property
    def hash(self) -> str:
        return self.artifact.manifest.model_hash or ""

    @property
    def title(self) -> str:
        """AUTOMATIC1111's checkpoint title, "name [hash]"."""
        return f"{self.name} [{self.hash}]" if self.hash else self.name

    @property
    def width(self) -> int:
        return self.artifact.width

    @property
    def height(self) -> int:
        return self.artifact.height

    @property
    def batch(self) -> int:
        return self.artifact.batch


def open_models(folders: Sequence[Path], check_hashes: bool = False) -> dict[str, Model]:
    """Name -> Model, in the order given. A model's name is its checkpoint name from the
    manifest (`sdrt export --model-name`), else the folder's name; two the same is refused."""
    from sdrt.runtime.artifact import Artifact

    models: dict[str, Model] = {}
    for folder in folders:
        artifact = Artifact.open(folder, check_hashes=check_hashes)
        name = artifact.manifest.model_name or Path(folder).resolve().name
        if name in models:
            raise InvalidInput(f"two artifacts are named {name!r} ({models[name].folder} and {folder}): export one "
                               f"with another --model-name so requests can choose between them")
        models[name] = Model(name, Path(folder), artifact)
    return models


class Executor(abc.ABC):
    def __init__(self, config: ServeConfig, models: dict[str, Model], metrics: Metrics):
        self.config = config
        self.models = models
        self.metrics = metrics

    def model(self, name: str | None) -> Model:
        """The model a request names: its name, or AUTOMATIC1111's title "name [hash]" or
        hash; None or "" picks the first one served."""
        if not name:
            return next(iter(self.models.values()))
        for m in self.models.values():
            if name in (m.name, m.title, m.hash) or (m.hash and name.startswith(m.name + " [")):
                return m
        raise UnknownModel(f"no model {name!r} is served here; choose one of: "
                           f"{', '.join(m.title for m in self.models.values())}")

    @abc.abstractmethod
    def start(self) -> None:
        """Begin loading in the background; return at once."""

    @abc.abstractmethod
    def close(self) -> None: ...

    @abc.abstractmethod
    def readiness(self) -> tuple[bool, str]:
        """(ready, why not)."""

    @abc.abstractmethod
    def enqueue(self, job: Job) -> Any:
        """Queue `job` now or raise QueueFull / NotReady; return a handle for `wait`."""

    @abc.abstractmethod
    def poll(self, handle: Any) -> JobResult | None:
        """The result when done (raising the job's error), else None."""

    @abc.abstractmethod
    def cancel(self, handle: Any, reason: str, message: str) -> None:
        """Drop a queued job or stop a running one between steps."""

    @abc.abstractmethod
    def progress(self) -> dict[str, Any]:
        """AUTOMATIC1111's /sdapi/v1/progress body (without current_image)."""

    @abc.abstractmethod
    def interrupt(self) -> int:
        """Stop the running generation(s) between steps; return how many."""

    @abc.abstractmethod
    def queue_depth(self) -> int: ...

    async def submit(self, job: Job, disconnected: Callable[[], Awaitable[bool]] | None = None) -> JobResult:
        """Queue `job` and wait for it, dropping it when the client goes away or its
        deadline passes (queued: removed; running: stopped between steps)."""
        handle = self.enqueue(job)
        cancelled = False
        while True:
            result = self.poll(handle)
            if result is not None:
                return result
            if not cancelled:
                if disconnected is not None and await disconnected():
                    self.cancel(handle, "disconnected", "the client disconnected")
                    cancelled = True
                elif job.deadline is not None and time.time() > job.deadline:
                    self.cancel(handle, "deadline", f"the request's deadline of {job.timeout or 0:g} s passed")
                    cancelled = True
            await self.wait(handle, POLL_S)

    async def wait(self, handle: Any, seconds: float) -> None:
        """Wait up to `seconds` for the job to finish (an executor that can be woken
        when it does overrides this, so an answer never waits out the poll interval)."""
        await asyncio.sleep(seconds)

    def retry_after(self, seconds_per_job: float) -> int:
        return max(1, math.ceil(seconds_per_job * max(1, self.queue_depth()) / max(1, len(self.models))))
