"""Generation from an artifact folder, with no torch in the process.

The whole generation reads top to bottom in `Pipeline._generate`, in diffusers'
seams: encode the prompt, prepare the latents, denoise, decode. It follows diffusers'
`StableDiffusionPipeline`, `StableDiffusionImg2ImgPipeline` and
`StableDiffusionInpaintPipeline` step for step (the tests hold it to that), so the
same weights, prompts and seed give the same pixels:

- every random draw comes from one generator in diffusers' order (initial noise, the
  VAE encoder's latent sample, image-to-image noise, each stochastic sampler step),
  and the default generator reproduces `torch.Generator("cpu").manual_seed(seed)`;
  a seed per batch item draws as diffusers' list of generators (runtime/generator_list.py);
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

import dataclasses
import os
import statistics
import threading
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np
from PIL import Image

from sdrt.engines import registry
from sdrt.engines.base import Engine
from sdrt.engines.errors import InvalidInput, InvalidType, NumericsError
from sdrt.engines.specs import (CLIP_SKIP, CONTROL_SCALES, CONTROLNET_COND, DEEPCACHE_FEATURE, ENCODER_ATTENTION_MASK,
                                ENCODER_HIDDEN_STATES, IMAGES, INPUT_IDS, LATENT, LATENT_MEAN, LATENT_STD, SAMPLE,
                                TEXT_EMBEDDINGS, TEXT_EMBEDS, TIME_IDS, TIMESTEP, TIMESTEP_COND, TOKEN_EMBEDDINGS, Stage)
from sdrt.engines.specs import CLIP_INPUT, CONCEPT_SCORES, SPECIAL_SCORES   # the safety checker's

from . import controlnet, inputs, prompts, safety
from .artifact import Artifact, Request
from .config import GenerationConfig, Generator, Task
from .embeddings import EmbeddingSet
from .generator_list import GeneratorList
from .images import PARAMETERS_KEY, to_pil
from .infotext import parameters_text
from .loras import LoraWeights
from .schedulers import SCHEDULERS, Sampler, denoising_end_calls
from .tokenizer import PromptTruncated
from .torch_random import TorchGenerator


@dataclass(frozen=True)
class Timings:
    """Seconds spent per stage of one generation."""

    text_encoder: float
    steps: tuple[float, ...]   # wall time of each denoising step, U-Net call and sampler math
    unet: tuple[float, ...]    # engine time of each U-Net call (with ControlNets: plus the controlnet stage's)
    vae_decoder: float
    total: float
    vae_encoder: float = 0.0   # image tasks: encoding the input (and masked) image
    safety_checker: float = 0.0   # the safety checker's engine call (0 when none ran)

    @property
    def unet_median(self) -> float:
        return statistics.median(self.unet) if self.unet else 0.0

    @property
    def host_median(self) -> float:
        """Median per-step time outside the U-Net: sampler math, guidance, copies."""
        return statistics.median(s - u for s, u in zip(self.steps, self.unet)) if self.steps else 0.0

    def to_json(self) -> dict[str, Any]:
        return {"text_encoder": self.text_encoder, "vae_encoder": self.vae_encoder, "steps": list(self.steps),
                "unet": list(self.unet), "vae_decoder": self.vae_decoder,
                "safety_checker": self.safety_checker, "total": self.total}


@dataclass(frozen=True)
class GenerationResult:
    images: list[Image.Image]   # one per batch item, 8-bit RGB
    pixels: np.ndarray | None   # float32 (batch, height, width, 3) in [0, 1], before 8-bit rounding
    timings: Timings
    seed: int                   # the seed used (drawn at random when none was given)
    config: GenerationConfig    # the validated settings
    latents_given: bool = False # True when the caller supplied the initial latents
    # AUTOMATIC1111's PNG `parameters` text of the first image (each image's own is in
    # image.info["parameters"]; batch items differ only where their prompts do)
    parameters: str = ""
    # the final latents (batch, C, h, w), before the VAE; with denoising_end (an SDXL base
    # handing over to its refiner) the only output: images is empty and pixels None
    latents: np.ndarray | None = None
    rng: Any = None             # the random stream after this call (a refiner continues it)
    # Per image, whether the artifact's safety checker flagged it (its image and pixels
    # are then all black, as diffusers returns them); None when no checker ran (the
    # artifact has none, or safety_checker=False).
    nsfw_content_detected: list[bool] | None = None

    @property
    def seeds(self) -> tuple[int, ...]:
        """Each batch item's seed (with one seed: that seed for every item)."""
        return self.config.item_seeds


@dataclass(frozen=True)
class Conditioning:
    """What the U-Net is conditioned on: the text context (guided batch, tokens, width)
    and, for an artifact of several prompt chunks, its mask (1 = a token of the chunks
    used)."""

    hidden_states: np.ndarray
    attention_mask: np.ndarray | None = None
    text_embeds: np.ndarray | None = None   # SDXL: the pooled text embedding, per row
    time_ids: np.ndarray | None = None      # SDXL: original size, crop top-left, target size, per row

    def unet_inputs(self) -> dict[str, np.ndarray]:
        inputs = {ENCODER_HIDDEN_STATES: self.hidden_states}
        if self.attention_mask is not None:
            inputs[ENCODER_ATTENTION_MASK] = self.attention_mask
        if self.text_embeds is not None:
            inputs[TEXT_EMBEDS] = self.text_embeds
            inputs[TIME_IDS] = self.time_ids
        return inputs


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

    def __init__(self, artifact: Artifact, engines: Mapping[Stage, Engine], backend: str = registry.DEFAULT,
                 backend_reason: str | None = None):
        self.artifact = artifact
        self.engines = dict(engines)
        self.backend = backend                  # the backend's name (auto resolved)
        self.backend_reason = backend_reason    # with backend="auto": why it was picked
        self.loras = LoraWeights(artifact.folder, self.engines)   # the LoRAs the engines run with now
        self._lock = threading.Lock()

    @classmethod
    def load(cls, folder: str | os.PathLike[str] | Artifact, backend: str = registry.DEFAULT, options: Any = None,
             check_hashes: bool = True, **option_kwargs: Any) -> "Pipeline":
        """Open an artifact folder written by `sdrt export` (or an `Artifact` already open).

        backend: onnxruntime (the default, the exact path), openvino, tensorrt, or auto
        (engines/registry.py: TensorRT where built, else OpenVINO, else ONNX Runtime).
        options: the backend's Options record (e.g. sdrt.engines.openvino.Options), or
        give its fields as keywords (threads=4, precision="bf16", cache=False, ...);
        an option of another backend is refused, naming the backend that takes it.

        Raises MissingFile if the folder does not exist, ArtifactError if it is incomplete
        (no manifest) or a file does not match the manifest's size and hash,
        BackendUnavailable (one line) if the backend cannot run here.
        """
        name = registry.parse(backend)
        if options is None:
            registry.check_options(name, option_kwargs)   # a bad option costs no hashing or loading
        artifact = folder if isinstance(folder, Artifact) else Artifact.open(folder, check_hashes=check_hashes)
        choice = registry.resolve(name, artifact.folder, artifact.manifest, options, **option_kwargs)
        engines = registry.open_engines(artifact.folder, artifact.manifest, choice)
        return cls(artifact, engines, choice.name, choice.reason)

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
                 steps: int | None = None, guidance: float | None = None,
                 scheduler: str | None = None, seed: int | list[int] | None = None,
                 latents: np.ndarray | None = None,
                 image: Any = None, mask_image: Any = None, strength: float | None = None,
                 outpaint: Any = None, generator: str = Generator.TORCH.value,
                 on_step: Callable[[int, int], None] | None = None,
                 scheduler_options: dict[str, Any] | None = None, prompt_weighting: bool = True,
                 clip_skip: int | None = None, prompt_2: str | list[str] | None = None,
                 negative_prompt_2: str | list[str] | None = None,
                 original_size: tuple[int, int] | None = None,
                 crops_coords_top_left: tuple[int, int] | None = None,
                 target_size: tuple[int, int] | None = None, denoising_start: float | None = None,
                 denoising_end: float | None = None, aesthetic_score: float = 6.0,
                 negative_aesthetic_score: float = 2.5, cache_interval: int = 1, cache_uniform: bool = True,
                 cache_center: int | None = None, cache_pow: float | None = None,
                 safety_checker: bool = True, loras: Any = None, control_image: Any = None,
                 controlnet_conditioning_scale: float | list[float] | None = None,
                 control_guidance_start: float | list[float] | None = None,
                 control_guidance_end: float | list[float] | None = None,
                 guess_mode: bool = False, embeddings: list[Any] | None = None,
                 allow_pickle: bool = False) -> GenerationResult:
        """Generate `batch` images (the artifact's batch).

        prompt, negative_prompt: a string (used for every batch item) or a list of `batch`.
        steps: denoising steps (default 25; 4 for an LCM model). guidance: CFG scale, <= 1
        disables guidance (default 7.5; 1.0 on a --no-cfg artifact; an LCM model's embedded
        guidance scale, default 8.5). A negative prompt that will not be used (no CFG) is
        dropped with an IgnoredSetting warning.
        scheduler: an sdrt sampler name ("dpmpp_2m_karras", see `SCHEDULERS`) or an
        AUTOMATIC1111 one ("DPM++ 2M Karras", "Euler a"); default: the checkpoint's own
        scheduler (a class sdrt does not follow runs "euler" with a SchedulerFallback warning).
        scheduler_options: diffusers options of that sampler on top of the checkpoint's
        config, as `Scheduler.from_config(config, **scheduler_options)` takes them
        (e.g. {"use_karras_sigmas": True, "solver_order": 3}); an unknown key is refused.
        seed: 0..2**64-1 (default: random, reported in the result). With generator="torch"
        (the default) it gives the image diffusers gives with
        `generator=torch.Generator("cpu").manual_seed(seed)`; "numpy" is sdrt 0.1's generator.
        A list of `batch` seeds gives each item its own, as diffusers'
        `generator=[torch.Generator("cpu").manual_seed(s) for s in seeds]`: item i is then
        the image a batch of one gives for seeds[i] (text-to-image, image-to-image; the
        inpainting pipelines sample their one input image from the first seed only).
        `result.seeds` lists each item's seed.
        latents: float32 (batch, C, H/8, W/8) standard-normal initial latents instead of
        drawing them from the seed (text-to-image).
        image: a PIL image, an HxWxC uint8 or float [0, 1] array, or a path: image-to-image,
        or with mask_image (white = repaint) inpainting, or with outpaint=(left, top,
        right, bottom) pixel margins outpainting. Inputs of another size are resized to
        the artifact's. strength in (0, 1]: how much of the schedule runs (default 0.8 for
        image-to-image, 1.0 for inpainting; SDXL 0.3 and 0.9999; as in diffusers).
        prompt_weighting: read AUTOMATIC1111's attention syntax: "(word)" x1.1, "[word]" /1.1,
        "(word:1.5)", "\\(" for a literal bracket, and BREAK to start a new 75-token chunk;
        False takes the text literally. Prompts past 75 tokens run in chunks, up to the
        artifact's max prompt chunks (`sdrt export --max-prompt-chunks`); the rest is
        dropped with a PromptTruncated warning.
        clip_skip: diffusers' clip_skip, the text encoder's hidden state this many layers
        before the last (AUTOMATIC1111's "Clip skip" is clip_skip + 1); None or 0: none.
        SDXL only, as in diffusers' StableDiffusionXLPipeline: prompt_2 / negative_prompt_2
        for the second text encoder (default: prompt / negative_prompt); original_size,
        target_size (height, width) and crops_coords_top_left (top, left) in pixels
        (default: the artifact's size and (0, 0)). denoising_end in (0, 1): stop there and
        return `result.latents` only (a base handing over to its refiner); denoising_start:
        a refiner's start, with image= those latents; aesthetic_score /
        negative_aesthetic_score: the refiner's conditions (6.0, 2.5). `refine()` runs both.
        cache_interval: DeepCache (needs an artifact exported with --deepcache): the full
        U-Net every cache_interval steps, its shallow graph reusing the last full call's
        deep feature in between; 1 (default) runs the full U-Net every step (exact).
        cache_uniform=False: the reference's non-uniform schedule, ceil(steps / interval)
        full steps packed around step cache_center (default 30% of the steps) by a power
        law of exponent cache_pow (default 1.4). See runtime/deepcache.py.
        safety_checker: run the artifact's safety checker, when it has one (the
        checkpoint's, exported unless `sdrt export --no-safety-checker`): images it flags
        come back black, and `result.nsfw_content_detected` says which; False skips it,
        as diffusers' safety_checker=None does.
        loras: LoRA files for this call, each a path or (path, scale) (scale default 1.0):
        diffusers/PEFT or kohya/AUTOMATIC1111 .safetensors, for the U-Net and the text
        encoder(s). Applied exactly as diffusers' fuse_lora(lora_scale=scale), several at
        once adding up; switching, or going back to none, re-reads and re-exports nothing,
        and a call without LoRAs runs the exported weights bit for bit (runtime/loras.py).
        On onnxruntime, and TensorRT engines built with --refittable.
        control_image: ControlNet (an artifact exported with --controlnet), as diffusers'
        StableDiffusionControlNet(Img2Img/Inpaint)Pipeline: the conditioning image (a
        path, PIL image or array, used as given: resized to the artifact's size, no
        preprocessor), or a list of one per ControlNet in their export order;
        controlnet_conditioning_scale (default as diffusers: 1.0, with image= 0.8, with
        mask_image= or outpaint= 0.5), control_guidance_start (0.0) and
        control_guidance_end (1.0): one number or a list of one per ControlNet; guess_mode:
        the ControlNets see the conditional half only (see runtime/controlnet.py). Without
        control_image a ControlNet artifact runs its U-Net with zero residuals (the base model).
        embeddings: textual inversion, a list of embedding files (AUTOMATIC1111's or
        diffusers' .safetensors; SDXL's clip_l + clip_g), each a path or a (path, token)
        pair. A file's trigger is its name without the extension (AUTOMATIC1111's files,
        as the web UI names them) or its stored token (diffusers'); a token given here
        replaces it. The trigger in a prompt or negative prompt stands for the
        embedding's vectors, as after diffusers' load_textual_inversion. Needs an
        artifact exported with embedding slots (sdrt export --embedding-slots, 32 by
        default). .pt/.bin files are pickles, read (with torch) only with
        allow_pickle=True, as their loading runs code from the file.
        on_step(i, n): called after each denoising step (progress reporting).
        """
        request = self.artifact.request(prompt, negative_prompt, steps, guidance, scheduler, seed, latents,
                                        image, mask_image, strength, outpaint, generator, scheduler_options,
                                        prompt_weighting, clip_skip, prompt_2, negative_prompt_2, original_size,
                                        crops_coords_top_left, target_size, denoising_start, denoising_end,
                                        aesthetic_score, negative_aesthetic_score, cache_interval, cache_uniform,
                                        cache_center, cache_pow, safety_checker=safety_checker, loras=loras,
                                        control_image=control_image,
                                        controlnet_conditioning_scale=controlnet_conditioning_scale,
                                        control_guidance_start=control_guidance_start,
                                        control_guidance_end=control_guidance_end, guess_mode=guess_mode,
                                        embeddings=embeddings, allow_pickle=allow_pickle)
        return self.run(request, on_step)

    def run(self, request: Request, on_step: Callable[[int, int], None] | None = None) -> GenerationResult:
        """Generate from a request made by `self.artifact.request(...)`."""
        if on_step is not None and not callable(on_step):
            raise InvalidType(f"on_step must be a callable on_step(i, n) or None, got {type(on_step).__name__}")
        self.loras.read(request.config.loras)   # a bad file fails here, before the lock and any engine work
        with self._lock:
            return self._generate(request, on_step)

    def _generate(self, request: Request, on_step: Callable[[int, int], None] | None,
                  rng: Any = None) -> GenerationResult:
        start = time.perf_counter()
        config, sampler = request.config, request.sampler
        rng = _random_source(config) if rng is None else rng
        self.loras.apply(config.loras)
        conditioning, text_time = self.encode_prompt(config, request.embeddings)
        latents, vae_encoder_time = self.prepare_latents(request, rng)
        x, step_times, unet_times = self.denoise(config, sampler, latents, conditioning, rng, on_step,
                                                 request.control_images)
        if config.denoising_end is not None:   # handed over to a refiner as latents, not decoded
            timings = Timings(text_time, tuple(step_times), tuple(unet_times), 0.0, time.perf_counter() - start,
                              vae_encoder_time)
            return GenerationResult([], None, timings, config.seed, config, request.latents is not None, "", x, rng)
        pixels, vae_time = self.decode(x)
        images = to_pil(pixels)
        nsfw, safety_time = None, 0.0
        if request.safety_checker and self.manifest.has(Stage.SAFETY_CHECKER):
            pixels, nsfw, safety_time = self.run_safety_checker(pixels, images)
            images = to_pil(pixels)
        timings = Timings(text_time, tuple(step_times), tuple(unet_times), vae_time, time.perf_counter() - start,
                          vae_encoder_time, safety_time)
        given = request.latents is not None   # the seed did not draw these latents: it is not recorded
        m = self.manifest
        extra = _embeddings_text(request.embeddings, self.tokenizer, config)
        for i, image in enumerate(images):
            image.info[PARAMETERS_KEY] = parameters_text(config, self.width, self.height, m.model_name, m.model_hash,
                                                         index=i, seed=not given, extra=extra)
        return GenerationResult(images, pixels, timings, config.seed, config, given, images[0].info[PARAMETERS_KEY],
                                x, nsfw_content_detected=nsfw)

    def refine(self, refiner: "Pipeline", prompt: str | list[str], high_noise_frac: float = 0.8,
               on_step: Callable[[int, int], None] | None = None, **kwargs: Any) -> GenerationResult:
        """SDXL base + refiner in one call, diffusers' "ensemble of expert denoisers": this
        (base) pipeline runs the first `high_noise_frac` of the noise schedule
        (`denoising_end`), the refiner the rest from its latents (`denoising_start`), with
        the same prompt and settings (`kwargs`: those of `__call__`) and one random stream,
        as one torch.Generator passed to both diffusers pipelines. Returns the refiner's
        result (its PNG text records the refiner's settings)."""
        if not isinstance(refiner, Pipeline):
            raise InvalidType(f"refiner must be a Pipeline (Pipeline.load(refiner_folder)), got {type(refiner).__name__}")
        first, refiner_kwargs = refine_requests(self.artifact, refiner.artifact, prompt, high_noise_frac, kwargs)
        with self._lock:
            base = self._generate(first, on_step)
        second = refiner.artifact.request(prompt, image=base.latents, denoising_start=high_noise_frac,
                                          **refiner_kwargs)
        with refiner._lock:
            result = refiner._generate(second, on_step, rng=base.rng)
        # The PNG text is the base's settings plus the refiner, as AUTOMATIC1111 writes it.
        r = refiner.manifest
        extra = {**_embeddings_text(first.embeddings, self.tokenizer, first.config),
                 "Refiner": f"{r.model_name} [{r.model_hash}]" if r.model_hash else r.model_name,
                 "Refiner switch at": f"{float(high_noise_frac):g}"}
        m = self.manifest
        for i, image in enumerate(result.images):
            image.info[PARAMETERS_KEY] = parameters_text(dataclasses.replace(first.config, denoising_end=None),
                                                         self.width, self.height, m.model_name, m.model_hash,
                                                         index=i, extra=extra)
        return dataclasses.replace(result, parameters=result.images[0].info[PARAMETERS_KEY])

    # -- the seams, in diffusers' order -----------------------------------------------------

    def encode_prompt(self, config: GenerationConfig,
                      embeddings: EmbeddingSet | None = None) -> tuple[Conditioning, float]:
        """The U-Net's context, negatives first like diffusers' torch.cat([negative, prompt]).

        Prompts are read in AUTOMATIC1111's syntax (unless config.prompt_weighting is
        False) and split into 75-token chunks; each text encoder runs once per chunk on
        every prompt, the outputs are joined along the token axis and weighted
        (`prompts.apply_emphasis`). The context then fills the artifact's
        prompt_chunks x 77 tokens: the chunks used, then zeros that the attention mask
        hides from the U-Net. clip_skip applies to the prompts only, as in diffusers'
        StableDiffusionPipeline (its negative prompt embeddings are the last hidden state).

        SDXL, as StableDiffusionXLPipeline: the second encoder reads prompt_2 (default:
        the prompt); the two encoders' hidden states are joined along the width; the
        pooled embedding comes from the second encoder's first chunk; with
        force_zeros_for_empty_prompt an absent negative prompt (None, not "") is all zeros.

        Textual inversion (`embeddings`): each encoder's tokenizer reads the triggers as
        the embeddings' ids, and the encoder takes their vectors as `token_embeddings`
        (zeros when the call has none).
        """
        facts, shape = self.manifest.facts, self.manifest.shape
        negatives = config.negative_prompts if shape.cfg else ()   # the engines run the guided batch
        encoders = self._encoders(config)
        limit = shape.prompt_chunks
        triggers = {stage: embeddings.triggers.get(stage) if embeddings else None for stage, _, _ in encoders}
        chunked = [prompts.chunk_prompts(tok, list(texts), config.prompt_weighting, max_chunks=limit,
                                         triggers=triggers[stage])
                   for stage, tok, texts in encoders]
        count = max(c.chunks for c in chunked)
        if any(c.chunks < count for c in chunked):   # the encoders' contexts must line up
            chunked = [prompts.chunk_prompts(tok, list(texts), config.prompt_weighting, max_chunks=limit, count=count,
                                             triggers=triggers[stage])
                       for stage, tok, texts in encoders]
        truncated = {t.prompt: t for c in chunked for t in c.truncated}
        if truncated:
            warnings.warn(prompts.truncation_message(self.tokenizer, list(truncated.values()), limit),
                          PromptTruncated, stacklevel=4)
        n_neg = len(negatives)
        # diffusers' clip_skip applies to the prompts, not to the negative prompts.
        skips = np.array([0] * n_neg + [config.clip_skip] * len(config.prompts), dtype=np.int32)
        text_time = 0.0
        widths, pooled = [], None
        for (stage, tok, _), chunks in zip(encoders, chunked):
            spec = self.manifest.specs[stage]
            names = {t.name for t in spec.inputs}
            extra = {CLIP_SKIP: skips} if CLIP_SKIP in names else {}
            if TOKEN_EMBEDDINGS in names:
                extra[TOKEN_EMBEDDINGS] = (embeddings.inputs[stage] if embeddings else
                                           np.zeros(spec.input(TOKEN_EMBEDDINGS).shape, np.float32))
            outputs = []
            for j, ids in enumerate(chunks.ids):
                t0 = time.perf_counter()
                out = self._run(stage, {INPUT_IDS: ids, **extra})
                text_time += self._engine_time(stage, t0)
                outputs.append(out[TEXT_EMBEDDINGS])
                if j == 0 and TEXT_EMBEDS in out:
                    pooled = out[TEXT_EMBEDS]
            z = outputs[0] if len(outputs) == 1 else np.concatenate(outputs, axis=1)
            _check_finite(z, f"the {stage.value.replace('_', ' ')}")
            widths.append(prompts.apply_emphasis(z, chunks.weights, tok.max_length))
        z = widths[0] if len(widths) == 1 else np.concatenate(widths, axis=2)
        if facts.force_zeros_for_empty_prompt and n_neg and not config.negative_given:
            # diffusers: negative_prompt None -> all-zero negative embeddings and pooled
            z = z.copy()
            z[:n_neg] = 0
            if pooled is not None:
                pooled = pooled.copy()
                pooled[:n_neg] = 0
        time_ids = self._time_ids(config, n_neg, z.shape[0]) if facts.added_conditions else None
        pooled = None if pooled is None else _f32(pooled)
        mask = None
        if limit > 1:
            context = np.zeros((z.shape[0], limit * self.tokenizer.max_length, z.shape[2]), dtype=np.float32)
            context[:, :z.shape[1]] = z
            mask = np.zeros(context.shape[:2], dtype=np.float32)
            mask[:, :z.shape[1]] = 1.0
            z = context
        return Conditioning(_f32(z), mask, pooled, time_ids), text_time

    def _encoders(self, config: GenerationConfig) -> list[tuple[Stage, Any, tuple[str, ...]]]:
        """(stage, tokenizer, the texts it encodes: negatives first) per text encoder."""
        negatives = config.negative_prompts if self.manifest.shape.cfg else ()
        if not self.manifest.has(Stage.TEXT_ENCODER):
            # The SDXL refiner's only encoder reads the prompt (diffusers zips
            # [prompt, prompt_2] with its one tokenizer).
            return [(Stage.TEXT_ENCODER_2, self.tokenizer, negatives + config.prompts)]
        encoders = [(Stage.TEXT_ENCODER, self.tokenizer, negatives + config.prompts)]
        if self.manifest.has(Stage.TEXT_ENCODER_2):   # SDXL base: prompt_2, else the prompt
            second_negatives = config.second_negative_prompts if self.manifest.shape.cfg else ()
            encoders.append((Stage.TEXT_ENCODER_2, self.artifact.tokenizer_2,
                             second_negatives + config.second_prompts))
        return encoders

    def _time_ids(self, config: GenerationConfig, n_negative: int, rows: int) -> np.ndarray:
        """SDXL's time ids per row: original size, crop top-left, then the target size
        (base) or the aesthetic score, negative rows first (refiner)."""
        size = (self.height, self.width)
        head = [*(config.original_size or size), *(config.crops_coords_top_left or (0, 0))]
        if self.manifest.facts.aesthetic_score:
            table = ([head + [config.negative_aesthetic_score]] * n_negative
                     + [head + [config.aesthetic_score]] * (rows - n_negative))
        else:
            table = [head + [*(config.target_size or size)]] * rows
        return np.array(table, dtype=np.float32)

    def prepare_latents(self, request: Request, rng: Any) -> tuple[_Latents, float]:
        """The initial latents (diffusers' prepare_latents, and prepare_mask_latents for
        the masked tasks), drawing from `rng` in diffusers' order."""
        config, sampler, shape = request.config, request.sampler, self.latent_shape
        if config.task is Task.TEXT_TO_IMAGE:
            noise = request.latents if request.latents is not None else rng.standard_normal(shape, dtype=np.float32)
            return _Latents(_f32(noise * np.float32(sampler.init_noise_sigma))), 0.0
        if request.image_latents is not None:
            # An SDXL base's latents (StableDiffusionXLImg2ImgPipeline takes 4-channel images
            # as latents): no VAE encoder; from denoising_start, no noise either.
            original = _f32(np.repeat(request.image_latents, self.batch // request.image_latents.shape[0], axis=0))
            if config.denoising_start is not None:
                return _Latents(original.copy()), 0.0
            noise = rng.standard_normal(shape, dtype=np.float32)
            return _Latents(_f32(sampler.add_noise(original, noise, 0))), 0.0
        encoder_time = 0.0
        inpainting_unet = self.manifest.facts.inpainting
        full = config.strength == 1.0   # diffusers' is_strength_max: start from pure noise
        original = None
        if not config.task.masked or not inpainting_unet or not full:
            # diffusers' img2img prepare_latents, given a list of generators, encodes the
            # image repeated to the batch, one latent sample per item from its generator;
            # the inpainting pipelines' _encode_vae_image samples the one image (first generator).
            per_item = isinstance(rng, GeneratorList) and not config.task.masked
            original, encoder_time = self._encode_image(request.image, rng, per_item)
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

    def denoise(self, config: GenerationConfig, sampler: Sampler, latents: _Latents, conditioning: Conditioning,
                rng: Any, on_step: Callable[[int, int], None] | None,
                control_images: np.ndarray | None = None) -> tuple[np.ndarray, list[float], list[float]]:
        cfg_graph = self.manifest.shape.cfg            # the engines run the guided batch
        use_cfg = cfg_graph and config.guidance > 1.0  # diffusers: do_classifier_free_guidance
        b = self.batch
        x = latents.x
        state = sampler.init_state()
        step_times, unet_times = [], []
        guidance = np.float32(config.guidance)
        timesteps = np.asarray(sampler.timesteps, dtype=np.float32).reshape(-1, 1)   # row i: call i's input
        n = len(timesteps)
        if config.denoising_end is not None:   # SDXL base: stop where the refiner takes over
            n = denoising_end_calls(sampler, self.scheduler_config, config.denoising_end)
        context = conditioning.unet_inputs()
        full = config.deepcache.full_calls(len(timesteps), sampler.order)
        feature = None   # DeepCache: the deep feature of the last full U-Net call
        # SDXL's shallow U-Net reads no text (its last up block has no attention).
        shallow = ({t.name for t in self.manifest.specs[Stage.UNET_SHALLOW].inputs}
                   if config.deepcache.enabled else set())
        if self.manifest.facts.guidance_embedding:   # LCM: the scale enters the U-Net, no CFG
            context[TIMESTEP_COND] = guidance_embedding(config.guidance, self.manifest.facts.time_cond_proj_dim,
                                                        self.manifest.shape.guided_batch)
        control = self._control_inputs(config, control_images, len(timesteps), use_cfg, context)
        for i in range(n):
            t0 = time.perf_counter()
            model_in = np.asarray(sampler.scale_model_input(x, i), dtype=np.float32)
            sample = np.concatenate([model_in, model_in]) if cfg_graph else model_in
            # ControlNet: its residuals for this call (the 4-channel latents, before an
            # inpainting U-Net's mask and masked image are appended, as diffusers runs it).
            c0 = time.perf_counter()
            residuals = control(i, sample, timesteps[i]) if control is not None else {}
            control_time = self._engine_time(Stage.CONTROLNET, c0) if residuals and control_images is not None else 0.0
            if latents.unet_extra is not None:   # 9-channel U-Net: [latents, mask, masked-image latents]
                sample = np.concatenate([sample, latents.unet_extra], axis=1)
            u0 = time.perf_counter()
            if full[i]:
                result = self._run(Stage.UNET, {SAMPLE: sample, TIMESTEP: timesteps[i], **context, **residuals})
                raw, feature = result[LATENT], result.get(DEEPCACHE_FEATURE)
                unet_times.append(self._engine_time(Stage.UNET, u0) + control_time)
            else:
                inputs = {SAMPLE: sample, TIMESTEP: timesteps[i], DEEPCACHE_FEATURE: feature, **context}
                raw = self._run(Stage.UNET_SHALLOW, {k: v for k, v in inputs.items() if k in shallow})[LATENT]
                unet_times.append(self._engine_time(Stage.UNET_SHALLOW, u0))
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

    def _control_inputs(self, config: GenerationConfig, images: np.ndarray | None, calls: int, use_cfg: bool,
                        context: Mapping[str, np.ndarray]) -> Callable[[int, np.ndarray, np.ndarray], dict] | None:
        """For an artifact with ControlNets: call i's U-Net residuals, from the controlnet
        stage (the same latents, timestep and text as the U-Net, each ControlNet's image
        for every row, and this call's weights from controlnet.scale_table); without a
        control image, zeros. None for an artifact without ControlNets."""
        shape = self.manifest.shape
        if not shape.controlnets:
            return None
        specs = self.manifest.specs
        if images is None or config.controlnet is None:
            zeros = {t.name: np.zeros(t.shape, np.float32) for t in specs[Stage.CONTROLNET].outputs}
            return lambda i, sample, t: zeros
        rows = shape.guided_batch
        cond = np.ascontiguousarray(np.repeat(images, rows, axis=1), dtype=np.float32)   # (nets, rows, 3, H, W)
        table = controlnet.scale_table(config.controlnet, calls, self.batch, shape.cfg, use_cfg,
                                       len(specs[Stage.CONTROLNET].outputs))
        text = context[ENCODER_HIDDEN_STATES]

        def residuals(i: int, sample: np.ndarray, t: np.ndarray) -> dict[str, np.ndarray]:
            out = self._run(Stage.CONTROLNET, {SAMPLE: sample, TIMESTEP: t, ENCODER_HIDDEN_STATES: text,
                                               CONTROLNET_COND: cond, CONTROL_SCALES: table[i]})
            for name, value in out.items():
                _check_finite(value, f"the ControlNet ({name}) at call {i + 1} of {calls}")
            return out
        return residuals

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

    def run_safety_checker(self, pixels: np.ndarray,
                           images: list[Image.Image]) -> tuple[np.ndarray, list[bool], float]:
        """diffusers' run_safety_checker: the 8-bit images through the checkpoint's
        feature extractor, the checker's scores to per-image flags, and the flagged
        images' pixels replaced by zeros (runtime/safety.py)."""
        t0 = time.perf_counter()
        out = self._run(Stage.SAFETY_CHECKER, {CLIP_INPUT: self.artifact.clip_processing(images)})
        seconds = self._engine_time(Stage.SAFETY_CHECKER, t0)
        _check_finite(out[CONCEPT_SCORES], "the safety checker")
        _check_finite(out[SPECIAL_SCORES], "the safety checker")
        flagged = safety.flags(out[SPECIAL_SCORES], out[CONCEPT_SCORES])
        return safety.black_out(pixels, flagged), flagged, seconds

    def _encode_image(self, image: np.ndarray, rng: Any, per_item: bool = False) -> tuple[np.ndarray, float]:
        """diffusers' `_encode_vae_image`: a latent sample (mean + std * noise, one draw),
        times the scaling factor, repeated for every batch item; per_item: one sample per
        batch item (the image's mean and std are the same for each)."""
        t0 = time.perf_counter()
        out = self._run(Stage.VAE_ENCODER, {IMAGES: image})
        seconds = self._engine_time(Stage.VAE_ENCODER, t0)
        mean, std = out[LATENT_MEAN], out[LATENT_STD]
        _check_finite(mean, "the VAE encoder")
        rows = self.batch if per_item else mean.shape[0]
        sample = mean + std * rng.standard_normal((rows, *mean.shape[1:]), dtype=np.float32)
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


def refine_requests(base: Artifact, refiner: Artifact, prompt: Any, high_noise_frac: Any,
                    kwargs: Mapping[str, Any]) -> tuple[Request, dict[str, Any]]:
    """Validate a base + refiner run before any engine loads: the base's request (to
    stop at `high_noise_frac`) and the refiner's settings (the base's, less those only
    the base takes: prompt_2, negative_prompt_2, target_size), checked on stand-in latents."""
    for key in ("denoising_end", "denoising_start", "image", "mask_image", "outpaint", "latents"):
        if kwargs.get(key) is not None:
            raise InvalidInput(f"{key} cannot be combined with a refiner: the base hands its latents over at "
                               f"high_noise_frac")
    if refiner.manifest.facts.family != "sdxl-refiner":
        raise InvalidInput(f"{refiner.folder} holds a {refiner.manifest.family.title} model, not an SDXL refiner")
    if refiner.latent_shape != base.latent_shape:
        raise InvalidInput(f"the refiner's latents {refiner.latent_shape} differ from the base's {base.latent_shape}: "
                           f"export both at the same size and batch")
    first = base.request(prompt, denoising_end=high_noise_frac, **kwargs)
    # The refiner has no first encoder and no target size; the hand-off sets the rest.
    # LoRAs are the base's (a LoRA trained on the base does not fit the refiner's U-Net).
    skip = ("prompt_2", "negative_prompt_2", "target_size", "loras", "denoising_end", "denoising_start", "image",
            "mask_image", "outpaint", "latents")
    refiner_kwargs = {k: v for k, v in kwargs.items() if k not in skip}
    refiner_kwargs["seed"] = list(first.config.seeds) if first.config.seeds is not None else first.config.seed
    refiner.request(prompt, image=np.zeros(base.latent_shape, np.float32), denoising_start=high_noise_frac,
                    **refiner_kwargs)
    return first, refiner_kwargs


def guidance_embedding(guidance: float, dim: int, batch: int) -> np.ndarray:
    """An LCM U-Net's `timestep_cond`: diffusers' `get_guidance_scale_embedding` of
    w = guidance - 1 (LatentConsistencyModelPipeline), in float32 as torch computes it:
    sin and cos of w * 1000 * 10000^(-k / (dim / 2 - 1)), zero-padded to an odd dim."""
    f32 = np.float32
    w = f32(guidance - 1) * f32(1000.0)
    half = dim // 2
    step = f32(np.log(f32(10000.0))) / f32(half - 1)
    freqs = np.exp(np.arange(half, dtype=f32) * -step)
    angles = w * freqs
    emb = np.concatenate([np.sin(angles), np.cos(angles)])
    if dim % 2:
        emb = np.concatenate([emb, np.zeros(1, f32)])
    return np.ascontiguousarray(np.broadcast_to(emb.astype(f32), (batch, dim)))


def _embeddings_text(embeddings: EmbeddingSet | None, tokenizer: Any, config: GenerationConfig) -> dict[str, str]:
    """AUTOMATIC1111's "TI hashes" PNG field for the embeddings a call's prompts use."""
    if embeddings is None:
        return {}
    texts = config.prompts + config.negative_prompts + config.second_prompts + config.second_negative_prompts
    used = embeddings.hashes_text(tokenizer, texts)
    return {"TI hashes": used} if used else {}


def _random_source(config: GenerationConfig) -> Any:
    """One generator per call, drawn from in diffusers' order; with a seed per batch
    item, one generator per item (diffusers' list of generators)."""
    make = np.random.default_rng if config.generator is Generator.NUMPY else TorchGenerator
    if config.seeds is not None:
        return GeneratorList([make(s) for s in config.seeds])
    return make(config.seed)


def _f32(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=np.float32)


def _check_finite(array: np.ndarray, where: str, hint: str = "") -> None:
    if not np.isfinite(array).all():
        bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
        raise NumericsError(f"{where} produced {bad} NaN/Inf values{hint}")
