"""LoRA files against diffusers + peft, at the parameter level: for each file,
`load_lora_weights` + `fuse_lora(lora_scale=s)` changes exactly the weights sdrt's reader
says it changes, by s times the sum of its deltas (the same float32 math, <= 1e-6).
Files are made as users' files are made (export/tiny_lora.py: peft + save_lora_weights,
diffusers 0.2x's converted layout, kohya's sd-scripts naming); hostile files are refused
in one line."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest

from sdrt.engines.errors import InvalidInput
from sdrt.runtime.lora import COMPONENTS, read_lora

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from safetensors.numpy import load_file, save_file   # noqa: E402

BOUND = 1e-6


class _Model:
    """A diffusers pipeline of a tiny model, its LoRA targets (every Linear and Conv2d
    weight, named as the loaded modules name them) and its original parameters."""

    def __init__(self, pipe):
        self.pipe = pipe
        self.components = [c for c in COMPONENTS if getattr(pipe, c, None) is not None]
        self.targets = {c: {f"{n}.weight": tuple(m.weight.shape) for n, m in getattr(pipe, c).named_modules()
                            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))} for c in self.components}
        self.original = {c: {n: p.detach().clone() for n, p in getattr(pipe, c).named_parameters()}
                         for c in self.components}

    def fused_changes(self, files: list[Path], scale: float) -> dict[tuple[str, str], np.ndarray]:
        """(fused - original) of every parameter after diffusers loads `files` and fuses them
        at `scale`; the pipeline is restored afterwards."""
        names = [f"lora{i}" for i in range(len(files))]
        try:
            for name, f in zip(names, files):
                self.pipe.load_lora_weights(str(f), adapter_name=name)
            self.pipe.set_adapters(names, adapter_weights=[1.0] * len(names))
            self.pipe.fuse_lora(components=self.components, lora_scale=scale)
            self.pipe.unload_lora_weights()
            return {(c, n): (p.detach() - self.original[c][n]).numpy()
                    for c in self.components for n, p in getattr(self.pipe, c).named_parameters()}
        finally:
            self.pipe.unload_lora_weights()
            with torch.no_grad():
                for c in self.components:
                    for n, p in getattr(self.pipe, c).named_parameters():
                        p.copy_(self.original[c][n])


def _load(cls, folder):
    from sdrt.export.tiny import quiet_libraries
    quiet_libraries()
    return _Model(cls.from_pretrained(folder))


@pytest.fixture(scope="module")
def sd15(tiny_sd15):
    from diffusers import StableDiffusionPipeline
    return _load(StableDiffusionPipeline, tiny_sd15)


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    from diffusers import StableDiffusionXLPipeline

    from sdrt.export.tiny import make_tiny_model
    return _load(StableDiffusionXLPipeline, make_tiny_model(tmp_path_factory.mktemp("models") / "sdxl", "sdxl"))


@pytest.fixture(scope="module")
def lora(tmp_path_factory):
    """lora(name, **make_tiny_lora arguments): the file, made once per module."""
    from sdrt.export.tiny_lora import make_tiny_lora

    folder, made = tmp_path_factory.mktemp("loras"), {}

    def make(name: str, **kw) -> Path:
        if name not in made:
            made[name] = make_tiny_lora(folder / f"{name}.safetensors", **kw)
        return made[name]
    return make


def _assert_diffusers_agrees(model: _Model, files: list[Path], scale: float, components: set[str]) -> list:
    loras = [read_lora(f, model.targets) for f in files]
    ours: dict[tuple[str, str], np.ndarray] = {}
    for read in loras:
        for layer in read.layers:
            key = (layer.component, layer.param)
            ours[key] = ours.get(key, 0) + layer.delta()
    changes = model.fused_changes(files, scale)
    changed = {k for k, d in changes.items() if np.any(d != 0)}
    assert changed == set(ours)
    assert {c for c, _ in changed} == components       # e.g. the text encoders really were tested
    worst = max(float(np.abs(d - scale * ours.get(k, 0)).max()) for k, d in changes.items())
    assert worst <= BOUND, worst
    return loras


# ---- parity with diffusers -------------------------------------------------------------

@pytest.mark.parametrize("scale", [0.5, 1.0, 1.5])
def test_peft_unet_and_text_encoder_lora_matches_diffusers(sd15, lora, scale):
    f = lora("peft", variant="sd15", format="peft", rank=4, alpha=8)
    (read,) = _assert_diffusers_agrees(sd15, [f], scale, {"unet", "text_encoder"})
    assert read.format == "diffusers" and {layer.scale for layer in read.layers} == {2.0}   # alpha 8 / rank 4


def test_peft_lora_without_metadata_has_scale_one_as_in_diffusers(sd15, lora):
    # Older training scripts saved no LoraConfig: diffusers takes alpha = rank.
    f = lora("peft-nometa", variant="sd15", format="peft", rank=4, alpha=8, metadata=False, dtype="float16")
    (read,) = _assert_diffusers_agrees(sd15, [f], 1.5, {"unet", "text_encoder"})
    assert {layer.scale for layer in read.layers} == {1.0}


def test_peft_locon_with_rank_and_alpha_patterns_matches_diffusers(sd15, lora):
    f = lora("peft-conv", variant="sd15", format="peft", rank=4, alpha=8, conv=True, conv_rank=2, conv_alpha=3)
    (read,) = _assert_diffusers_agrees(sd15, [f], 1.5, {"unet", "text_encoder"})
    conv3x3 = [layer for layer in read.layers if layer.down.ndim == 4 and layer.down.shape[2:] == (3, 3)]
    assert conv3x3 and {(layer.rank, layer.scale) for layer in conv3x3} == {(2, 1.5)}


def test_diffusers_0_2x_layout_matches_diffusers(sd15, lora):
    f = lora("diffusers-old", variant="sd15", format="diffusers", rank=4, alpha=4)
    keys = load_file(str(f)).keys()
    assert any(".lora.down.weight" in k for k in keys) and any(".lora_linear_layer." in k for k in keys)
    _assert_diffusers_agrees(sd15, [f], 0.5, {"unet", "text_encoder"})


def test_text_encoder_keys_with_transformers_4_text_model_level_match_diffusers(sd15, lora, tmp_path):
    # Files written with transformers 4 name the CLIPTextModel's weights under text_model.
    tensors = load_file(str(lora("peft", variant="sd15", format="peft", rank=4, alpha=8)))
    renamed = {k.replace("text_encoder.", "text_encoder.text_model.", 1): v for k, v in tensors.items()}
    assert any(k.startswith("text_encoder.text_model.") for k in renamed)
    f = tmp_path / "t4.safetensors"
    save_file(renamed, str(f))
    _assert_diffusers_agrees(sd15, [f], 1.0, {"unet", "text_encoder"})


@pytest.mark.parametrize("scale", [0.5, 1.5])
def test_kohya_unet_and_text_encoder_lora_with_alpha_matches_diffusers(sd15, lora, scale):
    f = lora("kohya", variant="sd15", format="kohya", rank=4, alpha=2)
    (read,) = _assert_diffusers_agrees(sd15, [f], scale, {"unet", "text_encoder"})
    assert read.format == "kohya" and {layer.scale for layer in read.layers} == {0.5}


def test_kohya_lora_without_alpha_keys_has_scale_one(sd15, lora):
    f = lora("kohya-noalpha", variant="sd15", format="kohya", rank=4, alpha=None)
    assert not any(k.endswith(".alpha") for k in load_file(str(f)))
    (read,) = _assert_diffusers_agrees(sd15, [f], 1.0, {"unet", "text_encoder"})
    assert {layer.scale for layer in read.layers} == {1.0}


def test_kohya_locon_in_bfloat16_matches_diffusers(sd15, lora):
    f = lora("kohya-conv", variant="sd15", format="kohya", rank=4, alpha=2, conv=True, conv_rank=2, conv_alpha=3,
             dtype="bfloat16")
    (read,) = _assert_diffusers_agrees(sd15, [f], 1.5, {"unet", "text_encoder"})
    assert {layer.scale for layer in read.layers if layer.down.shape[2:] == (3, 3)} == {1.5}


def test_two_loras_add_as_in_diffusers(sd15, lora):
    a = lora("peft", variant="sd15", format="peft", rank=4, alpha=8)
    b = lora("kohya-conv-seed1", variant="sd15", format="kohya", rank=2, alpha=1, conv=True, seed=1)
    _assert_diffusers_agrees(sd15, [a, b], 0.5, {"unet", "text_encoder"})


def test_sdxl_kohya_with_both_text_encoders_and_generative_models_names_matches_diffusers(sdxl, lora):
    f = lora("sdxl-kohya", variant="sdxl", format="kohya", rank=4, alpha=2, conv=True, conv_rank=2, conv_alpha=3)
    keys = load_file(str(f)).keys()
    for prefix in ("lora_unet_input_blocks_4_1_", "lora_unet_middle_block_", "lora_unet_output_blocks_",
                   "lora_te1_text_model_", "lora_te2_text_model_"):
        assert any(k.startswith(prefix) for k in keys), prefix
    _assert_diffusers_agrees(sdxl, [f], 1.5, {"unet", "text_encoder", "text_encoder_2"})


def test_sdxl_peft_with_both_text_encoders_matches_diffusers(sdxl, lora):
    f = lora("sdxl-peft", variant="sdxl", format="peft", rank=4, alpha=2)
    _assert_diffusers_agrees(sdxl, [f], 0.5, {"unet", "text_encoder", "text_encoder_2"})


def test_delta_has_the_weight_shape_and_is_float32(sd15, lora):
    read = read_lora(lora("kohya-conv", variant="sd15", format="kohya", rank=4, alpha=2, conv=True, conv_rank=2,
                          conv_alpha=3, dtype="bfloat16"), sd15.targets)
    for layer in read.layers:
        d = layer.delta()
        assert d.dtype == np.float32 and d.shape == sd15.targets[layer.component][layer.param]
        assert layer.up.dtype == layer.down.dtype == np.float32


# ---- hostile files -------------------------------------------------------------------

def _refused(path: Path, targets, *words: str) -> str:
    with pytest.raises(InvalidInput) as e:
        read_lora(path, targets)
    message = str(e.value)
    assert "\n" not in message and str(path) in message, message
    for w in words:
        assert w in message, message
    return message


def _edited(lora, tmp_path, name, edit, source="kohya", metadata=None, **kw) -> Path:
    defaults = dict(kohya=dict(variant="sd15", format="kohya", rank=4, alpha=2),
                    peft=dict(variant="sd15", format="peft", rank=4, alpha=8))[source]
    tensors = load_file(str(lora(source, **defaults)))
    edit(tensors)
    out = tmp_path / f"{name}.safetensors"
    save_file(tensors, str(out), metadata=metadata)
    return out


Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"


def test_a_key_that_matches_nothing_is_refused_by_name(sd15, lora, tmp_path):
    bad = "lora_unet_down_blocks_7_attentions_0_proj_in"

    def add(t):
        t[f"{bad}.lora_down.weight"], t[f"{bad}.lora_up.weight"] = np.ones((4, 16, 1, 1)), np.ones((16, 4, 1, 1))
    _refused(_edited(lora, tmp_path, "kohya-extra", add), sd15.targets, f"{bad}.lora_", "matches no unet weight")

    def rename(t):
        key = next(k for k in t if k.startswith("unet.") and k.endswith("to_q.lora_A.weight"))
        t[key.replace("to_q", "to_qq")] = t.pop(key)
    _refused(_edited(lora, tmp_path, "peft-extra", rename, source="peft"), sd15.targets, "to_qq.lora_A.weight")

    def foreign(t):
        t["transformer.single_blocks.0.attn.to_q.lora_A.weight"] = np.ones((4, 16), np.float32)
    _refused(_edited(lora, tmp_path, "flux", foreign, source="peft"), sd15.targets, "'transformer.single_blocks")


def test_wrong_shapes_and_rank_mismatches_are_refused(sd15, lora, tmp_path):
    def wider(t):
        t[f"{Q}.lora_down.weight"] = np.ones((4, 17), np.float32)
    _refused(_edited(lora, tmp_path, "wide", wider), sd15.targets, f"{Q}.lora_down.weight", "[4, 17]",
             "[16, 16]", "do not fit")

    def rank(t):
        t[f"{Q}.lora_up.weight"] = np.ones((16, 3), np.float32)
    _refused(_edited(lora, tmp_path, "rank", rank), sd15.targets, f"{Q}.lora_up.weight", "different ranks (3 and 4)")

    def flat(t):
        key = "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"
        t[key] = t[key].reshape(4, 16)      # a conv target's pair must be 4-d, as peft's Conv2d layers are
    _refused(_edited(lora, tmp_path, "flat", flat), sd15.targets, "proj_in", "not a LoRA pair")


@pytest.mark.parametrize("value", [np.nan, np.inf], ids=["nan", "inf"])
def test_nan_and_inf_weights_are_refused(sd15, lora, tmp_path, value):
    def poison(t):
        t[f"{Q}.lora_up.weight"][3, 1] = value
    _refused(_edited(lora, tmp_path, "poison", poison), sd15.targets, f"{Q}.lora_up.weight", "NaN or Inf")

    def alpha(t):
        t[f"{Q}.alpha"] = np.array(value, np.float32)
    _refused(_edited(lora, tmp_path, "alpha", alpha), sd15.targets, f"{Q}.alpha")


@pytest.mark.parametrize("suffix, kind", [
    ("hada_w1_a", "LoHa"), ("lokr_w1", "LoKr"), ("dora_scale", "DoRA"), ("lora_mid.weight", "Tucker"),
    ("diff", "full weight difference"), ("oft_blocks", "OFT"), ("lora_up.bias", "bias"),
])
def test_adapters_that_are_not_plain_lora_are_refused_by_name(sd15, lora, tmp_path, suffix, kind):
    def add(t):
        t[f"{Q}.{suffix}"] = np.ones((4, 4), np.float32)
    _refused(_edited(lora, tmp_path, "other", add), sd15.targets, kind, f"{Q}.{suffix}")


def test_peft_dora_and_bias_are_refused(sd15, lora, tmp_path):
    def dora(t):
        key = next(k for k in t if k.endswith("to_q.lora_A.weight"))
        t[key.replace("lora_A.weight", "lora_magnitude_vector")] = np.ones(16, np.float32)
    _refused(_edited(lora, tmp_path, "dora", dora, source="peft"), sd15.targets, "DoRA")
    meta = {"lora_adapter_metadata": json.dumps({"unet.r": 4, "unet.lora_alpha": 8, "unet.use_dora": True})}
    _refused(_edited(lora, tmp_path, "dora-meta", lambda t: None, source="peft", metadata=meta), sd15.targets,
             "DoRA")


def test_metadata_that_contradicts_the_weights_is_refused(sd15, lora, tmp_path):
    meta = {"lora_adapter_metadata": json.dumps({"unet.r": 8, "unet.lora_alpha": 8})}
    _refused(_edited(lora, tmp_path, "r8", lambda t: None, source="peft", metadata=meta), sd15.targets,
             "rank 4", "says 8")
    meta = {"lora_adapter_metadata": "{unet.r: 4"}
    _refused(_edited(lora, tmp_path, "badjson", lambda t: None, source="peft", metadata=meta), sd15.targets,
             "not JSON")


def test_half_pairs_duplicates_and_integer_weights_are_refused(sd15, lora, tmp_path):
    _refused(_edited(lora, tmp_path, "half", lambda t: t.pop(f"{Q}.lora_up.weight")), sd15.targets,
             f"{Q}.lora_down.weight", "no", "lora_up.weight")

    def twice(t):   # the same layer in the PEFT and the diffusers 0.2x spelling
        key = next(k for k in t if k.startswith("unet.") and k.endswith("to_q.lora_A.weight"))
        t[key.replace("lora_A", "lora.down")] = t[key]
        t[key.replace("lora_A", "lora.up")] = t[key.replace("lora_A", "lora_B")]
    _refused(_edited(lora, tmp_path, "twice", twice, source="peft"), sd15.targets, "both change")

    def ints(t):
        t[f"{Q}.lora_down.weight"] = np.ones((4, 16), np.int8)
    _refused(_edited(lora, tmp_path, "ints", ints), sd15.targets, "int8", "not a float type")


def test_an_sdxl_lora_is_refused_for_an_sd15_model(sd15, lora):
    peft = lora("sdxl-peft", variant="sdxl", format="peft", rank=4, alpha=2)
    _refused(peft, sd15.targets, "another model family")
    kohya = lora("sdxl-kohya", variant="sdxl", format="kohya", rank=4, alpha=2, conv=True, conv_rank=2,
                 conv_alpha=3)
    _refused(kohya, sd15.targets)


def test_pickles_truncated_and_empty_files_are_refused(sd15, lora, tmp_path):
    pickled = tmp_path / "lora.pt"
    torch.save({f"{Q}.lora_down.weight": torch.ones(4, 16)}, pickled)
    _refused(pickled, sd15.targets, "pickle")
    whole = lora("kohya", variant="sd15", format="kohya", rank=4, alpha=2).read_bytes()
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(whole[:len(whole) // 2])
    _refused(truncated, sd15.targets)
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    _refused(empty, sd15.targets)
    nothing = tmp_path / "nothing.safetensors"
    header = b'{"__metadata__":{"a":"b"}}'
    nothing.write_bytes(struct.pack("<Q", len(header)) + header)
    _refused(nothing, sd15.targets, "holds no tensors")


def test_tiny_lora_command_writes_a_file_the_reader_reads(sd15, tmp_path):
    from sdrt.cli.main import main

    out = tmp_path / "k.safetensors"
    assert main(["tiny-lora", str(out), "--format", "kohya", "--rank", "4", "--alpha", "2", "--conv"]) == 0
    read = read_lora(out, sd15.targets)
    assert read.format == "kohya" and {layer.scale for layer in read.layers} == {0.5}
    assert any(layer.down.shape[2:] == (3, 3) for layer in read.layers)
    assert main(["tiny-lora", str(out)]) == 2          # exists: refused in one line, the file kept
    assert read_lora(out, sd15.targets).format == "kohya"
