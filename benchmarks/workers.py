"""One process per framework, driven by the side-by-side coordinator.

Each framework runs in its own process so that sdrt is measured as users run it (no
torch in the process), each process's peak memory is its own, and a crash in one does
not take the others down. The coordinator alternates `run` commands between the
workers, so at any moment only one of them computes and machine noise hits all.

Protocol: JSON lines. The coordinator writes one command per line on stdin; the
worker answers one JSON line on a private copy of its stdout (fd 1 itself is pointed
at stderr, so a library printing to stdout cannot corrupt the protocol).

  {"cmd": "load"}                     -> {"ok": true, "load_s": ..., "info": {...}}
  {"cmd": "run", "save": PATH|null}   -> {"ok": true, "stages": {name: [seconds...]}, ...}
  {"cmd": "quit"}                     -> exits

Every worker reports the same stage names (see `sdrt.runtime.bench.FIGURES`), in
seconds: text_encoder (summed per generation), unet_step, host_step, step,
vae_decoder, end_to_end. A stage a framework does not run is absent.

Run as: python benchmarks/workers.py KIND SETTINGS_JSON   (KIND: sdrt, sdrt_openvino, diffusers, openvino,
openvino_bf16)
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import numpy as np

def peak_rss_bytes() -> int:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class SdrtWorker:
    """sdrt's Pipeline on the ONNX Runtime backend (or TensorRT on a GPU); the kind
    `sdrt_openvino` is this worker on the OpenVINO backend. A run command may carry
    `cache_interval` (DeepCache): the coordinator times sdrt_dcN in the sdrt process,
    on the same pipeline, rather than holding another copy of the model in memory."""

    def __init__(self, s: dict[str, Any], kind: str = "sdrt"):
        self.s = s
        self.latents = np.load(s["latents"])
        self.backend = "openvino" if kind == "sdrt_openvino" else s.get("backend", "onnxruntime")

    def load(self) -> dict[str, Any]:
        t0 = time.perf_counter()
        from sdrt.runtime.pipeline import Pipeline
        t1 = time.perf_counter()
        options = {"threads": self.s["threads"]} if self.backend in ("onnxruntime", "openvino") else {}
        self.pipe = Pipeline.load(self.s["artifacts"], backend=self.backend, **options)
        t2 = time.perf_counter()
        sessions = {stage.value: getattr(e, "load_seconds", None) for stage, e in self.pipe.engines.items()}
        return {"load_s": t2 - t0, "info": {"import_s": t1 - t0, "pipeline_load_s": t2 - t1,
                                            "sessions_s": sessions, "torch_imported": "torch" in sys.modules,
                                            "backend": self.backend}}

    def run(self, save: str | None, cache_interval: int = 1) -> dict[str, Any]:
        s = self.s
        t0 = time.perf_counter()
        result = self.pipe(s["prompt"], steps=s["steps"], guidance=s["guidance"], scheduler=s["scheduler"],
                           seed=0, latents=self.latents, cache_interval=cache_interval)
        wall = time.perf_counter() - t0
        if save:
            np.save(save, result.pixels)
        t = result.timings
        return {"stages": _stage_lists(t.text_encoder, t.steps, t.unet, t.vae_decoder, wall)}


class DiffusersWorker:
    """diffusers' StableDiffusionPipeline, timed stage by stage with hooks.

    The hooks only read the clock: text encoder and U-Net via forward pre/post hooks,
    the VAE by wrapping `vae.decode`, the start of the denoising loop by wrapping
    `progress_bar` (entered right before the loop) and each step's end by
    `callback_on_step_end`. The progress bar is disabled (tqdm's output is not what
    a fair comparison should time).
    """

    def __init__(self, s: dict[str, Any]):
        self.s = s
        self.latents = np.load(s["latents"])

    def load(self) -> dict[str, Any]:
        t0 = time.perf_counter()
        import torch
        import diffusers
        t1 = time.perf_counter()
        torch.set_num_threads(self.s["threads"])
        device = self.s.get("device", "cpu")
        dtype = torch.float16 if self.s.get("precision") == "fp16" else torch.float32
        # The checkpoint's own pipeline class: StableDiffusionPipeline, StableDiffusionXLPipeline, ...
        index = json.loads((Path(self.s["model"]) / "model_index.json").read_text())
        cls = getattr(diffusers, index["_class_name"])
        extra = (dict(add_watermarker=False) if "XL" in index["_class_name"] else
                 dict(safety_checker=None, requires_safety_checker=False))
        pipe = cls.from_pretrained(self.s["model"], torch_dtype=dtype, **extra)
        from sdrt.runtime.schedulers import diffusers_scheduler
        name, overrides = diffusers_scheduler(self.s["scheduler"], pipe.scheduler.config)
        pipe.scheduler = getattr(diffusers, name).from_config(pipe.scheduler.config, **overrides)
        pipe = pipe.to(device)
        pipe.set_progress_bar_config(disable=True)
        t2 = time.perf_counter()
        self.torch, self.pipe, self.device, self.dtype = torch, pipe, device, dtype
        self._install_hooks()
        return {"load_s": t2 - t0, "info": {"import_s": t1 - t0, "from_pretrained_s": t2 - t1,
                                            "torch_threads": torch.get_num_threads(),
                                            "scheduler": type(pipe.scheduler).__name__}}

    def _now(self) -> float:
        # On a GPU, synchronize so a stage's time is its kernels', not its launch time.
        if self.device != "cpu":
            self.torch.cuda.synchronize()
        return time.perf_counter()

    def _install_hooks(self) -> None:
        pipe = self.pipe
        self.marks: dict[str, list[float]] = {}

        def mark(name: str) -> Callable[..., None]:
            return lambda *a, **k: self.marks.setdefault(name, []).append(self._now())

        for encoder in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)):   # SDXL has two
            if encoder is not None:
                encoder.register_forward_pre_hook(mark("te0"))
                encoder.register_forward_hook(mark("te1"))
        pipe.unet.register_forward_pre_hook(mark("unet0"))
        pipe.unet.register_forward_hook(mark("unet1"))
        decode, progress_bar = pipe.vae.decode, pipe.progress_bar

        def timed_decode(*a, **k):
            mark("vae0")()
            out = decode(*a, **k)
            mark("vae1")()
            return out

        def timed_progress_bar(*a, **k):
            mark("loop0")()
            return progress_bar(*a, **k)

        pipe.vae.decode = timed_decode
        pipe.progress_bar = timed_progress_bar

    def run(self, save: str | None) -> dict[str, Any]:
        s, torch = self.s, self.torch
        latents = torch.from_numpy(self.latents).to(self.device, self.dtype)
        step_end = self.marks.setdefault("step1", [])

        def on_step_end(pipe, i, t, kwargs):
            step_end.append(self._now())
            return kwargs

        for v in self.marks.values():
            v.clear()
        t0 = self._now()
        # The size the latents stand for: SDXL conditions on it (its time ids default to
        # (height, width), and height defaults to the native 1024 whatever the latents).
        scale = self.pipe.vae_scale_factor
        out = self.pipe(s["prompt"], num_inference_steps=s["steps"], guidance_scale=s["guidance"],
                        latents=latents, output_type="np", callback_on_step_end=on_step_end,
                        height=latents.shape[2] * scale, width=latents.shape[3] * scale)
        wall = self._now() - t0
        if save:
            np.save(save, np.asarray(out.images, dtype=np.float32))
        m = self.marks
        text = sum(b - a for a, b in zip(m["te0"], m["te1"]))   # prompt and negative prompt (each encoder)
        unet = [b - a for a, b in zip(m["unet0"], m["unet1"])]
        ends = m["step1"]
        steps = [b - a for a, b in zip([m["loop0"][0]] + ends[:-1], ends)]
        vae = m["vae1"][0] - m["vae0"][0]
        reply = {"stages": _stage_lists(text, steps, unet, vae, wall)}
        if self.device != "cpu":
            reply["peak_gpu_bytes"] = int(torch.cuda.max_memory_allocated())
        return reply


class OpenVinoWorker:
    """OpenVINO reading sdrt's exported ONNX: static shapes, latency hint, f32.

    It times the three engines on inputs of the manifest's shapes, one text encoder
    call, `steps` U-Net calls and one VAE call per `run`, which is the engine work of
    a generation (OpenVINO has no pipeline of its own here). Precision is pinned to
    f32 to match sdrt's fp32 artifacts: on CPUs with native bf16 OpenVINO would
    otherwise pick bf16 by default, and a speed-up bought with precision is not a
    like-for-like comparison.
    """

    precision = "f32"

    def __init__(self, s: dict[str, Any]):
        self.s = s

    def load(self) -> dict[str, Any]:
        t0 = time.perf_counter()
        import openvino as ov
        from sdrt.engines.manifest import read_manifest
        from sdrt.engines.specs import Stage
        t1 = time.perf_counter()
        folder = Path(self.s["artifacts"])
        manifest = read_manifest(folder)
        core = ov.Core()
        config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": self.s["threads"],
                  "INFERENCE_PRECISION_HINT": self.precision}
        rng = np.random.default_rng(0)
        self.requests, self.inputs = {}, {}
        # The text-to-image stages, the ones `run` times (an artifact may also hold a VAE encoder).
        for stage in (Stage.TEXT_ENCODER, Stage.UNET, Stage.VAE_DECODER):
            model = core.read_model(str(folder / stage.onnx_file))
            compiled = core.compile_model(model, "CPU", config)
            self.requests[stage.value] = compiled.create_infer_request()
            self.inputs[stage.value] = {t.name: _example(t, rng) for t in manifest.specs[stage].inputs}
        t2 = time.perf_counter()
        return {"load_s": t2 - t0, "info": {"import_s": t1 - t0, "compile_s": t2 - t1,
                                            "openvino": ov.__version__, "config": config}}

    def _time(self, stage: str) -> float:
        t0 = time.perf_counter()
        self.requests[stage].infer(self.inputs[stage])
        return time.perf_counter() - t0

    def run(self, save: str | None) -> dict[str, Any]:
        t0 = time.perf_counter()
        text = self._time("text_encoder")
        unet = [self._time("unet") for _ in range(self.s["steps"])]
        vae = self._time("vae_decoder")
        # No host work: this is engine time only, the floor a pipeline around it could reach.
        return {"stages": {"text_encoder": [text], "unet_step": unet, "vae_decoder": [vae],
                           "engines_total": [time.perf_counter() - t0]}}


class OpenVinoDefaultWorker(OpenVinoWorker):
    """OpenVINO as a CPU user gets it by default: bf16 on CPUs with native bf16
    (AVX512_BF16, AMX), f32 elsewhere. Informational: its numerics differ from fp32."""

    precision = "bf16"

    def load(self) -> dict[str, Any]:
        import openvino as ov
        if "BF16" not in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
            self.precision = "f32"
        return super().load()


def _example(spec: Any, rng: np.random.Generator) -> np.ndarray:
    """An input of the spec's shape and dtype with plausible values (timing does not
    depend on them, but NaN-free realistic ranges keep every kernel on its normal path)."""
    dtype = spec.dtype.numpy
    if spec.name == "clip_skip":
        return np.zeros(spec.shape, dtype=dtype)
    if spec.name == "encoder_attention_mask":
        return np.ones(spec.shape, dtype=dtype)
    if np.issubdtype(dtype, np.integer):
        return rng.integers(0, 49407, size=spec.shape).astype(dtype)
    if spec.shape == (1,):   # the timestep
        return np.array([500.0], dtype=dtype)
    return rng.standard_normal(spec.shape).astype(dtype)


def _stage_lists(text: float, steps, unet, vae: float, wall: float) -> dict[str, list[float]]:
    steps, unet = list(steps), list(unet)
    return {
        "text_encoder": [text],
        "unet_step": unet,
        "host_step": [s - u for s, u in zip(steps, unet)],
        "step": steps,
        "vae_decoder": [vae],
        "other": [wall - text - sum(steps) - vae],
        "end_to_end": [wall],
    }


WORKERS = {"sdrt": SdrtWorker, "diffusers": DiffusersWorker, "openvino": OpenVinoWorker,
           "openvino_bf16": OpenVinoDefaultWorker}


def main(argv: list[str]) -> int:
    kind, settings = argv[0], json.loads(argv[1])
    # Keep the protocol channel private: anything printed to stdout goes to stderr.
    channel = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    worker = SdrtWorker(settings, kind) if kind.startswith("sdrt_") else WORKERS[kind](settings)
    for line in sys.stdin:
        cmd = json.loads(line)
        try:
            if cmd["cmd"] == "quit":
                break
            extra = {k: v for k, v in cmd.items() if k not in ("cmd", "save")}   # e.g. cache_interval
            reply = worker.load() if cmd["cmd"] == "load" else worker.run(cmd.get("save"), **extra)
            reply.update(ok=True, peak_rss_bytes=peak_rss_bytes())
        except Exception as e:  # report to the coordinator, which stops the case
            reply = {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
        channel.write(json.dumps(reply) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
