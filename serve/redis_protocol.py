"""What the front (remote.py, `sdrt serve --queue URL`) and the workers (worker.py,
`sdrt worker ART --queue URL`) share: the Celery app and its settings, our Redis keys
and the Lua scripts that change them atomically. One Redis URL serves as Celery's
broker and result backend.

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
larger one, and a larger --deadline.

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
before it starts and between steps) and `job:` (the worker's progress report); and
the channel `finished`, on which a worker publishes a job's id once its result is
stored, so the front answers at once instead of at its next poll (a wake-up only: the
result is the truth, and an announcement lost or repeated costs a poll at most).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any
from urllib.parse import urlsplit

from sdrt.engines.errors import InvalidInput, SdrtError

TASK = "sdrt.generate"
DEFAULT_VISIBILITY_TIMEOUT_S = 300.0
HEARTBEAT_S = 2.0          # a worker renews its liveness and its job's lock this often
LIVE_S = 3 * HEARTBEAT_S   # a worker or lock not renewed for this long is gone
MARKER_TTL_S = 86_400      # done and cancel markers outlive any redelivery
RESULT_TTL_S = 3_600       # a result nobody read (its front died) expires
ENV_URLS = ("CELERY_BROKER_URL", "CELERY_BROKER_READ_URL", "CELERY_BROKER_WRITE_URL", "CELERY_RESULT_BACKEND")


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
redis.call('PUBLISH', ARGV[4], ARGV[2])
return 1"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1], KEYS[3])
  redis.call('ZREM', KEYS[2], ARGV[2])
end
return 1"""


def key(kind: str, name: str = "") -> str:
    return f"sdrt:{kind}:{name}" if name else f"sdrt:{kind}"


ACTIVE, RUNNING, FINISHED = key("active"), key("running"), key("finished")


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
        """Mark the job done (its result is stored) and announce it on FINISHED."""
        self._finish(keys=[key("lock", job_id), key("done", job_id), RUNNING, key("job", job_id)],
                     args=[me, job_id, MARKER_TTL_S, FINISHED])

    def release(self, job_id: str, me: str) -> None:
        self._release(keys=[key("lock", job_id), RUNNING, key("job", job_id)], args=[me, job_id])

    def cancel(self, job_id: str, reason: str, message: str) -> None:
        self.redis.set(key("cancel", job_id), json.dumps({"reason": reason, "message": message}), nx=True,
                       ex=MARKER_TTL_S)

    def locked(self, job_id: str) -> bool:
        return bool(self.redis.exists(key("lock", job_id)))
