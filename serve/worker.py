"""The worker side of `sdrt serve --queue URL`: what `sdrt worker ART --queue URL`
(cli/worker.py) runs. Loaded pipelines behind a Celery worker, one job at a time, each
claimed, run and finished through redis_protocol.py's keys so that it completes once.

A worker stopped by SIGTERM or Ctrl-C finishes its job first (Celery's warm shutdown);
a second Ctrl-C puts the job back on its queue at once.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from sdrt.engines.errors import InvalidInput, SdrtError

from .executor import open_models
from .jobs import Job, JobResult, Stopped, deadline_passed, items_of, run_items
from .redis_protocol import (DEFAULT_VISIBILITY_TIMEOUT_S, HEARTBEAT_S, LIVE_S, TASK, QueueUnreachable, Store,
                             celery_app, check_url, key, queue_name, redis_client, shown_url)

log = logging.getLogger("sdrt.serve")

REPORT_S = 0.1             # a running job reports its step and reads its cancel key at most this often
DEADLINE_GRACE_S = 5.0     # workers enforce a job's deadline this late: the front's clock is not theirs


@dataclass(frozen=True)
class WorkerConfig:
    artifacts: tuple[Path, ...]
    queue_url: str
    backend: str = "onnxruntime"
    backend_options: Mapping[str, Any] = field(default_factory=dict)
    lora_dir: Path | None = None
    embedding_dir: Path | None = None
    visibility_timeout_s: float = DEFAULT_VISIBILITY_TIMEOUT_S
    check_hashes: bool = True

    def __post_init__(self):
        if not self.artifacts:
            raise InvalidInput("name at least one artifact folder to run jobs for")
        check_url(self.queue_url)
        if not 1 <= self.visibility_timeout_s <= 7 * 86_400:
            raise InvalidInput(f"--visibility-timeout must be 1 s to 7 days, got {self.visibility_timeout_s:g}")
        for flag, folder in (("--lora-dir", self.lora_dir), ("--embedding-dir", self.embedding_dir)):
            if folder is not None and not folder.is_dir():
                raise InvalidInput(f"{flag} {folder} is not a folder")


class _Lost(Exception):
    """Another worker holds or finished the job this one is running."""


class _PutBack(Exception):
    """The job cannot finish here: it goes back on its queue."""


def _cold_shutdown() -> bool:
    from celery.worker import state
    return state.should_terminate not in (None, False)


class Worker:
    """Loaded pipelines behind a Celery worker with the solo pool: one job at a time."""

    def __init__(self, config: WorkerConfig):
        import redis

        self.config = config
        self.name = f"sdrt.{os.getpid()}@{socket.gethostname()}"
        self._store = Store(redis_client(config.queue_url))
        try:
            self._store.redis.ping()
        except redis.RedisError as e:
            raise QueueUnreachable(f"cannot reach the queue's Redis at {shown_url(config.queue_url)}: {e}") from None
        self.models = open_models(config.artifacts)
        self.queues = {name: queue_name(m) for name, m in self.models.items()}
        self.pipes: dict[str, Any] = {}
        self._job = ""                     # the job whose lock this worker holds
        self._held = threading.Lock()      # _job and its lock in Redis change together
        self._lost = threading.Event()
        self._stop = threading.Event()

    def load(self) -> None:
        from sdrt.runtime.pipeline import Pipeline

        for name, model in self.models.items():
            started = time.perf_counter()
            self.pipes[name] = Pipeline.load(model.folder, backend=self.config.backend,
                                             check_hashes=self.config.check_hashes,
                                             **dict(self.config.backend_options))
            log.info("loaded %s (%s, %s) in %.2f s", name, model.folder, self.pipes[name].backend,
                     time.perf_counter() - started)

    def run(self) -> int:
        """Consume the models' queues until a warm shutdown (SIGTERM, Ctrl-C: the current
        job finishes first); return the exit code."""
        app = celery_app(self.config.queue_url, self.config.visibility_timeout_s)

        @app.task(name=TASK, bind=True, ignore_result=True)   # the result is stored by run_job
        def generate(task: Any, job: dict[str, Any], enqueued: float) -> None:
            self.run_job(task.request.id, job, enqueued, task.backend,
                         bool((task.request.delivery_info or {}).get("redelivered")))

        self._beat()
        beat = threading.Thread(target=self._beat_forever, name="sdrt-heartbeat", daemon=True)
        beat.start()
        worker = app.Worker(hostname=self.name, pool_cls="solo", concurrency=1, queues=list(self.queues.values()),
                            loglevel="INFO", quiet=True, without_mingle=True, without_gossip=True,
                            without_heartbeat=True, optimization="fair", redirect_stdouts=False)
        log.info("worker %s consumes %s (visibility timeout %g s)", self.name, ", ".join(self.queues.values()),
                 self.config.visibility_timeout_s)
        try:
            worker.start()
        finally:
            self._stop.set()
            beat.join(timeout=5)
            try:
                for q in self.queues.values():
                    self._store.redis.zrem(key("workers", q), self.name)
            except Exception as e:   # noqa: BLE001 - its heartbeat lapses in LIVE_S anyway
                log.warning("could not deregister %s: %s", self.name, e)
            for pipe in self.pipes.values():
                pipe.close()
        return int(worker.exitcode or 0)

    # -- liveness ------------------------------------------------------------------------------

    def _beat(self) -> None:
        with self._held:
            if not self._store.renew(self.name, list(self.queues.values()), self._job) and self._job:
                log.warning("job %s: another worker took it over (this worker's lock lapsed); stopping it", self._job)
                self._lost.set()

    def _beat_forever(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self._beat()
            except Exception as e:   # noqa: BLE001 - the next beat tries again
                log.warning("heartbeat to Redis failed: %s", e)

    # -- one job -------------------------------------------------------------------------------

    def run_job(self, job_id: str, data: dict[str, Any], enqueued: float, backend: Any, redelivered: bool) -> None:
        from celery.exceptions import Reject

        try:
            self._run_job(job_id, Job.from_json(data), enqueued, backend, redelivered)
        except Exception as e:
            # Storing the result failed, or a second Ctrl-C (Celery's cold shutdown, which the solo
            # pool cannot do: it raises NotImplementedError in the job): the job goes back on its queue.
            if not _cold_shutdown() and not isinstance(e, _PutBack):
                raise
            self._let_go(job_id)
            why = "the worker is stopping" if _cold_shutdown() else str(e)
            log.warning("job %s goes back on the queue: %s", job_id, why)
            raise Reject(why, requeue=True) from None

    def _run_job(self, job_id: str, job: Job, enqueued: float, backend: Any, redelivered: bool) -> None:
        pipe = self.pipes.get(job.model)
        claimed = self._claim(job_id, job, -(-job.count // pipe.batch) if pipe else 1)
        if claimed is None:
            return
        started, cancel = claimed
        log.info("job %s started on %s%s", job_id, self.name, " (redelivered)" if redelivered else "")
        began = time.perf_counter()
        try:
            payload = self._generate(job_id, job, pipe, started, enqueued, cancel)
        except _Lost:
            self._let_go(job_id)
            log.info("job %s dropped on %s: another worker holds or finished it", job_id, self.name)
            return
        try:
            backend.store_result(job_id, {**payload, "worker": self.name}, "SUCCESS")
        except Exception as e:
            raise _PutBack(f"storing its result failed: {e}") from e
        with self._held:
            self._store.finish(job_id, self.name)
            self._job = ""
        error = payload.get("error")
        outcome = "done" if error is None else f"ended: {error['type']} {error.get('reason', '')}".strip()
        log.info("job %s %s on %s in %.2f s", job_id, outcome, self.name, time.perf_counter() - began)

    def _let_go(self, job_id: str) -> None:
        """Release the job's lock (if this worker holds it) so another worker may run it."""
        with self._held:
            if self._job == job_id:
                try:
                    self._store.release(job_id, self.name)
                except Exception as e:   # noqa: BLE001 - the lock lapses in LIVE_S anyway
                    log.warning("job %s: could not release its lock: %s", job_id, e)
                self._job = ""

    def _claim(self, job_id: str, job: Job, calls: int) -> tuple[float, str] | None:
        """Take the job's lock: (Redis's time, its cancel record) or None when it is not ours to run."""
        waited = False
        while True:
            with self._held:
                state, *rest = self._store.claim(job_id, self.name, job.model, calls)
                if state == "ok":
                    self._job = job_id
                    self._lost.clear()
                    return float(rest[0]), rest[1]
            if state == "done":
                log.info("job %s was already done by %s; not run again", job_id, rest[0])
                return None
            if not waited:
                log.warning("job %s came back while %s holds it; waiting until it finishes the job or its lock "
                            "lapses (%g s after it died). If it is alive, the job ran longer than the visibility "
                            "timeout, %g s: raise --visibility-timeout above the longest job",
                            job_id, rest[0], LIVE_S, self.config.visibility_timeout_s)
                waited = True
            if job.deadline is not None and time.time() > job.deadline + DEADLINE_GRACE_S + LIVE_S:
                log.info("job %s: its deadline passed while %s ran it; dropped here", job_id, rest[0])
                return None
            time.sleep(HEARTBEAT_S / 2)

    def _generate(self, job_id: str, job: Job, pipe: Any, started: float, enqueued: float,
                  cancel: str) -> dict[str, Any]:
        """The job's outcome as the front reads it: {"ok": JobResult} or {"error": ...}."""
        try:
            if cancel:
                record = json.loads(cancel)
                raise Stopped(record["reason"], f"{record['message']} while the job was queued")
            if job.deadline is not None and time.time() > job.deadline + DEADLINE_GRACE_S:
                raise deadline_passed(job, "queued")
            if pipe is None:
                raise InvalidInput(f"worker {self.name} does not serve model {job.model!r}")
            images, stages, fills = run_items(pipe, items_of([job]), self.config.lora_dir, self._on_step(job_id, job),
                                              self.config.embedding_dir)
        except _Lost:
            raise
        except Stopped as e:
            return {"error": {"type": "Stopped", "reason": e.reason, "message": str(e)}}
        except SdrtError as e:
            return {"error": {"type": type(e).__name__, "message": str(e)}}
        except Exception as e:   # noqa: BLE001 - a bug: logged here, answered 500 by the front
            if _cold_shutdown():
                raise
            log.exception("job %s failed", job_id)
            return {"error": {"type": "internal", "message": f"{type(e).__name__}: {e}"}}
        return {"ok": JobResult(images, stages, max(0.0, started - enqueued)).to_json(), "fills": fills}

    def _on_step(self, job_id: str, job: Job) -> Callable[[int, int], None]:
        calls_done, last = 0, 0.0

        def on_step(i: int, n: int) -> None:
            nonlocal calls_done, last
            calls_done += i == n
            if self._lost.is_set():
                raise _Lost()
            if job.deadline is not None and time.time() > job.deadline + DEADLINE_GRACE_S:
                raise deadline_passed(job, "generating")
            now = time.monotonic()
            if now - last < REPORT_S and i != n:
                return
            last = now
            cancel, done = self._store.report(job_id, i, n, calls_done)
            if done is not None and done.decode() != self.name:
                raise _Lost()
            if cancel is not None:
                record = json.loads(cancel)
                raise Stopped(record["reason"], f"{record['message']} while the job was generating")

        return on_step
