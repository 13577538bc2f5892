"""Long life: many generations in one process, resident memory after warm-up vs end.

An embedded runtime that leaks a little per call (a growing cache, arrays kept by a
closure, ORT arenas that never settle) dies after days. This runs N generations on
one Pipeline (the built-in tiny SD 1.5 model unless --artifacts is given), cycling
prompts, seeds, schedulers and step counts as a real service would, and samples the
process's resident set size (RSS) as it goes:

    python benchmarks/soak.py [--generations 500] [--warmup 50] [--steps 4] [--json FILE]

The figure that matters is the growth from the end of warm-up to the end; the
sampled curve shows whether it is still climbing. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from sdrt.engines.progress import Progress

PROMPTS = ("a watercolor fox", "a red bicycle in the rain", "portrait of an astronaut, 35mm", "",
           "a bowl of soup " * 20)   # the last one is truncated to 77 tokens
SCHEDULERS = ("pndm", "ddim", "euler_a", "dpmpp_2m", "euler", "lcm")


def rss_bytes() -> int:
    """Current resident set size, from /proc (Linux) or psutil elsewhere."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import psutil
        return psutil.Process().memory_info().rss


def _built_in_artifacts(where: Path, progress: Progress) -> Path:
    """Make and export the tiny model in child processes, so torch never enters this
    one: the RSS measured is the runtime's, as a service runs it."""
    import subprocess

    progress(f"making the built-in tiny SD 1.5 model and exporting it in {where}")
    cli = [sys.executable, "-m", "sdrt.cli.main"]
    subprocess.run(cli + ["tiny-model", str(where / "model")], check=True, stdout=subprocess.DEVNULL)
    subprocess.run(cli + ["export", str(where / "model"), "--out", str(where / "artifacts"), "--no-verify"],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return where / "artifacts"


def soak(artifacts: Path, generations: int, warmup: int, steps: int, sample_every: int, progress: Progress) -> dict:
    from sdrt.runtime.pipeline import Pipeline

    pipe = Pipeline.load(artifacts)
    schedulers = [s for s in SCHEDULERS if s in pipe.schedulers]
    samples: list[tuple[int, int]] = [(0, rss_bytes())]
    warm_rss = None
    t0 = time.perf_counter()
    for i in range(1, generations + 1):
        result = pipe(PROMPTS[i % len(PROMPTS)], negative_prompt="blurry" if i % 3 == 0 else None,
                      steps=steps + i % 3, guidance=1.0 + (i % 8), scheduler=schedulers[i % len(schedulers)],
                      seed=i)
        del result
        if i == warmup:
            warm_rss = rss_bytes()
            samples.append((i, warm_rss))
            progress(f"generation {i}: warm-up done, RSS {warm_rss / 2**20:.1f} MiB")
        elif i % sample_every == 0 or i == generations:
            samples.append((i, rss_bytes()))
            progress(f"generation {i}/{generations}: RSS {samples[-1][1] / 2**20:.1f} MiB")
    elapsed = time.perf_counter() - t0
    pipe.close()
    end_rss = samples[-1][1]
    after = [r for i, r in samples if i >= warmup]
    return {
        "generations": generations,
        "warmup": warmup,
        "steps": f"{steps}..{steps + 2}",
        "schedulers": schedulers,
        "seconds": round(elapsed, 1),
        "rss_start_mib": round(samples[0][1] / 2**20, 1),
        "rss_after_warmup_mib": round(warm_rss / 2**20, 1),
        "rss_end_mib": round(end_rss / 2**20, 1),
        "rss_max_after_warmup_mib": round(max(after) / 2**20, 1),
        "growth_after_warmup_percent": round(100.0 * (end_rss - warm_rss) / warm_rss, 2),
        "samples": [{"generation": i, "rss_mib": round(r / 2**20, 1)} for i, r in samples],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--artifacts", type=Path, help="artifact folder (default: export the built-in tiny model)")
    p.add_argument("--generations", type=int, default=500)
    p.add_argument("--warmup", type=int, default=50, help="generations before the reference RSS (default 50)")
    p.add_argument("--steps", type=int, default=4, help="steps per generation (cycles steps..steps+2)")
    p.add_argument("--sample-every", type=int, default=25)
    p.add_argument("--json", type=Path, help="also write the figures to this file")
    args = p.parse_args(argv)
    if not 1 <= args.warmup < args.generations:
        p.error(f"--warmup must be from 1 to --generations - 1, got {args.warmup}")
    progress = Progress()
    with tempfile.TemporaryDirectory(prefix="sdrt-soak-") as tmp:
        artifacts = args.artifacts or _built_in_artifacts(Path(tmp), progress)
        report = soak(artifacts, args.generations, args.warmup, args.steps, args.sample_every, progress)
    print(f"generations:            {report['generations']} ({report['seconds']} s, steps {report['steps']}, "
          f"schedulers {', '.join(report['schedulers'])})")
    print(f"RSS at start:           {report['rss_start_mib']} MiB")
    print(f"RSS after warm-up ({report['warmup']}):  {report['rss_after_warmup_mib']} MiB")
    print(f"RSS at the end:         {report['rss_end_mib']} MiB (max after warm-up {report['rss_max_after_warmup_mib']} MiB)")
    print(f"growth after warm-up:   {report['growth_after_warmup_percent']:+.2f} %")
    if args.json:
        from sdrt.engines.files import atomic_write_json
        atomic_write_json(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
