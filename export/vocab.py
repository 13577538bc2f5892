"""CLIP's BPE vocabulary, derived from the gzip'd merge list that OpenAI and open_clip ship.

The data file (`data/bpe_simple_vocab_16e6.txt.gz`, MIT, see its LICENSE) holds one merge
per line after a header line. The token list is built exactly as open_clip's
`SimpleTokenizer.__init__` builds it: 256 byte symbols, the same with the end-of-word
mark, one token per merge, then the two special tokens (49,408 in all), which is
also the vocab.json / merges.txt pair that Hugging Face's `openai/clip-vit-*` ships.
"""

from __future__ import annotations

import gzip
import json
from functools import lru_cache
from importlib import resources

VOCAB_SIZE = 49408
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# open_clip: merges = merges[1:49152-256-2+1] (the header line, then 48,894 merges).
_N_MERGES = 49152 - 256 - 2


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable-character map (open_clip simple_tokenizer.py)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


@lru_cache(maxsize=1)
def merges() -> tuple[tuple[str, str], ...]:
    raw = resources.files("sdrt.export").joinpath("data/bpe_simple_vocab_16e6.txt.gz").read_bytes()
    lines = gzip.decompress(raw).decode("utf-8").split("\n")[1:_N_MERGES + 1]
    return tuple(tuple(line.split()) for line in lines)  # type: ignore[misc]


def vocab() -> dict[str, int]:
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges()] + [BOS, EOS]
    table = {t: i for i, t in enumerate(tokens)}
    if len(table) != VOCAB_SIZE:
        raise RuntimeError(f"derived CLIP vocabulary has {len(table)} tokens, expected {VOCAB_SIZE}")
    return table


def vocab_json() -> str:
    return json.dumps(vocab(), ensure_ascii=False)


def merges_txt() -> str:
    # Hugging Face's CLIP merges.txt: a version header, then one merge per line.
    return "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges())
