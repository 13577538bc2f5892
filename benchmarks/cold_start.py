"""Cold start: from a new process to the first image, measured from outside.

The child announces "ready" (pipeline loaded) and then "done" (first image) on its
stdout; the parent stamps both lines against the clock it read just before spawning
the process, so interpreter start-up and imports are included. The child also reports
its own breakdown (imports, manifest and tokenizer, session creation, generation).

The OS page cache is warm in every measurement (the files were just read by the
previous run or the export); a cold disk adds the time to read the weights once.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from sdrt.engines.errors import ArtifactError
from sdrt.engines.files import read_json_object
from sdrt.engines.manifest import read_manifest

SDRT_CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import sdrt.runtime
t1 = time.perf_counter()
from sdrt.runtime.pipeline import Pipeline
t2 = time.perf_counter()
s = json.loads(sys.argv[1])
pipe = Pipeline.load(s["artifacts"], backend=s.get("backend", "onnxruntime"), threads=s["threads"])
t3 = time.perf_counter()
print(json.dumps({"event": "ready"}), flush=True)
pipe(s["prompt"], steps=s["steps"], guidance=s["guidance"], scheduler=s["scheduler"], seed=0)
t4 = time.perf_counter()
sessions = sum(e.load_seconds for e in pipe.engines.values())
print(json.dumps({"event": "done", "cached": [bool(getattr(e, "cached", False)) for e in pipe.engines.values()],
                  "torch_imported": "torch" in sys.modules,
                  "breakdown": {"in-process total": t4 - t0, "import sdrt.runtime": t1 - t0,
                                "import pipeline+onnxruntime": t2 - t1,
                                "manifest+tokenizer": t3 - t2 - sessions, "sessions": sessions,
                                "first generation": t4 - t3}}), flush=True)
"""

DIFFUSERS_CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import torch, diffusers
from diffusers import StableDiffusionPipeline
t1 = time.perf_counter()
s = json.loads(sys.argv[1])
torch.set_num_threads(s["threads"])
pipe = StableDiffusionPipeline.from_pretrained(s["model"], safety_checker=None, requires_safety_checker=False)
name, overrides = s["scheduler_class"]
pipe.scheduler = getattr(diffusers, name).from_config(pipe.scheduler.config, **overrides)
pipe.set_progress_bar_config(disable=True)
t2 = time.perf_counter()
print(json.dumps({"event": "ready"}), flush=True)
pipe(s["prompt"], num_inference_steps=s["steps"], guidance_scale=s["guidance"], height=s["height"], width=s["width"],
     output_type="np")
t3 = time.perf_counter()
print(json.dumps({"event": "done", "breakdown": {"in-process total": t3 - t0, "import torch+diffusers": t1 - t0,
                  "from_pretrained": t2 - t1, "first generation": t3 - t2}}), flush=True)
"""

IMPORT_CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import sdrt.runtime
t1 = time.perf_counter()
heavy = sorted(m for m in ("torch", "diffusers", "transformers", "onnxruntime", "PIL") if m in sys.modules)
print(json.dumps({"import_s": t1 - t0, "heavy_modules": heavy}))
"""


def _child(script: str, settings: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Run a child script; return the parent-side times of its ready/done lines and its report."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", script, json.dumps(settings)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    out: dict[str, Any] = {}
    try:
        for line in proc.stdout:
            now = time.perf_counter() - start
            try:
                msg = json.loads(line)
            except json.JSONDecodeError:
                continue
            if msg.get("event") == "ready":
                out["ready_s"] = now
            elif msg.get("event") == "done":
                out["first_image_s"] = now
                out.update({k: v for k, v in msg.items() if k != "event"})
                break
            if now > timeout:
                break
    finally:
        proc.kill()
        stderr = proc.stderr.read()
        proc.wait()
    if "first_image_s" not in out:
        raise RuntimeError(f"cold-start child failed:\n{stderr[-3000:]}")
    return out


def import_time(repeats: int = 7) -> dict[str, Any]:
    """`import sdrt.runtime` in fresh interpreters: median and min seconds, and which
    heavy modules it pulled in (it must pull in none)."""
    results = []
    for _ in range(repeats):
        out = subprocess.run([sys.executable, "-c", IMPORT_CHILD], capture_output=True, text=True, check=True)
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    times = [r["import_s"] for r in results]
    return {"median_s": float(np.median(times)), "min_s": min(times), "max_s": max(times), "repeats": repeats,
            "heavy_modules": results[-1]["heavy_modules"]}


def cold_start(artifacts: Path, model: Path, settings: dict[str, Any], repeats: int, progress,
               timeout: float = 1800.0, openvino: bool = False) -> dict[str, Any]:
    """sdrt with an empty ORT cache (the first load after export), sdrt with its cache
    (every later load), diffusers from the checkpoint folder, and with `openvino` sdrt's
    OpenVINO backend with its compiled-model cache warm (filled by one load first)."""
    from sdrt.runtime.schedulers import diffusers_scheduler
    base = {"prompt": settings["prompt"], "steps": settings["steps"], "guidance": settings["guidance"],
            "scheduler": settings["scheduler"], "threads": settings["threads"]}
    sdrt_s = dict(base, artifacts=str(artifacts))
    # The image size sdrt's artifacts were exported at: diffusers would otherwise draw the
    # checkpoint's native size (512x512 for the full-size model, 4x the work of 256x256).
    shape = read_manifest(artifacts).shape
    diff_s = dict(base, model=str(model), scheduler_class=diffusers_scheduler(settings["scheduler"], read_json_object(
                      artifacts / "scheduler" / "scheduler_config.json", ArtifactError, "scheduler config")),
                  height=shape.height, width=shape.width)
    out: dict[str, Any] = {}

    from sdrt.engines.onnxruntime import CACHE_DIR
    shutil.rmtree(artifacts / CACHE_DIR, ignore_errors=True)
    progress("cold start: sdrt, empty session cache")
    out["sdrt, first load after export (builds cache)"] = _child(SDRT_CHILD, sdrt_s, timeout)
    runs = []
    for i in range(repeats):
        progress(f"cold start: sdrt with cache {i + 1}/{repeats}")
        runs.append(_child(SDRT_CHILD, sdrt_s, timeout))
    out["sdrt"] = _median_run(runs)
    if openvino:
        ov = dict(sdrt_s, backend="openvino")
        progress("cold start: sdrt openvino backend, filling its cache")
        _child(SDRT_CHILD, ov, timeout)
        runs = []
        for i in range(repeats):
            progress(f"cold start: sdrt openvino backend with cache {i + 1}/{repeats}")
            runs.append(_child(SDRT_CHILD, ov, timeout))
        out["sdrt, openvino backend (cache warm)"] = _median_run(runs)
    runs = []
    for i in range(repeats):
        progress(f"cold start: diffusers {i + 1}/{repeats}")
        runs.append(_child(DIFFUSERS_CHILD, diff_s, timeout))
    out["diffusers"] = _median_run(runs)
    return out


def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median time to ready, plus every run's times."""
    ordered = sorted(runs, key=lambda r: r["ready_s"])
    chosen = dict(ordered[len(ordered) // 2])
    chosen["all_ready_s"] = [r["ready_s"] for r in runs]
    chosen["all_first_image_s"] = [r["first_image_s"] for r in runs]
    return chosen
