"""Generation from an artifact folder, with no torch in the process.

The whole generation reads top to bottom in `Pipeline._generate`, in diffusers'
seams: encode the prompt, prepare the latents, denoise, decode. It follows diffusers'
`StableDiffusionPipeline`, `StableDiffusionImg2ImgPipeline` and
`StableDiffusionInpaintPipeline` step for step (the tests hold it to that), so the
same weights, prompts and seed give the same pixels:

- every random draw comes from one generator in diffusers' order (initial noise, the
  VAE encoder's latent sample, image-to-image noise, each stochastic sampler step),
  and the default generator reproduces `torch.Generator("cpu").manual_seed(seed)`;
- classifier-free guidance runs the unconditional and conditional halves in one
  engine call each (text encoder on [negatives..., prompts...], U-Net on [x, x])
  and combines them as `uncond + g * (cond - uncond)`; with guidance <= 1 diffusers
  skips guidance, so only the conditional half is used;
- text-to-image starts from standard normal latents times the sampler's
  init_noise_sigma; image tasks start part-way (`strength`) from the encoded image
  noised to the first timestep;
- inpainting U-Nets (9 channels) take [latents, mask, masked-image latents]; other
  U-Nets inpaint by replacing the latents outside the mask after every step with the
  original's, re-noised to the next timestep;
- the VAE gets latents / scaling_factor, and pixels are (x / 2 + 0.5) clipped to
  [0, 1], NHWC, exactly like VaeImageProcessor.postprocess(output_type="np").
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np
from PIL import Image

from sdrt.engines.base import Backend, Engine, open_engines
from sdrt.engines.errors import InvalidType, NumericsError
from sdrt.engines.specs import (ENCODER_HIDDEN_STATES, IMAGES, INPUT_IDS, LATENT, LATENT_MEAN, LATENT_STD, SAMPLE,
                                TEXT_EMBEDDINGS, TIMESTEP, Stage)

from . import inputs
from .artifact import Artifact, Request
from .config import DEFAULT_GUIDANCE, DEFAULT_STEPS, GenerationConfig, Generator, Task
from .images import to_pil
from .schedulers import SCHEDULERS, Sampler
from .torch_random import TorchGenerator


@dataclass(frozen=True)
class Timings:
    """Seconds spent per stage of one generation."""

    text_encoder: float
    steps: tuple[float, ...]   # wall time of each denoising step, U-Net call and sampler math
    unet: tuple[float, ...]    # engine time of each U-Net call
    vae_decoder: float
    total: float
    vae_encoder: float = 0.0   # image tasks: encoding the input (and masked) image

    @property
    def unet_median(self) -> float:
        return statistics.median(self.unet) if self.unet else 0.0

    @property
    def host_median(self) -> float:
        """Median per-step time outside the U-Net: sampler math, guidance, copies."""
        return statistics.median(s - u for s, u in zip(self.steps, self.unet)) if self.steps else 0.0

    def to_json(self) -> dict[str, Any]:
        return {"text_encoder": self.text_encoder, "vae_encoder": self.vae_encoder, "steps": list(self.steps),
                "unet": list(self.unet), "vae_decoder": self.vae_decoder, "total": self.total}


@dataclass(frozen=True)
class GenerationResult:
    images: list[Image.Image]   # one per batch item, 8-bit RGB
    pixels: np.ndarray          # float32 (batch, height, width, 3) in [0, 1], before 8-bit rounding
    timings: Timings
    seed: int                   # the seed used (drawn at random when none was given)
    config: GenerationConfig    # the validated settings
    latents_given: bool = False # True when the caller supplied the initial latents


@dataclass
class _Latents:
    """What denoising starts from, and what an inpainting task keeps beside it."""

    x: np.ndarray                               # (batch, C, h, w) initial latents
    unet_extra: np.ndarray | None = None        # 9-channel U-Net: [mask, masked-image latents], guided batch
    original: np.ndarray | None = None          # 4-channel inpainting: the image's clean latents,
    noise: np.ndarray | None = None             # the noise that re-noises them each step,
    mask: np.ndarray | None = None              # and the mask at latent size (1 = repaint), batch


class Pipeline:
    """A loaded artifact folder, ready to generate.

    Engines are opened once at `load`; each call computes the text embeddings once and
    only the latents change per step. One Pipeline may be shared by several threads:
    calls are serialised by a lock (the engines use all cores for a single call, so
    running two at once would not be faster), and each caller gets its own result.
    """

    def __init__(self, artifact: Artifact, engines: Mapping[Stage, Engine], backend: Backend):
        self.artifact = artifact
        self.engines = dict(engines)
        self.backend = backend
        self._lock = threading.Lock()

    @classmethod
    def load(cls, folder: str | os.PathLike[str] | Artifact, backend: str | Backend = "onnxruntime",
             check_hashes: bool = True, **backend_options: Any) -> "Pipeline":
        """Open an artifact folder written by `sdrt export` (or an `Artifact` already open).

        Raises MissingFile if the folder does not exist, ArtifactError if it is incomplete
        (no manifest) or a file does not match the manifest's size and hash.
        backend_options go to the backend's `open_engines` (ONNX Runtime: providers,
        threads, cache).
        """
        backend = Backend.parse(backend)
        artifact = folder if isinstance(folder, Artifact) else Artifact.open(folder, check_hashes=check_hashes)
        engines = open_engines(artifact.folder, artifact.manifest, backend, **backend_options)
        return cls(artifact, engines, backend)

    # -- what the artifact fixes -------------------------------------------------------

    @property
    def folder(self) -> Any:
        return self.artifact.folder

    @property
    def manifest(self) -> Any:
        return self.artifact.manifest

    @property
    def tokenizer(self) -> Any:
        return self.artifact.tokenizer

    @property
    def scheduler_config(self) -> dict[str, Any]:
        return self.artifact.scheduler_config

    @property
    def height(self) -> int:
        return self.artifact.height

    @property
    def width(self) -> int:
        return self.artifact.width

    @property
    def batch(self) -> int:
        return self.artifact.batch

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return self.artifact.latent_shape

    @property
    def schedulers(self) -> tuple[str, ...]:
        return tuple(SCHEDULERS)

    @property
    def default_scheduler(self) -> str:
        return self.artifact.default_scheduler

    # -- generation ----------------------------------------------------------------------

    def __call__(self, prompt: str | list[str], negative_prompt: str | list[str] | None = None,
                 steps: int | None = DEFAULT_STEPS, guidance: float = DEFAULT_GUIDANCE,
                 scheduler: str | None = None, seed: int | None = None, latents: np.ndarray | None = None,
                 image: Any = None, mask_image: Any = None, strength: float | None = None,
                 outpaint: Any = None, generator: str = Generator.TORCH.value,
                 on_step: Callable[[int, int], None] | None = None,
                 scheduler_options: dict[str, Any] | None = None) -> GenerationResult:
        """Generate `batch` images (the artifact's batch).

        prompt, negative_prompt: a string (used for every batch item) or a list of `batch`.
        steps: denoising steps (default 25). guidance: CFG scale; <= 1 disables guidance.
        scheduler: an sdrt sampler name ("dpmpp_2m_karras", see `SCHEDULERS`) or an
        AUTOMATIC1111 one ("DPM++ 2M Karras", "Euler a"); default: the checkpoint's own
        scheduler (a class sdrt does not follow runs "euler" with a SchedulerFallback warning).
        scheduler_options: diffusers options of that sampler on top of the checkpoint's
        config, as `Scheduler.from_config(config, **scheduler_options)` takes them
        (e.g. {"use_karras_sigmas": True, "solver_order": 3}); an unknown key is refused.
        seed: 0..2**64-1 (default: random, reported in the result). With generator="torch"
        (the default) it gives the image diffusers gives with
        `generator=torch.Generator("cpu").manual_seed(seed)`; "numpy" is sdrt 0.1's generator.
        latents: float32 (batch, C, H/8, W/8) standard-normal initial latents instead of
        drawing them from the seed (text-to-image).
        image: a PIL image, an HxWxC uint8 or float [0, 1] array, or a path: image-to-image,
        or with mask_image (white = repaint) inpainting, or with outpaint=(left, top,
        right, bottom) pixel margins outpainting. Inputs of another size are resized to
        the artifact's. strength in (0, 1]: how much of the schedule runs (default 0.8 for
        image-to-image, 1.0 for inpainting, as in diffusers).
        on_step(i, n): called after each denoising step (progress reporting).
        """
        request = self.artifact.request(prompt, negative_prompt, steps, guidance, scheduler, seed, latents,
                                        image, mask_image, strength, outpaint, generator, scheduler_options)
        return self.run(request, on_step)

    def run(self, request: Request, on_step: Callable[[int, int], None] | None = None) -> GenerationResult:
        """Generate from a request made by `self.artifact.request(...)`."""
        if on_step is not None and not callable(on_step):
            raise InvalidType(f"on_step must be a callable on_step(i, n) or None, got {type(on_step).__name__}")
        with self._lock:
            return self._generate(request, on_step)

    def _generate(self, request: Request, on_step: Callable[[int, int], None] | None) -> GenerationResult:
        start = time.perf_counter()
        config, sampler = request.config, request.sampler
        rng = _random_source(config)
        embeddings, text_time = self.encode_prompt(config)
        latents, vae_encoder_time = self.prepare_latents(request, rng)
        x, step_times, unet_times = self.denoise(config, sampler, latents, embeddings, rng, on_step)
        pixels, vae_time = self.decode(x)
        timings = Timings(text_time, tuple(step_times), tuple(unet_times), vae_time, time.perf_counter() - start,
                          vae_encoder_time)
        return GenerationResult(to_pil(pixels), pixels, timings, config.seed, config, request.latents is not None)

    # -- the seams, in diffusers' order -----------------------------------------------------

    def encode_prompt(self, config: GenerationConfig) -> tuple[np.ndarray, float]:
        """One text encoder call, negatives first, like diffusers' torch.cat([negative, prompt])."""
        cfg_graph = self.manifest.shape.cfg   # the engines run the guided batch
        prompts = list(config.negative_prompts + config.prompts) if cfg_graph else list(config.prompts)
        t0 = time.perf_counter()
        embeddings = self._run(Stage.TEXT_ENCODER, {INPUT_IDS: self.tokenizer.encode(prompts)})[TEXT_EMBEDDINGS]
        text_time = self._engine_time(Stage.TEXT_ENCODER, t0)
        _check_finite(embeddings, "the text encoder")
        return embeddings, text_time

    def prepare_latents(self, request: Request, rng: Any) -> tuple[_Latents, float]:
        """The initial latents (diffusers' prepare_latents, and prepare_mask_latents for
        the masked tasks), drawing from `rng` in diffusers' order."""
        config, sampler, shape = request.config, request.sampler, self.latent_shape
        if config.task is Task.TEXT_TO_IMAGE:
            noise = request.latents if request.latents is not None else rng.standard_normal(shape, dtype=np.float32)
            return _Latents(_f32(noise * np.float32(sampler.init_noise_sigma))), 0.0
        encoder_time = 0.0
        inpainting_unet = self.manifest.facts.inpainting
        full = config.strength == 1.0   # diffusers' is_strength_max: start from pure noise
        original = None
        if not config.task.masked or not inpainting_unet or not full:
            original, encoder_time = self._encode_image(request.image, rng)
        noise = rng.standard_normal(shape, dtype=np.float32)
        if config.task.masked and full:
            x = _f32(noise * np.float32(sampler.init_noise_sigma))
        else:
            x = _f32(sampler.add_noise(original, noise, 0))
        if not config.task.masked:
            return _Latents(x), encoder_time
        # The masked image is encoded (one more draw) whatever the U-Net, as diffusers'
        # prepare_mask_latents does; only a 9-channel U-Net uses its latents.
        latent_hw = shape[2:]
        mask = inputs.mask_to_latent(request.mask, *latent_hw)
        masked = inputs.masked_image(request.image, request.mask)
        if inpainting_unet:
            masked_latents, t = self._encode_image(masked, rng)
            encoder_time += t
            b = self.manifest.shape.guided_batch
            extra = np.concatenate([np.repeat(mask, b, axis=0), np.repeat(masked_latents[:1], b, axis=0)], axis=1)
            return _Latents(x, unet_extra=_f32(extra)), encoder_time
        rng.standard_normal((1, *shape[1:]), dtype=np.float32)   # the masked image's latent sample, unused
        return _Latents(x, original=original, noise=noise, mask=_f32(np.repeat(mask, shape[0], axis=0))), encoder_time

    def denoise(self, config: GenerationConfig, sampler: Sampler, latents: _Latents, embeddings: np.ndarray,
                rng: Any, on_step: Callable[[int, int], None] | None) -> tuple[np.ndarray, list[float], list[float]]:
        cfg_graph = self.manifest.shape.cfg            # the engines run the guided batch
        use_cfg = cfg_graph and config.guidance > 1.0  # diffusers: do_classifier_free_guidance
        b = self.batch
        x = latents.x
        state = sampler.init_state()
        step_times, unet_times = [], []
        guidance = np.float32(config.guidance)
        timesteps = np.asarray(sampler.timesteps, dtype=np.float32).reshape(-1, 1)   # row i: call i's input
        n = len(timesteps)
        for i in range(n):
            t0 = time.perf_counter()
            model_in = np.asarray(sampler.scale_model_input(x, i), dtype=np.float32)
            sample = np.concatenate([model_in, model_in]) if cfg_graph else model_in
            if latents.unet_extra is not None:   # 9-channel U-Net: [latents, mask, masked-image latents]
                sample = np.concatenate([sample, latents.unet_extra], axis=1)
            u0 = time.perf_counter()
            raw = self._run(Stage.UNET, {SAMPLE: sample, TIMESTEP: timesteps[i],
                                         ENCODER_HIDDEN_STATES: embeddings})[LATENT]
            unet_times.append(self._engine_time(Stage.UNET, u0))
            out = raw
            if cfg_graph:
                uncond, cond = raw[:b], raw[b:]
                out = uncond + guidance * (cond - uncond) if use_cfg else cond
            noise = rng.standard_normal(x.shape, dtype=np.float32) if sampler.draws_noise(i) else None
            x, state = sampler.step(state, i, x, out, noise)
            x = _f32(x)
            if latents.original is not None:
                # 4-channel inpainting: outside the mask, the original re-noised to the next
                # timestep (clean after the last step), as StableDiffusionInpaintPipeline.
                proper = latents.original if i == n - 1 else sampler.add_noise(latents.original, latents.noise, i + 1)
                x = _f32((np.float32(1) - latents.mask) * proper + latents.mask * x)
            # One check per step, on the new latents: a NaN/Inf from the U-Net enters every
            # sampler's update (NaN * 0 is NaN), so it always shows here; then say whose it was.
            if not np.isfinite(x).all():
                where = f"step {i + 1} of {n} (timestep {float(timesteps[i, 0]):g})"
                _check_finite(raw, f"the U-Net at {where}")
                _check_finite(x, f"the sampler at {where}")
            step_times.append(time.perf_counter() - t0)
            if on_step is not None:
                on_step(i + 1, n)
        return x, step_times, unet_times

    def decode(self, x: np.ndarray) -> tuple[np.ndarray, float]:
        t0 = time.perf_counter()
        decoded = self._run(Stage.VAE_DECODER, {LATENT: _f32(x / np.float32(self.manifest.facts.vae_scaling_factor))})
        vae_time = self._engine_time(Stage.VAE_DECODER, t0)
        images = decoded[IMAGES]
        _check_finite(images, "the VAE decoder",
                      hint="; an fp16 VAE overflows on some latents: export again with --vae-precision fp32")
        pixels = np.ascontiguousarray(np.clip(images / np.float32(2) + np.float32(0.5), 0, 1).transpose(0, 2, 3, 1),
                                      dtype=np.float32)
        return pixels, vae_time

    def _encode_image(self, image: np.ndarray, rng: Any) -> tuple[np.ndarray, float]:
        """diffusers' `_encode_vae_image`: a latent sample (mean + std * noise, one draw),
        times the scaling factor, repeated for every batch item."""
        t0 = time.perf_counter()
        out = self._run(Stage.VAE_ENCODER, {IMAGES: image})
        seconds = self._engine_time(Stage.VAE_ENCODER, t0)
        mean, std = out[LATENT_MEAN], out[LATENT_STD]
        _check_finite(mean, "the VAE encoder")
        sample = mean + std * rng.standard_normal(mean.shape, dtype=np.float32)
        latents = _f32(np.float32(self.manifest.facts.vae_scaling_factor) * sample)
        return np.repeat(latents, self.batch // latents.shape[0], axis=0), seconds

    def _run(self, stage: Stage, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.engines[stage](inputs)

    def _engine_time(self, stage: Stage, started: float) -> float:
        measured = self.engines[stage].last_time()
        return measured if measured is not None else time.perf_counter() - started

    def close(self) -> None:
        for engine in self.engines.values():
            engine.close()

    def __enter__(self) -> "Pipeline":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _random_source(config: GenerationConfig) -> Any:
    """One generator per call, drawn from in diffusers' order."""
    if config.generator is Generator.NUMPY:
        return np.random.default_rng(config.seed)
    return TorchGenerator(config.seed)


def _f32(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=np.float32)


def _check_finite(array: np.ndarray, where: str, hint: str = "") -> None:
    if not np.isfinite(array).all():
        bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
        raise NumericsError(f"{where} produced {bad} NaN/Inf values{hint}")
