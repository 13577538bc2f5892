"""What `--max-prompt-chunks K` costs: one model exported at K=1 and at K, the same
generations on both, interleaved, medians of several runs.

Prints per artifact and prompt length the text-encoder time per generation, the U-Net
time per step (median) and the whole generation, and the K-artifact / K=1 ratios; the
short prompt's pixels on both artifacts are compared (they must match).

    python benchmarks/prompt_chunks.py                          # built-in tiny SD 1.5
    python benchmarks/prompt_chunks.py --variant sd15-full --size 256 --runs 5
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import warnings
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", default="sd15", help="built-in model (sdrt tiny-model --variant), default sd15")
    ap.add_argument("--chunks", type=int, default=3, help="K of the long-prompt artifact (default 3)")
    ap.add_argument("--size", type=int, default=None, help="image side in pixels (default: the model's)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--runs", type=int, default=5, help="timed runs per case, after one warm-up")
    ap.add_argument("--workdir", type=Path, default=None, help="keep the model and artifacts here")
    args = ap.parse_args()

    from sdrt.export.config import ExportConfig
    from sdrt.export.exporter import export_artifacts
    from sdrt.export.tiny import make_tiny_model
    from sdrt.runtime import Pipeline

    work = args.workdir or Path(tempfile.mkdtemp(prefix="sdrt-chunks-"))
    model = work / f"model-{args.variant}"
    if not (model / "model_index.json").is_file():
        make_tiny_model(model, variant=args.variant)
    pipes = {}
    for k in (1, args.chunks):
        out = work / f"art-{args.variant}-{args.size}-k{k}"
        if not (out / "manifest.json").is_file():
            export_artifacts(ExportConfig(model_dir=model, out_dir=out, height=args.size, width=args.size,
                                          prompt_chunks=k, verify=False, force=True))
        pipes[k] = Pipeline.load(out)

    words = "fox tree snow river house cloud stone bird grass moon lake hill".split()
    prompts = {"short (1 chunk)": "a watercolor fox, highly detailed",
               f"long ({args.chunks} chunks)": " ".join(words[i % 12] for i in range(75 * args.chunks - 5))}
    rows = {}
    for label, prompt in prompts.items():
        for k, pipe in pipes.items():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")   # the long prompt is cut on the K=1 artifact
                pipe(prompt, steps=args.steps, seed=0)   # warm-up
        samples = {k: [] for k in pipes}
        for _ in range(args.runs):
            for k, pipe in pipes.items():       # interleaved, so drift hits both alike
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    samples[k].append(pipe(prompt, steps=args.steps, seed=0))
        for k, results in samples.items():
            rows[(label, k)] = (statistics.median(r.timings.text_encoder for r in results),
                                statistics.median(r.timings.unet_median for r in results),
                                statistics.median(r.timings.total for r in results))
        if label.startswith("short"):
            diff = float(np.abs(samples[1][0].pixels - samples[args.chunks][0].pixels).max())
            print(f"short prompt, K=1 vs K={args.chunks}: max |pixel diff| {diff:.3g}")

    size = pipes[1].width
    print(f"\n{args.variant} {size}x{size}, {args.steps} steps, medians of {args.runs} runs")
    print(f"{'prompt':<18} {'K':>2} {'text enc ms':>12} {'U-Net/step ms':>14} {'total ms':>10} {'total vs K=1':>13}")
    for label in prompts:
        base = rows[(label, 1)][2]
        for k in pipes:
            text, unet, total = rows[(label, k)]
            print(f"{label:<18} {k:>2} {text * 1e3:>12.1f} {unet * 1e3:>14.1f} {total * 1e3:>10.1f} "
                  f"{total / base:>12.2f}x")


if __name__ == "__main__":
    main()
