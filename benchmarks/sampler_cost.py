"""Host cost of every sampler: building its tables, and one step on full-size SD 1.5
latents (1, 4, 64, 64), median of several runs, with a constant stand-in model output.
This is the sampler's share of a step's host time (`sdrt bench` reports the whole of it).

    python benchmarks/sampler_cost.py [--steps 25] [--runs 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from sdrt.runtime.schedulers import SAMPLERS, make_sampler

SD15 = {"_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
        "beta_start": 0.00085, "num_train_timesteps": 1000, "set_alpha_to_one": False,
        "skip_prk_steps": True, "steps_offset": 1, "clip_sample": False}
SHAPE = (1, 4, 64, 64)


def measure(name: str, steps: int, runs: int) -> tuple[float, float, int]:
    """(median build seconds, median seconds per sampler call, calls per generation)."""
    builds, per_call = [], []
    rng = np.random.default_rng(0)
    x0 = rng.standard_normal(SHAPE, dtype=np.float32)
    out = 0.1 * rng.standard_normal(SHAPE, dtype=np.float32)
    noise = rng.standard_normal(SHAPE, dtype=np.float32)
    for _ in range(runs):
        t0 = time.perf_counter()
        s = make_sampler(name, SD15, steps)
        builds.append(time.perf_counter() - t0)
        x, state = x0 * np.float32(s.init_noise_sigma), s.init_state()
        t0 = time.perf_counter()
        for i in range(len(s.timesteps)):
            x = s.scale_model_input(x, i)
            x, state = s.step(state, i, x, out, noise if s.draws_noise(i) else None)
        per_call.append((time.perf_counter() - t0) / len(s.timesteps))
    return statistics.median(builds), statistics.median(per_call), len(s.timesteps)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--runs", type=int, default=5)
    args = p.parse_args()
    print(f"{'sampler':<14} {'build':>9} {'per call':>10} {'calls':>6}   ({args.steps} steps, latents {SHAPE}, "
          f"median of {args.runs})")
    for name in SAMPLERS:
        build, call, calls = measure(name, args.steps, args.runs)
        print(f"{name:<14} {build * 1e3:>7.2f}ms {call * 1e3:>8.3f}ms {calls:>6}")


if __name__ == "__main__":
    main()
