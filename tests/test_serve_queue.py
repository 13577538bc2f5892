"""`sdrt serve --queue redis://...` with `sdrt worker`s, as users run them: Debian's
redis-server, a front and two workers as subprocesses, all on 127.0.0.1 with the
network guard on (serve_netguard.py), on the tiny SD 1.5 artifact.

The workers run with a 5 s visibility timeout (jobs here take about 1 s), so the job of
a worker killed mid-generation comes back within seconds; the default is minutes.
"""

from __future__ import annotations

import base64
import contextlib
import io
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import httpx
import numpy as np
import pytest
from PIL import Image

from serve_helpers import Server, assert_loopback_only, free_port, guarded_env, start_server

redis = pytest.importorskip("redis", reason="redis-py is not installed (the serve extra)")
pytest.importorskip("celery", reason="celery is not installed (the serve extra)")

from sdrt.serve.redis_protocol import ENV_URLS, FINISHED, RUNNING, key   # noqa: E402

REDIS_SERVER = Path("/usr/bin/redis-server")
VISIBILITY_S = 5
MAX_QUEUE = 4
STEPS = 80          # about 1 s a job on two cores shared by two workers
PROMPT = "a lighthouse on a cliff"


def _env() -> dict[str, str]:
    env = guarded_env()
    for name in ENV_URLS:   # only the URL on the command line
        env.pop(name, None)
    return env


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory) -> Iterator[str]:
    if not REDIS_SERVER.exists():
        pytest.skip(f"{REDIS_SERVER} is missing (Debian package redis-server)")
    port = free_port()
    folder = tmp_path_factory.mktemp("redis")
    with open(folder / "redis.log", "w") as out:
        proc = subprocess.Popen([str(REDIS_SERVER), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                 "--appendonly", "no", "--dir", str(folder)], stdout=out, stderr=subprocess.STDOUT)
    try:
        client = redis.Redis(host="127.0.0.1", port=port)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"redis-server did not start:\n{(folder / 'redis.log').read_text()}")
                time.sleep(0.05)
        client.close()
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.kill()
        proc.wait()


@dataclass
class Worker:
    proc: subprocess.Popen
    log: Path

    @property
    def name_prefix(self) -> str:
        return f"sdrt.{self.proc.pid}@"

    def text(self) -> str:
        return self.log.read_text()


@contextlib.contextmanager
def worker(artifacts: Path, url: str) -> Iterator[Worker]:
    log = Path(tempfile.mkstemp(prefix="sdrt-worker-", suffix=".log")[1])
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "sdrt.cli.main", "worker", str(artifacts), "--queue", url,
                                 "--visibility-timeout", str(VISIBILITY_S)],
                                stdout=out, stderr=subprocess.STDOUT, env=_env())
    try:
        yield Worker(proc, log)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@dataclass
class Cluster:
    front: Server
    workers: list[Worker]
    db: Any   # a redis-py client of the queue's Redis


@pytest.fixture(scope="module")
def cluster(sd15_artifacts, redis_url) -> Iterator[Cluster]:
    with contextlib.ExitStack() as stack:
        workers = [stack.enter_context(worker(sd15_artifacts, redis_url)) for _ in range(2)]
        front = stack.enter_context(start_server([sd15_artifacts], "--queue", redis_url, "--max-queue",
                                                 str(MAX_QUEUE), env=_env()))
        db = redis.Redis.from_url(redis_url)
        stack.callback(db.close)
        _wait(lambda: all(_registered(db, w) for w in workers), 60, "both workers to register")
        yield Cluster(front, workers, db)
    assert_loopback_only()


@pytest.fixture(scope="module")
def reference(sd15_artifacts):
    from sdrt.runtime.pipeline import Pipeline

    pipe = Pipeline.load(sd15_artifacts)
    cache: dict[tuple[int, int], np.ndarray] = {}

    def pixels(seed: int, steps: int = STEPS) -> np.ndarray:
        if (seed, steps) not in cache:
            cache[seed, steps] = np.asarray(pipe(PROMPT, steps=steps, seed=seed, scheduler="Euler a").images[0])
        return cache[seed, steps]

    yield pixels
    pipe.close()


def _wait(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _registered(db, w: Worker) -> bool:
    return any(m.decode().startswith(w.name_prefix) for k in db.keys(key("workers", "*")) for m in db.zrange(k, 0, -1))


def _txt2img(url: str, seed: int, steps: int = STEPS) -> httpx.Response:
    return httpx.post(f"{url}/sdapi/v1/txt2img", timeout=120,
                      json={"prompt": PROMPT, "steps": steps, "seed": seed, "sampler_name": "Euler a"})


def _pixels(response: httpx.Response) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(response.json()["images"][0]))).convert("RGB"))


def _concurrently(url: str, seeds: list[int]) -> tuple[list[threading.Thread], dict[int, httpx.Response]]:
    answers: dict[int, httpx.Response] = {}

    def post(seed: int) -> None:
        answers[seed] = _txt2img(url, seed)

    threads = [threading.Thread(target=post, args=(s,)) for s in seeds]
    for t in threads:
        t.start()
    return threads, answers


def _log_events(workers: list[Worker], event: str) -> list[tuple[str, str]]:
    """(job id, worker log line) for each `job ID <event>` line of the workers' logs."""
    return [(m.group(1), line) for w in workers for line in w.text().splitlines()
            if (m := re.search(rf"job (\S+) {event}\b", line))]


def _running_job(db, workers: list[Worker], min_step: int) -> tuple[str, Worker] | None:
    for job_id in (m.decode() for m in db.zrange(RUNNING, 0, -1)):
        report = {k.decode(): v.decode() for k, v in db.hgetall(key("job", job_id)).items()}
        if int(report.get("step", 0)) >= min_step:
            for w in workers:
                if report.get("worker", "").startswith(w.name_prefix) and w.proc.poll() is None:
                    return job_id, w
    return None


# -- the tests ------------------------------------------------------------------------------------

def test_queue_mode_gives_the_pixels_of_in_process_generation(cluster, reference):
    response = _txt2img(cluster.front.url, 11, steps=20)
    assert response.status_code == 200, response.text
    assert np.array_equal(_pixels(response), reference(11, 20))
    assert httpx.get(f"{cluster.front.url}/sdapi/v1/progress").json()["state"]["job_count"] == 0


def test_a_worker_announces_each_finished_job_once_its_result_is_stored(cluster):
    # the front's wake-up (remote.py): the id of a job whose done marker is written, once
    pubsub = cluster.db.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(FINISHED)
    try:
        assert _txt2img(cluster.front.url, 12, steps=4).status_code == 200
        announced: list[str] = []
        deadline = time.monotonic() + 1   # the announcement came before the answer; wait for any second one
        while time.monotonic() < deadline:
            if (m := pubsub.get_message(timeout=0.1)) is not None:
                announced.append(m["data"].decode())
    finally:
        pubsub.close()
    assert len(announced) == 1 and cluster.db.exists(key("done", announced[0])), announced


def test_a_full_queue_answers_429_with_retry_after(cluster):
    seeds = list(range(100, 100 + MAX_QUEUE + 2))
    threads, answers = _concurrently(cluster.front.url, seeds)
    for t in threads:
        t.join(timeout=120)
    codes = sorted(r.status_code for r in answers.values())
    assert codes == [200] * MAX_QUEUE + [429] * 2, [r.text[:200] for r in answers.values()]
    assert all(int(r.headers["Retry-After"]) >= 1 for r in answers.values() if r.status_code == 429)
    assert cluster.db.zcard(key("active")) == 0, "answered jobs still count against --max-queue"


def test_a_job_whose_worker_is_killed_mid_generation_completes_once_on_the_other(cluster, reference):
    live = [w for w in cluster.workers if w.proc.poll() is None]
    assert len(live) == 2
    seen = {job_id for job_id, _ in _log_events(live, "started")}
    seeds = [200, 201, 202, 203]
    threads, answers = _concurrently(cluster.front.url, seeds)

    found: list[tuple[str, Worker]] = []
    _wait(lambda: found.append(_running_job(cluster.db, live, min_step=10)) or found[-1] is not None, 30,
          "a job at step 10")
    killed_job, victim = found[-1]
    victim.proc.send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    victim.proc.wait()
    _wait(lambda: cluster.db.exists(key("done", killed_job)), 60, f"job {killed_job} to be done by another worker")
    redelivered_in = time.monotonic() - killed_at
    for t in threads:
        t.join(timeout=120)

    # every request answered 200, once, with the pixels of in-process generation
    assert sorted(answers) == seeds
    assert all(r.status_code == 200 for r in answers.values()), [r.text[:200] for r in answers.values()]
    for seed, r in answers.items():
        assert np.array_equal(_pixels(r), reference(seed)), f"seed {seed}: not the in-process pixels"

    # every job completed exactly once; the killed worker's job by the survivor, redelivered
    survivor = next(w for w in live if w is not victim)
    done = [(j, line) for j, line in _log_events(live, "done") if j not in seen]
    jobs = {j for j, _ in _log_events(live, "started")} - seen
    assert len(jobs) == len(seeds) and killed_job in jobs
    assert sorted(j for j, _ in done) == sorted(jobs), f"completions per job: {done}"
    assert any(j == killed_job for j, _ in _log_events([survivor], "done"))
    assert any(j == killed_job and "(redelivered)" in line for j, line in _log_events([survivor], "started"))
    assert cluster.db.get(key("done", killed_job)).decode().startswith(survivor.name_prefix)
    # nothing left behind: no lock, nothing counted against --max-queue, no unread result
    assert not cluster.db.keys(key("lock", "*"))
    assert cluster.db.zcard(key("active")) == 0
    assert not cluster.db.keys("celery-task-meta-*")
    print(f"\njob {killed_job}: worker pid {victim.proc.pid} SIGKILLed at step >= 10; completed by pid "
          f"{survivor.proc.pid} {redelivered_in:.1f} s later")


def test_interrupt_stops_the_running_job_between_steps_and_progress_shows_it(cluster):
    answers: dict[str, httpx.Response] = {}
    thread = threading.Thread(target=lambda: answers.update(job=_txt2img(cluster.front.url, 400, steps=1000)))
    thread.start()   # 1000 steps: 10 s and more unless stopped
    progress: dict[str, Any] = {}

    def running() -> bool:
        progress.update(httpx.get(f"{cluster.front.url}/sdapi/v1/progress").json())
        return progress["state"]["sampling_step"] > 0
    _wait(running, 30, "progress from the worker")
    assert progress["state"]["job"].startswith("task(") and progress["state"]["job_count"] == 1
    assert 0 < progress["progress"] < 1
    stopped_at = time.monotonic()
    assert httpx.post(f"{cluster.front.url}/sdapi/v1/interrupt").json() == {"interrupted": 1}
    thread.join(timeout=30)
    assert answers["job"].status_code == 409, answers["job"].text
    assert time.monotonic() - stopped_at < 5, "the 1000-step job was not stopped between steps"
    assert progress["state"]["job"] in {j for j, line in _log_events(cluster.workers, "ended")
                                        if "interrupted" in line}


def test_a_client_that_leaves_stops_its_job_on_the_worker(cluster):
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{cluster.front.url}/sdapi/v1/txt2img", timeout=1.5,
                   json={"prompt": PROMPT, "steps": 1000, "seed": 500, "sampler_name": "Euler a"})
    _wait(lambda: any("disconnected" in line for _, line in _log_events(cluster.workers, "ended")), 30,
          "the worker to stop the job of the client that left")
    _wait(lambda: cluster.db.zcard(key("active")) == 0, 10, "the job to leave the --max-queue count")


def test_sigterm_lets_a_worker_finish_its_job_then_exit(cluster, sd15_artifacts, redis_url, reference):
    with worker(sd15_artifacts, redis_url) as extra:
        _wait(lambda: _registered(cluster.db, extra), 60, "the extra worker to register")
        busy = [w for w in cluster.workers + [extra] if w.proc.poll() is None]
        threads, answers = _concurrently(cluster.front.url, [300, 301][:len(busy)])
        found: list[Any] = []
        _wait(lambda: found.append(_running_job(cluster.db, [extra], min_step=5)) or found[-1] is not None, 30,
              "the extra worker to run a job")
        job_id, _ = found[-1]
        extra.proc.send_signal(signal.SIGTERM)
        assert extra.proc.wait(timeout=60) == 0, extra.text()
        for t in threads:
            t.join(timeout=120)
        assert all(r.status_code == 200 for r in answers.values()), [r.text[:200] for r in answers.values()]
        assert any(j == job_id for j, _ in _log_events([extra], "done")), extra.text()
        assert not _registered(cluster.db, extra), "a worker that stopped still counts as live"
        for seed, r in answers.items():
            assert np.array_equal(_pixels(r), reference(seed))


def test_worker_says_in_one_line_when_redis_cannot_be_reached(sd15_artifacts):
    result = subprocess.run([sys.executable, "-m", "sdrt.cli.main", "worker", str(sd15_artifacts), "--queue",
                             f"redis://127.0.0.1:{free_port()}/0"], capture_output=True, text=True, env=_env(),
                            timeout=60)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot reach the queue's Redis at redis://127.0.0.1:" in lines[0], result.stderr


def test_worker_help_states_the_default_visibility_timeout():
    from sdrt.cli.worker import VISIBILITY_TIMEOUT_S
    from sdrt.serve.redis_protocol import DEFAULT_VISIBILITY_TIMEOUT_S

    assert VISIBILITY_TIMEOUT_S == DEFAULT_VISIBILITY_TIMEOUT_S
