"""sdrt against diffusers (and OpenVINO on CPU), on the same weights, side by side.

    python benchmarks/side_by_side.py [--cases builtin,full,cold,gpu] [--out bench-out]

Every case runs sdrt and diffusers on the same checkpoint (sdrt on the folder exported
from it), prompt, scheduler, steps, resolution, device, thread count and initial
latents. Each framework lives in its own worker process (benchmarks/workers.py); the
runs alternate between them, with the order rotated every round, so slow stretches
of a shared machine hit all of them alike. On CPU, OpenVINO compiles sdrt's own
exported ONNX (static shapes, latency hint) and times the same stages.

Cases:
  builtin  the built-in SD 1.5 look-alike, 25 steps: runtime overhead dominates;
  full     the full-size SD 1.5 architecture (random weights) at 256x256, 20 steps; sdrt on
           ONNX Runtime and on its OpenVINO backend, and with DeepCache at intervals 2, 3, 5
           (image PSNR against sdrt's exact image);
  cold     new process to first image, both models (sdrt's OpenVINO backend too, its cache
           warm); `import sdrt.runtime` time;
  gpu      full size at 512x512, 50 steps, fp16 (needs a CUDA GPU; TensorRT if installed);
  sdxl     the built-in tiny SDXL, 25 steps, against StableDiffusionXLPipeline;
  sdxl-full  the full-size SDXL 1.0 architecture (random weights) at 512x512, 4 steps;
  sdxl-turbo the tiny SDXL exported --no-cfg, 1 step at guidance 0 (SDXL-Turbo's recipe).

Writes <out>/side_by_side.json (every figure, machine, versions, settings),
<out>/side_by_side.md (tables) and <out>/side_by_side.png (per-stage breakdown).
Models and exports are made once under --work (default /tmp/sdrt-bench) and reused.
Needs the `bench` and `export` extras (openvino, matplotlib; torch, diffusers).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import report as rep  # noqa: E402  (sibling module; benchmarks/ is not a package)
from cold_start import cold_start, import_time  # noqa: E402

from sdrt.engines.errors import AlreadyExists, InvalidInput  # noqa: E402
from sdrt.engines.files import atomic_path, atomic_write_json, atomic_write_text  # noqa: E402
from sdrt.engines.manifest import read_manifest  # noqa: E402
from sdrt.engines.progress import Progress  # noqa: E402
from sdrt.engines.specs import LATENT, Stage  # noqa: E402
from sdrt.runtime.bench import DEFAULT_PROMPT, machine_info, package_versions  # noqa: E402

CASES = ("builtin", "full", "cold", "gpu", "sdxl", "sdxl-full", "sdxl-turbo")
OUTPUT_NAMES = ("side_by_side.json", "side_by_side.md", "side_by_side.png")


@dataclass(frozen=True)
class Case:
    title: str
    variant: str               # sdrt.export.tiny variant
    height: int | None         # None: the model's native size
    width: int | None
    steps: int
    runs: int
    warmup: int
    frameworks: tuple[str, ...]
    device: str = "cpu"
    precision: str = "fp32"
    backend: str = "onnxruntime"
    cfg: bool = True                   # exported with CFG
    guidance: float | None = None      # None: the suite's (7.5)
    deepcache: bool = False            # exported with DeepCache's shallow U-Net (for sdrt_dcN)


def default_cases(runs: int | None, warmup: int | None, openvino_bf16: bool = False) -> dict[str, Case]:
    cases = {
        "builtin": Case("built-in model (runtime overhead)", "sd15", None, None, 25, 20, 3,
                        ("sdrt", "diffusers", "openvino")),
        # sdrt_openvino: sdrt's OpenVINO backend; sdrt_dcN: DeepCache at interval N.
        "full": Case("full-size SD 1.5 architecture", "sd15-full", 256, 256, 20, 3, 1,
                     ("sdrt", "sdrt_openvino", "diffusers", "openvino", "sdrt_dc2", "sdrt_dc3", "sdrt_dc5"),
                     deepcache=True),
        "gpu": Case("full-size SD 1.5 on the GPU, fp16", "sd15-full", 512, 512, 50, 5, 1,
                    ("sdrt", "diffusers"), device="cuda", precision="fp16",
                    backend="tensorrt" if _has("tensorrt") else "onnxruntime"),
        # SDXL: OpenVINO here times sdrt's SD engines only (one text encoder), so it sits out.
        "sdxl": Case("built-in tiny SDXL", "sdxl", None, None, 25, 20, 3, ("sdrt", "diffusers"), guidance=5.0),
        # ~20 s per CFG U-Net step on 2 cores: few steps and runs keep the case near 10 minutes.
        "sdxl-full": Case("full-size SDXL 1.0 architecture", "sdxl-full", 512, 512, 4, 2, 1, ("sdrt", "diffusers"),
                          guidance=5.0),
        "sdxl-turbo": Case("SDXL-Turbo-style: tiny SDXL, no CFG, 1 step", "sdxl", None, None, 1, 20, 3,
                           ("sdrt", "diffusers"), cfg=False, guidance=0.0),
    }
    extra = ("openvino_bf16",) if openvino_bf16 else ()
    return {k: replace(c, runs=runs or c.runs, warmup=c.warmup if warmup is None else warmup,
                       frameworks=c.frameworks + (extra if "openvino" in c.frameworks else ()))
            for k, c in cases.items()}


def _has(module: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(module) is not None


def _gpu_available() -> bool:
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20)
        return out.returncode == 0 and "GPU" in out.stdout
    except (OSError, subprocess.TimeoutExpired):
        return False


# ---------------------------------------------------------------------------------
# Models and artifacts, made once


def prepare(case: Case, work: Path, progress) -> tuple[Path, Path]:
    """The diffusers checkpoint folder and the sdrt artifact folder exported from it."""
    model = work / "models" / case.variant
    if not (model / "model_index.json").is_file():
        from sdrt.export.tiny import make_tiny_model
        progress(f"making the {case.variant} checkpoint in {model}")
        make_tiny_model(model, variant=case.variant)
    size = f"{case.width}x{case.height}" if case.height else "native"
    artifacts = (work / "artifacts" /
                 f"{case.variant}-{size}-{case.precision}{'' if case.cfg else '-nocfg'}{'-dc' if case.deepcache else ''}")
    if not (artifacts / "manifest.json").is_file():
        from sdrt.export.config import ExportConfig
        from sdrt.export.exporter import export_artifacts
        from sdrt.engines.specs import Precision
        progress(f"exporting {model} to {artifacts} (once; reused by later runs)")
        export_artifacts(ExportConfig(model_dir=model, out_dir=artifacts, height=case.height, width=case.width,
                                      precision=Precision(case.precision), cfg=case.cfg, deepcache=case.deepcache,
                                      force=True))
    return model, artifacts


# ---------------------------------------------------------------------------------
# Workers


class Worker:
    """A framework's process; see workers.py for the protocol."""

    def __init__(self, kind: str, settings: dict[str, Any]):
        self.kind = kind
        self.proc = subprocess.Popen([sys.executable, str(HERE / "workers.py"), kind, json.dumps(settings)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1,
                                     stderr=None)

    def ask(self, **cmd: Any) -> dict[str, Any]:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.kind} worker exited (code {self.proc.wait()})")
        reply = json.loads(line)
        if not reply.get("ok"):
            raise RuntimeError(f"{self.kind} worker: {reply.get('error')}\n{reply.get('traceback', '')}")
        return reply

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()


def run_case(name: str, case: Case, work: Path, settings: dict[str, Any], progress) -> dict[str, Any]:
    model, artifacts = prepare(case, work, progress)
    manifest = read_manifest(artifacts)
    shape = manifest.specs[Stage.VAE_DECODER].input(LATENT).shape
    # The same initial latents for everyone: standard normal, as both pipelines expect.
    latents_path = work / f"latents-{name}.npy"
    np.save(latents_path, np.random.default_rng(1234).standard_normal(shape).astype(np.float32))
    if case.guidance is not None:
        settings = dict(settings, guidance=case.guidance)
    common = dict(settings, steps=case.steps, artifacts=str(artifacts), model=str(model), latents=str(latents_path),
                  device=case.device, precision=case.precision, backend=case.backend)
    workers = {}
    out: dict[str, Any] = {"title": case.title, "frameworks": list(case.frameworks), "workers": {},
                           "settings": {"steps": case.steps, "runs": case.runs, "warmup": case.warmup,
                                        "height": manifest.shape.height, "width": manifest.shape.width,
                                        "scheduler": settings["scheduler"], "device": case.device,
                                        "guidance": settings["guidance"], "cfg": case.cfg,
                                        "precision": case.precision, "sdrt_backend": case.backend,
                                        "model": str(model), "artifacts": str(artifacts)}}
    try:
        for kind in dict.fromkeys(_process(fw) for fw in case.frameworks):
            workers[kind] = Worker(kind, common)
            progress(f"{name}: loading {kind}")
            reply = workers[kind].ask(cmd="load")
            progress(f"{name}: {kind} loaded in {reply['load_s']:.1f} s")
            for fw in (f for f in case.frameworks if _process(f) == kind):
                out["workers"][fw] = {"load_s": reply["load_s"], "info": reply["info"]}
        runs: dict[str, list[dict[str, list[float]]]] = {fw: [] for fw in case.frameworks}
        images = {}
        for i in range(case.warmup + case.runs):
            measured = i >= case.warmup
            order = list(case.frameworks[i % len(case.frameworks):]) + list(case.frameworks[:i % len(case.frameworks)])
            for fw in order:
                save = (str(work / f"image-{name}-{fw}.npy")
                        if i == case.warmup and fw.startswith(("sdrt", "diffusers")) else None)
                reply = workers[_process(fw)].ask(cmd="run", save=save, **_run_options(fw))
                out["workers"][fw]["peak_rss_bytes"] = reply["peak_rss_bytes"]
                if measured:
                    runs[fw].append(reply["stages"])
                if save:
                    images[fw] = save
                total = sum(reply["stages"].get("end_to_end", reply["stages"].get("engines_total", [0])))
                progress(f"{name}: {'run' if measured else 'warm-up'} "
                         f"{i - case.warmup + 1 if measured else i + 1}: {fw} {total:.3f} s")
    finally:
        for w in workers.values():
            w.close()
    out["runs"] = runs
    out["comparison"] = rep.compare(runs)
    out["parts"] = {fw: rep.generation_parts(r, case.steps) for fw, r in runs.items()}
    if "sdrt" in images and "diffusers" in images:
        a, b = np.load(images["sdrt"]), np.load(images["diffusers"])
        d = np.abs(a.astype(np.float64) - b.reshape(a.shape))
        out["image_difference"] = {"max_abs": float(d.max()), "mean_abs": float(d.mean())}
    if "sdrt" in images:   # another backend, or DeepCache, against sdrt's exact image
        exact = np.load(images["sdrt"]).astype(np.float64)
        out["image_quality"] = {}
        for fw in (f for f in images if f.startswith("sdrt_")):
            d = np.abs(np.load(images[fw]).astype(np.float64).reshape(exact.shape) - exact)
            mse = float((d ** 2).mean())
            out["image_quality"][fw] = {"max_abs": float(d.max()),
                                        "psnr_db": float("inf") if mse == 0 else float(10 * np.log10(1.0 / mse))}
    return out


def _process(fw: str) -> str:
    """The worker process a framework runs in: DeepCache (sdrt_dcN) runs in sdrt's, on
    the same pipeline (seven processes with a full-size model each would not fit in 24 GiB)."""
    return "sdrt" if fw.startswith("sdrt_dc") else fw


def _run_options(fw: str) -> dict[str, Any]:
    return {"cache_interval": int(fw[len("sdrt_dc"):])} if fw.startswith("sdrt_dc") else {}


# ---------------------------------------------------------------------------------
# Goals of issue 6


def goals(report: dict[str, Any]) -> list[dict[str, Any]]:
    g = []
    cases = report["cases"]

    def fig(case, figure, fw="sdrt"):
        return cases[case]["comparison"][figure][fw]["median_ms"]

    def ratio(case, figure, other="diffusers"):
        return cases[case]["comparison"][figure][f"{other}/sdrt"]["ratio"]

    if "comparison" in cases.get("builtin", {}):
        host = fig("builtin", "host_step")
        g.append({"goal": "host overhead per step <= 0.1 ms (built-in model)", "measured": f"{host:.3f} ms",
                  "met": host <= 0.1})
        r = ratio("builtin", "end_to_end")
        g.append({"goal": "built-in model end to end >= 2x faster than diffusers", "measured": f"{r:.2f}x",
                  "met": r >= 2})
    if "comparison" in cases.get("full", {}):
        host = fig("full", "host_step")
        g.append({"goal": "host overhead per step <= 0.1 ms (full size)", "measured": f"{host:.3f} ms",
                  "met": host <= 0.1})
        r = ratio("full", "end_to_end")
        g.append({"goal": "full size 256x256 end to end >= 1.6x faster than diffusers", "measured": f"{r:.2f}x",
                  "met": r >= 1.6})
        if "openvino" in cases["full"]["frameworks"]:
            for stage in ("text_encoder", "unet_step", "vae_decoder"):
                r = ratio("full", stage, "openvino")
                g.append({"goal": f"full size {stage} at least as fast as OpenVINO", "measured": f"OpenVINO/sdrt {r:.2f}x",
                          "met": r >= 1.0})
    full = cases.get("full", {})
    if "comparison" in full and "sdrt_openvino" in full["frameworks"] and "openvino" in full["frameworks"]:
        # Issue 16: sdrt's fastest exact backend against OpenVINO-direct and diffusers.
        exact = [fw for fw in ("sdrt", "sdrt_openvino") if fw in full["frameworks"]]
        best = min(exact, key=lambda fw: fig("full", "end_to_end", fw))
        for stage in ("text_encoder", "unet_step", "vae_decoder"):
            r = fig("full", stage, "openvino") / fig("full", stage, best)
            g.append({"goal": f"full size {stage}: sdrt's fastest exact backend ({best}) >= 1.0x OpenVINO-direct",
                      "measured": f"{r:.2f}x", "met": r >= 1.0})
        r = fig("full", "end_to_end", "diffusers") / fig("full", "end_to_end", best)
        g.append({"goal": f"full size end to end, fastest exact backend ({best}) >= 1.35x faster than diffusers",
                  "measured": f"{r:.2f}x", "met": r >= 1.35})
    if "comparison" in full and "sdrt_dc3" in full["frameworks"]:
        r = fig("full", "end_to_end", "diffusers") / fig("full", "end_to_end", "sdrt_dc3")
        g.append({"goal": "full size end to end with DeepCache interval 3 >= 2.5x faster than diffusers",
                  "measured": f"{r:.2f}x", "met": r >= 2.5})
    cold = cases.get("cold", {})
    for key, limit, label in (("builtin", 1.0, "built-in model"), ("full", 10.0, "full size")):
        c = cold.get("cold_start", {}).get(key, {}).get("sdrt")
        if c:
            g.append({"goal": f"cold start, new process to loaded pipeline < {limit:g} s ({label})",
                      "measured": f"{c['ready_s']:.2f} s (first image {c['first_image_s']:.2f} s)",
                      "met": c["ready_s"] < limit})
        c = cold.get("cold_start", {}).get(key, {}).get("sdrt, openvino backend (cache warm)")
        if c:
            g.append({"goal": f"cold start with the OpenVINO backend, cache warm, < 10 s ({label})",
                      "measured": f"{c['ready_s']:.2f} s (first image {c['first_image_s']:.2f} s)",
                      "met": c["ready_s"] < 10})
    if "import" in cold:
        t = cold["import"]["median_s"]
        g.append({"goal": "import sdrt.runtime < 0.2 s", "measured": f"{t:.3f} s", "met": t < 0.2})
    return g


# ---------------------------------------------------------------------------------
# CLI


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", default="builtin,full,cold,gpu", help=f"comma-separated, from {', '.join(CASES)}")
    p.add_argument("--out", type=Path, default=Path("bench-out"), help="folder for the JSON, markdown and PNG")
    p.add_argument("--work", type=Path, default=Path("/tmp/sdrt-bench"), help="models and exports, reused")
    p.add_argument("--runs", type=int, default=None, help="measured runs per framework (default per case)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up runs per framework (default per case)")
    p.add_argument("--cold-repeats", type=int, default=3, help="cold starts per framework for the built-in model")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                   help="threads for every framework (default: the CPUs this process may use)")
    p.add_argument("--scheduler", default="euler", help="sdrt scheduler name; diffusers gets the matching class")
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument("--openvino-bf16", action="store_true",
                   help="also time OpenVINO at its default precision (bf16 on CPUs with native bf16)")
    p.add_argument("--force", action="store_true", help="overwrite earlier results in --out")
    args = p.parse_args(argv)

    chosen = [c.strip() for c in args.cases.split(",") if c.strip()]
    bad = [c for c in chosen if c not in CASES]
    if bad:
        raise InvalidInput(f"unknown case(s) {bad}: choose from {', '.join(CASES)}")
    from sdrt.runtime.schedulers import SCHEDULERS
    if args.scheduler not in SCHEDULERS:
        raise InvalidInput(f"unknown scheduler {args.scheduler!r}: choose one of {', '.join(SCHEDULERS)}")
    for n in OUTPUT_NAMES:
        if (args.out / n).exists() and not args.force:
            raise AlreadyExists(f"{args.out / n} exists: pass --force to overwrite it")

    progress = Progress()
    settings = {"prompt": args.prompt, "guidance": 7.5, "scheduler": args.scheduler, "threads": args.threads}
    cases = default_cases(args.runs, args.warmup, args.openvino_bf16)
    if not _has("openvino"):   # an optional benchmark dependency: compare without it
        progress("openvino is not installed (pip install 'sdrt[bench]'): comparing sdrt and diffusers only")
        cases = {k: replace(c, frameworks=tuple(f for f in c.frameworks if "openvino" not in f))
                 for k, c in cases.items()}
    report: dict[str, Any] = {
        "schema": "sdrt-side-by-side", "schema_version": 1,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "versions": package_versions(["sdrt", "numpy", "onnxruntime", "openvino", "torch", "diffusers",
                                      "transformers", "tensorrt"]),
        "settings": dict(settings, command=" ".join(sys.argv)),
        "cases": {},
    }
    args.work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    for name in chosen:
        try:
            report["cases"][name] = _run_named(name, cases, args, settings, progress)
        except (RuntimeError, OSError) as e:   # a worker failed: keep the other cases
            progress(f"{name}: FAILED: {e}")
            report["cases"][name] = {"title": name, "skipped": f"failed: {str(e).splitlines()[0]}",
                                     "error": str(e)}
        _write(report, args.out)   # after every case, so a long suite keeps what it has
    report["goals"] = goals(report)
    report["elapsed_s"] = time.perf_counter() - t0
    _write(report, args.out)
    print(rep.markdown(report))
    progress(f"wrote {', '.join(str(args.out / n) for n in OUTPUT_NAMES if (args.out / n).exists())}")
    return 0


def _run_named(name: str, cases: dict[str, Case], args: argparse.Namespace, settings: dict[str, Any],
               progress) -> dict[str, Any]:
    if name == "gpu":
        if not _gpu_available():
            return {"title": cases["gpu"].title, "skipped": "no CUDA GPU on this machine"}
        return run_case("gpu", cases["gpu"], args.work, settings, progress)
    if name != "cold":
        return run_case(name, cases[name], args.work, settings, progress)
    cold: dict[str, Any] = {"title": "cold start, new process to first image", "cold_start": {}}
    progress("import time of sdrt.runtime")
    cold["import"] = import_time()
    for key in ("builtin", "full"):
        case = cases[key]
        model, artifacts = prepare(case, args.work, progress)
        repeats = args.cold_repeats if key == "builtin" else 1
        res = cold_start(artifacts, model, dict(settings, steps=case.steps), repeats, progress,
                         openvino=_has("openvino"))
        res["steps"] = case.steps
        cold["cold_start"][key] = res
    return cold


def _write(report: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "side_by_side.json", report)
    atomic_write_text(out / "side_by_side.md", rep.markdown(report))
    # The chart needs matplotlib (the bench extra); without it the JSON and tables still come out.
    if _has("matplotlib") and any("parts" in c or "cold_start" in c for c in report["cases"].values()):
        with atomic_path(out / "side_by_side.png") as tmp:
            rep.chart(report, str(tmp))


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (InvalidInput, AlreadyExists) as e:
        print(f"side_by_side: error: {e}", file=sys.stderr)
        sys.exit(2)
