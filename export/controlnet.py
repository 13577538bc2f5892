"""ControlNet folders for `sdrt export --controlnet`: what must be in them, whether they
fit the checkpoint's U-Net, and loading them (torch imported only there).

A diffusers ControlNetModel is a copy of the U-Net's encoder (conv_in, the down
blocks and the mid block) plus an image encoder for its conditioning image; its
residuals are added to the U-Net's skip connections and mid block, so its
architecture must be the U-Net's. That is checked here, from the config files,
before any weights load: a ControlNet for another model family fails in
milliseconds with the mismatching value named, not as a shape error in the trace.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdrt.engines.errors import InvalidInput, InvalidType, MissingFile
from sdrt.engines.specs import MAX_CONTROLNETS, ModelFacts

from .checkpoint import Checkpoint, Weights, _check_shards, _find_weights, _read_json, per_block

CONTROLNET_CLASS = "ControlNetModel"
# The families whose ControlNets sdrt exports (SDXL's take added conditions: not yet).
CONTROLNET_FAMILIES = ("sd1", "sd2")


@dataclass(frozen=True)
class ControlNetSource:
    folder: Path
    config: dict[str, Any]
    weights: Weights


def check_paths(paths: Any) -> tuple[Path, ...]:
    """ExportConfig.controlnets as a tuple of paths, or a typed error."""
    if isinstance(paths, (str, os.PathLike)):
        raise InvalidType("controlnets must be a list of ControlNet folders, not one path: pass [path]")
    if not isinstance(paths, (list, tuple)):
        raise InvalidType(f"controlnets must be a list of ControlNet folders, got {type(paths).__name__}")
    for p in paths:
        if not isinstance(p, (str, os.PathLike)):
            raise InvalidType(f"controlnets items must be folder paths, got {type(p).__name__}")
    if len(paths) > MAX_CONTROLNETS:
        raise InvalidInput(f"{len(paths)} ControlNets given; an artifact holds at most {MAX_CONTROLNETS}")
    return tuple(Path(p) for p in paths)


def open_controlnets(paths: tuple[Path, ...], ckpt: Checkpoint, facts: ModelFacts,
                     allow_pickle: bool = False) -> tuple[ControlNetSource, ...]:
    """Each folder checked against the checkpoint's U-Net, in the order given (the order
    of `control_image=` at generation)."""
    if paths and facts.family not in CONTROLNET_FAMILIES:
        raise InvalidInput(f"ControlNets are exported for Stable Diffusion 1.x/2.x checkpoints; {ckpt.folder} is "
                           f"{facts.family} (SDXL ControlNets are not supported yet)")
    return tuple(_open(p, ckpt, facts, allow_pickle) for p in paths)


def _open(folder: Path, ckpt: Checkpoint, facts: ModelFacts, allow_pickle: bool) -> ControlNetSource:
    if not folder.exists():
        raise MissingFile(f"ControlNet folder {folder} does not exist")
    if not folder.is_dir():
        raise MissingFile(f"ControlNet path {folder} is not a folder (expected a diffusers ControlNetModel folder "
                          f"with config.json)")
    if not (folder / "config.json").is_file():
        raise MissingFile(f"{folder} is not a diffusers ControlNetModel folder: config.json is missing")
    config = _read_json(folder / "config.json")
    cls = config.get("_class_name", CONTROLNET_CLASS)
    if cls != CONTROLNET_CLASS:
        raise InvalidInput(f"{folder}: a {cls!r:.60}, not a {CONTROLNET_CLASS} (sdrt exports SD 1.x/2.x ControlNets)")
    unet = ckpt.configs["unet"]
    blocks = config.get("block_out_channels", (320, 640, 1280, 1280))
    wants = {
        "in_channels": (config.get("in_channels", 4), facts.latent_channels),
        "block_out_channels": (_ints(blocks), facts.unet_block_out_channels),
        "layers_per_block": (per_block(config.get("layers_per_block", 2), len(blocks)), facts.unet_layers_per_block),
        "down_block_types": (list(config.get("down_block_types", ())), list(unet["down_block_types"])),
        "cross_attention_dim": (config.get("cross_attention_dim", 1280), facts.context_size),
    }
    for key, (got, want) in wants.items():
        if got != want:
            raise InvalidInput(f"{folder}: ControlNet {key} {_show(got)} differs from the U-Net's {_show(want)} "
                               f"in {ckpt.folder}: it was trained for another model family")
    for key in ("addition_embed_type", "class_embed_type", "encoder_hid_dim", "encoder_hid_dim_type"):
        if config.get(key) is not None:
            raise InvalidInput(f"{folder}: the ControlNet takes {key}={config[key]!r:.40}, an input sdrt does not "
                               f"feed (SD 1.x/2.x ControlNets are conditioned on text, timestep and one image)")
    if config.get("conditioning_channels", 3) != 3:
        raise InvalidInput(f"{folder}: conditioning_channels {config.get('conditioning_channels')!r:.20} is not "
                           f"supported: control images are RGB (3 channels), as diffusers' pipelines prepare them")
    embedding = config.get("conditioning_embedding_out_channels", (16, 32, 96, 256))
    scale = 2 ** (len(embedding) - 1) if isinstance(embedding, (list, tuple)) and embedding else None
    if scale != facts.vae_scale_factor:
        raise InvalidInput(f"{folder}: conditioning_embedding_out_channels {_show(embedding)} scales the control "
                           f"image down by {scale or '?'}, not by the VAE's {facts.vae_scale_factor}")
    if config.get("global_pool_conditions"):
        raise InvalidInput(f"{folder}: global_pool_conditions (a shuffle-type ControlNet, always in guess mode) is "
                           f"not supported yet")
    if config.get("controlnet_conditioning_channel_order", "rgb") not in ("rgb", "bgr"):
        raise InvalidInput(f"{folder}: controlnet_conditioning_channel_order "
                           f"{config['controlnet_conditioning_channel_order']!r:.20} is neither rgb nor bgr")
    weights = _find_weights(folder.parent, folder.name)
    if weights.safetensors and weights.file.endswith(".index.json"):
        _check_shards(folder / weights.file)
    if not weights.safetensors and not allow_pickle:
        raise InvalidInput(f"{folder / weights.file} holds pickle-based weights, and loading them would execute code "
                           f"from the file; convert it to safetensors, or pass --allow-pickle-code-execution if you "
                           f"trust its source")
    return ControlNetSource(folder, config, weights)


def load_controlnets(sources: tuple[ControlNetSource, ...]) -> Any:
    """The ControlNets as one torch ModuleList, fp32, eval mode."""
    import torch
    from diffusers import ControlNetModel
    from safetensors import SafetensorError

    from .tiny import quiet_libraries

    quiet_libraries()
    nets = []
    for src in sources:
        try:
            net = ControlNetModel.from_pretrained(src.folder, torch_dtype=torch.float32,
                                                  use_safetensors=src.weights.safetensors, variant=src.weights.variant)
        except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise InvalidInput(f"{src.folder}: cannot load {src.weights.file} ({type(e).__name__}: {first})") from None
        nets.append(net.float().eval().requires_grad_(False))
    return torch.nn.ModuleList(nets)


def _ints(value: Any) -> tuple[int, ...] | Any:
    return tuple(value) if isinstance(value, (list, tuple)) else value


def _show(value: Any) -> str:
    return repr(list(value) if isinstance(value, tuple) else value)[:60]
