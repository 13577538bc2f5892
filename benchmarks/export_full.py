"""Export benchmark: the full-size SD 1.5 architecture (random weights from the
published config), all three stages with verification, on CPU.

    python benchmarks/export_full.py [--variant sd15-full|sd21-full] [--work DIR] [--no-verify]

Prints the wall time of every export step and per stage, and the export process's
peak resident memory (the checkpoint is written by a child process first, so its
memory does not count). Goal on a 2-core machine: under 3 minutes and 8 GB for SD 1.5.
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import sys
import tempfile
import time
from pathlib import Path


def _make(variant: str, folder: Path) -> None:
    from sdrt.export.tiny import make_tiny_model

    make_tiny_model(folder, variant=variant)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="sd15-full", choices=("sd15-full", "sd21-full", "sd15", "sd2"))
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
    from sdrt.export.progress import Progress

    progress = Progress()
    t0 = time.perf_counter()
    export_artifacts(ExportConfig(model_dir=model, out_dir=work / f"artifacts-{args.variant}",
                                  verify=args.verify, force=True), progress)
    total = time.perf_counter() - t0
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB

    print(f"\nexport of {args.variant} ({'with' if args.verify else 'without'} verification)")
    print(f"{'step':<52}{'seconds':>9}")
    for step, seconds in progress.durations.items():
        print(f"{step:<52}{seconds:>9.1f}")
    per_stage: dict[str, float] = {}
    for step, seconds in progress.durations.items():
        stage = step.split(":")[0]
        per_stage[stage] = per_stage.get(stage, 0.0) + seconds
    for stage, seconds in per_stage.items():
        print(f"{'total ' + stage:<52}{seconds:>9.1f}")
    print(f"{'wall time, whole export':<52}{total:>9.1f}")
    print(f"peak RSS of the export process: {peak_gib:.2f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
