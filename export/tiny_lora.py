"""Built-in LoRA files for the built-in models (export/tiny.py), made the way users' files
are made, so that tests and the demo need no download.

- "peft": the U-Net and text encoders get peft adapters (LoraConfig, as diffusers'
  training scripts configure them) and the file is what
  `StableDiffusion(XL)Pipeline.save_lora_weights` writes from `get_peft_model_state_dict`,
  with each component's LoraConfig as `lora_adapter_metadata` (the newer scripts'
  `_collate_lora_metadata`; `metadata=False`: none, as older scripts saved, which loses
  alpha).
- "diffusers": the same for the U-Net's attention only (what train_text_to_image_lora.py
  targets), the state dicts first put through diffusers' `convert_state_dict_to_diffusers`,
  as diffusers' training scripts of 0.2x saved them (`to_q.lora.down.weight`,
  `q_proj.lora_linear_layer.down.weight`). diffusers 0.42 reads that layout only when no
  U-Net key of the file is PEFT's (load_lora_adapter converts by the first key), so this
  layout has no conv or projection layers.
- "kohya": kohya's sd-scripts naming (networks/lora.py, LoRANetwork.create_modules): every
  Linear and 1x1 Conv2d inside a Transformer2DModel (and with `conv`, every Conv2d of
  ResnetBlock2D / Downsample2D / Upsample2D: LoCon, 3x3 ones at conv_rank / conv_alpha),
  CLIPAttention and CLIPMLP, named `lora_unet_` / `lora_te_` (SDXL `lora_te1_` /
  `lora_te2_`) + the module path with dots as underscores; text encoders under their
  transformers 4 path (`text_model.` first); SDXL's U-Net under the generative-models
  names of sd-scripts' sdxl_original_unet.py (`input_blocks.4.1.`).

Weights are random from `seed` (peft's init leaves lora_B zero, which changes nothing).
torch, diffusers and peft are imported only when a file is made.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from sdrt.engines.errors import InvalidInput
from sdrt.engines.files import atomic_path, temp_folder

FORMATS = ("peft", "diffusers", "kohya")
DTYPES = ("float32", "float16", "bfloat16")

# What diffusers' LoRA training scripts target in the U-Net (train_text_to_image_lora.py:
# to_q/to_k/to_v/to_out.0; the dreambooth ones add proj_in/proj_out and the feed-forward),
# and in CLIP (q/k/v/out_proj; fc1/fc2 as kohya does).
_UNET_ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]
_UNET_LINEAR = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]
_UNET_CONV = ["conv1", "conv2", "conv_shortcut", "time_emb_proj", "conv"]   # "conv": down/upsamplers
_UNET_CONV_3X3 = ["conv1", "conv2", "conv"]
_TEXT = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]

# sd-scripts networks/lora.py: the module classes whose children get LoRA modules.
_KOHYA_UNET = ("Transformer2DModel",)
_KOHYA_UNET_CONV = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
_KOHYA_TEXT = ("CLIPAttention", "CLIPSdpaAttention", "CLIPMLP")


def make_tiny_lora(out_file: str | os.PathLike[str], variant: str = "sd15", format: str = "peft", rank: int = 4,
                   alpha: float | None = None, text_encoder: bool = True, conv: bool = False, seed: int = 0,
                   conv_rank: int | None = None, conv_alpha: float | None = None, dtype: str = "float32",
                   metadata: bool = True, force: bool = False) -> Path:
    """Write a LoRA for the built-in model `variant` to `out_file` (written atomically).

    alpha None: peft/diffusers alpha = rank; kohya writes no alpha keys (scale 1 either
    way). conv: LoCon, the resnets' and samplers' convolutions too, the 3x3 ones at
    conv_rank / conv_alpha (default rank / alpha). text_encoder: also the text
    encoder(s).
    """
    from .tiny import _variant, quiet_libraries

    spec = _variant(variant)
    if format not in FORMATS:
        raise InvalidInput(f"unknown LoRA format {format!r}: choose one of {', '.join(FORMATS)}")
    if dtype not in DTYPES:
        raise InvalidInput(f"unknown LoRA dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    for name, value in (("rank", rank), ("conv_rank", conv_rank if conv_rank is not None else rank)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InvalidInput(f"LoRA {name} must be a positive integer, got {value!r:.40}")
    if format == "diffusers" and conv:
        raise InvalidInput("the diffusers 0.2x layout has no conv layers: use format peft or kohya for LoCon")
    out_file = Path(out_file)
    if out_file.exists() and not force:
        from sdrt.engines.errors import AlreadyExists
        raise AlreadyExists(f"{out_file} already exists; choose another file or pass --force")
    quiet_libraries()
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)      # the base weights are not saved; only the module tree matters
    models = {"unet": UNet2DConditionModel(**spec.unet)}
    if text_encoder and not spec.refiner:
        models["text_encoder"] = CLIPTextModel(CLIPTextConfig(**spec.text))
    if text_encoder and spec.text_2 is not None:
        models["text_encoder_2"] = CLIPTextModelWithProjection(CLIPTextConfig(**spec.text_2))
    conv_rank = rank if conv_rank is None else conv_rank
    conv_alpha = alpha if conv_alpha is None else conv_alpha
    generator = torch.Generator("cpu").manual_seed(seed)
    torch_dtype = getattr(torch, dtype)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    if format == "kohya":
        tensors = _kohya_state_dict(models, spec, rank, alpha, conv, conv_rank, conv_alpha, generator)
        meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(rank),
                "ss_network_alpha": str(alpha if alpha is not None else rank)}
        if conv:
            meta.update(ss_network_args=f'{{"conv_dim": "{conv_rank}", "conv_alpha": "{conv_alpha or conv_rank}"}}')
        from safetensors.torch import save_file
        with atomic_path(out_file) as tmp:
            save_file({k: v.to(torch_dtype).contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)
        return out_file
    layers, configs = _peft_state_dicts(models, rank, alpha, conv, conv_rank, conv_alpha, generator,
                                        unet_targets=_UNET_ATTENTION if format == "diffusers" else _UNET_LINEAR)
    if format == "diffusers":
        from diffusers.utils import convert_state_dict_to_diffusers
        layers = {name: convert_state_dict_to_diffusers(sd) for name, sd in layers.items()}
    layers = {name: {k: v.to(torch_dtype) for k, v in sd.items()} for name, sd in layers.items()}
    import diffusers
    pipeline = getattr(diffusers, "StableDiffusionXLPipeline" if spec.text_2 is not None
                       else "StableDiffusionPipeline")
    kwargs = {f"{name}_lora_layers": sd for name, sd in layers.items()}
    if metadata:
        kwargs.update({f"{name}_lora_adapter_metadata": configs[name] for name in layers})
    with temp_folder(out_file.parent) as tmp:
        pipeline.save_lora_weights(tmp, weight_name="lora.safetensors", **kwargs)
        with atomic_path(out_file) as final:
            shutil.copyfile(tmp / "lora.safetensors", final)
    return out_file


def _fill(tensors, generator, fan_in_of) -> None:
    """Random LoRA weights: down ~ N(0, 1/fan_in) and up ~ N(0, 0.25/rank), so a pair's
    update is about half as large as a default-initialised weight."""
    import torch

    with torch.no_grad():
        for name, t in tensors:
            is_down = fan_in_of(name, t) is not None
            std = fan_in_of(name, t) ** -0.5 if is_down else 0.5 / t.shape[1] ** 0.5
            t.copy_(torch.randn(t.shape, generator=generator) * std)


def _peft_state_dicts(models, rank, alpha, conv, conv_rank, conv_alpha, generator, unet_targets):
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    layers, configs = {}, {}
    for name, model in models.items():
        if name == "unet":
            targets = unet_targets + (_UNET_CONV + ["conv_in", "conv_out"] if conv else [])
            patterns = {t: conv_rank for t in _UNET_CONV_3X3 + ["conv_in", "conv_out"]} if conv else {}
            alphas = {t: conv_alpha for t in patterns} if conv and conv_alpha is not None else {}
        else:
            targets, patterns, alphas = _TEXT, {}, {}
        config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank, target_modules=targets,
                            init_lora_weights=True, rank_pattern=patterns, alpha_pattern=alphas)
        inject_adapter_in_model(config, model, adapter_name="default")
        params = [(n, p) for n, p in model.named_parameters() if ".lora_" in n]
        _fill(params, generator, lambda n, t: (t[0].numel() if ".lora_A." in n else None))
        layers[name] = get_peft_model_state_dict(model, adapter_name="default")
        configs[name] = _json_config(config)
    return layers, configs


def _json_config(config) -> dict:
    """LoraConfig.to_dict() with its sets as lists: what JSON can hold."""
    return {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.to_dict().items()}


def _kohya_state_dict(models, spec, rank, alpha, conv, conv_rank, conv_alpha, generator):
    import torch

    sgm = _sgm_blocks(spec.unet) if spec.text_2 is not None else None
    tensors = {}
    prefixes = {"unet": "lora_unet", "text_encoder": "lora_te1" if spec.text_2 is not None else "lora_te",
                "text_encoder_2": "lora_te2"}
    for component, model in models.items():
        classes = (_KOHYA_UNET + (_KOHYA_UNET_CONV if conv else ())) if component == "unet" else _KOHYA_TEXT
        for parent, module in model.named_modules():
            if type(module).__name__ not in classes:
                continue
            for child_name, child in module.named_modules():
                kind = type(child).__name__
                if kind not in ("Linear", "Conv2d"):
                    continue
                one_by_one = kind == "Linear" or tuple(child.kernel_size) == (1, 1)
                dim, a = (rank, alpha) if one_by_one else (conv_rank, conv_alpha)
                path = f"{parent}.{child_name}"
                if component == "unet" and sgm is not None:
                    path = _sgm_path(sgm, parent, child_name)
                elif component != "unet" and not path.startswith("text_model."):
                    path = "text_model." + path    # sd-scripts' transformers 4 CLIPTextModel
                lora_name = f"{prefixes[component]}.{path}".replace(".", "_")
                w = child.weight
                down = torch.empty((dim,) + tuple(w.shape[1:]))
                up = torch.empty((w.shape[0], dim) + ((1, 1) if kind == "Conv2d" else ()))
                _fill([("down", down), ("up", up)], generator,
                      lambda n, t: (t[0].numel() if n == "down" else None))
                tensors[f"{lora_name}.lora_down.weight"] = down
                tensors[f"{lora_name}.lora_up.weight"] = up
                if a is not None:
                    tensors[f"{lora_name}.alpha"] = torch.tensor(float(a))
    return tensors


def _sgm_blocks(unet: dict) -> dict[str, str]:
    """{diffusers block: generative-models block} for an SDXL U-Net config, built the way
    sgm's UNetModel.__init__ appends its blocks: per level `layers_per_block` input blocks
    (a resnet, an attention on attended levels) and a Downsample on all but the last;
    middle_block resnet, attention, resnet; per level from the deepest
    `layers_per_block + 1` output blocks, the last with an Upsample after the others on
    all but the shallowest."""
    layers = unet["layers_per_block"]
    levels = len(unet["block_out_channels"])
    attended = [t.startswith("CrossAttn") for t in unet["down_block_types"]]
    blocks, index = {}, 1
    for level in range(levels):
        for j in range(layers):
            blocks[f"down_blocks.{level}.resnets.{j}"] = f"input_blocks.{index}.0"
            if attended[level]:
                blocks[f"down_blocks.{level}.attentions.{j}"] = f"input_blocks.{index}.1"
            index += 1
        if level != levels - 1:
            blocks[f"down_blocks.{level}.downsamplers.0"] = f"input_blocks.{index}.0"
            index += 1
    blocks.update({"mid_block.resnets.0": "middle_block.0", "mid_block.attentions.0": "middle_block.1",
                   "mid_block.resnets.1": "middle_block.2"})
    index = 0
    for up, level in enumerate(reversed(range(levels))):
        for j in range(layers + 1):
            inner = 0
            blocks[f"up_blocks.{up}.resnets.{j}"] = f"output_blocks.{index}.{inner}"
            if attended[level]:
                inner += 1
                blocks[f"up_blocks.{up}.attentions.{j}"] = f"output_blocks.{index}.{inner}"
            if level and j == layers:
                blocks[f"up_blocks.{up}.upsamplers.0"] = f"output_blocks.{index}.{inner + 1}"
            index += 1
    return blocks


# sgm's ResBlock: in_layers (GroupNorm, SiLU, Conv2d), emb_layers (SiLU, Linear),
# out_layers (GroupNorm, SiLU, Dropout, Conv2d), skip_connection; Downsample's conv is `op`.
_SGM_CHILD = {"conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "conv2": "out_layers.3",
              "conv_shortcut": "skip_connection"}


def _sgm_path(blocks: dict[str, str], parent: str, child: str) -> str:
    block = blocks[parent]
    if ".resnets." in parent:
        return f"{block}.{_SGM_CHILD[child]}"
    if ".downsamplers." in parent:
        return f"{block}.op"
    return f"{block}.{child}"
