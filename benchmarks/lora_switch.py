"""What switching LoRAs costs against reloading the artifact, on a full-size model.

    python benchmarks/lora_switch.py MODEL_DIR ARTIFACT_DIR [--rank 16] [--runs 3] [--work DIR]

MODEL_DIR is the diffusers checkpoint ARTIFACT_DIR was exported from (`sdrt tiny-model
--variant sd15-full` writes one). Two random LoRAs in kohya's format, for the U-Net and
the text encoder (every attention, projection and feed-forward layer, as sd-scripts
trains them), are written for that architecture. An artifact exported before sdrt
recorded its weight map gets one (export/weightmap.py matches the checkpoint's
parameters to the graph's weights by value, what export does), so an existing
full-size export can be measured without exporting again.

Printed, medians of --runs:
- a full reload: `Pipeline.load` (hash check off, ORT's optimized-graph cache warm:
  the fastest reload there is), and the same with the hash check;
- switching: base -> A (the first one also opens the overridable sessions), A -> B,
  B -> base, and A -> A+B, each `pipe.loras.apply` (parse cached, merge, hand over);
- one U-Net call on the exported weights and with a LoRA (the overridable session,
  which ONNX Runtime cannot pre-pack): what a LoRA costs per step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from workers import _example  # noqa: E402  (sibling module: plausible inputs per spec)


def ensure_weight_map(model_dir: Path, artifact: Path) -> None:
    from sdrt.engines import weightmap
    from sdrt.engines.manifest import load_manifest
    from sdrt.export import weightmap as link
    from sdrt.export.checkpoint import load_module, open_checkpoint

    if weightmap.read(artifact) is not None:
        return
    print(f"linking {artifact}'s weights to {model_dir}'s parameters (an export before weights.json)", flush=True)
    ckpt = open_checkpoint(model_dir)
    linked = {}
    for stage in load_manifest(artifact).stages:
        if link.link_stage(stage):
            params = link.fingerprints(load_module(ckpt, stage), stage)
            linked[stage] = link.match(stage, params, link.initializer_keys(artifact / stage.onnx_file))
    weightmap.write(artifact, weightmap.WeightMap(linked))


def median_seconds(fn, runs: int) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("artifact_dir", type=Path)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--work", type=Path, default=Path("/tmp/sdrt-lora-bench"))
    args = ap.parse_args()

    from sdrt.engines.specs import Stage
    from sdrt.export.tiny_lora import make_tiny_lora
    from sdrt.runtime.loras import LoraChoice
    from sdrt.runtime.pipeline import Pipeline

    ensure_weight_map(args.model_dir, args.artifact_dir)
    args.work.mkdir(parents=True, exist_ok=True)
    files = []
    for name, seed in (("A", 1), ("B", 2)):
        path = args.work / f"lora-{name}-r{args.rank}.safetensors"
        if not path.is_file():
            print(f"writing {path}", flush=True)
            make_tiny_lora(path, variant="sd15-full", format="kohya", rank=args.rank, seed=seed)
        files.append(path)
    a, b = (LoraChoice(str(files[0]), 1.0),), (LoraChoice(str(files[1]), 0.8),)

    results = {}
    Pipeline.load(args.artifact_dir, check_hashes=False).close()   # warm the optimized-graph cache
    results["reload"] = median_seconds(lambda: Pipeline.load(args.artifact_dir, check_hashes=False).close(),
                                       args.runs)
    results["reload_hash_check"] = median_seconds(lambda: Pipeline.load(args.artifact_dir).close(), 1)
    pipe = Pipeline.load(args.artifact_dir, check_hashes=False)
    pipe.loras.read(a + b)   # parse both files once, as the first call with them does before the lock
    t0 = time.perf_counter()
    pipe.loras.apply(a)
    results["first_switch_base_to_A"] = time.perf_counter() - t0
    cycles = {"base_to_A": [], "A_to_B": [], "B_to_base": [], "base_to_A+B": []}
    for _ in range(args.runs):
        for key, target in (("A_to_B", b), ("B_to_base", ()), ("base_to_A", a)):
            t0 = time.perf_counter()
            pipe.loras.apply(target)
            cycles[key].append(time.perf_counter() - t0)
        pipe.loras.apply(())
        t0 = time.perf_counter()
        pipe.loras.apply(a + b)
        cycles["base_to_A+B"].append(time.perf_counter() - t0)
        pipe.loras.apply(a)
    results.update({k: statistics.median(v) for k, v in cycles.items()})

    unet = pipe.engines[Stage.UNET]
    rng = np.random.default_rng(0)
    inputs = {t.name: _example(t, rng) for t in unet.spec.inputs}
    pipe.loras.apply(())
    unet(inputs)
    results["unet_call_exported"] = median_seconds(lambda: unet(inputs), args.runs)
    pipe.loras.apply(a)
    unet(inputs)
    results["unet_call_with_lora"] = median_seconds(lambda: unet(inputs), args.runs)
    pipe.close()

    layers = len(pipe.loras.read(a)[0].layers)
    print(f"\nLoRA switching on {args.artifact_dir} (rank {args.rank}, {layers} layers per LoRA), "
          f"medians of {args.runs}:")
    for key, value in results.items():
        print(f"  {key:28s} {value:8.3f} s")
    print(f"  switch A->B vs reload:        {results['A_to_B'] / results['reload']:.3f}x "
          f"({results['reload'] / results['A_to_B']:.1f}x faster)")
    print(f"  U-Net call with a LoRA:       {results['unet_call_with_lora'] / results['unet_call_exported']:.3f}x "
          f"the exported weights'")
    print(json.dumps({k: round(v, 4) for k, v in results.items()}))


if __name__ == "__main__":
    main()
