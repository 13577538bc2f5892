"""sdrt's safetensors reader against the `safetensors` package (the format's reference
writer and reader), and hostile files: each refused in one line, naming what is wrong."""

from __future__ import annotations

import json
import pickle
import struct
import zipfile

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from sdrt.engines.errors import InvalidInput, MissingFile
from sdrt.runtime import safetensors_file

NUMPY_DTYPES = (np.float64, np.float32, np.float16, np.int64, np.int32, np.int16, np.int8,
                np.uint64, np.uint32, np.uint16, np.uint8, np.bool_)


def _random(dtype, shape, rng):
    if dtype == np.bool_:
        return rng.integers(0, 2, shape).astype(np.bool_)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, shape, dtype=dtype, endpoint=True)
    return rng.standard_normal(shape).astype(dtype)


@pytest.mark.parametrize("dtype", NUMPY_DTYPES, ids=lambda d: np.dtype(d).name)
def test_every_numpy_dtype_round_trips_as_the_safetensors_package_reads_it(dtype, tmp_path):
    rng = np.random.default_rng(0)
    tensors = {"a": _random(dtype, (3, 5), rng), "scalar": _random(dtype, (), rng),
               "empty": _random(dtype, (0, 4), rng), "b.c": _random(dtype, (2, 1, 3), rng)}
    path = tmp_path / "x.safetensors"
    save_file(tensors, str(path), metadata={"k": "v"})
    ours, theirs = safetensors_file.read(path), load_file(str(path))
    assert ours.tensors.keys() == theirs.keys() == tensors.keys()
    for name, want in theirs.items():
        got = ours.tensors[name]
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(got, want)
        got[...] = 0 if got.size else got    # arrays are writable copies, not views of the file
    assert ours.metadata == {"k": "v"}


def test_bfloat16_is_widened_to_the_same_float32_as_torch(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file as torch_save

    x = torch.randn(7, 3, generator=torch.Generator().manual_seed(0)) * 100
    special = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), 1e-40, 3.0e38])
    path = tmp_path / "bf16.safetensors"
    torch_save({"x": x.to(torch.bfloat16), "special": special.to(torch.bfloat16),
                "empty": torch.zeros(0, 2, dtype=torch.bfloat16)}, str(path))
    read = safetensors_file.read(path).tensors
    assert read["x"].dtype == np.float32
    np.testing.assert_array_equal(read["x"], x.to(torch.bfloat16).float().numpy())
    np.testing.assert_array_equal(read["special"], special.to(torch.bfloat16).float().numpy())
    assert np.signbit(read["special"][1])
    assert read["empty"].shape == (0, 2) and read["empty"].dtype == np.float32


def test_a_header_length_with_low_byte_0x80_is_not_taken_for_a_pickle(tmp_path):
    # A pickle stream starts with 0x80; so does a safetensors file whose header is 128,
    # 384, ... bytes long (one padded header in 32).
    for n in range(1, 400):
        path = tmp_path / f"{n}.safetensors"
        save_file({"w" * n: np.ones(2, np.float32)}, str(path))
        if path.read_bytes()[0] == 0x80:
            break
        path.unlink()
    else:
        pytest.fail("no name length gave a header length with low byte 0x80")
    assert not safetensors_file.looks_like_pickle(path)
    np.testing.assert_array_equal(safetensors_file.read(path).tensors["w" * n], np.ones(2, np.float32))


# ---- hostile files ---------------------------------------------------------------------

def _write(path, header: dict | bytes, data: bytes = b"", length: int | None = None):
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


def _refused(path, *words):
    with pytest.raises(InvalidInput) as e:
        safetensors_file.read(path, "LoRA")
    message = str(e.value)
    assert "\n" not in message and str(path) in message
    for w in words:
        assert w in message, message
    return message


def test_a_header_that_is_not_json_is_refused(tmp_path):
    _refused(_write(tmp_path / "x.safetensors", b"{not json"), "not JSON")
    _refused(_write(tmp_path / "y.safetensors", b"[1, 2]"), "not a JSON object")
    _refused(_write(tmp_path / "z.safetensors", b"\xff\xfe{}"), "not JSON")


def test_a_header_length_past_the_end_of_the_file_is_refused(tmp_path):
    _refused(_write(tmp_path / "x.safetensors", {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}},
                    b"\0" * 4, length=10_000), "10000", "truncated")
    _refused(_write(tmp_path / "huge.safetensors", b"{}", length=2**63), "truncated")


def test_offsets_outside_the_data_are_refused(tmp_path):
    header = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
    _refused(_write(tmp_path / "x.safetensors", header, b"\0" * 4), "'a'", "outside", "truncated")
    header = {"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}
    _refused(_write(tmp_path / "y.safetensors", header, b"\0" * 4), "outside")
    header = {"a": {"dtype": "F32", "shape": [1], "data_offsets": [-4, 0]}}
    _refused(_write(tmp_path / "z.safetensors", header, b"\0" * 4), "outside")


def test_offsets_that_do_not_match_the_shape_are_refused(tmp_path):
    header = {"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}
    _refused(_write(tmp_path / "x.safetensors", header, b"\0" * 8), "'a'", "8 bytes do not hold shape [3]")
    # A shape whose element count wraps around int64 must not pass as 0 elements.
    header = {"a": {"dtype": "F32", "shape": [2**32, 2**32], "data_offsets": [0, 0]}}
    _refused(_write(tmp_path / "wrap.safetensors", header), "do not hold shape")


def test_gaps_and_overlaps_between_tensors_are_refused(tmp_path):
    # The format's rule: the tensors cover the data exactly (safetensors' validate()).
    overlap = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
               "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}
    _refused(_write(tmp_path / "overlap.safetensors", overlap, b"\0" * 12), "overlapping")
    gap = {"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}
    _refused(_write(tmp_path / "gap.safetensors", gap, b"\0" * 8), "a gap")
    trailing = {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}
    _refused(_write(tmp_path / "trailing.safetensors", trailing, b"\0" * 8), "end at byte 4 of 8")
    for name, header in (("overlap", overlap), ("gap", gap), ("trailing", trailing)):
        with pytest.raises(Exception):       # the reference reader refuses them too
            load_file(str(tmp_path / f"{name}.safetensors"))


@pytest.mark.parametrize("entry, words", [
    ({"dtype": "F8_E4M3", "shape": [1], "data_offsets": [0, 1]}, ("'F8_E4M3' is not one of",)),
    ({"dtype": "Q4", "shape": [1], "data_offsets": [0, 1]}, ("'Q4'",)),
    ({"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}, ("shape [-1]",)),
    ({"dtype": "F32", "shape": "4", "data_offsets": [0, 4]}, ("shape '4'",)),
    ({"dtype": "F32", "shape": [1], "data_offsets": [0]}, ("data_offsets [0]",)),
    ({"dtype": "F32", "shape": [1], "data_offsets": [0, True]}, ("data_offsets",)),
    ("F32", ("not an object",)),
], ids=["f8", "unknown-dtype", "negative-dim", "shape-string", "one-offset", "bool-offset", "not-object"])
def test_malformed_tensor_entries_are_refused(tmp_path, entry, words):
    _refused(_write(tmp_path / "x.safetensors", {"t": entry}, b"\0" * 4), "'t'", *words)


def test_malformed_metadata_is_refused(tmp_path):
    header = {"__metadata__": {"k": 1}, "a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}
    _refused(_write(tmp_path / "x.safetensors", header, b"\0"), "__metadata__")


def test_pickles_and_torch_zips_are_refused_before_anything_is_unpickled(tmp_path):
    class Boom:
        def __reduce__(self):
            return (pytest.fail, ("unpickled",))

    raw = tmp_path / "raw.bin"
    raw.write_bytes(pickle.dumps({"w": Boom()}, protocol=2))
    _refused(raw, "pickle", "convert it to .safetensors")
    zipped = tmp_path / "model.pt"
    with zipfile.ZipFile(zipped, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps(Boom()))
    _refused(zipped, "pickle")


def test_empty_short_and_missing_files(tmp_path):
    (tmp_path / "empty.safetensors").write_bytes(b"")
    _refused(tmp_path / "empty.safetensors", "0 bytes")
    (tmp_path / "short.safetensors").write_bytes(b"\x02\0\0")
    _refused(tmp_path / "short.safetensors", "3 bytes")
    with pytest.raises(MissingFile, match="does not exist"):
        safetensors_file.read(tmp_path / "nope.safetensors", "LoRA")
    with pytest.raises(MissingFile, match="is not a file"):
        safetensors_file.read(tmp_path, "LoRA")


def test_a_truncated_file_is_refused(tmp_path):
    path = tmp_path / "x.safetensors"
    save_file({"a": np.ones((4, 4), np.float32), "b": np.ones(3, np.float16)}, str(path))
    whole = path.read_bytes()
    for cut in (len(whole) - 1, len(whole) - 30, 20, 9):
        path.write_bytes(whole[:cut])
        _refused(path)
