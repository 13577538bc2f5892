"""The front of `sdrt serve --queue URL`: `RemoteExecutor` puts each job on its model's
Celery queue and answers the request from the result a worker (worker.py) stores. The
protocol both sides follow, and why it completes each job once, is redis_protocol.py's.

A waiting request reads its result (`poll`) every POLL_S (executor.py), and is woken
sooner: one thread per front listens on the FINISHED channel, where a worker announces
each job whose result it stored, and wakes that job's request, so a 30 ms job is
answered at about 30 ms rather than at the next 100 ms tick. The announcement is a
hint only; the stored result stays the truth and is read once, by `poll`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Mapping

from sdrt.engines.errors import (ArtifactError, BackendUnavailable, InvalidInput, InvalidType, MissingFile,
                                 NumericsError)

from .executor import Executor, NotReady, QueueFull
from .jobs import Job, JobResult, Stopped
from .redis_protocol import (ACTIVE, FINISHED, HEARTBEAT_S, MARKER_TTL_S, RUNNING, TASK, Store, celery_app,
                             check_url, key, queue_name, redis_client, shown_url)

log = logging.getLogger("sdrt.serve")

LISTEN_S = 1.0   # the listener looks at whether the front is closing this often

# The errors a worker's job may end with that the HTTP layer answers as the user's (422);
# any other is answered 500.
USER_ERRORS = {c.__name__: c for c in (InvalidInput, InvalidType, MissingFile, ArtifactError, NumericsError,
                                       BackendUnavailable)}


@dataclass(eq=False)
class Handle:
    job: Job
    model: str
    enqueued: float               # Redis's clock
    stop: Stopped | None = None   # set by cancel: the client left or the deadline passed
    loop: asyncio.AbstractEventLoop | None = None   # the waiting request's, which _wake wakes
    woken: asyncio.Event = field(default_factory=asyncio.Event)   # set when a worker announces the job finished


class RemoteExecutor(Executor):
    """Jobs on `sdrt worker` processes through Celery; the models here are only opened."""

    def __init__(self, config, models, metrics):
        super().__init__(config, models, metrics)
        self.url = check_url(config.queue_url)
        self.queues = {name: queue_name(m) for name, m in models.items()}
        self._app = celery_app(self.url)
        self._store = Store(redis_client(self.url))
        self._handles: dict[str, Handle] = {}   # by job id
        self._lock = threading.Lock()
        self._closed = False
        self._closing = threading.Event()
        self._listener: threading.Thread | None = None
        self._job_seconds = 1.0   # a running mean of a job's time, for Retry-After

    def start(self) -> None:
        log.info("jobs go to Celery workers through %s (queues %s)", shown_url(self.url),
                 ", ".join(self.queues.values()))
        self._listener = threading.Thread(target=self._listen, name="sdrt-finished", daemon=True)
        self._listener.start()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            handles = list(self._handles.values())
        for h in handles:
            self.cancel(h, "shutdown", "the server is shutting down")
        self._closing.set()
        if self._listener is not None:
            self._listener.join(timeout=2 * LISTEN_S)
        self._store.redis.close()
        self._app.close()

    def readiness(self) -> tuple[bool, str]:
        import redis

        try:
            self._store.redis.ping()
            missing = [q for q in self.queues.values() if not self._store.live(key("workers", q))]
        except redis.RedisError as e:
            ready, why = False, f"the queue's Redis at {shown_url(self.url)} cannot be reached: {e}"
        else:
            ready, why = not missing, (f"no live `sdrt worker` consumes {', '.join(missing)}" if missing else "")
        self.metrics.ready.set(int(ready))
        return ready, why

    def enqueue(self, job: Job) -> Handle:
        import redis

        model = self.model(job.model).name
        if self._closed:
            raise NotReady("the server is shutting down")
        ready, why = self.readiness()
        if not ready:
            raise NotReady(why)
        if not job.id:
            job = dataclasses.replace(job, id=uuid.uuid4().hex)
        expires = (job.deadline or time.time() + MARKER_TTL_S) + 60   # a dead front's jobs leave the bound
        try:
            n, enqueued = self._store.admit(job.id, expires, self.config.max_queue)
            if n < 0:
                self.metrics.rejected.labels("queue_full").inc()
                raise QueueFull(f"the queue is full ({self.config.max_queue} jobs waiting or running, --max-queue "
                                f"{self.config.max_queue}); retry later", self.retry_after(self._job_seconds))
            handle = Handle(job, model, enqueued, loop=_running_loop())
            with self._lock:   # before the task exists, so that its announcement finds the handle
                self._handles[job.id] = handle
            try:
                self._app.send_task(TASK, args=[job.to_json(), enqueued], task_id=job.id,
                                    queue=self.queues[model], ignore_result=True)
            except Exception as e:   # kombu's OperationalError wraps the connection's
                self._drop(handle)
                self._store.redis.zrem(ACTIVE, job.id)
                raise redis.RedisError(str(e)) from e
        except redis.RedisError as e:
            raise NotReady(f"the queue's Redis at {shown_url(self.url)} cannot be reached: {e}") from None
        self.metrics.queue_depth.set(self.queue_depth())
        return handle

    def poll(self, handle: Handle) -> JobResult | None:
        import redis

        backend = self._app.backend
        try:
            meta = backend.get_task_meta(handle.job.id, cache=False)
            if meta["status"] == "PENDING" and handle.stop is not None and not self._store.locked(handle.job.id):
                # cancelled and nobody runs it (the cancel key keeps any worker from starting it)
                meta = backend.get_task_meta(handle.job.id, cache=False)
                if meta["status"] == "PENDING":
                    self._forget(handle)
                    self.metrics.rejected.labels(handle.stop.reason).inc()
                    raise Stopped(handle.stop.reason, f"{handle.stop} while the job was queued")
        except redis.RedisError as e:
            if handle.stop is None:
                log.warning("job %s: the queue's Redis cannot be reached (%s); still waiting", handle.job.id, e)
                return None
            self._forget(handle)
            raise handle.stop from None
        if meta["status"] == "PENDING":
            return None
        self._forget(handle)
        return self._outcome(handle, meta)

    async def wait(self, handle: Handle, seconds: float) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(handle.woken.wait(), seconds)
        # a wake-up is used once: a repeated announcement, or a poll that failed after one,
        # costs one early poll, never a busy loop
        handle.woken.clear()

    def _listen(self) -> None:
        """Wake the request of each job announced on FINISHED, until the front closes; a
        Redis that cannot be reached is tried again every HEARTBEAT_S / 2 (meanwhile the
        requests poll)."""
        import redis

        pubsub, failing = None, False
        while not self._closing.is_set():
            try:
                if pubsub is None:
                    pubsub = self._store.redis.pubsub(ignore_subscribe_messages=True)
                    pubsub.subscribe(FINISHED)
                message = pubsub.get_message(timeout=LISTEN_S)
                failing = False
            except (redis.RedisError, OSError) as e:
                if not failing:
                    log.warning("listening for finished jobs on the queue's Redis failed (%s); requests are "
                                "answered at their next poll until it is back", e)
                    failing = True
                if pubsub is not None:
                    with contextlib.suppress(Exception):
                        pubsub.close()
                pubsub = None
                self._closing.wait(HEARTBEAT_S / 2)
                continue
            if message is not None and message["type"] == "message":
                self._wake(message["data"].decode())
        if pubsub is not None:
            with contextlib.suppress(Exception):
                pubsub.close()

    def _wake(self, job_id: str) -> None:
        with self._lock:
            handle = self._handles.get(job_id)   # None: another front's job, or answered already
        if handle is not None and handle.loop is not None:
            with contextlib.suppress(RuntimeError):   # its loop is closed: nobody waits
                handle.loop.call_soon_threadsafe(handle.woken.set)

    def _outcome(self, handle: Handle, meta: Mapping[str, Any]) -> JobResult:
        payload = meta.get("result")
        if meta["status"] != "SUCCESS" or not isinstance(payload, dict):
            raise RuntimeError(f"job {handle.job.id} ended {meta['status']} on its worker: {payload}")
        if "error" in payload:
            error = payload["error"]
            if error["type"] == "Stopped":
                self.metrics.rejected.labels(error["reason"]).inc()
                raise Stopped(error["reason"], error["message"])
            if error["type"] in USER_ERRORS:
                raise USER_ERRORS[error["type"]](error["message"])
            raise RuntimeError(f"job {handle.job.id} failed on worker {payload.get('worker')}: {error['message']}")
        result = JobResult.from_json(payload["ok"])
        self._job_seconds = 0.8 * self._job_seconds + 0.2 * result.stages.get("total", self._job_seconds)
        for fill in payload.get("fills", ()):
            self.metrics.batch_items.observe(fill)
        self.metrics.job_done(handle.model, len(result.images), result.stages, result.queue_wait)
        return result

    def _forget(self, handle: Handle) -> None:
        """The request is answered: out of the bound, and its result (if any) deleted."""
        self._drop(handle)
        try:
            self._store.redis.zrem(ACTIVE, handle.job.id)
            self._app.backend.forget(handle.job.id)
        except Exception as e:   # noqa: BLE001 - both expire on their own
            log.warning("job %s: could not clear its queue records: %s", handle.job.id, e)

    def _drop(self, handle: Handle) -> None:
        with self._lock:
            if self._handles.get(handle.job.id) is handle:
                del self._handles[handle.job.id]

    def cancel(self, handle: Handle, reason: str, message: str) -> None:
        if handle.stop is not None:
            return
        handle.stop = Stopped(reason, message)
        try:
            self._store.cancel(handle.job.id, reason, message)
        except Exception as e:   # noqa: BLE001 - poll answers the request all the same
            log.warning("job %s: could not record its cancel in Redis: %s", handle.job.id, e)

    def interrupt(self) -> int:
        """Stop every running job, on every worker (AUTOMATIC1111 has one generation to stop)."""
        running = self._running()
        for job_id in running:
            self._store.cancel(job_id, "interrupted", "interrupted by POST /sdapi/v1/interrupt")
        return len(running)

    def _running(self) -> list[str]:
        return self._store.live(RUNNING)

    def queue_depth(self) -> int:
        import redis

        try:
            pipe = self._store.redis.pipeline(transaction=False)
            pipe.zcard(ACTIVE).zcard(RUNNING)
            active, running = pipe.execute()
        except redis.RedisError:
            return 0
        self.metrics.running.set(running)
        return max(0, active - running)

    def progress(self) -> dict[str, Any]:
        """AUTOMATIC1111's progress of the running job furthest from done, from the workers' reports."""
        import redis

        try:
            reports = [r for r in (self._report(j) for j in self._running()) if r is not None]
            now = float("%d.%06d" % self._store.redis.time())
            jobs = self._store.redis.zcard(ACTIVE)
        except redis.RedisError:
            return a1111_progress(0.0, 0.0, 0, 0, 0, False, "")
        if not reports:
            return a1111_progress(0.0, 0.0, 0, 0, jobs, False, "")
        job_id, r = min(reports, key=lambda jr: jr[1]["done"])
        elapsed = now - r["started"]
        eta = elapsed / r["done"] - elapsed if r["done"] > 0 else 0.0
        cancel = self._store.redis.get(key("cancel", job_id))
        interrupted = cancel is not None and json.loads(cancel)["reason"] == "interrupted"
        return a1111_progress(r["done"], eta, r["step"], r["steps"], max(jobs, len(reports)), interrupted, job_id)

    def _report(self, job_id: str) -> tuple[str, dict[str, float]] | None:
        raw = {k.decode(): v.decode() for k, v in self._store.redis.hgetall(key("job", job_id)).items()}
        if "started" not in raw:
            return None
        r = {k: float(raw.get(k, 0)) for k in ("step", "steps", "calls", "calls_done", "started")}
        steps, calls = r["steps"], max(1.0, r["calls"])
        r["done"] = (r["calls_done"] * steps + r["step"] % steps) / (calls * steps) if steps else 0.0
        return job_id, r


def a1111_progress(done: float, eta: float, step: float, steps: float, jobs: int, interrupted: bool,
                   job_id: str) -> dict[str, Any]:
    return {"progress": round(done, 4), "eta_relative": round(eta, 3),
            "state": {"skipped": False, "interrupted": interrupted, "stopping_generation": False, "job": job_id,
                      "job_count": jobs, "job_no": 0, "job_timestamp": time.strftime("%Y%m%d%H%M%S"),
                      "sampling_step": int(step), "sampling_steps": int(steps)},
            "current_image": None, "textinfo": None}


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:   # enqueued outside an event loop: its request polls only
        return None
