"""Reading a diffusers Stable Diffusion checkpoint folder: what must be there, which
weights may be loaded, and the config values (`ModelFacts`) that shapes depend on.

Validation happens here, once, before torch is imported: a wrong folder fails in
milliseconds with a message naming the missing file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdrt.engines.errors import InvalidInput, MissingFile
from sdrt.engines.files import read_json_object
from sdrt.engines.specs import ModelFacts, Stage, inpaint_channels

# Components export reads weights from (SDXL adds text_encoder_2), and the component
# each stage comes from.
WEIGHT_COMPONENTS = ("text_encoder", "unet", "vae")
SDXL_COMPONENTS = ("text_encoder", "text_encoder_2", "unet", "vae")
REFINER_COMPONENTS = ("text_encoder_2", "unet", "vae")   # the SDXL refiner has no first text encoder
STAGE_COMPONENT = {Stage.TEXT_ENCODER: "text_encoder", Stage.TEXT_ENCODER_2: "text_encoder_2", Stage.UNET: "unet",
                   Stage.UNET_SHALLOW: "unet", Stage.VAE_ENCODER: "vae", Stage.VAE_DECODER: "vae",
                   Stage.SAFETY_CHECKER: "safety_checker"}
# The safety checker and its feature extractor, as model_index.json names their classes
# (CLIPFeatureExtractor is CLIPImageProcessor's old name, in older SD 1.x checkpoints).
SAFETY_CHECKER_CLASS = "StableDiffusionSafetyChecker"
FEATURE_EXTRACTOR_CLASSES = ("CLIPImageProcessor", "CLIPFeatureExtractor")
FEATURE_EXTRACTOR_CONFIG = "feature_extractor/preprocessor_config.json"
# Tokenizer folders: the second is SDXL's (it pads with "!", id 0).
TOKENIZER_DIRS = ("tokenizer", "tokenizer_2")
# diffusers pipeline classes whose checkpoints hold an SD 1.x/2.x text encoder, U-Net and VAE.
SUPPORTED_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline",
                       "StableDiffusionInpaintPipeline", "StableDiffusionInpaintPipelineLegacy",
                       "LatentConsistencyModelPipeline", "LatentConsistencyModelImg2ImgPipeline")
SDXL_PIPELINES = ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLInpaintPipeline")
# Pipeline classes recognised by name, for a message that says what they are.
KNOWN_UNSUPPORTED = {
    "StableDiffusion3Pipeline": "Stable Diffusion 3 (an MMDiT transformer, not a U-Net) is not supported",
    "FluxPipeline": "Flux (a transformer, not a U-Net) is not supported",
    "StableUnCLIPPipeline": "unCLIP (an image-embedding-conditioned U-Net) is not supported",
    "StableUnCLIPImg2ImgPipeline": "unCLIP (an image-embedding-conditioned U-Net) is not supported",
    "StableDiffusionUpscalePipeline": "the x4 upscaler (a noise-level-conditioned U-Net) is not supported",
    "StableDiffusionDepth2ImgPipeline": "depth-to-image (a depth-conditioned 5-channel U-Net) is not supported",
}
WEIGHT_STEMS = ("diffusion_pytorch_model", "model", "pytorch_model")
SUFFIX_WORDS = ("safetensors", "bin", "ckpt", "pt", "pth", "pkl")
# Pickle-based formats: loading them runs arbitrary code from the file.
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
SCHEDULER_CONFIG = "scheduler/scheduler_config.json"
# The tokenizer files a CLIP tokenizer needs, either set (transformers 5's save_pretrained
# writes only tokenizer.json + tokenizer_config.json); others present are copied too.
TOKENIZER_FILE_SETS = (("tokenizer.json",), ("vocab.json", "merges.txt"))


@dataclass(frozen=True)
class Checkpoint:
    folder: Path
    configs: dict[str, dict[str, Any]]   # component -> its config.json
    scheduler: dict[str, Any]
    tokenizer_config: dict[str, Any]
    weights: dict[str, "Weights"]          # component -> the weights export loads
    force_zeros: bool = False              # model_index.json force_zeros_for_empty_prompt (SDXL)
    aesthetics: bool = False               # model_index.json requires_aesthetics_score (SDXL refiner)
    # The feature extractor's preprocessor_config.json when the safety checker is read
    # (then configs["safety_checker"] is its config); None without one.
    preprocessor: dict[str, Any] | None = None
    safety_listed: bool = False            # model_index.json names a safety checker (read or not)

    def facts(self) -> ModelFacts:
        """The configs' facts, range-checked (ModelFacts.validate): a NaN scaling factor or
        a non-numeric size fails here, naming the folder, not as an export that loads nowhere."""
        try:
            return self._facts().validate()
        except InvalidInput as e:
            if str(self.folder) in str(e):
                raise
            raise InvalidInput(f"{self.folder}: {e} (from its unet/vae/text_encoder/tokenizer configs)") from None
        except (TypeError, ValueError, KeyError, IndexError, ArithmeticError) as e:
            raise InvalidInput(f"{self.folder}: unusable config value ({type(e).__name__}: {e})") from None

    @property
    def sdxl(self) -> bool:
        return "text_encoder_2" in self.configs

    @property
    def refiner(self) -> bool:
        """The SDXL refiner: text_encoder_2 alone, aesthetic-score time ids."""
        return self.sdxl and "text_encoder" not in self.configs

    def _facts(self) -> ModelFacts:
        unet, vae = self.configs["unet"], self.configs["vae"]
        text_2 = self.configs.get("text_encoder_2", {})
        text = self.configs.get("text_encoder", {})
        first = text or text_2   # the refiner's only encoder gives the shared facts
        latent = vae.get("latent_channels", 4)
        if unet.get("in_channels") not in (latent, inpaint_channels(latent)) or unet.get("out_channels", 4) != latent:
            raise InvalidInput(
                f"{self.folder}: unet in_channels {unet.get('in_channels')} / out_channels "
                f"{unet.get('out_channels', 4)} do not fit vae latent_channels {latent}: sdrt runs text-to-image "
                f"U-Nets (in {latent}, out {latent}) and inpainting U-Nets (in {inpaint_channels(latent)}, out {latent})")
        cross = unet.get("cross_attention_dim")
        if cross != text.get("hidden_size", 0) + text_2.get("hidden_size", 0):
            widths = " + text_encoder_2 hidden_size " + str(text_2.get("hidden_size")) if text_2 else ""
            raise InvalidInput(
                f"{self.folder}: unet cross_attention_dim {cross} differs from text_encoder hidden_size "
                f"{text.get('hidden_size')}{widths}")
        text_len = min(int(self.tokenizer_config.get("model_max_length", 77) or 77),
                       int(first.get("max_position_embeddings", 77)))
        prediction = self.scheduler.get("prediction_type", "epsilon")
        if prediction not in ("epsilon", "v_prediction"):
            raise InvalidInput(f"{self.folder}: scheduler prediction_type {prediction!r} is not supported "
                               f"(epsilon or v_prediction)")
        sample = unet.get("sample_size", 64)
        if isinstance(sample, (list, tuple)):
            sample = sample[0]
        # The U-Net halves the latent at every down block but the last. diffusers pads
        # odd sizes by forwarding upsample sizes, but a static trace bakes those sizes
        # in from one run; we accept only sizes that divide evenly, the sizes every
        # SD checkpoint was trained at (and the ones TensorRT's demo accepts).
        multiple = 2 ** (len(unet["down_block_types"]) - 1)
        return ModelFacts(
            latent_channels=int(latent),
            vae_scale_factor=2 ** (len(vae["block_out_channels"]) - 1),
            vae_scaling_factor=float(vae.get("scaling_factor", 0.18215)),
            image_channels=int(vae.get("out_channels", 3)),
            text_max_length=text_len,
            text_hidden_size=int(text.get("hidden_size", 0)),
            unet_sample_size=int(sample),
            unet_size_multiple=multiple,
            prediction_type=prediction,
            family="sdxl-refiner" if self.refiner else "sdxl" if self.sdxl else
            "sd2" if unet.get("use_linear_projection") or prediction == "v_prediction" else "sd1",
            unet_in_channels=int(unet["in_channels"]),
            text_num_layers=int(text.get("num_hidden_layers", 12)) if text else 0,   # CLIPTextConfig default
            time_cond_proj_dim=int(unet.get("time_cond_proj_dim") or 0),
            text_2_hidden_size=int(text_2.get("hidden_size", 0)),
            pooled_size=int(text_2.get("projection_dim", 0)) if text_2 else 0,
            text_2_num_layers=int(text_2.get("num_hidden_layers", 0)),
            force_zeros_for_empty_prompt=bool(self.force_zeros),
            aesthetic_score=bool(self.aesthetics),
            unet_block_channels=int(unet.get("block_out_channels", (320,))[0]),
            unet_last_up_attention="CrossAttn" in str(unet.get("up_block_types", ("CrossAttnUpBlock2D",))[-1]),
            safety_image_size=int(self.configs["safety_checker"].get("vision_config", {}).get("image_size", 224))
            if "safety_checker" in self.configs else 0,
            unet_block_out_channels=tuple(int(c) for c in unet.get("block_out_channels", ())),
            unet_layers_per_block=per_block(unet.get("layers_per_block", 2), len(unet.get("block_out_channels", ()))),
            # CLIPTextConfig's default vocab_size is CLIP's 49408
            text_vocab_size=max(int(c.get("vocab_size", 49408)) for c in (text, text_2) if c),
        )

    def tokenizer_files(self, name: str = "tokenizer") -> list[Path]:
        folder = self.folder / name
        return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))

    @property
    def tokenizer_dirs(self) -> tuple[str, ...]:
        return TOKENIZER_DIRS[1:] if self.refiner else TOKENIZER_DIRS if self.sdxl else TOKENIZER_DIRS[:1]


def per_block(value: Any, blocks: int) -> tuple[int, ...]:
    """A diffusers config value given once for all down blocks or as one per block
    (layers_per_block): one per block."""
    return tuple(int(v) for v in value) if isinstance(value, (list, tuple)) else (int(value),) * blocks


def open_checkpoint(folder: Path, allow_pickle: bool = False, safety_checker: bool = True) -> Checkpoint:
    """Check a checkpoint folder and read its configs. safety_checker=False leaves the
    checkpoint's safety checker unread (an export without it)."""
    folder = Path(folder)
    if not folder.exists():
        raise MissingFile(f"model folder {folder} does not exist")
    if not folder.is_dir():
        raise MissingFile(f"model path {folder} is not a folder (expected a diffusers checkpoint folder)")
    model_index = _read_json(_require(folder, "model_index.json"))
    _refuse_unsupported_pipeline(folder, model_index)
    sdxl = model_index.get("_class_name") in SDXL_PIPELINES
    refiner = sdxl and (model_index.get("text_encoder") or [None])[0] is None
    components = REFINER_COMPONENTS if refiner else SDXL_COMPONENTS if sdxl else WEIGHT_COMPONENTS
    configs = {c: _read_json(_require(folder, f"{c}/config.json")) for c in components}
    _refuse_unsupported_networks(folder, configs)
    for key in ("in_channels", "down_block_types", "cross_attention_dim"):
        if key not in configs["unet"]:
            raise InvalidInput(f"{folder / 'unet/config.json'} lacks {key!r}: not a Stable Diffusion U-Net")
    if "block_out_channels" not in configs["vae"]:
        raise InvalidInput(f"{folder / 'vae/config.json'} lacks 'block_out_channels': not an AutoencoderKL")
    if "hidden_size" not in configs.get("text_encoder", configs.get("text_encoder_2")):
        raise InvalidInput(f"{folder / 'text_encoder/config.json'} lacks 'hidden_size': not a CLIP text model")
    scheduler = _read_json(_require(folder, SCHEDULER_CONFIG))
    tokenizer_dirs = TOKENIZER_DIRS[1:] if refiner else TOKENIZER_DIRS if sdxl else TOKENIZER_DIRS[:1]
    for tok in tokenizer_dirs:
        if not any(all((folder / tok / n).is_file() for n in names) for names in TOKENIZER_FILE_SETS):
            raise MissingFile(f"{folder} is not a diffusers Stable Diffusion checkpoint: {tok}/ has neither "
                              f"tokenizer.json nor vocab.json + merges.txt")
    tok_cfg_path = folder / tokenizer_dirs[0] / "tokenizer_config.json"
    tokenizer_config = _read_json(tok_cfg_path) if tok_cfg_path.is_file() else {}

    safety_listed = _lists_safety_checker(folder, model_index)
    preprocessor = None
    if safety_listed and safety_checker:
        configs["safety_checker"] = _read_json(_require(folder, "safety_checker/config.json"))
        preprocessor = _read_json(_require(folder, FEATURE_EXTRACTOR_CONFIG))
        components = (*components, "safety_checker")
    weights = {c: _find_weights(folder, c) for c in components}
    for c, w in weights.items():
        if w.safetensors and w.file.endswith(".index.json"):
            _check_shards(folder / c / w.file)
    pickled = [(c, w.file) for c, w in weights.items() if not w.safetensors]
    if pickled and not allow_pickle:
        raise InvalidInput(
            f"{folder}: {', '.join(f'{c}/{name}' for c, name in pickled)} holds pickle-based weights, and "
            f"loading them would execute code from the file; convert the checkpoint to safetensors, or pass "
            f"--allow-pickle-code-execution if you trust its source")
    force_zeros = sdxl and model_index.get("force_zeros_for_empty_prompt", True)   # the pipeline's default
    aesthetics = sdxl and model_index.get("requires_aesthetics_score", False)
    return Checkpoint(folder, configs, scheduler, tokenizer_config, weights, bool(force_zeros), bool(aesthetics),
                      preprocessor, safety_listed)


def _lists_safety_checker(folder: Path, model_index: dict[str, Any]) -> bool:
    """Whether model_index.json names a safety checker (["stable_diffusion",
    "StableDiffusionSafetyChecker"]; [null, null] or absent: none), with the CLIP
    feature extractor it needs. Another class is refused: sdrt would not know its rule."""
    entry = model_index.get("safety_checker")
    if not isinstance(entry, list) or len(entry) != 2 or entry[1] is None:
        return False
    if entry[1] != SAFETY_CHECKER_CLASS:
        raise InvalidInput(f"{folder}: safety_checker is a {entry[1]!r:.60}; sdrt exports diffusers' "
                           f"{SAFETY_CHECKER_CLASS} (export with --no-safety-checker to leave it out)")
    extractor = model_index.get("feature_extractor")
    if not isinstance(extractor, list) or len(extractor) != 2 or extractor[1] not in FEATURE_EXTRACTOR_CLASSES:
        raise InvalidInput(f"{folder}: the safety checker needs a CLIPImageProcessor feature_extractor, and "
                           f"model_index.json lists {extractor!r:.60} (export with --no-safety-checker to leave "
                           f"the checker out)")
    return True


def _refuse_unsupported_pipeline(folder: Path, model_index: dict[str, Any]) -> None:
    """Refuse, before any work, a checkpoint whose pipeline class sdrt does not run,
    naming the family and what is unsupported."""
    cls = model_index.get("_class_name")
    if cls in KNOWN_UNSUPPORTED:
        raise InvalidInput(f"{folder}: {cls} checkpoint: {KNOWN_UNSUPPORTED[cls]}; sdrt exports Stable Diffusion "
                           f"1.x/2.x, SDXL and LCM checkpoints ({', '.join(SUPPORTED_PIPELINES[:3])})")
    if cls in SDXL_PIPELINES:
        return
    if "text_encoder_2" in model_index:
        raise InvalidInput(f"{folder}: {cls or 'this'} checkpoint has a second text encoder (text_encoder_2) but "
                           f"is not an SDXL pipeline; sdrt does not know how to combine them")
    if cls not in SUPPORTED_PIPELINES:
        raise InvalidInput(f"{folder}: pipeline class {cls!r:.60} is not supported; sdrt exports Stable Diffusion "
                           f"1.x/2.x, SDXL and LCM checkpoints ({', '.join(SUPPORTED_PIPELINES[:3])})")


# U-Net options that change its inputs beyond (sample, timestep, text), with what they mean.
_UNET_CONDITIONS = {
    "addition_embed_type": "added conditioning (SDXL's text_time, or image embeddings)",
    "class_embed_type": "class conditioning (unCLIP, the x4 upscaler)",
    "num_class_embeds": "class conditioning (class labels)",
    "encoder_hid_dim": "a projected encoder input (encoder_hid_dim)",
    "encoder_hid_dim_type": "a projected encoder input (encoder_hid_dim_type)",
    "projection_class_embeddings_input_dim": "projected class embeddings",
}


def _refuse_unsupported_networks(folder: Path, configs: dict[str, dict[str, Any]]) -> None:
    unet, text = configs["unet"], configs.get("text_encoder", configs.get("text_encoder_2"))
    sdxl = "text_encoder_2" in configs
    if sdxl and unet.get("addition_embed_type") != "text_time":
        raise InvalidInput(f"{folder}: an SDXL checkpoint whose U-Net has addition_embed_type "
                           f"{unet.get('addition_embed_type')!r:.40}, not 'text_time' (SDXL's size and crop conditions)")
    for key, what in _UNET_CONDITIONS.items():
        if sdxl and key in ("addition_embed_type", "projection_class_embeddings_input_dim"):
            continue   # SDXL's text_time conditions, which sdrt feeds
        if unet.get(key) is not None:
            raise InvalidInput(f"{folder}: the U-Net takes {what} ({key}={unet[key]!r:.40}), an input sdrt does "
                               f"not feed: sdrt runs Stable Diffusion 1.x/2.x U-Nets conditioned on text (and "
                               f"LCM U-Nets' guidance embedding, time_cond_proj_dim)")
    if unet.get("_class_name", "UNet2DConditionModel") != "UNet2DConditionModel":
        raise InvalidInput(f"{folder}: unet is a {unet.get('_class_name')!r:.60}, not a UNet2DConditionModel")
    model_type = text.get("model_type", "clip_text_model")
    if model_type != "clip_text_model":
        raise InvalidInput(f"{folder}: the text encoder is a {model_type!r:.40} model, not a CLIP text model "
                           f"(clip_text_model)")


@dataclass(frozen=True)
class Weights:
    file: str                 # one weight file (or shard index) of the component, for messages
    safetensors: bool
    variant: str | None       # diffusers/transformers "variant" (e.g. fp16 in model.fp16.safetensors)


def _find_weights(folder: Path, component: str) -> Weights:
    """Which weights a component folder holds: safetensors first, in the plain or a
    variant naming (`diffusion_pytorch_model.fp16.safetensors`, common on the Hub)."""
    names = sorted(p.name for p in (folder / component).iterdir() if p.is_file())
    for safetensors, suffixes in ((True, (".safetensors",)), (False, PICKLE_SUFFIXES)):
        found = [n for n in names if n.endswith(suffixes) or any(f"{x}.index" in n for x in suffixes)]
        if not found:
            continue
        plain = [n for n in found if n.split(".")[0] in WEIGHT_STEMS and n.split(".")[1] in SUFFIX_WORDS]
        if plain:
            return Weights(plain[0], safetensors, None)
        variants = sorted({n.split(".")[1] for n in found if n.split(".")[0] in WEIGHT_STEMS and n.count(".") >= 2})
        if variants:
            variant = "fp16" if "fp16" in variants else variants[0]
            return Weights(next(n for n in found if n.split(".")[1] == variant), safetensors, variant)
        return Weights(found[0], safetensors, None)
    raise MissingFile(f"{folder / component} has no weights (expected diffusion_pytorch_model.safetensors "
                      f"or model.safetensors)")


def _check_shards(index: Path) -> None:
    """A safetensors shard index names its shards; diffusers and transformers load
    whatever it names, with torch.load for any name not ending in .safetensors and
    from any path joined onto the folder. Each shard must be a .safetensors file
    directly in the index's folder, or the pickle policy and the folder are bypassed."""
    weight_map = _read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise InvalidInput(f"{index}: no weight_map naming the shards")
    for name in sorted({str(v) for v in weight_map.values()}):
        if Path(name).name != name or name.startswith(".") or not name.endswith(".safetensors"):
            raise InvalidInput(f"{index}: shard {name!r} is not a .safetensors file in {index.parent}; refused "
                               f"(a pickle or a path outside the checkpoint would be loaded)")
        if not (index.parent / name).is_file():
            raise MissingFile(f"{index}: shard {name} is missing")


def load_module(ckpt: Checkpoint, stage: Stage) -> Any:
    """The torch module of one stage, in fp32 and eval mode (torch imported here)."""
    import torch

    from .tiny import quiet_libraries

    quiet_libraries()
    component = STAGE_COMPONENT[stage]
    if component not in ckpt.weights:   # the safety checker of a checkpoint without one
        raise MissingFile(f"{ckpt.folder} has no {component} for the {stage.value} stage")
    w = ckpt.weights[component]
    from safetensors import SafetensorError

    kw: dict[str, Any] = dict(use_safetensors=w.safetensors, variant=w.variant)
    try:
        if stage is Stage.TEXT_ENCODER:
            from transformers import CLIPTextModel

            model = CLIPTextModel.from_pretrained(ckpt.folder / component, dtype=torch.float32, **kw)
        elif stage is Stage.TEXT_ENCODER_2:
            from transformers import CLIPTextModelWithProjection

            model = CLIPTextModelWithProjection.from_pretrained(ckpt.folder / component, dtype=torch.float32, **kw)
        elif stage in (Stage.UNET, Stage.UNET_SHALLOW):
            from diffusers import UNet2DConditionModel

            model = UNet2DConditionModel.from_pretrained(ckpt.folder, subfolder=component, torch_dtype=torch.float32, **kw)
        elif stage is Stage.SAFETY_CHECKER:
            from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

            model = StableDiffusionSafetyChecker.from_pretrained(ckpt.folder / component, dtype=torch.float32, **kw)
        else:   # both VAE stages: the export wrapper picks the encoder or the decoder
            from diffusers import AutoencoderKL

            model = AutoencoderKL.from_pretrained(ckpt.folder, subfolder=component, torch_dtype=torch.float32, **kw)
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as e:
        # A truncated or mismatched weight file: name it, in one line.
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InvalidInput(f"{ckpt.folder / component}: cannot load {w.file} ({type(e).__name__}: {first})") from None
    # fp16 variants load as fp16 weights; export traces and verifies in fp32.
    return model.float().eval().requires_grad_(False)


def _require(folder: Path, rel: str) -> Path:
    path = folder / rel
    if not path.is_file():
        raise MissingFile(f"{folder} is not a diffusers Stable Diffusion checkpoint: {rel} is missing")
    return path


def _read_json(path: Path) -> dict[str, Any]:
    return read_json_object(path, InvalidInput, "JSON")
