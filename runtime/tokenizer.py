"""The CLIP tokenizer, built with the `tokenizers` library alone (no transformers).

It reproduces `transformers.CLIPTokenizer` (transformers 5.x, itself tokenizers-backed,
models/clip/tokenization_clip.py) from the files a diffusers checkpoint ships in
`tokenizer/`: the same normalizer, pre-tokenizer regex and byte-level BPE with the
"</w>" end-of-word suffix, the same special tokens (added so that they match whole in
the raw text, which is why SD 2.x's pad token "!" turns a typed "!" into id 0, as
transformers does), then [BOS] + ids + [EOS], truncated and padded to the text
encoder's length.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers
from tokenizers import Tokenizer as _Backend
from tokenizers.models import BPE

from sdrt.engines.errors import ArtifactError, InvalidType, MissingFile
from sdrt.engines.files import read_json_object

# CLIP's pre-tokenizer pattern (OpenAI's clip/simple_tokenizer.py, as transformers writes it).
_CLIP_SPLIT = (r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]"""
               r"""|[^\s\p{L}\p{N}]+""")
# CLIPTokenizer's defaults, used where the checkpoint's config names no token.
_DEFAULT_SPECIAL = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
                    "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
# CLIP's context length; used when tokenizer_config.json gives none (transformers then
# says "very large", which no CLIP text encoder accepts).
DEFAULT_MAX_LENGTH = 77
_MAX_SANE_LENGTH = 10_000


class PromptTruncated(UserWarning):
    """A prompt had more tokens than the text encoder takes; the tail was dropped."""


@dataclass(frozen=True, eq=False)
class Tokenizer:
    backend: _Backend
    max_length: int
    bos_id: int
    eos_id: int
    pad_id: int

    @classmethod
    def from_folder(cls, path: str | Path) -> "Tokenizer":
        """Load the tokenizer of a checkpoint or artifact folder (its `tokenizer/`
        subfolder, or the folder itself): vocab/merges from tokenizer.json when present,
        else vocab.json + merges.txt; special tokens and length from
        tokenizer_config.json / special_tokens_map.json."""
        folder = Path(path)
        if not folder.is_dir():
            raise MissingFile(f"tokenizer folder not found: {folder}")
        if not _has_model(folder) and _has_model(folder / "tokenizer"):
            folder = folder / "tokenizer"
        if not _has_model(folder):
            raise MissingFile(f"{folder}: no tokenizer in it; expected vocab.json and merges.txt, "
                              f"or tokenizer.json")
        config = _read_json(folder / "tokenizer_config.json")
        special, added = _special_tokens(folder, config)
        vocab, merges = _vocab_and_merges(folder)

        backend = _Backend(BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                               end_of_word_suffix="</w>", fuse_unk=False,
                               unk_token=_content(special["unk_token"])))
        backend.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_CLIP_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ])
        backend.decoder = decoders.ByteLevel()
        # Special tokens are matched whole in the raw text before normalisation (unless
        # the checkpoint marks them "normalized"), as transformers adds them.
        known = {a.content for a in added}
        backend.add_tokens(added + [_added(v, special=True) for v in special.values() if _content(v) not in known])

        ids = {}
        for key in ("bos_token", "eos_token", "pad_token"):
            token = _content(special[key])
            ids[key] = backend.token_to_id(token)
            if ids[key] is None:
                raise ArtifactError(f"{folder}: {key} {token!r} is not in the vocabulary")
        return cls(backend=backend, max_length=_max_length(config, folder), bos_id=ids["bos_token"],
                   eos_id=ids["eos_token"], pad_id=ids["pad_token"])

    def encode(self, prompts: Sequence[str] | str) -> np.ndarray:
        """Token ids, int32 (len(prompts), max_length): BOS, the prompt's tokens, EOS,
        then padding; prompts longer than max_length - 2 tokens are truncated with a
        `PromptTruncated` warning saying how many tokens and which text were dropped."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(prompts, Sequence) or isinstance(prompts, (bytes, bytearray)):
            raise InvalidType(f"prompts must be a string or a list of strings, got {type(prompts).__name__}")
        for i, p in enumerate(prompts):
            if not isinstance(p, str):
                raise InvalidType(f"prompt {i} must be a string, got {type(p).__name__}: {p!r:.80}")
        room = self.max_length - 2
        out = np.full((len(prompts), self.max_length), self.pad_id, dtype=np.int32)
        for row, (prompt, enc) in enumerate(zip(prompts, self.backend.encode_batch(
                list(prompts), add_special_tokens=False))):
            ids = enc.ids
            if len(ids) > room:
                self._warn_truncated(prompt, ids[room:])
                ids = ids[:room]
            out[row, :len(ids) + 2] = [self.bos_id, *ids, self.eos_id]
        return out

    def decode(self, ids: Sequence[int]) -> str:
        """Text of token ids (special tokens skipped); "</w>" marks become spaces."""
        text = self.backend.decode(list(ids), skip_special_tokens=True)
        return text.replace("</w>", " ").strip()

    def _warn_truncated(self, prompt: str, dropped: list[int]) -> None:
        # diffusers' pipeline logs the same fact (pipeline_stable_diffusion.py, encode_prompt).
        warnings.warn(
            f"{len(dropped)} token(s) of the prompt {prompt[:40]!r}... were dropped because CLIP can only "
            f"handle sequences up to {self.max_length} tokens; truncated part: {self.decode(dropped)!r}",
            PromptTruncated, stacklevel=3)


def _has_model(folder: Path) -> bool:
    return (folder / "tokenizer.json").is_file() or (
        (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file())


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    return read_json_object(path, ArtifactError, "tokenizer file")


def _vocab_and_merges(folder: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    try:
        if (folder / "tokenizer.json").is_file():
            model = _read_json(folder / "tokenizer.json").get("model", {})
            if model.get("type") != "BPE":
                raise ArtifactError(f"{folder / 'tokenizer.json'}: not a BPE tokenizer "
                                    f"(model type {model.get('type')!r}); CLIP's is BPE")
            merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
            return dict(model["vocab"]), merges
        return BPE.read_file(str(folder / "vocab.json"), str(folder / "merges.txt"))
    except ArtifactError:
        raise
    except Exception as e:   # tokenizers raises plain Exception on malformed files
        raise ArtifactError(f"{folder}: cannot read the tokenizer vocabulary ({e})") from None


def _special_tokens(folder: Path, config: dict[str, Any]) -> tuple[dict[str, Any], list[AddedToken]]:
    """The named special tokens and any other added tokens, resolved as transformers'
    `from_pretrained` does: tokenizer_config.json, overridden by special_tokens_map.json
    when the config has no `added_tokens_decoder` (the legacy layout SD checkpoints use),
    and tokenizer.json's `added_tokens` in that legacy case."""
    special = {k: config.get(k) or v for k, v in _DEFAULT_SPECIAL.items()}
    added: list[AddedToken] = []
    if "added_tokens_decoder" in config:
        entries = sorted(config["added_tokens_decoder"].items(), key=lambda kv: int(kv[0]))
        added = [_added(v) for _, v in entries]
    else:
        for key, value in _read_json(folder / "special_tokens_map.json").items():
            if key in special and value:
                special[key] = {**value, "special": True} if isinstance(value, dict) else value
        if (folder / "tokenizer.json").is_file():
            added = [_added(t) for t in _read_json(folder / "tokenizer.json").get("added_tokens", [])]
    return special, added


def _content(token: Any) -> str:
    return token["content"] if isinstance(token, dict) else str(token)


def _added(token: Any, special: bool = False) -> AddedToken:
    """A plain string is a special token matched exactly (transformers' default); a
    serialised AddedToken keeps its own flags, except that the named special tokens
    (bos, eos, unk, pad) are always special, as transformers forces."""
    if not isinstance(token, dict):
        return AddedToken(str(token), special=True, normalized=False)
    flags = {k: bool(token[k]) for k in ("single_word", "lstrip", "rstrip", "normalized", "special")
             if k in token}
    if special:
        flags["special"] = True
    return AddedToken(token["content"], **flags)


def _max_length(config: dict[str, Any], folder: Path) -> int:
    n = config.get("model_max_length", DEFAULT_MAX_LENGTH)
    if isinstance(n, float) and n.is_integer():
        n = int(n)
    if isinstance(n, bool) or not isinstance(n, int) or n < 3:
        raise ArtifactError(f"{folder / 'tokenizer_config.json'}: model_max_length must be an integer >= 3, "
                            f"got {n!r}")
    return n if n <= _MAX_SANE_LENGTH else DEFAULT_MAX_LENGTH
