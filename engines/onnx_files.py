"""Where an ONNX file's weights come from, checked before any backend opens it.

An ONNX tensor may keep its bytes in an "external data" file named by a path inside
the model (`TensorProto.external_data["location"]`). A downloaded model could name
`../../home/user/.ssh/id_rsa`, `/etc/shadow`, or a symlink that leads out of its
folder, and a backend would read that file into a weight (and, through the outputs,
leak it). This module lists every external reference of a model file and refuses
any that does not resolve to a file inside the model's folder.

ONNX Runtime 1.32 refuses all three escapes itself (absolute paths, `..`, symlinks
that resolve outside the model directory: `ValidateExternalDataPathFromDir`), but
ONNX Runtime before 1.19 and TensorRT's ONNX parser read whatever path is written,
and their messages do not say which artifact file is at fault. Checking here gives
every backend the same rule and the same message.

The runtime must not depend on the `onnx` package, so this reads the protobuf wire
format directly and descends only the fields that can hold a tensor:

    ModelProto.graph (7), .functions (25) -> FunctionProto.node (7),
    .training_info (20) -> TrainingInfoProto.initialization (1) / .algorithm (2)
    GraphProto.node (1), .initializer (5), .sparse_initializer (15)
    NodeProto.attribute (5) -> AttributeProto.t (5), .g (6), .tensors (10),
        .graphs (11), .sparse_tensor (22), .sparse_tensors (23)
    SparseTensorProto.values (1), .indices (2)
    TensorProto.name (8), .external_data (13) -> StringStringEntryProto key (1) / value (2),
        .data_location (14, EXTERNAL = 1)

Everything else (weights in raw_data, doc strings, shapes) is skipped by length
without being copied, so a 500 MB model with embedded weights is scanned in
milliseconds through a memory map.
"""

from __future__ import annotations

import math
import mmap
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from .errors import ArtifactError, MissingFile

# Protobuf wire types (https://protobuf.dev/programming-guides/encoding/).
_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5
# protobuf's own default recursion limit; a deeper file is hostile, not a model.
_MAX_DEPTH = 100
_EXTERNAL = 1  # TensorProto.DataLocation.EXTERNAL


@dataclass(frozen=True)
class ExternalRef:
    """One tensor whose bytes live in another file."""

    tensor: str
    location: str
    offset: int
    length: int | None   # None: to the end of the file


class _Malformed(Exception):
    pass


def _varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise _Malformed("varint runs past its message")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7


def _fields(buf: memoryview, start: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """Yield (field number, wire type, value or payload start, payload end) of one message."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos, end)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise _Malformed("field number 0")
        if wire == _VARINT:
            value, pos = _varint(buf, pos, end)
            yield number, wire, value, pos
        elif wire == _LEN:
            length, pos = _varint(buf, pos, end)
            if pos + length > end:
                raise _Malformed(f"field {number} needs {length} bytes, {end - pos} left")
            yield number, wire, pos, pos + length
            pos += length
        elif wire == _I64:
            pos += 8
        elif wire == _I32:
            pos += 4
        else:  # groups (3, 4) are not used by ONNX; anything else is not protobuf
            raise _Malformed(f"wire type {wire} in field {number}")
        if pos > end:
            raise _Malformed(f"field {number} runs past its message")


def _tensor(buf: memoryview, start: int, end: int, out: list[ExternalRef]) -> None:
    name, location_is_external, entries = "", False, {}
    for number, wire, a, b in _fields(buf, start, end):
        if number == 8 and wire == _LEN:
            name = bytes(buf[a:b]).decode("utf-8", "replace")
        elif number == 14 and wire == _VARINT:
            location_is_external = a == _EXTERNAL
        elif number == 13 and wire == _LEN:
            key = value = ""
            for n2, w2, a2, b2 in _fields(buf, a, b):
                if w2 == _LEN and n2 in (1, 2):
                    text = bytes(buf[a2:b2]).decode("utf-8", "replace")
                    key, value = (text, value) if n2 == 1 else (key, text)
            entries[key] = value
    if not location_is_external and "location" not in entries:
        return   # stray key/value pairs on an inline tensor: backends ignore them
    if "location" not in entries:
        raise _Malformed(f"tensor {name!r} is marked external but names no location")
    try:
        offset = int(entries.get("offset", "0") or 0)
        length = int(entries["length"]) if entries.get("length") else None
    except ValueError:
        raise _Malformed(f"tensor {name!r} has a non-numeric external offset or length") from None
    if offset < 0 or (length is not None and length < 0):
        raise _Malformed(f"tensor {name!r} has a negative external offset or length")
    out.append(ExternalRef(name, entries["location"], offset, length))


def _sparse(buf: memoryview, start: int, end: int, out: list[ExternalRef]) -> None:
    for number, wire, a, b in _fields(buf, start, end):
        if number in (1, 2) and wire == _LEN:
            _tensor(buf, a, b, out)


def _node(buf: memoryview, start: int, end: int, out: list[ExternalRef], depth: int) -> None:
    for number, wire, a, b in _fields(buf, start, end):
        if number != 5 or wire != _LEN:
            continue
        for n2, w2, a2, b2 in _fields(buf, a, b):  # AttributeProto
            if w2 != _LEN:
                continue
            if n2 in (5, 10):
                _tensor(buf, a2, b2, out)
            elif n2 in (6, 11):
                _graph(buf, a2, b2, out, depth + 1)
            elif n2 in (22, 23):
                _sparse(buf, a2, b2, out)


def _graph(buf: memoryview, start: int, end: int, out: list[ExternalRef], depth: int) -> None:
    if depth > _MAX_DEPTH:
        raise _Malformed(f"graphs nested more than {_MAX_DEPTH} deep")
    for number, wire, a, b in _fields(buf, start, end):
        if wire != _LEN:
            continue
        if number == 1:
            _node(buf, a, b, out, depth)
        elif number == 5:
            _tensor(buf, a, b, out)
        elif number == 15:
            _sparse(buf, a, b, out)


def _model(buf: memoryview, out: list[ExternalRef]) -> None:
    seen_graph = False
    for number, wire, a, b in _fields(buf, 0, len(buf)):
        if wire != _LEN:
            continue
        if number == 7:
            seen_graph = True
            _graph(buf, a, b, out, 0)
        elif number == 25:
            for n2, w2, a2, b2 in _fields(buf, a, b):
                if n2 == 7 and w2 == _LEN:
                    _node(buf, a2, b2, out, 0)
        elif number == 20:
            for n2, w2, a2, b2 in _fields(buf, a, b):
                if n2 in (1, 2) and w2 == _LEN:
                    _graph(buf, a2, b2, out, 0)
    if not seen_graph:
        raise _Malformed("no graph")


def external_data_refs(path: str | os.PathLike[str]) -> list[ExternalRef]:
    """Every external-data reference in the ONNX file at `path` (no path checks)."""
    path = Path(path)
    if not path.is_file():
        raise MissingFile(f"{path}: ONNX file missing")
    out: list[ExternalRef] = []
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            raise ArtifactError(f"{path}: empty file, not an ONNX model (truncated?)")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            view = memoryview(mm)
            try:
                _model(view, out)
            except _Malformed as e:
                raise ArtifactError(f"{path}: not a valid ONNX model, truncated or corrupt ({e})") from None
            finally:
                view.release()
    return out


def check_external_data(path: str | os.PathLike[str], root: str | os.PathLike[str] | None = None) -> list[ExternalRef]:
    """Refuse an ONNX file whose external data lies outside `root` (default: its folder).

    Each location must be relative, must resolve (after `..` and symlinks) to a file
    inside `root`, and must hold the bytes the tensor claims (offset + length within
    the file), so a truncated data file is named here rather than failing deep in a
    backend. Returns the references, for callers that want the data files' names.
    """
    path = Path(path)
    folder = path.parent
    root_real = Path(os.path.realpath(root if root is not None else folder))
    if not _within(Path(os.path.realpath(path)), root_real):
        raise ArtifactError(f"{path}: resolves outside {root_real} (symlink out of the artifact folder); refused")
    refs = external_data_refs(path)
    sizes: dict[str, int] = {}
    for ref in refs:
        loc = ref.location
        where = f"{path}: tensor {ref.tensor!r} has external data location {loc!r}"
        if not loc or "\x00" in loc:
            raise ArtifactError(f"{where}, which is not a file name; refused")
        # Absolute in POSIX or Windows form (drive letter, UNC, leading separator).
        if os.path.isabs(loc) or loc.startswith(("/", "\\")) or (len(loc) > 1 and loc[1] == ":"):
            raise ArtifactError(f"{where}: absolute paths are refused, external data must lie in {folder}")
        target = Path(os.path.realpath(folder / loc))
        if not _within(target, root_real):
            raise ArtifactError(
                f"{where}, which resolves to {target}, outside {root_real} ('..' or a symlink out); refused")
        if loc not in sizes:
            if not target.is_file():
                # ArtifactError, not MissingFile: the folder is incomplete, whatever the user named.
                raise ArtifactError(f"{where}, but {folder / loc} is missing (incomplete artifact folder)")
            sizes[loc] = target.stat().st_size
        need = ref.offset + (ref.length or 0)
        if need > sizes[loc] or (ref.length is None and ref.offset > sizes[loc]):
            raise ArtifactError(
                f"{folder / loc}: truncated: tensor {ref.tensor!r} needs bytes up to {need}, "
                f"the file has {sizes[loc]}")
    return refs


def _within(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


# TensorProto.DataType -> NumPy, for the weights `read_initializers` returns.
_NP_TYPES = {1: np.float32, 10: np.float16, 11: np.float64, 6: np.int32, 7: np.int64}


def read_initializers(path: str | os.PathLike[str], names: Iterable[str]) -> dict[str, np.ndarray]:
    """The values of the named top-level initializers of the ONNX file at `path`, read
    from its raw bytes or its external data file (inside its folder, as
    `check_external_data` requires), without the `onnx` package. What changes weights
    at run time (LoRA) reads the exported weights from here, so restoring them is exact.
    Raises ArtifactError naming a tensor that is missing or stored in a way sdrt does not
    write (typed fields other than float_data)."""
    path = Path(path)
    wanted = set(names)
    external = {ref.tensor: ref for ref in check_external_data(path) if ref.tensor in wanted}
    found: dict[str, np.ndarray] = {}
    _scan_initializers(path, lambda view, a, b: _read_tensor(view, a, b, wanted, external, path.parent, found))
    missing = sorted(wanted - set(found))
    if missing:
        raise ArtifactError(f"{path}: no initializer {missing[0]!r} ({len(missing)} missing); export the model again")
    return found


def _read_tensor(buf: memoryview, start: int, end: int, wanted: set[str], external: dict[str, ExternalRef],
                 folder: Path, found: dict[str, np.ndarray]) -> None:
    name, dims, dtype, raw, floats = _tensor_fields(buf, start, end)
    if name not in wanted:
        return
    if dtype not in _NP_TYPES:
        raise _Malformed(f"tensor {name!r} has data type {dtype}, not one sdrt reads")
    np_type = np.dtype(_NP_TYPES[dtype]).newbyteorder("<")
    count = math.prod(dims)
    if name in external:
        ref = external[name]
        with open(folder / ref.location, "rb") as f:
            f.seek(ref.offset)
            data = bytearray(count * np_type.itemsize)   # writable: callers may update it in place
            got = f.readinto(data)
            if got != len(data):
                raise _Malformed(f"tensor {name!r}: its external data ends after {got} of {len(data)} bytes")
        array = np.frombuffer(data, dtype=np_type)
    elif raw is not None:
        array = np.frombuffer(buf[raw[0]:raw[1]], dtype=np_type).copy()
    elif floats is not None and dtype == 1:
        array = np.frombuffer(buf[floats[0]:floats[1]], dtype=np_type).copy()
    else:
        raise _Malformed(f"tensor {name!r} holds its values in a field sdrt does not read")
    if array.size != count:
        raise _Malformed(f"tensor {name!r} holds {array.size} values for shape {dims}")
    found[name] = array.astype(array.dtype.newbyteorder("="), copy=False).reshape(dims)


def initializer_types(path: str | os.PathLike[str]) -> dict[str, tuple[tuple[int, ...], int]]:
    """{name: (dims, ONNX data type)} of every top-level initializer, values not read."""
    found: dict[str, tuple[tuple[int, ...], int]] = {}

    def visit(view: memoryview, start: int, end: int) -> None:
        name, dims, dtype = _tensor_header(view, start, end)
        found[name] = (dims, dtype)

    _scan_initializers(Path(path), visit)
    return found


def _scan_initializers(path: Path, visit: Callable[[memoryview, int, int], None]) -> None:
    """Call visit(buffer, start, end) for each top-level initializer (GraphProto field 5
    of ModelProto field 7) of the ONNX file at `path`, read through a memory map."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        view = memoryview(mm)
        try:
            for number, wire, a, b in _fields(view, 0, len(view)):
                if number == 7 and wire == _LEN:
                    for n2, w2, a2, b2 in _fields(view, a, b):
                        if n2 == 5 and w2 == _LEN:
                            visit(view, a2, b2)
        except _Malformed as e:
            raise ArtifactError(f"{path}: not a valid ONNX model, truncated or corrupt ({e})") from None
        finally:
            view.release()


def _tensor_header(buf: memoryview, start: int, end: int) -> tuple[str, tuple[int, ...], int]:
    return _tensor_fields(buf, start, end)[:3]


def _tensor_fields(buf: memoryview, start: int, end: int) -> tuple[str, tuple[int, ...], int, Any, Any]:
    """A TensorProto's name, dims, data type, and the spans of its raw_data and
    float_data (None when absent), nothing copied."""
    name, dims, dtype, raw, floats = "", [], 0, None, None
    for number, wire, a, b in _fields(buf, start, end):
        if number == 8 and wire == _LEN:
            name = bytes(buf[a:b]).decode("utf-8", "replace")
        elif number == 1 and wire == _VARINT:
            dims.append(a)
        elif number == 1 and wire == _LEN:   # packed
            pos = a
            while pos < b:
                d, pos = _varint(buf, pos, b)
                dims.append(d)
        elif number == 2 and wire == _VARINT:
            dtype = a
        elif number == 9 and wire == _LEN:
            raw = (a, b)
        elif number == 4 and wire == _LEN:
            floats = (a, b)
    return name, tuple(dims), dtype, raw, floats


def with_overridable(path: str | os.PathLike[str], names: Iterable[str]) -> bytes:
    """The ONNX model at `path` with the named initializers also listed as graph inputs,
    as serialized bytes. ONNX Runtime lets a caller feed such an initializer at run time
    ("overridable initializers", IR version >= 4) and uses the stored value when it is
    not fed. Protobuf messages are concatenations of fields, so the inputs are appended
    to the graph's bytes and only the graph's length prefix is rewritten; the `onnx`
    package is not needed (the runtime does not depend on it)."""
    types = initializer_types(path)
    extra = bytearray()
    for name in names:
        dims, dtype = types[name]
        shape = b"".join(_message(1, _varint_field(1, d)) for d in dims)          # TensorShapeProto.dim
        tensor = _varint_field(1, dtype) + _message(2, shape)                      # TypeProto.Tensor
        value_info = _message(1, name.encode()) + _message(2, _message(1, tensor))  # ValueInfoProto
        extra += _message(11, value_info)                                          # GraphProto.input
    data = Path(path).read_bytes()
    view = memoryview(data)
    out = bytearray()
    pos = 0
    try:
        for number, wire, a, b in _fields(view, 0, len(view)):
            if number == 7 and wire == _LEN:
                head_start = _field_start(view, pos, a)
                out += data[pos:head_start]
                out += _message(7, bytes(view[a:b]) + bytes(extra))
                pos = b
    except _Malformed as e:
        raise ArtifactError(f"{path}: not a valid ONNX model, truncated or corrupt ({e})") from None
    out += data[pos:]
    return bytes(out)


def _field_start(buf: memoryview, scan_from: int, payload: int) -> int:
    """Where the field whose payload starts at `payload` begins (its key and length),
    found by walking the top-level fields again from `scan_from`."""
    pos = scan_from
    while pos < payload:
        start = pos
        key, pos = _varint(buf, pos, payload)
        wire = key & 7
        if wire == _LEN:
            length, pos = _varint(buf, pos, payload)
            if pos == payload:
                return start
            pos += length
        elif wire == _VARINT:
            _, pos = _varint(buf, pos, payload)
        elif wire == _I64:
            pos += 8
        elif wire == _I32:
            pos += 4
    raise _Malformed("graph field not found")


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _varint_field(number: int, value: int) -> bytes:
    return _encode_varint(number << 3 | _VARINT) + _encode_varint(value)


def _message(number: int, payload: bytes) -> bytes:
    return _encode_varint(number << 3 | _LEN) + _encode_varint(len(payload)) + payload
