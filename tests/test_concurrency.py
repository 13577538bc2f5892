"""One Pipeline shared by 8 threads: each caller gets its own image, bit-identical
to a serial run with the same settings.

What the pipeline guarantees (runtime/pipeline.py): calls on one Pipeline are
serialised by a lock around the generation (engines use every core for one call, so
overlapping calls would not be faster); input validation runs before the lock, so a
bad call fails at once without waiting, and a failing call releases the lock.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from sdrt.engines.errors import InvalidInput, SdrtError
from sdrt.runtime.pipeline import Pipeline

THREADS = 8
STEPS = 3


@pytest.fixture(scope="module")
def pipe(sd15_artifacts):
    with Pipeline.load(sd15_artifacts) as p:
        yield p


def _jobs(pipe):
    # Mixed prompts, seeds and samplers, stochastic ones included (their noise comes
    # from each call's own generator, never from shared state).
    names = [s for s in ("euler_a", "ddim", "dpmpp_2m", "euler", "pndm", "lcm") if s in pipe.schedulers]
    return [dict(prompt=f"a fox number {i}", negative_prompt="blurry" if i % 2 else None, steps=STEPS,
                 guidance=1.0 + i, scheduler=names[i % len(names)], seed=1000 + i) for i in range(THREADS)]


def test_eight_threads_each_get_the_serial_result_for_their_seed(pipe):
    jobs = _jobs(pipe)
    serial = [pipe(**job).pixels for job in jobs]
    barrier = threading.Barrier(THREADS)

    def run(job):
        barrier.wait()   # start together
        return pipe(**job).pixels

    with ThreadPoolExecutor(THREADS) as pool:
        concurrent = list(pool.map(run, jobs))
    for job, want, got in zip(jobs, serial, concurrent):
        assert np.array_equal(want, got), f"thread with seed {job['seed']} got another image"
    # The jobs differ, so equal outputs cannot come from every thread getting the same image.
    assert len({p.tobytes() for p in concurrent}) == THREADS


def test_calls_are_serialised_not_interleaved(pipe):
    events = []
    barrier = threading.Barrier(THREADS)

    def run(job):
        barrier.wait()
        pipe(**job, on_step=lambda i, n, s=job["seed"]: events.append(s))

    with ThreadPoolExecutor(THREADS) as pool:
        list(pool.map(run, _jobs(pipe)))
    # Each call's steps form one unbroken run in the global order of step callbacks.
    runs = [s for k, s in enumerate(events) if k == 0 or events[k - 1] != s]
    # (PNDM makes one more U-Net call than steps, so count runs, not events.)
    assert len(runs) == THREADS and len(set(runs)) == THREADS, runs


def test_bad_and_failing_calls_do_not_disturb_the_others(pipe):
    jobs = _jobs(pipe)
    serial = {job["seed"]: pipe(**job).pixels for job in jobs[:4]}
    bad = [dict(prompt="x", steps=0), dict(prompt="x", scheduler="nope"), dict(prompt=3), dict(prompt="x", seed=-1)]
    barrier = threading.Barrier(len(jobs[:4]) + len(bad))

    def run(job):
        barrier.wait()
        try:
            return pipe(**job).pixels
        except SdrtError as e:
            return e

    with ThreadPoolExecutor(len(jobs[:4]) + len(bad)) as pool:
        results = list(pool.map(run, jobs[:4] + bad))
    for job, got in zip(jobs[:4], results[:4]):
        assert np.array_equal(serial[job["seed"]], got)
    assert all(isinstance(r, SdrtError) for r in results[4:])
    assert isinstance(results[4], InvalidInput)
    # The lock was released by every failing call: a further call completes.
    assert np.array_equal(pipe(**jobs[0]).pixels, serial[jobs[0]["seed"]])


@pytest.mark.slow
def test_500_generations_in_one_process_stop_growing_after_warm_up(tmp_path):
    """Long life (benchmarks/soak.py): resident memory at the end within 5% of the
    figure after 50 warm-up generations."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "soak.py"
    report = tmp_path / "soak.json"
    subprocess.run([sys.executable, str(script), "--generations", "500", "--warmup", "50", "--json", str(report)],
                   check=True, timeout=1800)
    figures = json.loads(report.read_text())
    assert figures["growth_after_warmup_percent"] < 5.0, figures
