"""Export benchmark: the full-size SD 1.5 architecture (random weights from the
published config), all three stages with verification, on CPU.

    python benchmarks/export_full.py [--variant sd15-full|sd21-full|sdxl-full] [--size PX] [--work DIR] [--no-verify]

Prints the wall time of every export step and per stage, and the export process's
peak resident memory (the checkpoint is written by a child process first, so its
memory does not count). Goal on a 2-core machine: under 3 minutes and 8 GB for SD 1.5.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import sys
import tempfile
import time
from pathlib import Path


def _make(variant: str, folder: Path) -> None:
    from sdrt.export.tiny import make_tiny_model

    make_tiny_model(folder, variant=variant)


class _SampledProgress:
    """Export's Progress, plus the peak resident memory seen during each step
    (sampled every 20 ms by a thread; psutil is in the export extra)."""

    def __new__(cls):  # built lazily so `--help` needs no sdrt import
        import contextlib
        import threading

        import psutil

        from sdrt.engines.progress import Progress

        class Sampled(Progress):
            def __init__(self):
                super().__init__()
                self.peaks: dict[str, int] = {}
                self.current = "start"
                self._done = threading.Event()
                self._proc = psutil.Process()
                self._thread = threading.Thread(target=self._sample, daemon=True)
                self._thread.start()

            def _sample(self):
                while not self._done.wait(0.02):
                    rss = self._proc.memory_info().rss
                    self.peaks[self.current] = max(self.peaks.get(self.current, 0), rss)

            @contextlib.contextmanager
            def step(self, what):
                self.current = what
                with super().step(what):
                    yield
                self.current = "between steps"

            def stop(self):
                self._done.set()
                self._thread.join()

        return Sampled()


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="sd15-full",
                        choices=("sd15-full", "sd21-full", "sdxl-full", "sd15", "sd2", "sdxl"))
    parser.add_argument("--size", type=int, default=None, help="image side in pixels (default: the model's)")
    parser.add_argument("--work", type=Path, help="folder for the checkpoint and artifacts (kept; default: a temp folder)")
    parser.add_argument("--no-verify", dest="verify", action="store_false")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="sdrt-bench-"))
    model = work / f"model-{args.variant}"
    if not (model / "model_index.json").is_file():
        t0 = time.perf_counter()
        # In a child process so that writing the checkpoint does not count in the export's peak memory.
        child = multiprocessing.get_context("spawn").Process(target=_make, args=(args.variant, model))
        child.start()
        child.join()
        if child.exitcode != 0:
            print(f"writing the {args.variant} checkpoint failed", file=sys.stderr)
            return 1
        print(f"checkpoint written in {time.perf_counter() - t0:.1f}s: {model}", file=sys.stderr)

    from sdrt.export.config import ExportConfig
    from sdrt.export.exporter import export_artifacts

    progress = _SampledProgress()
    load_before = os.getloadavg()[0]
    cpu0 = _cpu_seconds()
    t0 = time.perf_counter()
    try:
        export_artifacts(ExportConfig(model_dir=model, out_dir=work / f"artifacts-{args.variant}",
                                      height=args.size, width=args.size, verify=args.verify, force=True), progress)
    finally:
        progress.stop()
    total = time.perf_counter() - t0
    cpu = _cpu_seconds() - cpu0
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB

    print(f"\nexport of {args.variant} ({'with' if args.verify else 'without'} verification)")
    print(f"{'step':<52}{'seconds':>9}{'peak RSS GiB':>14}")
    for step, seconds in progress.durations.items():
        print(f"{step:<52}{seconds:>9.1f}{progress.peaks.get(step, 0) / 2**30:>14.2f}")
    per_stage: dict[str, float] = {}
    for step, seconds in progress.durations.items():
        stage = step.split(":")[0]
        per_stage[stage] = per_stage.get(stage, 0.0) + seconds
    for stage, seconds in per_stage.items():
        print(f"{'total ' + stage:<52}{seconds:>9.1f}")
    print(f"{'wall time, whole export':<52}{total:>9.1f}")
    print(f"{'CPU time, whole export (user + system)':<52}{cpu:>9.1f}")
    print(f"peak RSS of the export process: {peak_gib:.2f} GiB")
    # On a shared machine wall time depends on the neighbours; the load average says how busy it was.
    print(f"load average (1 min) before / after: {load_before:.1f} / {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} CPUs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
