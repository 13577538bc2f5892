"""The one home of every shape fact (see STYLE.md, habit 1).

Export, the manifest, the engine builder, buffer allocation, input checks and tests
all derive every stage's tensor names, shapes and dtypes from here, from two small
frozen records:

- `ModelFacts`: what the checkpoint's configs say (latent channels, VAE scale,
  text length and width, ...), read once at export and stored in the manifest;
- `ShapeConfig`: what the user chose at export (height, width, batch, CFG).

Each stage kind has one spec function (`STAGE_SPECS`); which stages an artifact has
comes from its model family (`families.py`) and the export options, never from a
list written here. Tensor names follow NVIDIA's TensorRT diffusion demo so engines
are interchangeable.
"""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Callable, Iterable, Mapping

import numpy as np

from .errors import ArtifactError, InvalidInput

# Largest image side accepted (pixels). Beyond this the U-Net's attention maps alone
# need tens of GB; nothing in the SD 1.x/2.x families was trained near it.
MAX_IMAGE_SIDE = 4096
MAX_BATCH = 64
# Most 77-token prompt chunks a U-Net context may hold: 16 x 75 = 1200 prompt tokens,
# far past any prompt a person writes; cross-attention cost grows with it.
MAX_PROMPT_CHUNKS = 16
# Most ControlNets one artifact holds (diffusers' MultiControlNetModel sets no limit;
# each one costs a U-Net encoder's compute per step).
MAX_CONTROLNETS = 8
# Textual inversion: rows of the text encoders' `token_embeddings` input, the vectors of
# the embeddings one call may use in all (a multi-vector embedding takes one row per
# vector). 32 holds several typical embeddings (1-16 vectors each) and costs one
# (32, width) float32 input per text-encoder call. 0 = an artifact without the input.
DEFAULT_EMBEDDING_SLOTS = 32
MAX_EMBEDDING_SLOTS = 4096


class Stage(str, enum.Enum):
    """Every kind of stage sdrt knows. An artifact holds the stages its family and
    export options chose (`Manifest.stages`); code iterates those, not this enum."""

    TEXT_ENCODER = "text_encoder"
    TEXT_ENCODER_2 = "text_encoder_2"   # SDXL's second (OpenCLIP bigG) text encoder
    UNET = "unet"
    # DeepCache's shallow U-Net: the full U-Net's outer layers only, fed the deep
    # feature a full call returned (see unet_shallow_spec).
    UNET_SHALLOW = "unet_shallow"
    VAE_ENCODER = "vae_encoder"
    VAE_DECODER = "vae_decoder"
    # The checkpoint's safety checker (diffusers' StableDiffusionSafetyChecker): CLIP's
    # vision model and the concept embeddings, run on the decoded images.
    SAFETY_CHECKER = "safety_checker"
    # Every ControlNet of the artifact in one graph, their residuals summed as diffusers'
    # MultiControlNetModel sums them (see controlnet_spec).
    CONTROLNET = "controlnet"

    @property
    def onnx_file(self) -> str:
        return f"{self.value}.onnx"

    @property
    def data_file(self) -> str | None:
        """External-data file name, for the stages whose weights can pass protobuf's 2 GB
        limit: the U-Net always has one, so the >2 GB path is the normal path, and so
        does SDXL's second text encoder (OpenCLIP bigG: 2.8 GB in fp32) and the
        ControlNet stage (1.4 GB per SD 1.5 ControlNet, two pass the limit)."""
        return f"{self.value}.onnx.data" if self in (Stage.UNET, Stage.TEXT_ENCODER_2, Stage.CONTROLNET) else None


class Precision(str, enum.Enum):
    FP32 = "fp32"
    FP16 = "fp16"


class DType(str, enum.Enum):
    FLOAT32 = "float32"
    FLOAT16 = "float16"
    INT32 = "int32"
    INT64 = "int64"

    @property
    def numpy(self) -> np.dtype:
        return np.dtype(self.value)


@dataclass(frozen=True)
class ModelFacts:
    """Config values of the source checkpoint that shapes and the runtime depend on."""

    latent_channels: int        # unet.in_channels == vae.latent_channels
    vae_scale_factor: int       # 2 ** (len(vae.block_out_channels) - 1): pixels per latent
    vae_scaling_factor: float   # vae.scaling_factor (0.18215 for SD 1.x/2.x)
    image_channels: int         # vae.out_channels
    text_max_length: int        # tokens per prompt (tokenizer model_max_length, 77)
    text_hidden_size: int       # text_encoder.hidden_size == unet.cross_attention_dim
    unet_sample_size: int       # native latent side (64 for SD 1.5 -> 512 px)
    unet_size_multiple: int     # latent sides must be multiples of this (the U-Net's down-sampling)
    prediction_type: str        # "epsilon" or "v_prediction" (from the scheduler config)
    family: str = "sd1"         # the model family's name (families.FAMILIES)
    # unet.in_channels: latent_channels for text-to-image U-Nets; 2 * latent_channels + 1
    # for inpainting U-Nets (latents, mask, masked-image latents). 0 = latent_channels
    # (format-1 manifests predate the field).
    unet_in_channels: int = 0
    # text_encoder.num_hidden_layers. The text encoder graph takes a `clip_skip` input
    # (0 .. layers - 1) when this is known; 0 = an artifact exported before clip skip.
    text_num_layers: int = 0
    # unet.time_cond_proj_dim of an LCM-distilled U-Net: it takes the guidance scale as an
    # embedding (`timestep_cond`) and runs without classifier-free guidance. 0 = none.
    time_cond_proj_dim: int = 0
    # SDXL: text_encoder_2's width and its pooled projection (the U-Net's added
    # `text_embeds`), and its layer count. 0 = one text encoder (SD 1.x/2.x).
    text_2_hidden_size: int = 0
    pooled_size: int = 0
    text_2_num_layers: int = 0
    # SDXL: an absent negative prompt is all-zero embeddings (model_index.json).
    force_zeros_for_empty_prompt: bool = False
    # SDXL refiner: its time ids end with an aesthetic score instead of the target size
    # (diffusers' requires_aesthetics_score), 5 values instead of 6.
    aesthetic_score: bool = False
    # unet.block_out_channels[0]: the width of DeepCache's cached feature. 0 = an
    # artifact exported before the field (it has no shallow U-Net either).
    unet_block_channels: int = 0
    # Whether the U-Net's last up block has cross-attention (SD 1.x/2.x: CrossAttnUpBlock2D;
    # SDXL: UpBlock2D, none). Without it DeepCache's shallow U-Net reads no text.
    unet_last_up_attention: bool = True
    # The safety checker's CLIP vision image_size (= its feature extractor's crop size):
    # the side of the pixel values it takes. 0 = none (not in the checkpoint, or left out).
    safety_image_size: int = 0
    # unet.block_out_channels and layers_per_block (one per down block): the shapes of the
    # residuals a ControlNet adds to the U-Net (controlnet_residuals). () = an artifact
    # exported before the fields (it has no ControlNet either).
    unet_block_out_channels: tuple[int, ...] = ()
    unet_layers_per_block: tuple[int, ...] = ()
    # Rows of the text encoders' token-embedding tables (text_encoder.vocab_size, SDXL: the
    # larger of the two): token ids from here on pick a row of the `token_embeddings` input
    # (textual inversion). 0 = an artifact exported before textual inversion.
    text_vocab_size: int = 0

    @property
    def context_size(self) -> int:
        """The U-Net's cross-attention width: the text encoders' widths side by side."""
        return self.text_hidden_size + self.text_2_hidden_size

    @property
    def added_conditions(self) -> bool:
        """SDXL: the U-Net also takes the pooled text embedding and six size/crop time ids."""
        return self.pooled_size > 0

    @property
    def penultimate(self) -> bool:
        """SDXL conditions on the penultimate hidden states, without the final layer norm."""
        return self.family in ("sdxl", "sdxl-refiner")

    @property
    def clip_skip_input(self) -> bool:
        """The text encoder graphs take `clip_skip` (artifacts of older sdrt do not)."""
        return bool(self.text_num_layers or self.text_2_num_layers)

    @property
    def time_ids(self) -> int:
        """How many time ids the U-Net takes per row (SDXL)."""
        return SDXL_TIME_IDS - 1 if self.aesthetic_score else SDXL_TIME_IDS

    @property
    def guidance_embedding(self) -> bool:
        """The U-Net takes the guidance scale as an input (LCM) instead of running CFG."""
        return self.time_cond_proj_dim > 0

    @property
    def max_clip_skip(self) -> int:
        """The largest clip_skip the text encoder graphs take (0: they have no clip_skip
        input): down to the first layer's output (SD), or to the embeddings' (SDXL, which
        starts from the penultimate layer)."""
        layers = [n for n in (self.text_num_layers, self.text_2_num_layers) if n]
        return max(min(layers) - 1, 0) if layers else 0

    def __post_init__(self) -> None:
        if self.unet_in_channels == 0:
            object.__setattr__(self, "unet_in_channels", self.latent_channels)
        for name in ("unet_block_out_channels", "unet_layers_per_block"):   # JSON gives lists
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))

    @property
    def inpainting(self) -> bool:
        """The U-Net takes the mask and the masked image's latents besides the latents."""
        return self.unet_in_channels == inpaint_channels(self.latent_channels)

    @property
    def native_image_size(self) -> int:
        return self.unet_sample_size * self.vae_scale_factor

    @property
    def image_size_multiple(self) -> int:
        return self.unet_size_multiple * self.vae_scale_factor

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "ModelFacts":
        names = {f.name for f in fields(cls)}
        optional = {"family", "unet_in_channels", "text_num_layers", "time_cond_proj_dim", "text_2_hidden_size",
                    "pooled_size", "text_2_num_layers", "force_zeros_for_empty_prompt", "aesthetic_score",
                    "unet_block_channels", "unet_last_up_attention", "safety_image_size", "unet_block_out_channels",
                    "unet_layers_per_block", "text_vocab_size"}
        missing = names - set(data) - optional
        if missing:
            raise InvalidInput(f"model facts lack {sorted(missing)}")
        return cls(**{k: v for k, v in data.items() if k in names}).validate()

    def validate(self) -> "ModelFacts":
        """A hand-edited or hostile manifest or checkpoint config must fail here, not as
        a ZeroDivisionError in stage_specs or a NaN image from a scaling factor of nan."""
        for f in fields(self):
            value = getattr(self, f.name)
            least = 0 if f.name in ("text_num_layers", "time_cond_proj_dim", "text_2_hidden_size", "pooled_size",
                                    "text_2_num_layers", "unet_block_channels", "safety_image_size",
                                    "text_vocab_size") else 1
            if f.name == "text_hidden_size" and self.family == "sdxl-refiner":
                least = 0   # the refiner has only the second text encoder
            if f.type == "int" and (isinstance(value, bool) or not isinstance(value, int) or value < least):
                raise InvalidInput(f"model fact {f.name} must be a positive integer, got {value!r:.40}")
        blocks, layers = self.unet_block_out_channels, self.unet_layers_per_block
        for name, value in (("unet_block_out_channels", blocks), ("unet_layers_per_block", layers)):
            if not isinstance(value, tuple) or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0
                                                       for v in value):
                raise InvalidInput(f"model fact {name} must be a list of positive integers, got {value!r:.60}")
        if len(blocks) != len(layers):
            raise InvalidInput(f"model facts unet_block_out_channels {list(blocks)} and unet_layers_per_block "
                               f"{list(layers)} must have one entry per down block")
        scaling = self.vae_scaling_factor
        if isinstance(scaling, bool) or not isinstance(scaling, (int, float)) or not 0 < scaling < float("inf"):
            raise InvalidInput(f"model fact vae_scaling_factor must be a positive finite number, got {scaling!r:.40}")
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise InvalidInput(f"model fact prediction_type must be epsilon or v_prediction, "
                               f"got {self.prediction_type!r:.40}")
        accepted = (self.latent_channels, inpaint_channels(self.latent_channels))
        if self.unet_in_channels not in accepted:
            raise InvalidInput(f"model fact unet_in_channels must be {accepted[0]} (text-to-image) or {accepted[1]} "
                               f"(inpainting) for {self.latent_channels} latent channels, got {self.unet_in_channels}")
        return self


def inpaint_channels(latent_channels: int) -> int:
    """An inpainting U-Net's input: latents, a 1-channel mask, the masked image's latents
    (diffusers' StableDiffusionInpaintPipeline concatenates them in that order)."""
    return 2 * latent_channels + 1


@dataclass(frozen=True)
class ShapeConfig:
    """The static shapes chosen at export: image size, images per call, CFG, and how
    many 77-token prompt chunks the U-Net's context holds."""

    height: int
    width: int
    batch: int = 1
    cfg: bool = True   # classifier-free guidance: U-Net and text encoder run 2 x batch
    # The U-Net's context is prompt_chunks x 77 tokens. Above 1 it also takes
    # `encoder_attention_mask`, so a prompt of fewer chunks attends to its own tokens only.
    prompt_chunks: int = 1
    # DeepCache: the U-Net also returns the deep feature its shallow graph reuses, and the
    # artifact has the shallow graph (Stage.UNET_SHALLOW).
    deepcache: bool = False
    # ControlNets in the artifact's controlnet stage; with any, the U-Net also takes their
    # summed residuals (controlnet_residuals). 0 = none, the plain U-Net.
    controlnets: int = 0
    # Textual inversion: rows of the text encoders' `token_embeddings` input; 0 = no such
    # input, no embeddings at run time (what manifests written before it read as). Export
    # asks for DEFAULT_EMBEDDING_SLOTS unless told otherwise.
    embedding_slots: int = 0

    def validate(self, facts: ModelFacts) -> "ShapeConfig":
        m = facts.image_size_multiple
        for name, value in (("height", self.height), ("width", self.width)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise InvalidInput(f"{name} must be an integer, got {value!r}")
            if value < m or value > MAX_IMAGE_SIDE or value % m:
                raise InvalidInput(
                    f"{name} {value} is not accepted by this U-Net: use a multiple of {m} "
                    f"from {m} to {MAX_IMAGE_SIDE - MAX_IMAGE_SIDE % m} (native size {facts.native_image_size})"
                )
        if isinstance(self.batch, bool) or not isinstance(self.batch, int) or not 1 <= self.batch <= MAX_BATCH:
            raise InvalidInput(f"batch must be an integer from 1 to {MAX_BATCH}, got {self.batch!r}")
        chunks = self.prompt_chunks
        if isinstance(chunks, bool) or not isinstance(chunks, int) or not 1 <= chunks <= MAX_PROMPT_CHUNKS:
            raise InvalidInput(f"max prompt chunks must be an integer from 1 to {MAX_PROMPT_CHUNKS} "
                               f"(75 prompt tokens each), got {chunks!r}")
        if not isinstance(self.deepcache, bool):
            raise InvalidInput(f"deepcache must be True or False, got {self.deepcache!r}")
        if self.deepcache and not facts.unet_block_channels:
            raise InvalidInput("deepcache needs the U-Net's block_out_channels (model fact unet_block_channels)")
        n = self.controlnets
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= MAX_CONTROLNETS:
            raise InvalidInput(f"controlnets must be an integer from 0 to {MAX_CONTROLNETS}, got {n!r}")
        if n:
            if not facts.unet_block_out_channels:
                raise InvalidInput("ControlNets need the U-Net's block_out_channels and layers_per_block "
                                   "(model facts unet_block_out_channels, unet_layers_per_block)")
            if self.deepcache:
                raise InvalidInput("DeepCache and ControlNet cannot be combined: the shallow U-Net would skip the "
                                   "blocks the ControlNet residuals enter; export with one or the other")
            if self.prompt_chunks > 1:
                # ControlNetModel takes no encoder attention mask: it would attend to the
                # zero padding of a context longer than the prompt.
                raise InvalidInput(f"ControlNets take a 75-token prompt context (diffusers' ControlNetModel has no "
                                   f"encoder attention mask): export with max prompt chunks 1, "
                                   f"not {self.prompt_chunks}")
        slots = self.embedding_slots
        if isinstance(slots, bool) or not isinstance(slots, int) or not 0 <= slots <= MAX_EMBEDDING_SLOTS:
            raise InvalidInput(f"embedding slots must be an integer from 0 to {MAX_EMBEDDING_SLOTS} (textual-inversion "
                               f"vectors per call; 0 = none), got {slots!r}")
        if slots and not facts.text_vocab_size:
            raise InvalidInput("embedding slots need the text encoder's vocabulary size (model fact text_vocab_size)")
        return self

    @property
    def guided_batch(self) -> int:
        """Batch of the text encoder and U-Net calls: unconditional + conditional halves."""
        return 2 * self.batch if self.cfg else self.batch

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "ShapeConfig":
        return cls(height=int(data["height"]), width=int(data["width"]),
                   batch=int(data["batch"]), cfg=bool(data["cfg"]), prompt_chunks=int(data.get("prompt_chunks", 1)),
                   deepcache=data.get("deepcache", False) is True, controlnets=_count(data.get("controlnets", 0)),
                   # manifests written before textual inversion have no such input
                   embedding_slots=int(data.get("embedding_slots", 0)))


def _count(value: Any) -> int:
    """A manifest's count as it is (a bool or float fails validate, not as a silent int())."""
    return value if isinstance(value, int) and not isinstance(value, bool) else -1


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: DType

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.numpy.itemsize

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype.value}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "TensorSpec":
        return cls(str(data["name"]), tuple(int(d) for d in data["shape"]), DType(data["dtype"]))


@dataclass(frozen=True)
class StageSpec:
    stage: Stage
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def input(self, name: str) -> TensorSpec:
        return next(t for t in self.inputs if t.name == name)

    def output(self, name: str) -> TensorSpec:
        return next(t for t in self.outputs if t.name == name)

    def to_json(self) -> dict[str, Any]:
        return {"inputs": [t.to_json() for t in self.inputs],
                "outputs": [t.to_json() for t in self.outputs]}


Signature = Mapping[str, tuple[tuple[Any, ...], str]]   # tensor name -> (shape, numpy dtype name)


def check_io(spec: StageSpec, inputs: Signature, outputs: Signature, where: str, remedy: str) -> None:
    """The one check that a graph's or engine's I/O is exactly its stage spec: the same
    names, static shapes and dtypes. Export (the written ONNX), ONNX Runtime (the
    session) and TensorRT (the deserialized engine) each describe theirs as name ->
    (shape, dtype) and call this, so a mismatch reads the same from every backend."""
    want_in = {t.name: (t.shape, t.dtype.value) for t in spec.inputs}
    want_out = {t.name: (t.shape, t.dtype.value) for t in spec.outputs}
    got_in = {k: (tuple(v[0]), str(v[1])) for k, v in inputs.items()}
    got_out = {k: (tuple(v[0]), str(v[1])) for k, v in outputs.items()}
    if got_in != want_in or got_out != want_out:
        def show(ins: Signature, outs: Signature) -> str:
            return "; ".join(f"{kind} {name}{list(shape)} {dtype}" for kind, io in (("in", ins), ("out", outs))
                             for name, (shape, dtype) in sorted(io.items()))
        raise ArtifactError(f"{where}: its I/O ({show(got_in, got_out)}) differs from the {spec.stage.value} "
                            f"stage spec ({show(want_in, want_out)}); {remedy}")


# Tensor names, once.
INPUT_IDS = "input_ids"
TEXT_EMBEDDINGS = "text_embeddings"
SAMPLE = "sample"
TIMESTEP = "timestep"
ENCODER_HIDDEN_STATES = "encoder_hidden_states"
LATENT = "latent"
IMAGES = "images"
LATENT_MEAN = "latent_mean"
LATENT_STD = "latent_std"
CLIP_SKIP = "clip_skip"
ENCODER_ATTENTION_MASK = "encoder_attention_mask"
TIMESTEP_COND = "timestep_cond"
TEXT_EMBEDS = "text_embeds"   # SDXL: text_encoder_2's pooled projection, an added U-Net input
TIME_IDS = "time_ids"         # SDXL: original size, crop top-left, target size, per batch item
DEEPCACHE_FEATURE = "deepcache_feature"   # the full U-Net's deep feature, the shallow one's input
CONTROLNET_COND = "controlnet_cond"       # one conditioning image per ControlNet, pixels in [0, 1]
CONTROL_SCALES = "control_scales"         # per ControlNet, row and residual: its weight this step
MID_BLOCK_RESIDUAL = "mid_block_res"      # the ControlNets' residual for the U-Net's mid block
TOKEN_EMBEDDINGS = "token_embeddings"     # textual inversion: the vectors token ids >= text_vocab_size pick
SDXL_TIME_IDS = 6
CLIP_INPUT = "clip_input"           # the safety checker's CLIP pixel values
SPECIAL_SCORES = "special_scores"   # cosine similarity to each special-care concept minus its threshold
CONCEPT_SCORES = "concept_scores"   # cosine similarity to each concept minus its threshold
# StableDiffusionSafetyChecker's concept counts (fixed in its __init__), and CLIP's RGB input.
SAFETY_CONCEPTS = 17
SAFETY_SPECIAL_CONCEPTS = 3
CLIP_CHANNELS = 3
# A ControlNet's conditioning image is RGB (diffusers' control image processor converts to it).
CONTROL_IMAGE_CHANNELS = 3

# Images the VAE encoder takes per call. image-to-image and inpainting take one input
# image for all batch items, as diffusers does with a single image: it encodes it
# once and repeats the latents (StableDiffusionImg2ImgPipeline.prepare_latents).
VAE_ENCODER_BATCH = 1

_F32, _I32 = DType.FLOAT32, DType.INT32


def _latent_hw(facts: ModelFacts, shape: ShapeConfig) -> tuple[int, int]:
    return shape.height // facts.vae_scale_factor, shape.width // facts.vae_scale_factor


def text_encoder_spec(facts: ModelFacts, shape: ShapeConfig) -> StageSpec:
    """One 77-token chunk per prompt per call (a long prompt takes one call per chunk).
    `clip_skip` (int32, one per prompt): a row's output is the hidden state that many
    layers before the last, through the final layer norm (0: the last hidden state);
    SDXL: the hidden state clip_skip + 1 layers before the last, no layer norm."""
    gb, tl, th = shape.guided_batch, facts.text_max_length, facts.text_hidden_size
    skip = (TensorSpec(CLIP_SKIP, (gb,), _I32),) if facts.text_num_layers else ()
    return StageSpec(Stage.TEXT_ENCODER,
                     inputs=(TensorSpec(INPUT_IDS, (gb, tl), _I32), *skip, *_token_embeddings(shape, th)),
                     outputs=(TensorSpec(TEXT_EMBEDDINGS, (gb, tl, th), _F32),))


def _token_embeddings(shape: ShapeConfig, width: int) -> tuple[TensorSpec, ...]:
    """Textual inversion: the vectors of this call's embeddings, one row per slot (zeros
    where unused). Token id text_vocab_size + i in `input_ids` takes row i instead of a
    row of the encoder's own token-embedding table (see export/graphs.py)."""
    return (TensorSpec(TOKEN_EMBEDDINGS, (shape.embedding_slots, width), _F32),) if shape.embedding_slots else ()


def text_encoder_2_spec(facts: ModelFacts, shape: ShapeConfig) -> StageSpec:
    """SDXL's second text encoder: the hidden states, and the pooled projection of the
    last layer at the EOS token (the U-Net's `text_embeds`)."""
    gb, tl = shape.guided_batch, facts.text_max_length
    return StageSpec(Stage.TEXT_ENCODER_2,
                     inputs=(TensorSpec(INPUT_IDS, (gb, tl), _I32), TensorSpec(CLIP_SKIP, (gb,), _I32),
                             *_token_embeddings(shape, facts.text_2_hidden_size)),
                     outputs=(TensorSpec(TEXT_EMBEDDINGS, (gb, tl, facts.text_2_hidden_size), _F32),
                              TensorSpec(TEXT_EMBEDS, (gb, facts.pooled_size), _F32)))


def unet_spec(facts: ModelFacts, shape: ShapeConfig) -> StageSpec:
    gb, (lh, lw) = shape.guided_batch, _latent_hw(facts, shape)
    tl, th = facts.text_max_length * shape.prompt_chunks, facts.context_size
    # 1 for the tokens of the chunks a call uses, 0 for the rest of the context.
    mask = (TensorSpec(ENCODER_ATTENTION_MASK, (gb, tl), _F32),) if shape.prompt_chunks > 1 else ()
    # An LCM U-Net's guidance-scale embedding, one row per batch item.
    cond = (TensorSpec(TIMESTEP_COND, (gb, facts.time_cond_proj_dim), _F32),) if facts.guidance_embedding else ()
    # SDXL's added conditions (diffusers' added_cond_kwargs).
    added = ((TensorSpec(TEXT_EMBEDS, (gb, facts.pooled_size), _F32), TensorSpec(TIME_IDS, (gb, facts.time_ids), _F32))
             if facts.added_conditions else ())
    return StageSpec(Stage.UNET,
                     inputs=(
                         # An inpainting U-Net's sample is [latents, mask, masked-image latents].
                         TensorSpec(SAMPLE, (gb, facts.unet_in_channels, lh, lw), _F32),
                         # One timestep for the whole batch, as float: Euler-family schedulers
                         # feed fractional timesteps.
                         TensorSpec(TIMESTEP, (1,), _F32),
                         TensorSpec(ENCODER_HIDDEN_STATES, (gb, tl, th), _F32),
                         *mask,
                         *cond,
                         *added,
                         # The ControlNets' summed residuals (controlnet_spec's outputs).
                         *(controlnet_residuals(facts, shape) if shape.controlnets else ()),
                     ),
                     outputs=(TensorSpec(LATENT, (gb, facts.latent_channels, lh, lw), _F32),
                              *((deepcache_feature_spec(facts, shape),) if shape.deepcache else ())))


def down_block_residual(i: int) -> str:
    """The name of the ControlNets' i-th residual for the U-Net's down blocks."""
    return f"down_block_res_{i}"   # is_controlnet_residual reads it back


def is_controlnet_residual(name: str) -> bool:
    return name == MID_BLOCK_RESIDUAL or (name.startswith("down_block_res_") and name[15:].isdigit())


def controlnet_residuals(facts: ModelFacts, shape: ShapeConfig) -> tuple[TensorSpec, ...]:
    """What a ControlNet adds to the U-Net: one residual per feature the U-Net's down
    blocks keep for their skip connections, then one for the mid block's output, in
    UNet2DConditionModel's order (`down_block_res_samples`): conv_in's output, then per
    down block each resnet's output and, but for the last block, its downsampler's.
    SD 1.5: 1 + 3 x (2 + 1) + 2 = 12 down residuals."""
    gb, (lh, lw) = shape.guided_batch, _latent_hw(facts, shape)
    blocks, layers = facts.unet_block_out_channels, facts.unet_layers_per_block
    if not blocks:   # an artifact of an older sdrt: no ControlNet
        return ()
    found = [(blocks[0], 0)]   # (channels, times halved)
    for i, (channels, n) in enumerate(zip(blocks, layers)):
        found += [(channels, i)] * n
        if i < len(blocks) - 1:
            found.append((channels, i + 1))
    down = tuple(TensorSpec(down_block_residual(j), (gb, c, lh >> k, lw >> k), _F32) for j, (c, k) in enumerate(found))
    k = len(blocks) - 1
    return (*down, TensorSpec(MID_BLOCK_RESIDUAL, (gb, blocks[-1], lh >> k, lw >> k), _F32))


def controlnet_spec(facts: ModelFacts, shape: ShapeConfig) -> StageSpec:
    """All the artifact's ControlNets in one call, as diffusers' MultiControlNetModel runs
    them: the U-Net's latents (4 channels, also for a 9-channel inpainting U-Net), timestep
    and text; per ControlNet its conditioning image (pixels in [0, 1], as
    StableDiffusionControlNetPipeline.prepare_image gives it, for every row) and a weight
    per row and residual (`control_scales`: the conditioning scale, 0 outside the
    ControlNet's guidance window, guess mode's ramp and its zero unconditional rows) ->
    the weighted residuals summed over the ControlNets, the U-Net's extra inputs."""
    n, gb, (lh, lw) = shape.controlnets, shape.guided_batch, _latent_hw(facts, shape)
    residuals = controlnet_residuals(facts, shape)
    return StageSpec(Stage.CONTROLNET,
                     inputs=(TensorSpec(SAMPLE, (gb, facts.latent_channels, lh, lw), _F32),
                             TensorSpec(TIMESTEP, (1,), _F32),
                             TensorSpec(ENCODER_HIDDEN_STATES, (gb, facts.text_max_length, facts.context_size), _F32),
                             TensorSpec(CONTROLNET_COND, (n, gb, CONTROL_IMAGE_CHANNELS, shape.height, shape.width),
                                        _F32),
                             TensorSpec(CONTROL_SCALES, (n, gb, len(residuals)), _F32)),
                     outputs=residuals)


def deepcache_feature_spec(facts: ModelFacts, shape: ShapeConfig) -> TensorSpec:
    """DeepCache (Ma et al., CVPR 2024), skip branch 0 as its DeepCacheSDHelper takes it:
    the hidden state entering the last resnet of the U-Net's last up block, before the
    skip connection from conv_in is concatenated to it."""
    gb, (lh, lw) = shape.guided_batch, _latent_hw(facts, shape)
    return TensorSpec(DEEPCACHE_FEATURE, (gb, facts.unet_block_channels, lh, lw), _F32)


def unet_shallow_spec(facts: ModelFacts, shape: ShapeConfig) -> StageSpec:
    """DeepCache's shallow U-Net: the U-Net's inputs plus the deep feature of the last
    full call -> the model output. It runs the time embedding, conv_in, the last up
    block's last resnet (and attention) and conv_out, about 1/20 of SD 1.5's U-Net."""
    unet = unet_spec(facts, replace(shape, deepcache=False, controlnets=0))
    # Without the last up block's attention (SDXL) nothing reads the text or its mask.
    text = () if facts.unet_last_up_attention else (ENCODER_HIDDEN_STATES, ENCODER_ATTENTION_MASK)
    inputs = tuple(t for t in unet.inputs if t.name not in text)
    return StageSpec(Stage.UNET_SHALLOW, inputs=(*inputs, deepcache_feature_spec(facts, shape)), outputs=unet.outputs)


def vae_encoder_spec(facts: ModelFacts, shape: ShapeConfig) -> StageSpec:
    """Image in [-1, 1] -> the latent distribution's mean and standard deviation; the
    runtime draws the sample (mean + std * noise) from the seed, as diffusers'
    `latent_dist.sample(generator)` does, so the noise stays torch-compatible."""
    b, (lh, lw) = VAE_ENCODER_BATCH, _latent_hw(facts, shape)
    latent = (b, facts.latent_channels, lh, lw)
    return StageSpec(Stage.VAE_ENCODER,
                     inputs=(TensorSpec(IMAGES, (b, facts.image_channels, shape.height, shape.width), _F32),),
                     outputs=(TensorSpec(LATENT_MEAN, latent, _F32), TensorSpec(LATENT_STD, latent, _F32)))


def vae_decoder_spec(facts: ModelFacts, shape: ShapeConfig) -> StageSpec:
    b, (lh, lw) = shape.batch, _latent_hw(facts, shape)
    return StageSpec(Stage.VAE_DECODER,
                     inputs=(TensorSpec(LATENT, (b, facts.latent_channels, lh, lw), _F32),),
                     outputs=(TensorSpec(IMAGES, (b, facts.image_channels, shape.height, shape.width), _F32),))


def safety_checker_spec(facts: ModelFacts, shape: ShapeConfig) -> StageSpec:
    """One call per generation on every batch item's CLIP pixel values (the feature
    extractor's crop of the decoded image) -> each image's scores against the concepts,
    thresholds already subtracted. The runtime applies diffusers' rounding, special-care
    adjustment and any-concept rule to them (runtime/safety.py)."""
    b, side = shape.batch, facts.safety_image_size
    return StageSpec(Stage.SAFETY_CHECKER,
                     inputs=(TensorSpec(CLIP_INPUT, (b, CLIP_CHANNELS, side, side), _F32),),
                     outputs=(TensorSpec(SPECIAL_SCORES, (b, SAFETY_SPECIAL_CONCEPTS), _F32),
                              TensorSpec(CONCEPT_SCORES, (b, SAFETY_CONCEPTS), _F32)))


# Stage kind -> its spec function. Adding a stage kind is one entry here plus its
# spec function (and its export wrapper in export/graphs.py).
STAGE_SPECS: dict[Stage, Callable[[ModelFacts, ShapeConfig], StageSpec]] = {
    Stage.TEXT_ENCODER: text_encoder_spec,
    Stage.TEXT_ENCODER_2: text_encoder_2_spec,
    Stage.UNET: unet_spec,
    Stage.UNET_SHALLOW: unet_shallow_spec,
    Stage.VAE_ENCODER: vae_encoder_spec,
    Stage.VAE_DECODER: vae_decoder_spec,
    Stage.SAFETY_CHECKER: safety_checker_spec,
    Stage.CONTROLNET: controlnet_spec,
}


def stage_specs(facts: ModelFacts, shape: ShapeConfig,
                stages: Iterable[Stage] | None = None) -> dict[Stage, StageSpec]:
    """Input and output specs of `stages` (default: every stage kind), in that order.
    Graph I/O is always float32/int32; an fp16 graph casts at its boundary, so the
    runtime is the same for every precision."""
    return {stage: STAGE_SPECS[stage](facts, shape) for stage in (STAGE_SPECS if stages is None else stages)}
