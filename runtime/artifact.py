"""An artifact folder before any engine is opened, and the requests it accepts.

`Artifact.open` reads what is cheap (the manifest, the tokenizer, the scheduler
config); `Artifact.request` validates everything one generation asks for, builds its
sampler and decodes its input images, so a bad setting or a broken image fails in
milliseconds, before engines load (the CLI calls it before `Pipeline.load`). The
pipeline then trusts the `Request`.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from sdrt.engines.errors import ArtifactError, InvalidInput, InvalidType
from sdrt.engines.files import read_json_object
from sdrt.engines.manifest import Manifest, load_manifest
from sdrt.engines.specs import LATENT, Stage

from . import controlnet, inputs
from .loras import parse_loras
from .config import DEFAULT_GUIDANCE, DEFAULT_STEPS, GenerationConfig, Generator, Task
from .embeddings import EmbeddingSet, parse_request
from .embeddings import fit as fit_embeddings
from .embeddings import load as load_embedding
from .prompts import parse_prompt_attention
from .safety import ClipImageProcessing, read_processing
from .schedulers import (Sampler, SchedulerFallback, checkpoint_default, denoising_end_calls, make_sampler,
                         resolved_name)
from .tokenizer import Tokenizer

SCHEDULER_CONFIG = Path("scheduler") / "scheduler_config.json"
# diffusers' LatentConsistencyModelPipeline defaults: num_inference_steps=4, guidance_scale=8.5.
LCM_DEFAULT_STEPS = 4
LCM_DEFAULT_GUIDANCE = 8.5
SDXL_DEFAULT_GUIDANCE = 5.0   # StableDiffusionXLPipeline's (and its Img2Img / Inpaint) guidance_scale


class IgnoredSetting(UserWarning):
    """A setting the request gave that this artifact cannot use (and that is not recorded)."""
TOKENIZER_DIR = "tokenizer"
TOKENIZER_2_DIR = "tokenizer_2"   # SDXL's second text encoder


@dataclass(frozen=True, eq=False)
class Request:
    """One validated generation: settings, the sampler for them, and the inputs."""

    config: GenerationConfig
    sampler: Sampler
    image: np.ndarray | None = None     # float32 (1, 3, H, W) in [-1, 1]: the (outpaint: extended) input image
    mask: np.ndarray | None = None      # float32 (1, 1, H, W) of 0/1, 1 = repaint
    latents: np.ndarray | None = None   # text-to-image: the caller's standard-normal initial latents
    # image-to-image from latents (an SDXL base's hand-off to its refiner): used as the
    # image's latents, no VAE encoder call
    image_latents: np.ndarray | None = None
    # Run the artifact's safety checker (when it has one); False only when asked for.
    safety_checker: bool = True
    # ControlNet: float32 (ControlNets, 1, 3, H, W) control images, pixels in [0, 1]
    control_images: np.ndarray | None = None
    embeddings: EmbeddingSet | None = None   # textual inversion: this call's embeddings, fitted to the artifact


class Artifact:
    def __init__(self, folder: Path, manifest: Manifest, tokenizer: Tokenizer, scheduler_config: Mapping[str, Any],
                 tokenizer_2: Tokenizer | None = None, clip_processing: ClipImageProcessing | None = None):
        self.folder = folder
        self.manifest = manifest
        self.tokenizer = tokenizer
        self.tokenizer_2 = tokenizer_2
        self.scheduler_config = dict(scheduler_config)
        # The safety checker's feature extractor (None: the artifact has no checker).
        self.clip_processing = clip_processing
        self._samplers: dict[tuple, Sampler] = {}

    @classmethod
    def open(cls, folder: str | os.PathLike[str], check_hashes: bool = True) -> "Artifact":
        """Raises MissingFile if the folder does not exist, ArtifactError if it is incomplete
        (no manifest) or a file does not match the manifest's size and hash."""
        if not isinstance(folder, (str, os.PathLike)):
            raise InvalidType(f"artifact folder must be a path, got {type(folder).__name__}")
        folder = Path(folder)
        manifest = load_manifest(folder, check_hashes=check_hashes)
        # The SDXL refiner has only the second text encoder and its tokenizer.
        first = TOKENIZER_DIR if manifest.has(Stage.TEXT_ENCODER) else TOKENIZER_2_DIR
        tokenizer = Tokenizer.from_folder(folder / first)
        if tokenizer.max_length != manifest.facts.text_max_length:
            raise ArtifactError(f"{folder / TOKENIZER_DIR}: tokenizer length {tokenizer.max_length} does not match "
                                f"the text encoder's {manifest.facts.text_max_length}")
        tokenizer_2 = None
        if manifest.has(Stage.TEXT_ENCODER_2) and first == TOKENIZER_DIR:
            tokenizer_2 = Tokenizer.from_folder(folder / TOKENIZER_2_DIR)
            if tokenizer_2.max_length != tokenizer.max_length:
                raise ArtifactError(f"{folder / TOKENIZER_2_DIR}: tokenizer length {tokenizer_2.max_length} differs "
                                    f"from {folder / TOKENIZER_DIR}'s {tokenizer.max_length}")
        path = folder / SCHEDULER_CONFIG
        if not path.is_file():
            raise ArtifactError(f"{path} is missing: the artifact folder is incomplete; export it again")
        processing = None
        if manifest.has(Stage.SAFETY_CHECKER):
            processing = read_processing(folder, manifest.facts.safety_image_size)
        return cls(folder, manifest, tokenizer, read_json_object(path, ArtifactError, "scheduler config"),
                   tokenizer_2 or tokenizer, processing)

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
    def default_steps(self) -> int:
        """Steps when none are asked for: LatentConsistencyModelPipeline's 4 for an LCM
        U-Net, else sdrt's 25."""
        return LCM_DEFAULT_STEPS if self.manifest.facts.guidance_embedding else DEFAULT_STEPS

    def guidance_default(self, task: Task) -> float:
        """`default_guidance` for `task`: StableDiffusionXLInpaintPipeline's is 7.5."""
        if task.masked and self.manifest.facts.added_conditions and self.manifest.shape.cfg:
            return DEFAULT_GUIDANCE
        return self.default_guidance

    @property
    def default_guidance(self) -> float:
        """Guidance when none is asked for: LatentConsistencyModelPipeline's 8.5 for an
        LCM U-Net (the embedded scale), 1.0 (no guidance) for a --no-cfg artifact,
        StableDiffusionXLPipeline's 5.0 for SDXL (its inpainting 7.5, see guidance_default),
        else 7.5."""
        if self.manifest.facts.guidance_embedding:
            return LCM_DEFAULT_GUIDANCE
        if not self.manifest.shape.cfg:
            return 1.0
        return SDXL_DEFAULT_GUIDANCE if self.manifest.facts.added_conditions else DEFAULT_GUIDANCE

    @property
    def default_scheduler(self) -> str:
        """The sampler that runs when none is asked for: the checkpoint's own scheduler
        class with its options, or the documented fallback (see `schedulers.checkpoint_default`)."""
        return checkpoint_default(self.scheduler_config).name

    def tasks(self) -> tuple[Task, ...]:
        """What this artifact can do: an inpainting U-Net only inpaints; image tasks need
        the VAE encoder."""
        if self.manifest.facts.inpainting:
            return (Task.INPAINT, Task.OUTPAINT)
        if self.manifest.facts.aesthetic_score:   # the SDXL refiner: StableDiffusionXLImg2ImgPipeline
            return (Task.IMAGE_TO_IMAGE,)
        if self.manifest.has(Stage.VAE_ENCODER):
            return tuple(Task)
        return (Task.TEXT_TO_IMAGE,)

    # -- requests ------------------------------------------------------------------------

    def request(self, prompt: Any, negative_prompt: Any = None, steps: Any = None,
                guidance: Any = None, scheduler: Any = None, seed: Any = None,
                latents: Any = None, image: Any = None, mask_image: Any = None, strength: Any = None,
                outpaint: Any = None, generator: Any = Generator.TORCH,
                scheduler_options: Any = None, prompt_weighting: Any = True, clip_skip: Any = None,
                prompt_2: Any = None, negative_prompt_2: Any = None, original_size: Any = None,
                crops_coords_top_left: Any = None, target_size: Any = None, denoising_start: Any = None,
                denoising_end: Any = None, aesthetic_score: Any = 6.0,
                negative_aesthetic_score: Any = 2.5, cache_interval: Any = 1, cache_uniform: Any = True,
                cache_center: Any = None, cache_pow: Any = None, safety_checker: Any = True,
                loras: Any = None, control_image: Any = None,
                controlnet_conditioning_scale: Any = None, control_guidance_start: Any = None,
                control_guidance_end: Any = None, guess_mode: Any = False, embeddings: Any = None,
                allow_pickle: bool = False) -> Request:
        """Validate one generation's settings and inputs (see `Pipeline.__call__`).
        LoRA files are named and scaled here; their contents are checked against the
        engines' weights by the Pipeline (runtime/loras.py), before any engine runs."""
        if not isinstance(safety_checker, bool):
            raise InvalidType(f"safety_checker must be True or False, got {type(safety_checker).__name__}")
        chosen_loras = parse_loras(loras)
        task = self._task(image, mask_image, outpaint)
        control = self._control(control_image, controlnet_conditioning_scale, control_guidance_start,
                                control_guidance_end, guess_mode, task)
        fitted = self.embeddings(embeddings, allow_pickle)
        if scheduler is None:
            default = checkpoint_default(self.scheduler_config)
            if default.notice:
                warnings.warn(default.notice, SchedulerFallback, stacklevel=3)
            scheduler = default.name
            if default.options and isinstance(scheduler_options, (dict, type(None))):
                scheduler_options = {**default.options, **(scheduler_options or {})}
        config = GenerationConfig.create(
            prompt, negative_prompt, self.default_steps if steps is None else steps,
            self.guidance_default(task) if guidance is None else guidance, scheduler, seed,
            batch=self.batch, task=task, strength=strength, generator=generator,
            scheduler_options=scheduler_options, prompt_weighting=prompt_weighting, clip_skip=clip_skip,
            max_clip_skip=self.manifest.facts.max_clip_skip if self.manifest.facts.clip_skip_input else None,
            prompt_2=prompt_2, negative_prompt_2=negative_prompt_2, original_size=original_size,
            crops_coords_top_left=crops_coords_top_left, target_size=target_size,
            sdxl=self.manifest.facts.added_conditions, denoising_start=denoising_start,
            denoising_end=denoising_end, aesthetic_score=aesthetic_score,
            negative_aesthetic_score=negative_aesthetic_score, cache_interval=cache_interval,
            cache_uniform=cache_uniform, cache_center=cache_center, cache_pow=cache_pow)
        if chosen_loras:
            config = dataclasses.replace(config, loras=chosen_loras)
        if config.deepcache.enabled and Stage.UNET_SHALLOW not in self.manifest.stages:
            raise InvalidInput(f"cache_interval {config.deepcache.interval} (DeepCache) needs the shallow U-Net, which "
                               f"{self.folder} lacks: export it with --deepcache")
        if config.denoising_start is not None and task is not Task.IMAGE_TO_IMAGE:
            raise InvalidInput("denoising_start applies to image-to-image (a refiner taking the base's latents): "
                               "pass image=")
        if config.sdxl_settings and not self.manifest.facts.added_conditions:
            raise InvalidInput(f"prompt_2, negative_prompt_2, original_size, crops_coords_top_left, target_size, "
                               f"denoising_start and denoising_end apply to SDXL models; {self.folder} holds a "
                               f"{self.manifest.family.title} model")
        if config.clip_skip and not self.manifest.facts.clip_skip_input:
            raise InvalidInput(f"clip_skip {config.clip_skip} needs a text encoder exported with clip skip; "
                               f"{self.folder} was exported by an older sdrt: export the model again")
        embedded = self.manifest.facts.guidance_embedding
        if config.guidance > 1.0 and not self.manifest.shape.cfg and not embedded:
            raise InvalidInput(f"guidance {config.guidance:g} needs classifier-free guidance, but this artifact was "
                               f"exported with --no-cfg: use guidance <= 1 or export with CFG")
        if (any(config.negative_prompts) or any(config.negative_prompts_2 or ())) and (
                embedded or config.guidance <= 1.0 or not self.manifest.shape.cfg):
            # diffusers encodes no negative prompt without CFG; say so, and record none.
            why = ("this LCM model takes the guidance scale as an embedding and runs no classifier-free guidance"
                   if embedded else "this artifact was exported with --no-cfg" if not self.manifest.shape.cfg
                   else f"guidance {config.guidance:g} <= 1 turns classifier-free guidance off")
            warnings.warn(f"the negative prompt is ignored: {why}", IgnoredSetting, stacklevel=3)
            config = dataclasses.replace(config, negative_prompts=("",) * self.batch, negative_prompts_2=None,
                                         negative_given=False)
        if config.prompt_weighting:   # a malformed weight fails now, not after engines load
            for text in set(config.prompts + config.negative_prompts + config.second_prompts
                            + config.second_negative_prompts):
                parse_prompt_attention(text)
        if latents is not None and task is not Task.TEXT_TO_IMAGE:
            raise InvalidInput("latents apply to text-to-image only; with an image the seed draws the noise")
        options = dict(config.scheduler_options)
        sampler = self.sampler(config.scheduler, config.steps, config.strength, options, config.denoising_start)
        if config.denoising_end is not None:   # refused here if it would leave no step
            denoising_end_calls(sampler, self.scheduler_config, config.denoising_end)
        config.deepcache.full_calls(len(sampler.timesteps), sampler.order)   # a schedule that cannot be, refused now
        # What runs is recorded: "dpmpp_2m" with use_karras_sigmas=True is "dpmpp_2m_karras".
        config = dataclasses.replace(config, scheduler=resolved_name(config.scheduler, self.scheduler_config, options),
                                     controlnet=control)
        images = None if control is None else controlnet.control_images(control_image, control.count, self.height,
                                                                         self.width)
        h, w = self.height, self.width
        img = mask = None
        if task is Task.OUTPAINT:
            margins = inputs.parse_margins(outpaint) if isinstance(outpaint, str) else outpaint
            canvas, canvas_mask = inputs.outpaint_canvas(inputs.load_image(image), margins, height=h, width=w)
            img, mask = inputs.preprocess_image(canvas, h, w), inputs.preprocess_mask(canvas_mask, h, w)
        elif task is Task.IMAGE_TO_IMAGE and self._is_latents(image):
            return Request(config, sampler, latents=None, image_latents=self._check_latents(image),
                           safety_checker=safety_checker, control_images=images, embeddings=fitted)
        elif task.takes_image:
            # Files are decoded once here; arrays go as they are (float arrays take
            # diffusers' NumPy path in `inputs`).
            source = image if isinstance(image, np.ndarray) else inputs.load_image(image)
            img = inputs.preprocess_image(source, h, w)
            if task is Task.INPAINT:
                size = (source.shape[1], source.shape[0]) if isinstance(source, np.ndarray) else source.size
                mask_source = mask_image if isinstance(mask_image, np.ndarray) else inputs.load_mask(mask_image)
                mask = inputs.preprocess_mask(mask_source, h, w, image_size=size)
        return Request(config, sampler, img, mask, self._check_latents(latents), safety_checker=safety_checker,
                       control_images=images, embeddings=fitted)

    def _control(self, image: Any, scale: Any, start: Any, end: Any, guess_mode: Any, task: Task) -> Any:
        """The call's ControlNet settings (None without a control image), checked against
        the artifact's ControlNets; the images are decoded later, with the other inputs."""
        count = self.manifest.shape.controlnets
        if image is None:
            given = [name for name, v in (("controlnet_conditioning_scale", scale), ("control_guidance_start", start),
                                          ("control_guidance_end", end)) if v is not None]
            given += ["guess_mode"] if guess_mode is not False else []
            if given:
                raise InvalidInput(f"{', '.join(given)} apply to ControlNets: pass control_image too")
            return None
        if not count:
            raise InvalidInput(f"control_image needs an artifact exported with ControlNets; {self.folder} has none: "
                               f"export it with --controlnet CONTROLNET_FOLDER")
        return controlnet.ControlSettings.create(count, scale, start, end, guess_mode, task.value)

    def embeddings(self, embeddings: Any, allow_pickle: bool = False) -> EmbeddingSet | None:
        """Read a call's textual-inversion embeddings (paths, or (path, token) pairs) and
        fit them to this artifact (runtime/embeddings.py); None without any."""
        pairs = parse_request(embeddings)
        if not pairs:
            return None
        if not isinstance(allow_pickle, bool):
            raise InvalidType(f"allow_pickle must be True or False, got {allow_pickle!r}")
        loaded = [load_embedding(path, token, allow_pickle) for path, token in pairs]
        tokenizers = {Stage.TEXT_ENCODER: self.tokenizer, Stage.TEXT_ENCODER_2: self.tokenizer_2 or self.tokenizer}
        return fit_embeddings(loaded, self.manifest, tokenizers, self.folder)

    def sampler(self, name: str, steps: int, strength: float | None = None,
                options: Mapping[str, Any] | None = None, denoising_start: float | None = None) -> Sampler:
        # Samplers are immutable tables, so one per (name, steps, strength, options) serves all calls.
        key = (name, steps, strength, repr(sorted((options or {}).items())), denoising_start)
        if key not in self._samplers:
            self._samplers[key] = make_sampler(name, self.scheduler_config, steps, strength=strength,
                                               options=options, denoising_start=denoising_start)
        return self._samplers[key]

    def _task(self, image: Any, mask_image: Any, outpaint: Any) -> Task:
        if image is None:
            if mask_image is not None or outpaint is not None:
                raise InvalidInput(f"{'mask_image' if mask_image is not None else 'outpaint'} needs an image to work on")
            task = Task.TEXT_TO_IMAGE
        elif outpaint is not None:
            if mask_image is not None:
                raise InvalidInput("pass either mask_image (inpainting) or outpaint margins, not both: "
                                   "outpainting makes its own mask")
            task = Task.OUTPAINT
        else:
            task = Task.INPAINT if mask_image is not None else Task.IMAGE_TO_IMAGE
        if task not in self.tasks():
            raise InvalidInput(self._why_not(task))
        return task

    def _why_not(self, task: Task) -> str:
        if self.manifest.facts.aesthetic_score:
            return (f"{self.folder} holds an SDXL refiner: it refines an image or an SDXL base's latents (image=, "
                    f"or Pipeline.refine / sdrt generate BASE --refiner); it cannot do {task.value}")
        if self.manifest.facts.inpainting:
            return (f"{self.folder} holds an inpainting model: pass an image with mask_image (--mask) or outpaint "
                    f"margins (--outpaint); it cannot do {task.value}")
        if self.manifest.format_version < 2:
            return (f"{self.folder} was exported by sdrt 0.1, without a VAE encoder: export the model again to "
                    f"use input images ({task.value})")
        return (f"{self.folder} was exported without the VAE encoder (--no-vae-encoder): export it again "
                f"without that option to use input images ({task.value})")

    def _is_latents(self, image: Any) -> bool:
        """A (batch, latent channels, h, w) array given as the image: latents to refine."""
        return isinstance(image, np.ndarray) and image.ndim == 4 and image.shape[1] == self.latent_shape[1]

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
