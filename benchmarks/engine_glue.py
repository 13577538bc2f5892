"""What sdrt's engine layer costs on top of the backend's own call, per stage.

    python benchmarks/engine_glue.py ARTIFACT_DIR [--backend openvino] [--runs 7] [--threads N]

For every stage of the artifact, the same compiled model is called two ways, in
alternation: through sdrt's engine (`Engine.__call__`: the input check, the call,
the output copies) and through the backend's own API with nothing around it (an
OpenVINO infer request on the same compiled model; an ONNX Runtime `session.run`).
Medians of `--runs` calls each, on the manifest's input shapes. Same compiled model,
same settings, same process: the difference is sdrt's glue, and nothing else.

The side-by-side suite compares whole processes (sdrt's OpenVINO backend against
OpenVINO reading the ONNX in another process), where run-to-run drift on a shared
2-core machine is +-10 %; this isolates the part sdrt adds.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from workers import _example  # noqa: E402  (sibling module: plausible inputs per spec)


def direct_call(backend: str, engine: Any) -> Callable[[dict[str, np.ndarray]], Any]:
    """The backend's own call on the engine's compiled model, with nothing around it."""
    if backend == "openvino":
        request = engine.compiled.create_infer_request()
        return request.infer
    if backend == "onnxruntime":
        names = [t.name for t in engine.spec.outputs]
        return lambda inputs: engine.session.run(names, inputs)
    raise SystemExit(f"engine_glue: no direct call for the {backend} backend")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("artifact_dir", type=Path)
    p.add_argument("--backend", default="openvino", choices=["openvino", "onnxruntime"])
    p.add_argument("--runs", type=int, default=7)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)

    from sdrt.runtime.pipeline import Pipeline
    options = {"threads": args.threads} if args.threads else {}
    pipe = Pipeline.load(args.artifact_dir, backend=args.backend, **options)
    rng = np.random.default_rng(0)
    print(f"{args.artifact_dir} on {pipe.backend}, {args.runs} alternating calls per way")
    print(f"{'stage':<14}{'sdrt engine ms':>16}{'direct ms':>12}{'direct/sdrt':>13}{'glue ms':>10}")
    for stage, engine in pipe.engines.items():
        inputs = {t.name: _example(t, rng) for t in engine.spec.inputs}
        direct = direct_call(pipe.backend, engine)
        engine(inputs)   # first calls: allocation, kernel selection
        direct(inputs)
        ours, theirs = [], []
        for _ in range(args.runs):
            t0 = time.perf_counter()
            engine(inputs)
            t1 = time.perf_counter()
            direct(inputs)
            t2 = time.perf_counter()
            ours.append(t1 - t0)
            theirs.append(t2 - t1)
        a, b = statistics.median(ours), statistics.median(theirs)
        print(f"{stage.value:<14}{a * 1e3:>16.2f}{b * 1e3:>12.2f}{b / a:>12.3f}x{(a - b) * 1e3:>10.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
