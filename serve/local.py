"""Jobs run in the server's own process: one loaded Pipeline and one worker thread per
served model (one job at a time per engine set: the engines already use every core
for one call), fed from a bounded queue.

Batching: for an artifact exported with `--batch N`, the worker that takes a job with
fewer than N images waits up to `--batch-wait-ms` for queued jobs with the same
`batch_key` (jobs.py) and runs them in the same engine calls.

Stopping: `cancel` removes a queued job at once; a running one is stopped at its next
step (the pipeline's on_step callback raises), unless it shares its engine call with
jobs that still want their images, whose call then runs on and the stopped job's
images are dropped.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from sdrt.engines.errors import SdrtError

from .executor import Executor, NotReady, QueueFull
from .jobs import Job, JobResult, Stopped, deadline_passed, items_of, run_items

log = logging.getLogger("sdrt.serve")


@dataclass(eq=False)
class Ticket:
    job: Job
    model: str
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    queued_at: float = field(default_factory=time.perf_counter)
    started_at: float | None = None
    stop: Stopped | None = None     # set by cancel / interrupt / the deadline: the job wants no more work
    awaitable: Any = None           # the future as seen by the event loop (wait)


@dataclass
class _Progress:
    job: Ticket | None = None
    step: int = 0            # the step of the current engine call
    steps: int = 0           # steps per engine call
    calls_done: int = 0
    calls: int = 1           # engine calls the job's group needs
    started: float = 0.0

    @property
    def done(self) -> float:
        if not self.steps:
            return 0.0
        return (self.calls_done * self.steps + self.step % self.steps) / (self.calls * self.steps)


class LocalExecutor(Executor):
    def __init__(self, config, models, metrics):
        super().__init__(config, models, metrics)
        self._cond = threading.Condition()
        self._queues: dict[str, collections.deque[Ticket]] = {name: collections.deque() for name in models}
        self._running: dict[str, list[Ticket]] = {name: [] for name in models}
        self._progress: dict[str, _Progress] = {name: _Progress() for name in models}
        self._pipes: dict[str, Any] = {}
        self._error: str | None = None
        self._closed = False
        self._threads: list[threading.Thread] = []
        self._job_seconds = 1.0   # a running mean of a job's time, for Retry-After

    # -- life cycle -------------------------------------------------------------------------

    def start(self) -> None:
        t = threading.Thread(target=self._load_all, name="sdrt-load", daemon=True)
        t.start()
        self._threads.append(t)

    def _load_all(self) -> None:
        from sdrt.runtime.pipeline import Pipeline

        for name, model in self.models.items():
            started = time.perf_counter()
            try:
                pipe = Pipeline.load(model.folder, backend=self.config.backend,
                                     check_hashes=self.config.check_hashes, **dict(self.config.backend_options))
            except Exception as e:   # noqa: BLE001 - reported by readiness and the log, the server stays up
                self._error = f"loading {name} from {model.folder} failed: {type(e).__name__}: {e}"
                log.error("%s", self._error)
                return
            seconds = time.perf_counter() - started
            self.metrics.load_seconds.labels(name).set(seconds)
            log.info("loaded %s (%s, %s) in %.2f s", name, model.folder, pipe.backend, seconds)
            with self._cond:
                if self._closed:
                    pipe.close()
                    return
                self._pipes[name] = pipe
            worker = threading.Thread(target=self._work, args=(name,), name=f"sdrt-worker-{name}", daemon=True)
            worker.start()
            self._threads.append(worker)
        self.metrics.ready.set(1)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            for name, queue in self._queues.items():
                while queue:
                    queue.popleft().future.set_exception(NotReady("the server is shutting down"))
            for running in self._running.values():
                for t in running:
                    t.stop = Stopped("shutdown", "the server is shutting down")
            self._cond.notify_all()
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(timeout=30)
        for pipe in self._pipes.values():
            pipe.close()

    def readiness(self) -> tuple[bool, str]:
        if self._error:
            return False, self._error
        missing = [n for n in self.models if n not in self._pipes]
        if missing:
            return False, f"loading {', '.join(missing)}"
        return True, ""

    # -- the queue ---------------------------------------------------------------------------

    def queue_depth(self) -> int:
        return sum(len(q) for q in self._queues.values())

    def enqueue(self, job: Job) -> Ticket:
        model = self.model(job.model).name
        with self._cond:
            if self._closed:
                raise NotReady("the server is shutting down")
            if model not in self._pipes:
                ready, why = self.readiness()
                raise NotReady(f"model {model} is not loaded yet ({why})" if not self._error else why)
            depth = self.queue_depth()
            if depth >= self.config.max_queue:
                self.metrics.rejected.labels("queue_full").inc()
                raise QueueFull(f"the queue is full ({depth} jobs waiting, --max-queue {self.config.max_queue}); "
                                f"retry later", self.retry_after(self._job_seconds))
            ticket = Ticket(job, model)
            self._queues[model].append(ticket)
            self.metrics.queue_depth.set(depth + 1)
            self._cond.notify_all()
        return ticket

    def poll(self, handle: Ticket) -> JobResult | None:
        return handle.future.result() if handle.future.done() else None

    async def wait(self, handle: Ticket, seconds: float) -> None:
        # woken by the job's future, not after a fixed poll interval: a 60 ms generation
        # is answered at 60 ms, not at the next 100 ms tick
        if handle.awaitable is None:
            handle.awaitable = asyncio.wrap_future(handle.future)
        await asyncio.wait({handle.awaitable}, timeout=seconds)
        if handle.awaitable.done() and not handle.awaitable.cancelled():
            handle.awaitable.exception()   # seen here; poll() raises it to the request

    def cancel(self, handle: Ticket, reason: str, message: str) -> None:
        with self._cond:
            queue = self._queues[handle.model]
            if handle in queue:
                queue.remove(handle)
                self.metrics.queue_depth.set(self.queue_depth())
                self.metrics.rejected.labels(reason).inc()
                handle.future.set_exception(Stopped(reason, f"{message} while the job was queued"))
            elif not handle.future.done() and handle.stop is None:
                handle.stop = Stopped(reason, f"{message} while the job was generating")

    def interrupt(self) -> int:
        with self._cond:
            running = [t for ts in self._running.values() for t in ts if t.stop is None]
            for t in running:
                t.stop = Stopped("interrupted", "interrupted by POST /sdapi/v1/interrupt")
        return len(running)

    # -- progress ------------------------------------------------------------------------------

    def progress(self) -> dict[str, Any]:
        """AUTOMATIC1111's progress of the model that is furthest from done."""
        with self._cond:
            busy = [p for p in self._progress.values() if p.job is not None]
            queued = self.queue_depth()
            running = sum(len(r) for r in self._running.values())
        if not busy:
            return _a1111_progress(0.0, 0.0, 0, 0, queued, False, None)
        p = min(busy, key=lambda p: p.done)
        done = p.done
        elapsed = time.perf_counter() - p.started
        eta = elapsed / done - elapsed if done > 0 else 0.0
        return _a1111_progress(done, eta, p.step, p.steps, queued + running,
                               p.job.stop is not None and p.job.stop.reason == "interrupted", p.job)

    # -- the worker ------------------------------------------------------------------------------

    def _work(self, model: str) -> None:
        batch = self.models[model].batch
        while True:
            group = self._take(model, batch)
            if group is None:
                return
            self._run(model, self._pipes[model], group)

    def _take(self, model: str, batch: int) -> list[Ticket] | None:
        """The next job, and with an N-image batch, compatible queued jobs that fill it."""
        queue = self._queues[model]
        with self._cond:
            while True:
                while not queue and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return None
                first = queue.popleft()
                if self._expired(first):
                    continue
                break
            group, room = [first], batch - first.job.count % batch if first.job.count % batch else 0
            if room:
                key = first.job.batch_key()
                wait_until = time.perf_counter() + self.config.batch_wait_ms / 1e3
                while room and not self._closed:
                    for t in list(queue):
                        if t.job.count <= room and t.job.batch_key() == key and not self._expired(t, queue):
                            queue.remove(t)
                            group.append(t)
                            room -= t.job.count
                            if not room:
                                break
                    left = wait_until - time.perf_counter()
                    if not room or left <= 0:
                        break
                    self._cond.wait(left)
            now = time.perf_counter()
            for t in group:
                t.started_at = now
            self._running[model] = group
            self.metrics.queue_depth.set(self.queue_depth())
            self.metrics.running.set(sum(len(r) for r in self._running.values()))
            calls = -(-sum(t.job.count for t in group) // batch)
            self._progress[model] = _Progress(first, calls=calls, started=now)
            return group

    def _expired(self, ticket: Ticket, queue: Any = None) -> bool:
        """Drop a queued job whose deadline passed (called with the lock held)."""
        if ticket.job.deadline is None or time.time() <= ticket.job.deadline:
            return False
        if queue is not None:
            queue.remove(ticket)
        self.metrics.rejected.labels("deadline").inc()
        ticket.future.set_exception(deadline_passed(ticket.job, "queued"))
        return True

    def _run(self, model: str, pipe: Any, group: list[Ticket]) -> None:
        progress = self._progress[model]

        def on_step(i: int, n: int) -> None:
            progress.step, progress.steps = i, n
            if i == n:
                progress.calls_done += 1
            now = time.time()
            for t in group:
                if t.stop is None and t.job.deadline is not None and now > t.job.deadline:
                    t.stop = deadline_passed(t.job, "generating")
            if all(t.stop is not None for t in group):
                raise group[0].stop

        started = time.perf_counter()
        try:
            images, stages, fills = run_items(pipe, items_of([t.job for t in group]), self.config.lora_dir,
                                              on_step, self.config.embedding_dir)
            for fill in fills:
                self.metrics.batch_items.observe(fill)
        except Stopped:
            for t in group:
                self.metrics.rejected.labels(t.stop.reason).inc()
                t.future.set_exception(t.stop)
        except Exception as e:   # noqa: BLE001 - the job's error, answered to its request
            if not isinstance(e, SdrtError):
                log.exception("job %s failed", group[0].job.id)
            for t in group:
                t.future.set_exception(e)
        else:
            total = sum(t.job.count for t in group)
            at = 0
            for t in group:
                mine = images[at:at + t.job.count]
                at += t.job.count
                if t.stop is not None:
                    self.metrics.rejected.labels(t.stop.reason).inc()
                    t.future.set_exception(t.stop)
                    continue
                share = {k: v * t.job.count / total for k, v in stages.items()}
                wait = t.started_at - t.queued_at
                self.metrics.job_done(model, len(mine), share, wait)
                t.future.set_result(JobResult(mine, share, wait))
        finally:
            seconds = time.perf_counter() - started
            self._job_seconds = 0.8 * self._job_seconds + 0.2 * seconds / len(group)
            with self._cond:
                self._running[model] = []
                self._progress[model] = _Progress()
                self.metrics.running.set(sum(len(r) for r in self._running.values()))


def _a1111_progress(done: float, eta: float, step: int, steps: int, jobs: int, interrupted: bool,
                    ticket: Ticket | None) -> dict[str, Any]:
    return {"progress": round(done, 4), "eta_relative": round(eta, 3),
            "state": {"skipped": False, "interrupted": interrupted, "stopping_generation": False,
                      "job": ticket.job.id if ticket else "", "job_count": jobs, "job_no": 0,
                      "job_timestamp": time.strftime("%Y%m%d%H%M%S"), "sampling_step": step,
                      "sampling_steps": steps},
            "current_image": None, "textinfo": None}
