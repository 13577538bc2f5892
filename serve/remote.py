"""Scale-out on Celery with a Redis broker and result backend (one Redis URL for both):
`sdrt serve --queue URL` puts each job on its model's queue (`RemoteExecutor`, the
front), and `sdrt worker ART --queue URL` runs them where the engines are (`Worker`),
one job at a time.

Delivery: late acknowledgement. A worker takes one message (prefetch 1), runs the job,
stores the result and only then acknowledges. Redis cannot tell that a consumer went
away: kombu keeps each taken message in an "unacked" hash, and a periodic sweep by
any live worker puts it back on its queue once it is older than the visibility
timeout (`--visibility-timeout`, default DEFAULT_VISIBILITY_TIMEOUT_S). So the job
of a worker killed mid-generation runs on another worker, but only that long after
it was taken. The trade-off: a job still running when its message passes the
timeout is handed out a second time as well. It does not run twice (below), but the
worker that got the copy waits for the first to finish; and a job lost longer than
its request's deadline comes back when nobody waits for it. So the timeout should
exceed the longest job and stay under the front's --deadline (default 600 s). The
default, 300 s, is half that deadline and well above a GPU's job (a 50-step SDXL
image takes seconds to a minute); workers whose jobs take minutes (CPUs) need a
larger one, and a larger --deadline. A worker stopped by SIGTERM or Ctrl-C finishes
its job first (Celery's warm shutdown); a second Ctrl-C puts the job back on its
queue at once.

Exactly once: the job id is the Celery task id. A worker claims a job with a lock
key (SET NX, which lapses LIVE_S after its last renewal; a thread renews it every
HEARTBEAT_S), runs it, stores the result, then writes the job's done marker. A worker
that takes a message whose job is done acknowledges it without running it; one whose
job another live worker holds waits until that one finishes or its lock lapses. A
running job stops between steps when its done marker appears. The front answers a
request from the one result it reads, and deletes it. (A worker killed in the
milliseconds between storing a result and writing the marker lets the job run
again; its client is still answered once.)

Redis keys besides Celery's, all under "sdrt:": `active` (the jobs fronts have
accepted and not answered: the --max-queue bound), `running` and `workers:QUEUE`
(sorted sets scored by Redis's clock, so machines' clocks never meet), and per job
`lock:`, `done:`, `cancel:` (deadline, disconnect, interrupt: read by the worker
before it starts and between steps) and `job:` (the worker's progress report).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping
from urllib.parse import urlsplit

from sdrt.engines.errors import (ArtifactError, BackendUnavailable, InvalidInput, InvalidType, MissingFile,
                                 NumericsError, SdrtError)

from .executor import Executor, NotReady, QueueFull, open_models
from .jobs import Job, JobResult, Stopped, deadline_passed, items_of, run_items

log = logging.getLogger("sdrt.serve")

TASK = "sdrt.generate"
DEFAULT_VISIBILITY_TIMEOUT_S = 300.0
HEARTBEAT_S = 2.0          # a worker renews its liveness and its job's lock this often
LIVE_S = 3 * HEARTBEAT_S   # a worker or lock not renewed for this long is gone
REPORT_S = 0.1             # a running job reports its step and reads its cancel key at most this often
MARKER_TTL_S = 86_400      # done and cancel markers outlive any redelivery
RESULT_TTL_S = 3_600       # a result nobody read (its front died) expires
DEADLINE_GRACE_S = 5.0     # workers enforce a job's deadline this late: the front's clock is not theirs
ENV_URLS = ("CELERY_BROKER_URL", "CELERY_BROKER_READ_URL", "CELERY_BROKER_WRITE_URL", "CELERY_RESULT_BACKEND")
# The errors a worker's job may end with that the HTTP layer answers as the user's (422);
# any other is answered 500.
USER_ERRORS = {c.__name__: c for c in (InvalidInput, InvalidType, MissingFile, ArtifactError, NumericsError,
                                       BackendUnavailable)}


class QueueUnreachable(SdrtError, ConnectionError):
    """The queue's Redis cannot be reached."""


def check_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss") or not parts.hostname:
        raise InvalidInput(f"--queue must be a Redis URL such as redis://HOST:6379/0, got {shown_url(url)!r}")
    for name in ENV_URLS:   # Celery's settings would read these before the URL given
        if os.environ.get(name, url) != url:
            raise InvalidInput(f"the environment variable {name} names another broker than --queue; unset it")
    return url


def shown_url(url: str) -> str:
    """The URL without its password, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@")).geturl()


def queue_name(model: Any) -> str:
    """The Celery queue of a served model (executor.Model): its name and weights' hash, so a
    worker never takes jobs checked against another artifact of the same name."""
    return f"sdrt.{model.name}" + (f".{model.hash}" if model.hash else "")


def celery_app(url: str, visibility_timeout_s: float = DEFAULT_VISIBILITY_TIMEOUT_S) -> Any:
    from celery import Celery

    app = Celery("sdrt", broker=check_url(url), backend=url, set_as_current=False)
    app.conf.update(
        task_serializer="json", result_serializer="json", accept_content=["json"], result_accept_content=["json"],
        task_acks_late=True, task_reject_on_worker_lost=True, worker_prefetch_multiplier=1,
        broker_transport_options={
            "visibility_timeout": visibility_timeout_s,
            # kombu sweeps for messages past the timeout every interval x throttle seconds (100 s by default)
            "unacked_restore_interval": min(10.0, max(1.0, visibility_timeout_s / 5)),
            "unacked_restore_throttle": 1,
            "socket_connect_timeout": 5},
        broker_connection_retry_on_startup=True, broker_connection_timeout=5,
        task_publish_retry_policy={"max_retries": 2, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.5},
        redis_socket_connect_timeout=5, result_expires=RESULT_TTL_S,
        # cancel, interrupt and liveness travel by our own keys: no pidbox, events, mingle or gossip
        worker_enable_remote_control=False, worker_send_task_events=False, task_send_sent_event=False,
        worker_redirect_stdouts=False)
    return app


def redis_client(url: str) -> Any:
    import redis
    return redis.Redis.from_url(check_url(url), socket_connect_timeout=5, socket_timeout=10,
                                health_check_interval=30)


# -- the keys and the scripts that change them atomically ----------------------------------------

_NOW = "local t = redis.call('TIME') local now = t[1] .. '.' .. string.format('%06d', tonumber(t[2])) "
_ADMIT = _NOW + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[3])
local n = redis.call('ZCARD', KEYS[1])
if n >= tonumber(ARGV[4]) then return {-1, now} end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
return {n + 1, now}"""
_LIVE = _NOW + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', tonumber(now) - tonumber(ARGV[1]))
return redis.call('ZRANGE', KEYS[1], 0, -1)"""
_CLAIM = """
local done = redis.call('GET', KEYS[2])
if done then return {'done', done} end
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then return {'held', holder} end
""" + _NOW + """
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('ZADD', KEYS[4], now, ARGV[3])
redis.call('HSET', KEYS[5], 'worker', ARGV[1], 'model', ARGV[4], 'calls', ARGV[5], 'calls_done', 0,
           'step', 0, 'steps', 0, 'started', now)
redis.call('EXPIRE', KEYS[5], ARGV[6])
return {'ok', now, redis.call('GET', KEYS[3]) or ''}"""
_RENEW = _NOW + """
for i = 3, #KEYS do redis.call('ZADD', KEYS[i], now, ARGV[1]) end
if ARGV[3] == '' then return 1 end
local holder = redis.call('GET', KEYS[2])
if holder and holder ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
redis.call('ZADD', KEYS[1], now, ARGV[3])
return 1"""
_FINISH = """
redis.call('SET', KEYS[2], ARGV[1], 'EX', ARGV[3])
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
redis.call('ZREM', KEYS[3], ARGV[2])
redis.call('DEL', KEYS[4])
return 1"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1], KEYS[3])
  redis.call('ZREM', KEYS[2], ARGV[2])
end
return 1"""


def key(kind: str, name: str = "") -> str:
    return f"sdrt:{kind}:{name}" if name else f"sdrt:{kind}"


ACTIVE, RUNNING = key("active"), key("running")


class Store:
    """Our keys in Redis, shared by the front and the workers."""

    def __init__(self, client: Any):
        self.redis = client
        self._admit, self._live, self._claim, self._renew, self._finish, self._release = (
            client.register_script(s) for s in (_ADMIT, _LIVE, _CLAIM, _RENEW, _FINISH, _RELEASE))

    def admit(self, job_id: str, expires: float, limit: int) -> tuple[int, float]:
        """Count `job_id` in the bound unless `limit` jobs are; (jobs now or -1, Redis's time)."""
        n, now = self._admit(keys=[ACTIVE], args=[job_id, expires, time.time(), limit])
        return int(n), float(now)

    def live(self, key: str) -> list[str]:
        return [m.decode() for m in self._live(keys=[key], args=[LIVE_S])]

    def claim(self, job_id: str, me: str, model: str, calls: int) -> list[str]:
        return [v.decode() if isinstance(v, bytes) else str(v) for v in self._claim(
            keys=[key("lock", job_id), key("done", job_id), key("cancel", job_id), RUNNING, key("job", job_id)],
            args=[me, int(LIVE_S * 1000), job_id, model, calls, MARKER_TTL_S])]

    def renew(self, me: str, queues: list[str], job_id: str) -> bool:
        return bool(self._renew(keys=[RUNNING, key("lock", job_id)] + [key("workers", q) for q in queues],
                                args=[me, int(LIVE_S * 1000), job_id]))

    def report(self, job_id: str, step: int, steps: int, calls_done: int) -> tuple[bytes | None, bytes | None]:
        """Write a running job's progress; (its cancel record, its done marker)."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.hset(key("job", job_id), mapping={"step": step, "steps": steps, "calls_done": calls_done})
        pipe.get(key("cancel", job_id))
        pipe.get(key("done", job_id))
        _, cancel, done = pipe.execute()
        return cancel, done

    def finish(self, job_id: str, me: str) -> None:
        self._finish(keys=[key("lock", job_id), key("done", job_id), RUNNING, key("job", job_id)],
                     args=[me, job_id, MARKER_TTL_S])

    def release(self, job_id: str, me: str) -> None:
        self._release(keys=[key("lock", job_id), RUNNING, key("job", job_id)], args=[me, job_id])

    def cancel(self, job_id: str, reason: str, message: str) -> None:
        self.redis.set(key("cancel", job_id), json.dumps({"reason": reason, "message": message}), nx=True,
                       ex=MARKER_TTL_S)

    def locked(self, job_id: str) -> bool:
        return bool(self.redis.exists(key("lock", job_id)))


# -- the front ------------------------------------------------------------------------------------

@dataclass(eq=False)
class Handle:
    job: Job
    model: str
    enqueued: float               # Redis's clock
    stop: Stopped | None = None   # set by cancel: the client left or the deadline passed


class RemoteExecutor(Executor):
    """Jobs on `sdrt worker` processes through Celery; the models here are only opened."""

    def __init__(self, config, models, metrics):
        super().__init__(config, models, metrics)
        self.url = check_url(config.queue_url)
        self.queues = {name: queue_name(m) for name, m in models.items()}
        self._app = celery_app(self.url)
        self._store = Store(redis_client(self.url))
        self._handles: set[Handle] = set()
        self._lock = threading.Lock()
        self._closed = False
        self._job_seconds = 1.0   # a running mean of a job's time, for Retry-After

    def start(self) -> None:
        log.info("jobs go to Celery workers through %s (queues %s)", shown_url(self.url),
                 ", ".join(self.queues.values()))

    def close(self) -> None:
        with self._lock:
            self._closed = True
            handles = list(self._handles)
        for h in handles:
            self.cancel(h, "shutdown", "the server is shutting down")
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
            try:
                self._app.send_task(TASK, args=[job.to_json(), enqueued], task_id=job.id,
                                    queue=self.queues[model], ignore_result=True)
            except Exception as e:   # kombu's OperationalError wraps the connection's
                self._store.redis.zrem(ACTIVE, job.id)
                raise redis.RedisError(str(e)) from e
        except redis.RedisError as e:
            raise NotReady(f"the queue's Redis at {shown_url(self.url)} cannot be reached: {e}") from None
        handle = Handle(job, model, enqueued)
        with self._lock:
            self._handles.add(handle)
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
        with self._lock:
            self._handles.discard(handle)
        try:
            self._store.redis.zrem(ACTIVE, handle.job.id)
            self._app.backend.forget(handle.job.id)
        except Exception as e:   # noqa: BLE001 - both expire on their own
            log.warning("job %s: could not clear its queue records: %s", handle.job.id, e)

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


# -- the worker -----------------------------------------------------------------------------------

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

