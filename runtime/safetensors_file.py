"""A strict reader of `.safetensors` files (LoRAs, embeddings) into NumPy arrays.

The format (huggingface/safetensors, "Format" in its README): an 8-byte little-endian
header length N, N bytes of JSON ({name: {"dtype", "shape", "data_offsets": [begin,
end]}, optional "__metadata__": {str: str}}), then the tensors' bytes, offsets counted
from the end of the header. Reading it here, rather than through the `safetensors`
package, checks every field of a file a user downloaded from anywhere before a byte
is used, names what is wrong in one line, and reads bfloat16 (the dtype most LoRAs
trained on recent GPUs ship in), which NumPy has no type for: it is widened to
float32 exactly (a bfloat16 is the top 16 bits of a float32).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sdrt.engines.errors import InvalidInput, MissingFile

# Largest JSON header accepted: the format's own readers refuse past 100 MB too.
MAX_HEADER_BYTES = 100 * 1024 * 1024

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
    "U64": np.uint64, "U32": np.uint32, "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_,
}
# The first bytes of the formats a `.pt`/`.bin`/`.ckpt` may really be: a zip (torch.save
# since 1.6) or a raw pickle stream (protocol 2+ starts with 0x80).
_PICKLE_MAGIC = (b"PK\x03\x04", b"\x80")


@dataclass(frozen=True)
class SafetensorsFile:
    path: Path
    tensors: dict[str, np.ndarray]   # float types as stored (bfloat16 widened to float32)
    metadata: dict[str, str]


def looks_like_pickle(path: str | os.PathLike[str]) -> bool:
    """Whether the file starts like a torch.save zip or a pickle stream, and not like a
    safetensors file: a safetensors header length whose low byte is 0x80 (128, 384, ...,
    1 in 32 of the 8-byte-padded headers the format writes) starts like a pickle too, so
    a file whose first 8 bytes give a length that fits and whose header opens with "{"
    is safetensors."""
    with open(path, "rb") as f:
        head = f.read(9)
        size = os.fstat(f.fileno()).st_size
        if len(head) == 9 and head[8:9] == b"{" and 8 + int.from_bytes(head[:8], "little") <= size:
            return False
    return any(head.startswith(m) for m in _PICKLE_MAGIC)


def read(path: str | os.PathLike[str], what: str = "file") -> SafetensorsFile:
    """Read every tensor of a safetensors file. `what` names the file's role in errors
    ("LoRA", "embedding"). Raises MissingFile, or InvalidInput naming the first thing
    wrong: a pickle, a truncated file, a malformed header, an unknown dtype, offsets
    outside the data or not matching the shape."""
    path = Path(path)
    if not path.is_file():
        raise MissingFile(f"{what} {path} does not exist" if not path.exists() else f"{what} {path} is not a file")
    size = path.stat().st_size
    if size >= 4 and looks_like_pickle(path):
        raise InvalidInput(f"{what} {path} is a pickle (torch.save) file, which runs code when loaded; "
                           f"convert it to .safetensors")
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise InvalidInput(f"{what} {path} is not a safetensors file: {size} bytes, too short for a header")
        n = int.from_bytes(raw, "little")
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise InvalidInput(f"{what} {path} is not a safetensors file or is truncated: its header claims "
                               f"{n} bytes and the file has {size}")
        header_bytes = f.read(n)
        data = f.read()
    try:
        header = json.loads(header_bytes.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise InvalidInput(f"{what} {path} is not a safetensors file: its header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise InvalidInput(f"{what} {path} is not a safetensors file: its header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise InvalidInput(f"{what} {path}: __metadata__ must map names to strings")
    tensors, spans = {}, []
    for name, entry in header.items():
        tensors[name], span = _tensor(path, what, name, entry, data)
        spans.append((span, name))
    _check_coverage(path, what, spans, len(data))
    return SafetensorsFile(path, tensors, dict(metadata))


def _check_coverage(path: Path, what: str, spans: list[tuple[tuple[int, int], str]], size: int) -> None:
    """The format's rule (and its reference reader's check): the tensors' bytes follow
    one another from the start of the data to its end, with no gap and no overlap, so
    no byte of the file goes unread (no polyglot files)."""
    end = 0
    for (begin, stop), name in sorted(spans):
        if begin != end:
            raise InvalidInput(f"{what} {path}, tensor {name!r}: its bytes start at {begin}, not where the "
                               f"previous tensor's end ({end}): {'overlapping' if begin < end else 'a gap'}")
        end = stop
    if end != size:
        raise InvalidInput(f"{what} {path}: the tensors end at byte {end} of {size} bytes of data")


def _tensor(path: Path, what: str, name: str, entry: object, data: bytes) -> tuple[np.ndarray, tuple[int, int]]:
    where = f"{what} {path}, tensor {name!r}"
    if not isinstance(entry, dict):
        raise InvalidInput(f"{where}: its header entry is not an object")
    dtype = entry.get("dtype")
    if dtype not in _DTYPES:
        raise InvalidInput(f"{where}: dtype {dtype!r} is not one of {', '.join(_DTYPES)}")
    shape = entry.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                             for d in shape):
        raise InvalidInput(f"{where}: shape {shape!r} is not a list of non-negative integers")
    offsets = entry.get("data_offsets")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
        raise InvalidInput(f"{where}: data_offsets {offsets!r} is not [begin, end]")
    begin, end = offsets
    item = np.dtype(_DTYPES[dtype]).itemsize
    count = math.prod(shape)      # Python ints: a hostile shape must not wrap around int64
    if not 0 <= begin <= end or end > len(data):
        raise InvalidInput(f"{where}: bytes {begin}..{end} lie outside the file's {len(data)} bytes of data "
                           f"(truncated?)")
    if end - begin != count * item:
        raise InvalidInput(f"{where}: {end - begin} bytes do not hold shape {shape} of {dtype}")
    array = np.frombuffer(data, dtype=np.dtype(_DTYPES[dtype]).newbyteorder("<"), count=count, offset=begin)
    if dtype == "BF16":
        array = (array.astype(np.uint32) << 16).view(np.float32)
    return array.astype(array.dtype.newbyteorder("="), copy=True).reshape(shape), (begin, end)
