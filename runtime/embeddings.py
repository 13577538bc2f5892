"""Textual inversion: embedding files, and the token ids and vectors a call feeds.

An embedding is k learned vectors (Gal et al., "An Image is Worth One Word", 2022)
that a trigger word in the prompt stands for. The files users have:

- AUTOMATIC1111's `.safetensors`: `emb_params` (k, width); SDXL's `clip_l` (k, 768)
  and `clip_g` (k, 1280), one set per text encoder. The trigger is the file's name
  without its extension, as the web UI names embeddings (textual_inversion.py
  `load_from_file`).
- diffusers' (`learned_embeds.safetensors`, `save_textual_inversion`): one tensor,
  named by its token (`{"<cat-toy>": (k, width)}` or a single (width,) vector).
- `.pt` / `.bin`: torch pickles (A1111's `string_to_param`, diffusers' dict, or a bare
  tensor), read only with allow_pickle, since unpickling runs code from the file.

The artifact's text encoders take no new table rows (they are static graphs): each of
an embedding's vectors gets a slot of their `token_embeddings` input and the id
`text_vocab_size + slot` (engines/specs.py, export/graphs.py SlotTokenEmbedding). The
prompt is read as diffusers reads it after `load_textual_inversion`: the trigger
is an added token, found anywhere in the normalised (lowercased) text, even inside a
word, and stands for its k vectors in k token positions, the ids of
`<tok> <tok>_1 ...` that `maybe_convert_prompt` writes. Slots are given in the order
of the embeddings, as diffusers gives ids in the order it loads them.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from sdrt.engines.errors import BackendUnavailable, InvalidInput, InvalidType, MissingFile
from sdrt.engines.files import sha256_file
from sdrt.engines.specs import TOKEN_EMBEDDINGS, Stage

from . import safetensors_file
from .tokenizer import Tokenizer

A1111_KEY = "emb_params"
SDXL_KEYS = ("clip_l", "clip_g")   # AUTOMATIC1111's SDXL embeddings: text_encoder's, text_encoder_2's
SINGLE = ""                        # the key of a one-encoder (SD 1.x/2.x) embedding's vectors
PICKLE_SUFFIXES = (".pt", ".bin", ".ckpt")
PICKLE_REMEDY = ("convert it to .safetensors, or pass --allow-pickle-code-execution (allow_pickle=True) if you "
                 "trust its source")


@dataclass(frozen=True, eq=False)
class Embedding:
    """One embedding file: its trigger and its vectors per text encoder
    (SINGLE, or "clip_l" and "clip_g"), each float32 (k, width)."""

    trigger: str
    vectors: Mapping[str, np.ndarray]
    path: Path
    sha256: str = ""   # of the file: AUTOMATIC1111 records its first 12 digits ("TI hashes")

    @property
    def count(self) -> int:
        return next(iter(self.vectors.values())).shape[0]


def load(path: str | os.PathLike[str], token: str | None = None, allow_pickle: bool = False) -> Embedding:
    """Read an embedding file. `token` overrides the trigger the file implies.
    Raises MissingFile, or InvalidInput naming the file and what is wrong with it."""
    if not isinstance(path, (str, os.PathLike)):
        raise InvalidType(f"an embedding must be a path or a (path, token) pair, got {type(path).__name__}")
    path = Path(path)
    if not path.is_file():
        raise MissingFile(f"embedding {path} {'is not a file' if path.exists() else 'does not exist'}")
    pickled = path.stat().st_size >= 4 and safetensors_file.looks_like_pickle(path)
    if path.suffix.lower() in PICKLE_SUFFIXES or pickled:
        if not allow_pickle:
            raise InvalidInput(f"embedding {path} is a pickle (torch.save) file, which runs code when loaded; "
                               f"{PICKLE_REMEDY}")
        tensors, a1111 = _read_pickle(path)
    else:
        tensors = safetensors_file.read(path, "embedding").tensors
        a1111 = False
    trigger, vectors = _parse(path, tensors, a1111)
    if token is not None:
        if not isinstance(token, str):
            raise InvalidType(f"the token of embedding {path} must be a string, got {type(token).__name__}")
        trigger = token
    if not trigger.strip():
        raise InvalidInput(f"embedding {path}: its trigger {trigger!r} is empty; pass a token")
    return Embedding(trigger, vectors, path, sha256_file(path))


def _parse(path: Path, tensors: Mapping[str, Any], a1111: bool) -> tuple[str, dict[str, np.ndarray]]:
    """(trigger, vectors per encoder) of a file's tensors, by their names."""
    names = sorted(tensors)
    if not names:
        raise InvalidInput(f"embedding {path} holds no tensors")
    if set(names) == set(SDXL_KEYS):
        vectors = {k: _vectors(path, k, tensors[k]) for k in SDXL_KEYS}
        counts = {k: v.shape[0] for k, v in vectors.items()}
        if len(set(counts.values())) > 1:
            raise InvalidInput(f"embedding {path}: clip_l has {counts['clip_l']} vectors and clip_g "
                               f"{counts['clip_g']}; an SDXL embedding has as many for each text encoder")
        return path.stem, vectors
    if len(names) != 1:
        raise InvalidInput(f"embedding {path} holds tensors {', '.join(names)[:120]}: not a textual-inversion "
                           f"embedding (expected {A1111_KEY}, clip_l + clip_g, or one tensor named by its token)")
    name = names[0]
    trigger = path.stem if a1111 or name == A1111_KEY else name
    return trigger, {SINGLE: _vectors(path, name, tensors[name])}


def _vectors(path: Path, name: str, array: Any) -> np.ndarray:
    where = f"embedding {path}, tensor {name!r}"
    array = np.asarray(array)
    if array.dtype.kind != "f":
        raise InvalidInput(f"{where}: dtype {array.dtype} is not a float type")
    if array.ndim == 1:
        array = array[None]   # one vector, as diffusers' and the web UI's loaders take it
    if array.ndim != 2 or 0 in array.shape:
        raise InvalidInput(f"{where}: shape {list(array.shape)} is not (vectors, width) with at least one of each")
    if not np.isfinite(array).all():
        bad = int(array.size - np.count_nonzero(np.isfinite(array)))
        raise InvalidInput(f"{where} holds {bad} NaN/Inf values")
    return np.ascontiguousarray(array, dtype=np.float32)


def _read_pickle(path: Path) -> tuple[dict[str, Any], bool]:
    """A torch-saved embedding (allowed by the caller): its tensors as NumPy arrays, and
    whether it is the web UI's format (named by the file, as the web UI does)."""
    try:
        import torch
    except ImportError:
        raise BackendUnavailable(f"embedding {path} is a torch pickle, and reading one needs torch, which is not "
                                 f"installed (the runtime does not need it otherwise); convert it to .safetensors "
                                 f"or install torch") from None
    try:
        data = torch.load(path, map_location="cpu", weights_only=False)   # allowed: it may run code
    except Exception as e:   # a corrupt pickle raises anything
        raise InvalidInput(f"embedding {path} cannot be read as a torch file ({type(e).__name__}: {e})"[:300]) from None
    a1111 = isinstance(data, dict) and "string_to_param" in data
    if a1111:
        params = data["string_to_param"]
        params = dict(getattr(params, "_parameters", params))   # a ParameterDict in older web UI saves
        data = {A1111_KEY: params["*"]} if list(params) == ["*"] else params
    elif isinstance(data, torch.Tensor):
        a1111, data = True, {A1111_KEY: data}   # a bare tensor: named by the file
    if not isinstance(data, dict):
        raise InvalidInput(f"embedding {path} holds a {type(data).__name__}, not a textual-inversion embedding")
    out = {}
    for key, value in data.items():
        if not isinstance(value, torch.Tensor):
            raise InvalidInput(f"embedding {path}: {str(key)[:60]!r} is a {type(value).__name__}, not a tensor")
        out[str(key)] = value.detach().to(torch.float32).numpy()
    return out, a1111


@dataclass(frozen=True, eq=False)
class Triggers:
    """What one tokenizer sees of a call's embeddings: each trigger's token ids (one
    per vector, text_vocab_size + slot), found in text as diffusers' added tokens are."""

    ids: Mapping[str, tuple[int, ...]]   # normalised trigger -> its ids

    def encode(self, tokenizer: Tokenizer, texts: Sequence[str]) -> list[list[int | tuple[int, ...]]]:
        """Each text's tokens: ids, and for each trigger the tuple of its embedding's ids.

        The tokenizers library matches a non-special added token in the normalised text
        (NFC, whitespace runs to one space, lowercase), the longest at the leftmost
        position, and encodes the text between matches piece by piece; so does this.
        """
        normalizer = tokenizer.backend.normalizer
        pattern = re.compile("|".join(re.escape(t) for t in sorted(self.ids, key=len, reverse=True)))
        out: list[list[int | tuple[int, ...]]] = []
        for text in texts:
            norm = normalizer.normalize_str(text) if normalizer is not None else text
            pieces, groups, start = [], [], 0
            for m in pattern.finditer(norm):
                pieces.append(norm[start:m.start()])
                groups.append(self.ids[m.group()])
                start = m.end()
            pieces.append(norm[start:])
            encoded = tokenizer.backend.encode_batch(pieces, add_special_tokens=False)
            tokens: list[int | tuple[int, ...]] = list(encoded[0].ids)
            for group, enc in zip(groups, encoded[1:]):
                tokens.append(group)
                tokens.extend(enc.ids)
            out.append(tokens)
        return out


@dataclass(frozen=True, eq=False)
class EmbeddingSet:
    """A call's embeddings fitted to an artifact: per text-encoder stage, the
    `token_embeddings` input (slots, width) and the triggers its tokenizer reads."""

    embeddings: tuple[Embedding, ...]
    inputs: Mapping[Stage, np.ndarray]    # Stage -> (slots, width) float32
    triggers: Mapping[Stage, Triggers]      # Stage -> Triggers

    def hashes_text(self, tokenizer: Tokenizer, texts: Iterable[str]) -> str | None:
        """AUTOMATIC1111's "TI hashes" of the embeddings that `texts` use: "name: first
        12 digits of the file's SHA-256, ..." (None when no trigger occurs)."""
        norm = " ".join(_normalized(tokenizer, t) for t in texts)
        used = [f"{e.trigger}: {e.sha256[:12]}" for e in self.embeddings if _normalized(tokenizer, e.trigger) in norm]
        return ", ".join(used) or None


def parse_request(embeddings: Any) -> list[tuple[Any, str | None]]:
    """`embeddings=` as (path, token or None) pairs: a path, or a (path, token) pair, each."""
    if embeddings is None:
        return []
    if isinstance(embeddings, (str, os.PathLike)) or not isinstance(embeddings, Iterable):
        raise InvalidType(f"embeddings must be a list of paths or (path, token) pairs, got "
                          f"{type(embeddings).__name__}")
    out = []
    for item in embeddings:
        if isinstance(item, tuple):
            if len(item) != 2:
                raise InvalidInput(f"an embedding pair must be (path, token), got {len(item)} items")
            out.append((item[0], item[1]))
        else:
            out.append((item, None))
    return out


def fit(embeddings: Sequence[Embedding], manifest: Any, tokenizers: Mapping[Stage, Tokenizer],
        folder: Any) -> EmbeddingSet:
    """Check a call's embeddings against the artifact and give each vector its slot.

    Refused, naming the file: an artifact without slots (exported before textual
    inversion or with --embedding-slots 0); an embedding for another model (width, or
    an SDXL pair on a one-encoder model and the reverse); more vectors than slots, or
    than a 75-token chunk holds; two embeddings with one trigger; a trigger that is a
    word of the vocabulary (diffusers refuses a token already in the vocabulary too):
    the prompt could no longer say that word, so the file must be renamed or given a
    token."""
    slots = manifest.shape.embedding_slots
    if not slots:
        raise InvalidInput(f"{folder} was exported without textual-inversion slots (by an older sdrt, or with "
                           f"--embedding-slots 0): export it again (sdrt export --embedding-slots N) to use "
                           f"embeddings")
    sdxl = bool(manifest.facts.text_2_hidden_size)
    stages = {stage: (SDXL_KEYS[i] if sdxl else SINGLE, manifest.specs[stage].input(TOKEN_EMBEDDINGS).shape[1])
              for stage, i in _encoder_stages(manifest) if stage in tokenizers}
    base = manifest.facts.text_vocab_size
    inputs = {stage: np.zeros((slots, width), np.float32) for stage, (_, width) in stages.items()}
    ids: dict[Stage, dict[str, tuple[int, ...]]] = {stage: {} for stage in stages}
    used = 0
    for emb in embeddings:
        what = f"embedding {emb.path} ({emb.trigger!r})"
        if emb.count > (room := next(iter(tokenizers.values())).max_length - 2):
            raise InvalidInput(f"{what} has {emb.count} vectors; a prompt chunk holds {room} tokens")
        if used + emb.count > slots:
            total = sum(e.count for e in embeddings)
            raise InvalidInput(f"the embeddings take {total} vectors in all and {folder} has {slots} slots: use fewer, "
                               f"or export again with --embedding-slots {total} or more")
        for stage, (key, width) in stages.items():
            vectors = emb.vectors.get(key)
            if vectors is None:
                have = ("an SDXL embedding (clip_l + clip_g)" if SINGLE not in emb.vectors else
                        f"an embedding for one {emb.vectors[SINGLE].shape[1]}-wide text encoder (SD 1.x/2.x)")
                want = "clip_l and clip_g vectors (an SDXL embedding)" if sdxl else "one set of vectors"
                raise InvalidInput(f"{what} is {have}; this {manifest.family.title} model takes {want}")
            if vectors.shape[1] != width:
                name = f"{key} " if key else ""
                raise InvalidInput(f"{what}: its {name}vectors are {vectors.shape[1]} wide and this model's "
                                   f"{stage.value.replace('_', ' ')} takes {width}: it is an embedding for another "
                                   f"model")
            tok = tokenizers[stage]
            trigger = _normalized(tok, emb.trigger)
            if trigger in ids[stage]:
                raise InvalidInput(f"{what}: another embedding of this call has the trigger {emb.trigger!r}; pass "
                                   f"each a distinct token")
            vocab = tok.backend.get_vocab(with_added_tokens=True)
            if trigger in vocab or f"{trigger}</w>" in vocab:
                raise InvalidInput(f"{what}: the trigger {emb.trigger!r} is a word of the tokenizer's vocabulary, so "
                                   f"the prompt could no longer say {trigger!r}; rename the file or give the embedding "
                                   f"another token (embeddings=[(path, '<name>')], --embedding FILE:TOKEN)")
            inputs[stage][used:used + emb.count] = vectors
            ids[stage][trigger] = tuple(range(base + used, base + used + emb.count))
        used += emb.count
    return EmbeddingSet(tuple(embeddings), inputs, {stage: Triggers(t) for stage, t in ids.items()})


def _normalized(tokenizer: Tokenizer, text: str) -> str:
    normalizer = tokenizer.backend.normalizer
    return normalizer.normalize_str(text) if normalizer is not None else text


def _encoder_stages(manifest: Any) -> list[tuple[Stage, int]]:
    """(text encoder stage, index of its SDXL key) of the artifact's encoders."""
    return [(s, i) for i, s in enumerate((Stage.TEXT_ENCODER, Stage.TEXT_ENCODER_2)) if manifest.has(s)]
