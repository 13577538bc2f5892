"""Text to image from an artifact folder, with no torch in the process.

The whole generation reads top to bottom in `Pipeline._generate`: tokenize, encode
the text once, denoise with a NumPy sampler and the U-Net engine, decode with the
VAE engine. It follows diffusers' `StableDiffusionPipeline.__call__` step for step
(the tests hold it to that), so the same weights, prompts and initial latents give
the same pixels:

- classifier-free guidance runs the unconditional and conditional halves in one
  engine call each (text encoder on [negatives..., prompts...], U-Net on [x, x])
  and combines them as `uncond + g * (cond - uncond)`;
- with guidance <= 1 diffusers skips guidance, so only the conditional half is used;
- initial latents are standard normal, multiplied by the sampler's init_noise_sigma;
- the VAE gets latents / scaling_factor, and pixels are (x / 2 + 0.5) clipped to
  [0, 1], NHWC, exactly like VaeImageProcessor.postprocess(output_type="np").
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
from PIL import Image

from sdrt.engines.base import Backend, Engine, open_engines
from sdrt.engines.errors import ArtifactError, InvalidInput, InvalidType, NumericsError
from sdrt.engines.files import read_json_object
from sdrt.engines.manifest import Manifest, load_manifest
from sdrt.engines.specs import (ENCODER_HIDDEN_STATES, IMAGES, INPUT_IDS, LATENT, SAMPLE, TEXT_EMBEDDINGS,
                                TIMESTEP, Stage)

from .config import DEFAULT_GUIDANCE, DEFAULT_STEPS, GenerationConfig
from .images import to_pil
from .schedulers import SCHEDULERS, make_sampler
from .tokenizer import Tokenizer

SCHEDULER_CONFIG = Path("scheduler") / "scheduler_config.json"
TOKENIZER_DIR = "tokenizer"

# The checkpoint's own scheduler class -> our sampler name; the default when the
# caller names none. Unknown classes fall back to PNDM, the SD 1.x default.
DEFAULT_SCHEDULER_BY_CLASS = {
    "PNDMScheduler": "pndm",
    "DDIMScheduler": "ddim",
    "EulerDiscreteScheduler": "euler",
    "EulerAncestralDiscreteScheduler": "euler_a",
    "DPMSolverMultistepScheduler": "dpmpp_2m",
    "LCMScheduler": "lcm",
}
FALLBACK_SCHEDULER = "pndm"


@dataclass(frozen=True)
class Timings:
    """Seconds spent per stage of one generation."""

    text_encoder: float
    steps: tuple[float, ...]   # wall time of each denoising step, U-Net call and sampler math
    unet: tuple[float, ...]    # engine time of each U-Net call
    vae_decoder: float
    total: float

    @property
    def unet_median(self) -> float:
        return statistics.median(self.unet) if self.unet else 0.0

    @property
    def host_median(self) -> float:
        """Median per-step time outside the U-Net: sampler math, guidance, copies."""
        return statistics.median(s - u for s, u in zip(self.steps, self.unet)) if self.steps else 0.0

    def to_json(self) -> dict[str, Any]:
        return {"text_encoder": self.text_encoder, "steps": list(self.steps), "unet": list(self.unet),
                "vae_decoder": self.vae_decoder, "total": self.total}


@dataclass(frozen=True)
class GenerationResult:
    images: list[Image.Image]   # one per batch item, 8-bit RGB
    pixels: np.ndarray          # float32 (batch, height, width, 3) in [0, 1], before 8-bit rounding
    timings: Timings
    seed: int                   # the seed used (drawn at random when none was given)
    config: GenerationConfig    # the validated settings
    latents_given: bool = False # True when the caller supplied the initial latents


class Pipeline:
    """A loaded artifact folder, ready to generate.

    Engines are opened once at `load`; each call computes the text embeddings once and
    only the latents change per step. One Pipeline may be shared by several threads:
    calls are serialised by a lock (the engines use all cores for a single call, so
    running two at once would not be faster), and each caller gets its own result.
    """

    def __init__(self, folder: Path, manifest: Manifest, engines: Mapping[Stage, Engine], tokenizer: Tokenizer,
                 scheduler_config: Mapping[str, Any], backend: Backend):
        self.folder = folder
        self.manifest = manifest
        self.engines = dict(engines)
        self.tokenizer = tokenizer
        self.scheduler_config = dict(scheduler_config)
        self.backend = backend
        self._samplers: dict[tuple[str, int], Any] = {}
        self._lock = threading.Lock()

    @classmethod
    def load(cls, folder: str | os.PathLike[str], backend: str | Backend = "onnxruntime", check_hashes: bool = True,
             **backend_options: Any) -> "Pipeline":
        """Open an artifact folder written by `sdrt export`.

        Raises MissingFile if the folder does not exist, ArtifactError if it is incomplete
        (no manifest) or a file does not match the manifest's size and hash.
        backend_options go to the backend's `open_engines` (ONNX Runtime: providers,
        threads, cache).
        """
        if not isinstance(folder, (str, os.PathLike)):
            raise InvalidType(f"artifact folder must be a path, got {type(folder).__name__}")
        backend = Backend.parse(backend)
        folder = Path(folder)
        manifest = load_manifest(folder, check_hashes=check_hashes)
        tokenizer = Tokenizer.from_folder(folder / TOKENIZER_DIR)
        if tokenizer.max_length != manifest.facts.text_max_length:
            raise ArtifactError(f"{folder / TOKENIZER_DIR}: tokenizer length {tokenizer.max_length} does not match "
                                f"the text encoder's {manifest.facts.text_max_length}")
        scheduler_config = _read_scheduler_config(folder / SCHEDULER_CONFIG)
        engines = open_engines(folder, manifest, backend, **backend_options)
        return cls(folder, manifest, engines, tokenizer, scheduler_config, backend)

    # -- what the artifact fixes -------------------------------------------------------

    @property
    def height(self) -> int:
        return self.manifest.shape.height

    @property
    def width(self) -> int:
        return self.manifest.shape.width

    @property
    def batch(self) -> int:
        return self.manifest.shape.batch

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return self.manifest.specs[Stage.VAE_DECODER].input(LATENT).shape

    @property
    def schedulers(self) -> tuple[str, ...]:
        return tuple(SCHEDULERS)

    @property
    def default_scheduler(self) -> str:
        cls_name = self.scheduler_config.get("_class_name", "")
        name = DEFAULT_SCHEDULER_BY_CLASS.get(cls_name, FALLBACK_SCHEDULER)
        if name == "dpmpp_2m" and self.scheduler_config.get("use_karras_sigmas"):
            name = "dpmpp_2m_karras"
        return name

    # -- generation ----------------------------------------------------------------------

    def __call__(self, prompt: str | list[str], negative_prompt: str | list[str] | None = None,
                 steps: int | None = DEFAULT_STEPS, guidance: float = DEFAULT_GUIDANCE,
                 scheduler: str | None = None, seed: int | None = None, latents: np.ndarray | None = None,
                 on_step: Callable[[int, int], None] | None = None) -> GenerationResult:
        """Generate `batch` images (the artifact's batch).

        prompt, negative_prompt: a string (used for every batch item) or a list of `batch`.
        steps: denoising steps (default 25). guidance: CFG scale; <= 1 disables guidance.
        scheduler: one of `schedulers` (default: the checkpoint's own scheduler).
        seed: 0..2**64-1 (default: random, reported in the result); it draws the initial
        latents and the noise of stochastic samplers from numpy.random.default_rng(seed).
        latents: float32 (batch, C, H/8, W/8) standard-normal initial latents instead of
        drawing them from the seed (to compare runs across backends or with diffusers).
        on_step(i, n): called after each denoising step (progress reporting).
        """
        config = GenerationConfig.create(
            prompt, negative_prompt, DEFAULT_STEPS if steps is None else steps, guidance,
            self.default_scheduler if scheduler is None else scheduler, seed,
            batch=self.batch, schedulers=self.schedulers)
        if config.guidance > 1.0 and not self.manifest.shape.cfg:
            raise InvalidInput(f"guidance {config.guidance:g} needs classifier-free guidance, but this artifact was "
                               f"exported with --no-cfg: use guidance <= 1 or export with CFG")
        latents = self._check_latents(latents)
        if on_step is not None and not callable(on_step):
            raise InvalidType(f"on_step must be a callable on_step(i, n) or None, got {type(on_step).__name__}")
        sampler = self._sampler(config.scheduler, config.steps)
        with self._lock:
            return self._generate(config, sampler, latents, on_step)

    def _generate(self, config: GenerationConfig, sampler: Any, latents: np.ndarray | None,
                  on_step: Callable[[int, int], None] | None) -> GenerationResult:
        start = time.perf_counter()
        cfg_graph = self.manifest.shape.cfg            # the engines run the guided batch
        use_cfg = cfg_graph and config.guidance > 1.0  # diffusers: do_classifier_free_guidance
        b = self.batch
        rng = np.random.default_rng(config.seed)

        # Text: one encoder call, negatives first, like diffusers' torch.cat([negative, prompt]).
        prompts = list(config.negative_prompts + config.prompts) if cfg_graph else list(config.prompts)
        ids = self.tokenizer.encode(prompts)
        t0 = time.perf_counter()
        embeddings = self._run(Stage.TEXT_ENCODER, {INPUT_IDS: ids})[TEXT_EMBEDDINGS]
        text_time = self._engine_time(Stage.TEXT_ENCODER, t0)
        _check_finite(embeddings, "the text encoder")

        # Denoising.
        x = latents if latents is not None else rng.standard_normal(self.latent_shape, dtype=np.float32)
        x = (x * np.float32(sampler.init_noise_sigma)).astype(np.float32)
        state = sampler.init_state()
        step_times, unet_times = [], []
        guidance = np.float32(config.guidance)
        timesteps = np.asarray(sampler.timesteps, dtype=np.float32).reshape(-1, 1)   # row i: call i's input
        n = len(timesteps)
        for i in range(n):
            t0 = time.perf_counter()
            model_in = np.asarray(sampler.scale_model_input(x, i), dtype=np.float32)
            sample = np.concatenate([model_in, model_in]) if cfg_graph else model_in
            u0 = time.perf_counter()
            raw = self._run(Stage.UNET, {SAMPLE: sample, TIMESTEP: timesteps[i],
                                         ENCODER_HIDDEN_STATES: embeddings})[LATENT]
            unet_times.append(self._engine_time(Stage.UNET, u0))
            out = raw
            if cfg_graph:
                uncond, cond = raw[:b], raw[b:]
                out = uncond + guidance * (cond - uncond) if use_cfg else cond
            noise = rng.standard_normal(x.shape, dtype=np.float32) if sampler.stochastic else None
            x, state = sampler.step(state, i, x, out, noise)
            x = np.asarray(x, dtype=np.float32)
            # One check per step, on the new latents: a NaN/Inf from the U-Net enters every
            # sampler's update (NaN * 0 is NaN), so it always shows here; then say whose it was.
            if not np.isfinite(x).all():
                where = f"step {i + 1} of {n} (timestep {float(timesteps[i, 0]):g})"
                _check_finite(raw, f"the U-Net at {where}")
                _check_finite(x, f"the sampler at {where}")
            step_times.append(time.perf_counter() - t0)
            if on_step is not None:
                on_step(i + 1, n)

        # Decoding.
        t0 = time.perf_counter()
        decoded = self._run(Stage.VAE_DECODER,
                            {LATENT: (x / np.float32(self.manifest.facts.vae_scaling_factor)).astype(np.float32)})
        vae_time = self._engine_time(Stage.VAE_DECODER, t0)
        images = decoded[IMAGES]
        _check_finite(images, "the VAE decoder",
                      hint="; an fp16 VAE overflows on some latents: export again with --vae-precision fp32")
        pixels = np.ascontiguousarray(np.clip(images / np.float32(2) + np.float32(0.5), 0, 1).transpose(0, 2, 3, 1),
                                      dtype=np.float32)
        timings = Timings(text_time, tuple(step_times), tuple(unet_times), vae_time, time.perf_counter() - start)
        return GenerationResult(to_pil(pixels), pixels, timings, config.seed, config, latents is not None)

    def _run(self, stage: Stage, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.engines[stage](inputs)

    def _engine_time(self, stage: Stage, started: float) -> float:
        measured = self.engines[stage].last_time()
        return measured if measured is not None else time.perf_counter() - started

    def _sampler(self, name: str, steps: int) -> Any:
        # Samplers are immutable tables, so one per (name, steps) is shared by all calls.
        key = (name, steps)
        if key not in self._samplers:
            self._samplers[key] = make_sampler(name, self.scheduler_config, steps)
        return self._samplers[key]

    def _check_latents(self, latents: Any) -> np.ndarray | None:
        if latents is None:
            return None
        shape = self.latent_shape
        if not isinstance(latents, np.ndarray):
            raise InvalidType(f"latents must be a float32 numpy array of shape {shape}, got {type(latents).__name__}")
        if latents.dtype != np.float32:
            raise InvalidType(f"latents must be float32, got {latents.dtype} (shape {shape})")
        if latents.shape != shape:
            raise InvalidInput(f"latents must have shape {shape} for this artifact, got {latents.shape}")
        if not np.isfinite(latents).all():
            raise InvalidInput("latents contain NaN or Inf")
        return latents

    def close(self) -> None:
        for engine in self.engines.values():
            engine.close()

    def __enter__(self) -> "Pipeline":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _read_scheduler_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ArtifactError(f"{path} is missing: the artifact folder is incomplete; export it again")
    return read_json_object(path, ArtifactError, "scheduler config")


def _check_finite(array: np.ndarray, where: str, hint: str = "") -> None:
    if not np.isfinite(array).all():
        bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
        raise NumericsError(f"{where} produced {bad} NaN/Inf values{hint}")
