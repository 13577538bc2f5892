"""LoRA files: the low-rank weight updates a `.safetensors` LoRA makes to a model.

A LoRA (Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", 2021) changes a
weight W (out, in) into W + scale * up @ down, with down (rank, in) and up (out, rank).
For a convolution W (out, in, kh, kw), down is a (rank, in, kh, kw) convolution and up a
1x1 one (LoCon). A file names the layer of each pair in one of two layouts, both as
diffusers' Stable Diffusion loaders read them (diffusers/loaders/lora_pipeline.py,
lora_conversion_utils.py, utils/state_dict_utils.py):

- diffusers/PEFT: `unet.<module>.lora_A.weight` / `.lora_B.weight` (and
  `text_encoder.`, SDXL's `text_encoder_2.`), as `save_lora_weights` writes it; the
  scale is lora_alpha / r (alpha / sqrt(r) with use_rslora) from the PEFT config that
  diffusers stores in the file's `lora_adapter_metadata`, per module where its
  rank_pattern / alpha_pattern say so, and 1 when the file has no metadata. diffusers
  0.2x's layouts are read too: `.lora.down.weight` / `.lora.up.weight`, the text
  encoders' `.lora_linear_layer.`, and the attention processors' `processor.to_q_lora`.
- kohya/AUTOMATIC1111: `lora_unet_<module path, dots as underscores>.lora_down.weight`,
  `.lora_up.weight` and `.alpha` (scale alpha / rank; no alpha: 1), with `lora_te_` for
  the text encoder, SDXL's `lora_te1_` / `lora_te2_`, and for SDXL the U-Net's names in
  Stability's generative-models layout (`input_blocks.4.1`, `middle_block`,
  `output_blocks`) that kohya's sd-scripts trains on.

An underscore-joined name cannot be split back into a path by guessing where the dots
went (`to_out_0`, `time_emb_proj`, `ff_net_0_proj`): every name is looked up in a table
built from the model's own weight names, so a key matches one weight exactly or the file
is refused, naming the key. NumPy only: no torch at run time.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np

from sdrt.engines.errors import InvalidInput

from . import safetensors_file

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")

# kohya's prefixes (sd-scripts networks/lora.py: LORA_PREFIX_UNET, LORA_PREFIX_TEXT_ENCODER,
# LORA_PREFIX_TEXT_ENCODER1/2). diffusers reads lora_te_ and lora_te1_ alike as the first encoder.
KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
                  "lora_te2_": "text_encoder_2"}
_KOHYA_DOWN, _KOHYA_UP, _KOHYA_ALPHA = "lora_down.weight", "lora_up.weight", "alpha"

# The file metadata entry in which diffusers (>= 0.34) stores each component's PEFT
# LoraConfig, prefixed by component ("unet.r", "text_encoder.lora_alpha", ...).
METADATA_KEY = "lora_adapter_metadata"
_PEFT_DEFAULT_R = _PEFT_DEFAULT_ALPHA = 8          # peft's LoraConfig defaults

# diffusers-layout (down, up) suffixes: PEFT; diffusers 0.2x's LoRACompatible layers
# (UNET_TO_DIFFUSERS); its text-encoder layers (DIFFUSERS_TO_PEFT).
_DIFFUSERS_SUFFIXES = ((".lora_A.weight", ".lora_B.weight"), (".lora.down.weight", ".lora.up.weight"),
                       (".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight"))
# diffusers <= 0.20's attention processors: `attn1.processor.to_q_lora.down.weight`, for
# the U-Net's and the text encoders' attention (UNET_TO_DIFFUSERS, DIFFUSERS_OLD_TO_PEFT).
_PROCESSOR_LAYERS = {"to_q_lora": ("to_q", "q_proj"), "to_k_lora": ("to_k", "k_proj"),
                     "to_v_lora": ("to_v", "v_proj"), "to_out_lora": ("to_out.0", "out_proj")}

# Adapters that are not a plain low-rank pair, by a part of their keys (LyCORIS's and
# peft's names). diffusers drops DoRA's magnitudes with a warning and applies the rest
# as plain LoRA; sdrt refuses rather than apply something else than the file means.
_OTHER_ADAPTERS = {
    "hada_": "LoHa (hada_*)", "lokr_": "LoKr (lokr_*)", "dora_scale": "DoRA (dora_scale)",
    "lora_magnitude_vector": "DoRA (lora_magnitude_vector)", "lora_mid": "LoCon with a Tucker core (lora_mid)",
    "oft_": "OFT (oft_*)", "boft_": "BOFT (boft_*)", "ia3_": "IA3 (ia3_*)", "on_input": "IA3 (on_input)",
    "vera_": "VeRA (vera_*)", "lora_embedding_": "an embedding LoRA (lora_embedding_*)",
    "w_norm": "a LyCORIS norm adapter (w_norm)", "b_norm": "a LyCORIS norm adapter (b_norm)",
    "diff": "a LyCORIS full weight difference (diff)", "diff_b": "a LyCORIS full weight difference (diff_b)",
    "a1": "GLoRA (a1/a2/b1/b2)", "a2": "GLoRA (a1/a2/b1/b2)", "b1": "GLoRA (a1/a2/b1/b2)",
    "b2": "GLoRA (a1/a2/b1/b2)", "bundle_emb": "bundled textual-inversion embeddings (bundle_emb)",
}
_PREFIX_MARKERS = ("hada_", "lokr_", "oft_", "boft_", "ia3_", "vera_", "lora_embedding_")


@dataclass(frozen=True)
class LoraLayer:
    component: str     # "unet", "text_encoder" or "text_encoder_2"
    param: str         # the weight it changes, as the module's named_parameters() names it
    up: np.ndarray     # float32 (out, rank), or (out, rank, 1, 1) for a convolution
    down: np.ndarray   # float32 (rank, in), or (rank, in, kh, kw)
    scale: float       # what the format multiplies up @ down by (alpha / rank, ...), without the user's scale

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def delta(self) -> np.ndarray:
        """scale * up @ down in float32, in the weight's shape: peft's
        get_delta_weight, which fuse_lora adds (tuners/lora/layer.py: Linear
        `(B @ A) * scaling`; Conv2d 1x1 the same on squeezed kernels; kxk
        `conv2d(A^T, B)^T * scaling`, which is B @ A on A's flattened kernels)."""
        up = self.up.reshape(self.up.shape[0], self.rank)
        product = up @ self.down.reshape(self.rank, -1)
        return (product * np.float32(self.scale)).reshape((self.up.shape[0],) + self.down.shape[1:])


@dataclass(frozen=True)
class Lora:
    path: Path
    format: str        # "diffusers" (PEFT and diffusers' older key layouts) or "kohya"
    layers: tuple[LoraLayer, ...]


@dataclass(frozen=True)
class _Pair:
    """One layer's keys in the file, before its arrays are checked."""
    component: str
    module: str                  # the target module (its weight is module + ".weight")
    down: str
    up: str
    alpha: str | None = None     # kohya: the key of its alpha


def read_lora(path: str | os.PathLike[str], targets: Mapping[str, Mapping[str, tuple[int, ...]]]) -> Lora:
    """Read a LoRA file into one LoraLayer per weight it changes.

    targets: {component: {parameter name: shape}}, the weights the model can change.
    Raises MissingFile, or InvalidInput in one line naming the first thing wrong: not a
    safetensors file (a pickle, truncated, malformed), an adapter that is not plain LoRA
    (LoHa, LoKr, DoRA, ...), a key that matches no weight of `targets`, a missing half of
    a pair, up and down of different ranks, a pair that does not fit its weight's shape,
    NaN or Inf values.
    """
    path = Path(path)
    where = f"LoRA {path}"
    modules = _modules(targets)
    file = safetensors_file.read(path, "LoRA")
    if not file.tensors:
        raise InvalidInput(f"{where} holds no tensors")
    _refuse_other_adapters(where, file.tensors)
    if all(k.startswith(tuple(KOHYA_PREFIXES)) for k in file.tensors):
        fmt, pairs = "kohya", _kohya_pairs(where, file.tensors, modules)
    else:
        fmt, pairs = "diffusers", _diffusers_pairs(where, file.tensors, modules)
    scales = _peft_configs(where, file.metadata) if fmt == "diffusers" else {}
    layers, changed = [], {}
    for pair in pairs:
        param = pair.module + ".weight"
        if (pair.component, param) in changed:
            raise InvalidInput(f"{where}: {changed[pair.component, param]!r} and {pair.down!r} both change "
                               f"{pair.component} weight {param}")
        changed[pair.component, param] = pair.down
        up, down = _pair_arrays(where, pair, file.tensors, modules[pair.component][pair.module])
        if fmt == "kohya":
            scale = _kohya_alpha(where, pair, file.tensors, down.shape[0]) / down.shape[0]
        else:
            scale = _peft_scale(where, pair, scales.get(pair.component), down.shape[0])
        layers.append(LoraLayer(pair.component, param, up, down, scale))
    return Lora(path, fmt, tuple(layers))


def _modules(targets: Mapping[str, Mapping[str, tuple[int, ...]]]) -> dict[str, dict[str, tuple[int, ...]]]:
    """{component: {module name: weight shape}} of the targets' `.weight` parameters."""
    unknown = [c for c in targets if c not in COMPONENTS]
    if unknown:
        raise InvalidInput(f"LoRA targets name unknown component {unknown[0]!r}; components are "
                           f"{', '.join(COMPONENTS)}")
    return {c: {name[:-len(".weight")]: tuple(int(d) for d in shape)
                for name, shape in params.items() if name.endswith(".weight")}
            for c, params in targets.items()}


def _refuse_other_adapters(where: str, tensors: Mapping[str, np.ndarray]) -> None:
    for key in tensors:
        head, _, tail = key.partition(".")
        # A kohya key's module is its first part; a diffusers key's are all but the last few.
        parts = tail.split(".") if head.startswith(tuple(KOHYA_PREFIXES)) else key.split(".")[-3:]
        if head == "bundle_emb":
            parts = [head]
        for part in parts:
            kind = _OTHER_ADAPTERS.get(part) or next(
                (_OTHER_ADAPTERS[m] for m in _PREFIX_MARKERS if part.startswith(m)), None)
            if kind:
                raise InvalidInput(f"{where} is {kind}, not a plain LoRA (key {key!r}); sdrt applies LoRA "
                                   f"and LoCon files only")
        if head.startswith(tuple(KOHYA_PREFIXES)) and tail.endswith(".bias") or key.endswith(".lora_B.bias"):
            raise InvalidInput(f"{where} has LoRA bias terms (key {key!r}), which sdrt does not apply")


# ---- kohya ---------------------------------------------------------------------------

def _kohya_pairs(where: str, tensors: Mapping[str, np.ndarray],
                 modules: Mapping[str, Mapping[str, tuple[int, ...]]]) -> list[_Pair]:
    groups: dict[str, dict[str, str]] = {}
    for key in tensors:
        name, _, suffix = key.partition(".")
        if suffix not in (_KOHYA_DOWN, _KOHYA_UP, _KOHYA_ALPHA):
            raise InvalidInput(f"{where}: key {key!r} is not a kohya LoRA entry (NAME.{_KOHYA_DOWN}, "
                               f"NAME.{_KOHYA_UP} or NAME.{_KOHYA_ALPHA})")
        groups.setdefault(name, {})[suffix] = key
    table = _kohya_names(modules)
    pairs = []
    for name, keys in groups.items():
        first = next(iter(keys.values()))
        if name not in table:
            raise _unmatched(where, first, KOHYA_PREFIXES[_kohya_prefix(name)], modules)
        if table[name] is None:
            raise InvalidInput(f"{where}: key {first!r} could name more than one weight of this model")
        for part, other in ((_KOHYA_DOWN, _KOHYA_UP), (_KOHYA_UP, _KOHYA_DOWN)):
            if part not in keys:
                raise InvalidInput(f"{where}: {keys.get(other, first)!r} has no {name}.{part} to pair with")
        component, module = table[name]
        pairs.append(_Pair(component, module, keys[_KOHYA_DOWN], keys[_KOHYA_UP], keys.get(_KOHYA_ALPHA)))
    return pairs


def _kohya_prefix(name: str) -> str:
    return next(p for p in KOHYA_PREFIXES if name.startswith(p))


def _kohya_names(modules: Mapping[str, Mapping[str, tuple[int, ...]]]) -> dict[str, tuple[str, str] | None]:
    """Every kohya name of every target module: {name: (component, module)}, None where
    two modules would share a name. Text encoders also under their transformers 4 path
    (`text_model.` first), which sd-scripts' names carry and transformers 5's
    CLIPTextModel no longer has; the U-Net also under its generative-models names."""
    table: dict[str, tuple[str, str] | None] = {}

    def add(name: str, hit: tuple[str, str]) -> None:
        table[name] = hit if table.get(name, hit) == hit else None

    for prefix, component in KOHYA_PREFIXES.items():
        names = modules.get(component, {})
        for module in names:
            add(prefix + module.replace(".", "_"), (component, module))
            if component != "unet" and not module.startswith("text_model."):
                add(prefix + "text_model_" + module.replace(".", "_"), (component, module))
        if component == "unet":
            for module, sgm in sgm_names(names).items():
                add(prefix + sgm.replace(".", "_"), (component, module))
    return table


# diffusers U-Net names -> Stability's generative-models (SGM) UNetModel names, the layout
# of the original SD checkpoints and of sd-scripts' SDXL U-Net (sdxl_original_unet.py).
_SGM_FIXED = {"conv_in": "input_blocks.0.0", "conv_out": "out.2", "time_embedding.linear_1": "time_embed.0",
              "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
              "add_embedding.linear_2": "label_emb.0.2"}
_SGM_RESNET = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
               "conv_shortcut": "skip_connection"}
_SGM_MID = {("resnets", 0): 0, ("attentions", 0): 1, ("resnets", 1): 2}
_BLOCK = re.compile(r"(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)")
_MID = re.compile(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)")


def sgm_names(modules: Iterable[str]) -> dict[str, str]:
    """{diffusers U-Net module: its SGM name} for the modules that have one.

    SGM numbers blocks flat: input_blocks.0 is conv_in, then per level `layers` blocks of
    (0: resnet, 1: attention) and a downsampler block (0.op); middle_block 0, 1, 2 is
    resnet, attention, resnet; output_blocks per level `layers + 1` blocks of (resnet,
    attention), the last one also holding the upsampler after them. `layers` (the
    config's layers_per_block) is read off the down blocks' resnets, as diffusers'
    _maybe_map_sgm_blocks_to_diffusers reads it from the config.
    """
    modules = list(modules)
    found = [(m, _BLOCK.fullmatch(m)) for m in modules]
    down_resnets = [int(b.group(4)) for _, b in found if b and b.group(1) == "down_blocks" and b.group(3) == "resnets"]
    if not down_resnets:
        return {}
    per = max(down_resnets) + 2      # layers + 1 blocks per level
    attended = {int(b.group(2)) for _, b in found if b and b.group(1) == "up_blocks" and b.group(3) == "attentions"}
    names = {}
    for module, block in found:
        if module in _SGM_FIXED:
            names[module] = _SGM_FIXED[module]
        elif mid := _MID.fullmatch(module):
            kind, index, rest = mid.group(1), int(mid.group(2)), mid.group(3)
            rest = _SGM_RESNET.get(rest) if kind == "resnets" else rest
            if (kind, index) in _SGM_MID and rest:
                names[module] = f"middle_block.{_SGM_MID[kind, index]}.{rest}"
        elif block:
            side, level, kind, index, rest = block.group(1), int(block.group(2)), block.group(3), \
                int(block.group(4)), block.group(5)
            base = 1 + level * per if side == "down_blocks" else level * per
            if kind == "resnets" and rest in _SGM_RESNET:
                names[module] = f"{'input' if side == 'down_blocks' else 'output'}_blocks.{base + index}.0." \
                                f"{_SGM_RESNET[rest]}"
            elif kind == "attentions":
                names[module] = f"{'input' if side == 'down_blocks' else 'output'}_blocks.{base + index}.1.{rest}"
            elif kind == "downsamplers" and index == 0 and rest == "conv":
                names[module] = f"input_blocks.{base + per - 1}.0.op"
            elif kind == "upsamplers" and index == 0 and rest == "conv":
                names[module] = f"output_blocks.{base + per - 1}.{2 if level in attended else 1}.conv"
    return names


def _kohya_alpha(where: str, pair: _Pair, tensors: Mapping[str, np.ndarray], rank: int) -> float:
    """kohya's alpha (networks/lora.py: scale = alpha / lora_dim; no alpha: alpha = dim)."""
    if pair.alpha is None:
        return float(rank)
    alpha = tensors[pair.alpha]
    if alpha.size != 1 or not (np.issubdtype(alpha.dtype, np.floating) or np.issubdtype(alpha.dtype, np.integer)):
        raise InvalidInput(f"{where}: {pair.alpha!r} must be one number, got shape {list(alpha.shape)} "
                           f"of {alpha.dtype}")
    value = float(alpha.reshape(-1)[0])
    if not math.isfinite(value):
        raise InvalidInput(f"{where}: {pair.alpha!r} is {value}")
    return value


# ---- diffusers / PEFT ----------------------------------------------------------------

def _diffusers_pairs(where: str, tensors: Mapping[str, np.ndarray],
                     modules: Mapping[str, Mapping[str, tuple[int, ...]]]) -> list[_Pair]:
    groups: dict[tuple[str, str], dict[str, str]] = {}
    for key in tensors:
        component = key.split(".", 1)[0]
        if component not in COMPONENTS:
            raise InvalidInput(f"{where}: key {key!r} matches no weight of this model: a LoRA key starts with "
                               f"{', '.join(c + '.' for c in COMPONENTS)} (diffusers) or "
                               f"{', '.join(KOHYA_PREFIXES)} (kohya), all in one layout")
        rest = key[len(component) + 1:].replace(".processor.", ".")
        found = _diffusers_module(rest, component)
        if found is None:
            raise InvalidInput(f"{where}: key {key!r} is not a LoRA weight (MODULE.lora_A.weight and "
                               f"MODULE.lora_B.weight, or diffusers' older .lora.down/.lora.up.weight)")
        module, half = found
        resolved = _resolve(modules.get(component), module)
        if resolved is None:
            raise _unmatched(where, key, component, modules)
        group = groups.setdefault((component, resolved), {})
        if half in group:
            raise InvalidInput(f"{where}: {group[half]!r} and {key!r} both change {component} weight "
                               f"{resolved}.weight")
        group[half] = key
    pairs = []
    for (component, module), keys in groups.items():
        for half in ("down", "up"):
            if half not in keys:
                other = next(iter(keys.values()))
                raise InvalidInput(f"{where}: {other!r} has no {half} ({'lora_A' if half == 'down' else 'lora_B'}) "
                                   f"weight to pair with")
        pairs.append(_Pair(component, module, keys["down"], keys["up"]))
    return pairs


def _diffusers_module(rest: str, component: str) -> tuple[str, str] | None:
    """(module path as the file writes it, "down" or "up"), or None for no LoRA weight."""
    for down, up in _DIFFUSERS_SUFFIXES:
        for suffix, half in ((down, "down"), (up, "up")):
            if rest.endswith(suffix):
                return rest[:-len(suffix)], half
    for suffix, half in ((".down.weight", "down"), (".up.weight", "up")):
        if rest.endswith(suffix):
            parent, _, layer = rest[:-len(suffix)].rpartition(".")
            if layer in _PROCESSOR_LAYERS and parent:
                return f"{parent}.{_PROCESSOR_LAYERS[layer][0 if component == 'unet' else 1]}", half
    return None


def _resolve(names: Mapping[str, tuple[int, ...]] | None, module: str) -> str | None:
    """The target module a diffusers key's path names: itself, or for files written with
    transformers 4 the path without its `text_model.` level, which transformers 5's
    CLIPTextModel dropped (diffusers strips it the same way in _load_lora_into_text_encoder)."""
    if names is None:
        return None
    if module in names:
        return module
    if module.startswith("text_model.") and module[len("text_model."):] in names:
        return module[len("text_model."):]
    return None


@dataclass(frozen=True)
class _PeftConfig:
    r: int
    alpha: float
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]
    rslora: bool


def _peft_configs(where: str, metadata: Mapping[str, str]) -> dict[str, _PeftConfig]:
    """Each component's LoraConfig from the file's metadata, as diffusers' load_lora_adapter
    passes `lora_adapter_metadata` (prefix removed) to LoraConfig."""
    raw = metadata.get(METADATA_KEY)
    if not raw:
        return {}
    try:
        packed = json.loads(raw)
    except ValueError as e:
        raise InvalidInput(f"{where}: metadata {METADATA_KEY} is not JSON ({e})") from None
    if not isinstance(packed, dict):
        raise InvalidInput(f"{where}: metadata {METADATA_KEY} is not a JSON object")
    configs = {}
    for component in COMPONENTS:
        config = {k[len(component) + 1:]: v for k, v in packed.items() if k.startswith(component + ".")}
        if not config:
            continue
        if config.get("use_dora"):
            raise InvalidInput(f"{where} is DoRA (its {component} config has use_dora), not a plain LoRA; sdrt "
                               f"applies LoRA and LoCon files only")
        if config.get("lora_bias"):
            raise InvalidInput(f"{where} has LoRA bias terms ({component} config lora_bias), which sdrt does "
                               f"not apply")
        r, alpha = config.get("r", _PEFT_DEFAULT_R), config.get("lora_alpha", _PEFT_DEFAULT_ALPHA)
        ranks, alphas = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
        numbers = [r, alpha, *ranks.values(), *alphas.values()] if isinstance(ranks, dict) and \
            isinstance(alphas, dict) else [None]
        if not all(isinstance(n, (int, float)) and not isinstance(n, bool) and math.isfinite(n) for n in numbers):
            raise InvalidInput(f"{where}: metadata {METADATA_KEY}: {component}'s r, lora_alpha, rank_pattern "
                               f"and alpha_pattern must be numbers")
        configs[component] = _PeftConfig(r, float(alpha), dict(ranks), dict(alphas), bool(config.get("use_rslora")))
    return configs


def _pattern_value(where: str, patterns: Mapping[str, float], module: str) -> float | None:
    """peft's get_pattern_key: the first pattern that matches the module name's tail."""
    for pattern, value in patterns.items():
        try:
            if re.match(rf"(.*\.)?({pattern})$", module):
                return value
        except re.error as e:
            raise InvalidInput(f"{where}: metadata pattern {pattern!r} is not a regular expression ({e})") from None
    return None


def _peft_scale(where: str, pair: _Pair, config: _PeftConfig | None, rank: int) -> float:
    """peft's LoraLayer.update_layer: lora_alpha / r, or / sqrt(r) with use_rslora. No
    metadata: diffusers' get_peft_kwargs sets alpha = rank for every module (scale 1)."""
    if config is None:
        return 1.0
    r = _pattern_value(where, config.rank_pattern, pair.module)
    r = config.r if r is None else r
    if r != rank:
        raise InvalidInput(f"{where}: {pair.down!r} has rank {rank} and the file's {pair.component} config says "
                           f"{r}")
    alpha = _pattern_value(where, config.alpha_pattern, pair.module)
    alpha = config.alpha if alpha is None else float(alpha)
    return alpha / math.sqrt(r) if config.rslora else alpha / r


# ---- both ----------------------------------------------------------------------------

def _pair_arrays(where: str, pair: _Pair, tensors: Mapping[str, np.ndarray],
                 shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """(up, down) as float32, checked against each other and against the weight's shape."""
    up, down = tensors[pair.up], tensors[pair.down]
    for key, a in ((pair.down, down), (pair.up, up)):
        if not np.issubdtype(a.dtype, np.floating):
            raise InvalidInput(f"{where}: {key!r} is {a.dtype}, not a float type")
        if not np.isfinite(a).all():
            raise InvalidInput(f"{where}: {key!r} holds NaN or Inf values")
    if up.ndim not in (2, 4) or down.ndim != up.ndim:
        raise InvalidInput(f"{where}: {pair.down!r} {list(down.shape)} and {pair.up!r} {list(up.shape)} are not a "
                           f"LoRA pair (2-d, or 4-d for a convolution)")
    if up.shape[1] != down.shape[0]:
        raise InvalidInput(f"{where}: {pair.up!r} {list(up.shape)} and {pair.down!r} {list(down.shape)} have "
                           f"different ranks ({up.shape[1]} and {down.shape[0]})")
    if down.shape[0] == 0:
        raise InvalidInput(f"{where}: {pair.down!r} has rank 0")
    rank = down.shape[0]
    want_down, want_up = (rank,) + shape[1:], (shape[0], rank) + (1,) * (len(shape) - 2)
    if down.shape != want_down or up.shape != want_up:
        raise InvalidInput(f"{where}: {pair.down!r} {list(down.shape)} and {pair.up!r} {list(up.shape)} do not fit "
                           f"{pair.component} weight {pair.module}.weight {list(shape)} (down {list(want_down)}, "
                           f"up {list(want_up)}); is it for another model?")
    return up.astype(np.float32), down.astype(np.float32)


def _unmatched(where: str, key: str, component: str, modules: Mapping[str, object]) -> InvalidInput:
    what = f"no {component} in this model" if component not in modules else f"no {component} weight of this model"
    return InvalidInput(f"{where}: key {key!r} matches {what}; is it a LoRA for another model family?")
