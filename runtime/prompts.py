"""AUTOMATIC1111 web UI prompt syntax: attention weights, 75-token chunks, emphasis.

Three pure steps, each the web UI's behaviour (stable-diffusion-webui, modules/):

1. `parse_prompt_attention`: "(word)", "[word]", "(word:1.5)", escapes and BREAK to
   (text, weight) runs (prompt_parser.py `parse_prompt_attention`).
2. `tokenize_chunks`: the runs' tokens in chunks of 75 (BOS + 75 + EOS = the text
   encoder's 77), broken at a late comma, with one weight per token
   (sd_hijack_clip.py `TextConditionalModel.tokenize_line`); `pad_chunks` and
   `truncate_chunks` give prompts the same chunk count (sd_samplers_cfg_denoiser.py
   `pad_cond` pads with the encoded empty prompt).
3. `apply_emphasis`: scale each token's embedding by its weight, then restore the
   chunk's mean (sd_emphasis.py `EmphasisOriginal`, the default "Original" emphasis).

The text encoder runs once per chunk, in between; its outputs are joined along the
token axis (`torch.hstack(zs)` in `TextConditionalModel.forward`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np

from sdrt.engines.errors import InvalidInput, InvalidType

from .tokenizer import DEFAULT_MAX_LENGTH, Tokenizer

if TYPE_CHECKING:
    from .embeddings import Triggers

# prompt_parser.py: "(" multiplies by 1.1, "[" by 1 / 1.1 (a multiplication, not a
# division, so that the products round exactly as the web UI's do).
ROUND_MULTIPLIER = 1.1
SQUARE_MULTIPLIER = 1 / 1.1
# The weight the parser gives a BREAK marker; a marker keeps it only outside brackets.
BREAK_WEIGHT = -1.0
BREAK = "BREAK"
# The web UI's "Prompt word wrap length limit" setting (shared_options.py,
# comma_padding_backtrack, default 20, slider 0..74): how far back from a chunk's end
# a comma may be to end the chunk there; 0 turns it off.
COMMA_PADDING_BACKTRACK = 20

# The lexer of prompt_parser.py's `re_attention`, alternative for alternative and in the
# same order (order decides: "\\(" is an escape before "\\" is a lone backslash). A lone
# backslash yields "" (so it disappears), as the web UI's `text[1:]` does.
_LEXER = re.compile(r"""
    (?P<escape>\\[()\[\]\\]|\\)
  | (?P<open_round>\()
  | (?P<open_square>\[)
  | :\s*(?P<weight>[+-]?[.\d]+)\s*\)
  | (?P<close_round>\))
  | (?P<close_square>])
  | (?P<text>[^\\()\[\]:]+|:)
""", re.X)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """Runs of text with their attention weights, as the web UI parses a prompt.

    "(a)" multiplies a's weight by 1.1, "[a]" divides it by 1.1, "(a:w)" multiplies it
    by w; brackets nest, and ones never closed apply to the rest of the prompt; a stray
    ")" or "]" is text; "\\(", "\\)", "\\[", "\\]", "\\\\" are the literal characters.
    "BREAK" (a whole word) becomes its own run ("BREAK", -1.0). Adjacent runs of equal
    weight are merged; an empty prompt is [("", 1.0)].
    """
    if not isinstance(text, str):
        raise InvalidType(f"prompt must be a string, got {type(text).__name__}: {text!r:.80}")
    runs: list[list] = []            # [text, weight], weights multiplied in place
    rounds: list[int] = []           # index in runs where each open "(" started
    squares: list[int] = []

    def scale(start: int, factor: float) -> None:
        for run in runs[start:]:
            run[1] *= factor

    for m in _LEXER.finditer(text):
        kind = m.lastgroup
        if kind == "escape":
            runs.append([m.group()[1:], 1.0])
        elif kind == "open_round":
            rounds.append(len(runs))
        elif kind == "open_square":
            squares.append(len(runs))
        elif kind == "weight" and rounds:
            scale(rounds.pop(), _weight(m.group("weight"), text))
        elif kind == "close_round" and rounds:
            scale(rounds.pop(), ROUND_MULTIPLIER)
        elif kind == "close_square" and squares:
            scale(squares.pop(), SQUARE_MULTIPLIER)
        else:   # text, or a closing bracket with nothing open: literal text
            for i, part in enumerate(_BREAK.split(m.group())):
                if i:
                    runs.append([BREAK, BREAK_WEIGHT])
                runs.append([part, 1.0])
    # Brackets never closed: round ones first, each in the order opened (as the web UI).
    for start in rounds:
        scale(start, ROUND_MULTIPLIER)
    for start in squares:
        scale(start, SQUARE_MULTIPLIER)

    merged: list[list] = []
    for run in runs or [["", 1.0]]:
        if merged and merged[-1][1] == run[1]:
            merged[-1][0] += run[0]
        else:
            merged.append(run)
    return [(t, w) for t, w in merged]


def _weight(literal: str, prompt: str) -> float:
    # The lexer takes any run of digits and dots ("1.2.3", "."), which float() refuses;
    # the web UI then fails with a bare ValueError.
    try:
        return float(literal)
    except ValueError:
        raise InvalidInput(f"attention weight {literal!r} in prompt {prompt[:80]!r} is not a number; "
                           f"write e.g. (word:1.2)") from None


@dataclass(frozen=True, eq=False)
class Chunk:
    """One text-encoder input: ids (max_length,) int64 = BOS, up to max_length - 2
    prompt tokens, EOS, padding; weights (max_length,) float32, 1.0 on BOS, EOS and
    padding; length = how many prompt tokens it holds."""
    ids: np.ndarray
    weights: np.ndarray
    length: int


def tokenize_chunks(tokenizer: Tokenizer, text: str, weighting: bool = True,
                    comma_padding_backtrack: int = COMMA_PADDING_BACKTRACK,
                    max_chunks: int | None = None, triggers: Triggers | None = None) -> list[Chunk]:
    """The prompt as the web UI's chunks (sd_hijack_clip.py `tokenize_line`).

    Tokens fill chunks of `tokenizer.max_length - 2` (75). When a chunk is full and the
    next token is not a comma, the tokens after the chunk's last comma move to the next
    chunk if that comma is within `comma_padding_backtrack` tokens of the end. A BREAK
    run closes the current chunk, even an empty one. `weighting=False` is the web UI's
    emphasis "None": the text is taken literally, BREAK included, with weight 1.0.
    A prompt without syntax and of at most 75 tokens gives `tokenizer.encode`'s ids.
    With `max_chunks`, chunk number max_chunks (the last that will be kept) is filled
    to 75 tokens rather than broken at a comma, as nothing follows it: at max_chunks=1
    a long prompt keeps its first 75 tokens, as diffusers' truncation does.
    `triggers`: textual-inversion embeddings; each trigger in the text takes its
    embedding's ids, one per vector, with its run's weight, in one chunk: an embedding
    that does not fit in the current chunk starts the next (the web UI's rule).
    """
    if not isinstance(text, str):
        raise InvalidType(f"prompt must be a string, got {type(text).__name__}: {text!r:.80}")
    room = tokenizer.max_length - 2
    if isinstance(comma_padding_backtrack, bool) or not isinstance(comma_padding_backtrack, int):
        raise InvalidType(f"comma_padding_backtrack must be an int, got {comma_padding_backtrack!r}")
    if not 0 <= comma_padding_backtrack < room:
        raise InvalidInput(f"comma_padding_backtrack must be in 0..{room - 1}, got {comma_padding_backtrack}")
    runs = parse_prompt_attention(text) if weighting else [(text, 1.0)]
    texts = [t for t, _ in runs]
    encoded = (triggers.encode(tokenizer, texts) if triggers is not None and triggers.ids else
               [enc.ids for enc in tokenizer.backend.encode_batch(texts, add_special_tokens=False)])
    comma = tokenizer.backend.token_to_id(",</w>")

    chunks: list[Chunk] = []
    ids: list[int] = []              # the current chunk's prompt tokens and weights
    weights: list[float] = []
    last_comma = -1                  # index in ids of the chunk's last comma

    def close(keep: int) -> None:
        """Emit ids[:keep] as a chunk; the rest starts the next one."""
        nonlocal ids, weights, last_comma
        chunks.append(_chunk(tokenizer, ids[:keep], weights[:keep]))
        ids, weights, last_comma = ids[keep:], weights[keep:], -1

    for (run, weight), enc in zip(runs, encoded):
        if run == BREAK and weight == BREAK_WEIGHT:
            close(len(ids))
            continue
        for token in enc:
            if token == comma:
                last_comma = len(ids)
            elif (comma_padding_backtrack and len(ids) == room and last_comma != -1
                  and len(ids) - last_comma <= comma_padding_backtrack
                  and (max_chunks is None or len(chunks) < max_chunks - 1)):
                close(last_comma + 1)
            if len(ids) == room:
                close(room)
            if isinstance(token, tuple):   # an embedding's vectors
                if len(ids) + len(token) > room:
                    close(len(ids))
                ids.extend(token)
                weights.extend([weight] * len(token))
                continue
            ids.append(token)
            weights.append(weight)
    if ids or not chunks:
        close(len(ids))
    return chunks


def _chunk(tokenizer: Tokenizer, ids: Sequence[int], weights: Sequence[float]) -> Chunk:
    # The web UI pads with EOS, then (process_tokens) turns everything after the first
    # EOS into id_pad where the two differ: SD 1.x pads with EOS (49407), SD 2.x's
    # OpenCLIP tokenizer with id 0 ("!"); the checkpoint's tokenizer names the same ids.
    # Here the padding starts after the EOS that closes the prompt, as in
    # `Tokenizer.encode`, even if the prompt itself contains a typed "<|endoftext|>".
    out = np.full(tokenizer.max_length, tokenizer.pad_id, dtype=np.int64)
    out[:len(ids) + 2] = [tokenizer.bos_id, *ids, tokenizer.eos_id]
    w = np.ones(tokenizer.max_length, dtype=np.float32)
    w[1:len(ids) + 1] = weights
    return Chunk(ids=out, weights=w, length=len(ids))


def empty_chunk(tokenizer: Tokenizer) -> Chunk:
    """The chunk of the empty prompt, which the web UI pads shorter prompts with
    (sd_models.py `get_empty_cond` encodes [""])."""
    return _chunk(tokenizer, [], [])


def pad_chunks(tokenizer: Tokenizer, prompts: Sequence[Sequence[Chunk]],
               count: int | None = None) -> list[list[Chunk]]:
    """Each prompt's chunks followed by empty chunks up to `count` (default: the most
    any prompt has), so that a prompt and its negative, or a batch, stack. The web UI
    appends the encoded empty prompt the same way (sd_samplers_cfg_denoiser.py
    `pad_cond`); encoding an empty chunk gives that embedding, as its weights are 1."""
    longest = max((len(p) for p in prompts), default=0)
    if count is None:
        count = longest
    if isinstance(count, bool) or not isinstance(count, int):
        raise InvalidType(f"chunk count must be an int, got {count!r}")
    if count < longest:
        raise InvalidInput(f"cannot pad to {count} chunks: a prompt has {longest}; truncate_chunks first")
    empty = empty_chunk(tokenizer)
    return [list(p) + [empty] * (count - len(p)) for p in prompts]


def truncate_chunks(chunks: Sequence[Chunk], max_chunks: int) -> tuple[list[Chunk], int]:
    """The first `max_chunks` chunks and how many prompt tokens the rest held (the
    caller warns). The web UI has no limit; a static engine has one."""
    if isinstance(max_chunks, bool) or not isinstance(max_chunks, int):
        raise InvalidType(f"max_chunks must be an int, got {max_chunks!r}")
    if max_chunks < 1:
        raise InvalidInput(f"max_chunks must be at least 1, got {max_chunks}")
    return list(chunks[:max_chunks]), sum(c.length for c in chunks[max_chunks:])


def apply_emphasis(z: np.ndarray, weights: np.ndarray, chunk_length: int = DEFAULT_MAX_LENGTH) -> np.ndarray:
    """The web UI's "Original" emphasis (sd_emphasis.py `EmphasisOriginal`).

    z (batch, chunk_length * chunks, dim): the text encoder's outputs, chunks joined
    along the token axis; weights (batch, chunk_length * chunks): the chunks' weights
    joined the same way. Each token's vector is multiplied by its weight, then each
    chunk is rescaled so that its mean over all of its tokens and features is what it
    was. The web UI computes that mean once per chunk over the whole batch it encodes,
    and encodes one prompt at a time (prompt_parser.py `get_learned_conditioning`
    loops over prompts; the negative prompt is a separate call), so here the mean is
    per prompt and per chunk. A chunk whose weights are all 1 is left as it is, bit
    for bit; z itself is returned when every weight is 1.
    """
    if not isinstance(z, np.ndarray) or not isinstance(weights, np.ndarray):
        raise InvalidType(f"z and weights must be numpy arrays, got {type(z).__name__} and {type(weights).__name__}")
    if z.ndim != 3 or weights.shape != z.shape[:2] or z.shape[1] % chunk_length:
        raise InvalidInput(f"z must be (batch, {chunk_length} * chunks, dim) and weights (batch, {chunk_length} "
                           f"* chunks); got z {z.shape} and weights {weights.shape}")
    batch, tokens, dim = z.shape
    w = weights.astype(np.float32).reshape(batch, tokens // chunk_length, chunk_length)
    weighted = ~np.all(w == 1.0, axis=2)                      # (batch, chunks)
    if not weighted.any():
        return z
    out = z.astype(np.float32, copy=True)
    view = out.reshape(batch, tokens // chunk_length, chunk_length, dim)
    for b, k in zip(*np.nonzero(weighted)):
        original = view[b, k]
        original_mean = original.mean(dtype=np.float64)
        scaled = original * w[b, k, :, None]
        # "restoring original mean is likely not correct, but it seems to work well to
        # prevent artifacts that happen otherwise" (sd_emphasis.py)
        view[b, k] = scaled * np.float32(original_mean / scaled.mean(dtype=np.float64))
    return out.astype(z.dtype, copy=False)


@dataclass(frozen=True, eq=False)
class Truncation:
    """A prompt cut at the artifact's chunk limit."""
    prompt: str
    tokens: int           # prompt tokens in all
    dropped: list[int]    # the token ids left out


@dataclass(frozen=True, eq=False)
class ChunkedPrompts:
    """Prompts as text-encoder calls: call j encodes ids[j], one row per prompt.

    ids (chunks, prompts, max_length) int32; weights (prompts, chunks * max_length)
    float32, in the order the calls' outputs are joined along the token axis."""
    ids: np.ndarray
    weights: np.ndarray
    truncated: tuple[Truncation, ...]

    @property
    def chunks(self) -> int:
        return self.ids.shape[0]


def chunk_prompts(tokenizer: Tokenizer, prompts: Sequence[str], weighting: bool = True,
                  max_chunks: int | None = None, count: int | None = None,
                  triggers: Triggers | None = None) -> ChunkedPrompts:
    """Every prompt in chunks, cut at `max_chunks` and padded with empty chunks to the
    count of the longest (at least `count`: SDXL's two encoders must agree), as the
    web UI conditions a batch (negative prompts included)."""
    per_prompt, truncated = [], []
    for text in prompts:
        chunks = tokenize_chunks(tokenizer, text, weighting, max_chunks=max_chunks, triggers=triggers)
        if max_chunks is not None and len(chunks) > max_chunks:
            dropped = [int(t) for c in chunks[max_chunks:] for t in c.ids[1:c.length + 1]]
            truncated.append(Truncation(text, sum(c.length for c in chunks), dropped))
            chunks, _ = truncate_chunks(chunks, max_chunks)
        per_prompt.append(chunks)
    longest = max(len(p) for p in per_prompt)
    padded = pad_chunks(tokenizer, per_prompt, max(longest, count or 0))
    ids = np.stack([np.stack([p[j].ids for p in padded]) for j in range(len(padded[0]))]).astype(np.int32)
    weights = np.stack([np.concatenate([c.weights for c in p]) for p in padded])
    return ChunkedPrompts(ids, weights, tuple(truncated))


def truncation_message(tokenizer: Tokenizer, truncated: Sequence[Truncation], max_chunks: int) -> str:
    """One warning for every prompt of a call that was cut, naming token counts and K."""
    room = tokenizer.max_length - 2
    parts = [f"prompt {t.prompt[:40]!r}... has {t.tokens} tokens; {len(t.dropped)} were dropped: "
             f"{tokenizer.decode(t.dropped)[:80]!r}" for t in truncated]
    return (f"{'; '.join(parts)}. This artifact takes at most {max_chunks} chunk(s) of {room} tokens "
            f"(sdrt export --max-prompt-chunks {max_chunks}); export with a larger --max-prompt-chunks for "
            f"longer prompts")
