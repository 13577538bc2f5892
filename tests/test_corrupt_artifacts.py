"""Corrupt or mismatched artifact folders are refused on load, naming the file and
what is wrong: by `Pipeline.load`, and by `sdrt generate` as one line with exit 2
(no PNG written).

Every case works on a copy of the session's exported SD 1.5 folder. The copy is
loaded once first, so the manifest's stamps are fresh: in-place damage must then be
caught although a stamp exists (a write changes the file's ctime, which voids it).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Callable

import pytest

from sdrt.engines.errors import ArtifactError, InvalidInput, MissingFile
from sdrt.engines.manifest import MANIFEST_NAME, STAMPS_NAME, load_manifest
from sdrt.engines.specs import Stage
from sdrt.cli.main import main
from sdrt.runtime.pipeline import Pipeline


@pytest.fixture
def folder(sd15_artifacts, tmp_path) -> Path:
    copy = tmp_path / "artifacts"
    shutil.copytree(sd15_artifacts, copy, ignore=shutil.ignore_patterns(".sdrt-cache"))
    load_manifest(copy)             # hash once: stamps now vouch for every file
    assert json.loads((copy / STAMPS_NAME).read_text())
    return copy


def _error_lines(stderr: str) -> list[str]:
    """stderr without the progress lines ("[   0.0 s] loading ..."): what is left must
    be the one-line error."""
    return [line for line in stderr.splitlines() if not re.match(r"\[\s*[\d.]+ ?s\] ", line)]


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    with open(path, "r+b") as f:
        f.truncate(int(len(data) * keep))


def _flip_byte(path: Path, at: float = 0.5) -> None:
    """Flip one byte in place (same size, same inode), as bit rot or a bad copy would."""
    size = path.stat().st_size
    pos = int(size * at)
    with open(path, "r+b") as f:
        f.seek(pos)
        b = f.read(1)
        f.seek(pos)
        f.write(bytes([b[0] ^ 0xFF]))


def _edit_manifest(folder: Path, edit: Callable[[dict], None]) -> None:
    path = folder / MANIFEST_NAME
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _set_hash(name: str):
    def edit(m: dict) -> None:
        h = m["files"][name]["sha256"]
        m["files"][name]["sha256"] = ("0" if h[0] != "0" else "1") + h[1:]
    return edit


def _set_unet_sample_shape(m: dict) -> None:
    next(s for s in m["stages"] if s["name"] == "unet")["inputs"][0]["shape"][2] += 8


def _set_height_consistently(m: dict) -> None:
    """A manifest that agrees with itself (shape and every stage spec say 2x the
    height) but not with the graphs: only opening the engines can tell."""
    m["shape"]["height"] *= 2
    for stage in m["stages"]:
        for t in stage["inputs"] + stage["outputs"]:
            if t["name"] in ("sample", "latent", "images", "latent_mean", "latent_std"):
                t["shape"][2] *= 2


def _rerecord(folder: Path, rel: str, text: str) -> None:
    """Replace a file and record it in the manifest, as a consistent but hostile folder would."""
    import dataclasses

    from sdrt.engines.manifest import file_record, read_manifest, write_manifest

    (folder / rel).write_text(text)
    manifest = read_manifest(folder)
    write_manifest(folder, dataclasses.replace(manifest, files={**manifest.files, rel: file_record(folder, rel)}))


def _tokenizer_file(folder: Path) -> str:
    return next(n for n in json.loads((folder / MANIFEST_NAME).read_text())["files"] if n.startswith("tokenizer/"))


# (case id, damage, words the message must contain besides the file name, file named)
CASES = [
    ("truncated graph", lambda f: _truncate(f / Stage.TEXT_ENCODER.onnx_file),
     r"size \d+ bytes, manifest says \d+ \(truncated", Stage.TEXT_ENCODER.onnx_file),
    ("truncated U-Net data", lambda f: _truncate(f / Stage.UNET.data_file),
     r"size \d+ bytes, manifest says \d+ \(truncated", Stage.UNET.data_file),
    ("flipped byte in graph", lambda f: _flip_byte(f / Stage.VAE_DECODER.onnx_file),
     "content hash does not match", Stage.VAE_DECODER.onnx_file),
    ("flipped byte in U-Net data", lambda f: _flip_byte(f / Stage.UNET.data_file),
     "content hash does not match", Stage.UNET.data_file),
    ("flipped first byte of U-Net graph", lambda f: _flip_byte(f / Stage.UNET.onnx_file, at=0.0),
     "content hash does not match", Stage.UNET.onnx_file),
    ("manifest hash altered", lambda f: _edit_manifest(f, _set_hash(Stage.UNET.data_file)),
     "content hash does not match", Stage.UNET.data_file),
    ("manifest size altered", lambda f: _edit_manifest(
        f, lambda m: m["files"][Stage.UNET.onnx_file].update(size=m["files"][Stage.UNET.onnx_file]["size"] + 1)),
     "manifest says", Stage.UNET.onnx_file),
    ("manifest tensor shape altered", lambda f: _edit_manifest(f, _set_unet_sample_shape),
     "unet tensor specs do not match", MANIFEST_NAME),
    ("manifest shapes consistent but not the graphs'", lambda f: _edit_manifest(f, _set_height_consistently),
     "differs from the unet stage spec", Stage.UNET.onnx_file),
    ("missing tokenizer file", lambda f: (f / _tokenizer_file(f)).unlink(),
     r"missing \(listed in manifest.json\)", "tokenizer/"),
    ("missing scheduler config", lambda f: (f / "scheduler" / "scheduler_config.json").unlink(),
     "missing", "scheduler_config.json"),
    ("missing U-Net data", lambda f: (f / Stage.UNET.data_file).unlink(),
     "missing", Stage.UNET.data_file),
    ("manifest not JSON", lambda f: (f / MANIFEST_NAME).write_text('{"format": "sdrt-artifacts", '),
     "unreadable manifest", MANIFEST_NAME),
    ("manifest a JSON list", lambda f: (f / MANIFEST_NAME).write_text("[]"),
     "malformed manifest", MANIFEST_NAME),
    ("manifest lacks model facts", lambda f: _edit_manifest(f, lambda m: m.pop("model")),
     "malformed manifest", MANIFEST_NAME),
    ("manifest of another format version", lambda f: _edit_manifest(f, lambda m: m.update(format_version=99)),
     "format version 99 is not supported", MANIFEST_NAME),
    ("manifest missing", lambda f: (f / MANIFEST_NAME).unlink(),
     "incomplete", "artifacts"),
    ("manifest lists a file outside the folder", lambda f: _edit_manifest(
        f, lambda m: m["files"].update({"../outside.onnx": {"sha256": "0" * 64, "size": 1}})),
     "points outside", "../outside.onnx"),
    ("manifest model fact of zero", lambda f: _edit_manifest(f, lambda m: m["model"].update(vae_scale_factor=0)),
     "vae_scale_factor must be a positive integer, got 0", MANIFEST_NAME),
    ("manifest scaling factor NaN", lambda f: _edit_manifest(
        f, lambda m: m["model"].update(vae_scaling_factor=float("nan"))),
     "vae_scaling_factor must be a positive finite number, got nan", MANIFEST_NAME),
    ("manifest prediction type unknown", lambda f: _edit_manifest(
        f, lambda m: m["model"].update(prediction_type="sample")),
     "prediction_type must be epsilon or v_prediction, got 'sample'", MANIFEST_NAME),
    ("manifest nested 100000 deep", lambda f: (f / MANIFEST_NAME).write_text("[" * 100_000 + "]" * 100_000),
     "unreadable manifest", MANIFEST_NAME),
    ("scheduler config nested 100000 deep (manifest re-recorded)",
     lambda f: _rerecord(f, "scheduler/scheduler_config.json", "[" * 100_000 + "]" * 100_000),
     "unreadable scheduler config", "scheduler_config.json"),
    ("scheduler config not JSON (manifest re-recorded)",
     lambda f: _rerecord(f, "scheduler/scheduler_config.json", "{'python': 'dict'}"),
     "unreadable scheduler config", "scheduler_config.json"),
    ("manifest path with a NUL byte", lambda f: _edit_manifest(
        f, lambda m: m["files"].update({"a\u0000b": {"sha256": "0" * 64, "size": 1}})),
     "", MANIFEST_NAME),
]


@pytest.mark.parametrize("name,damage,words,named", CASES, ids=[c[0] for c in CASES])
def test_damaged_folder_is_refused_naming_file_and_fault(folder, name, damage, words, named, tmp_path, capsys):
    damage(folder)
    with pytest.raises((ArtifactError, MissingFile)) as e:
        Pipeline.load(folder)
    message = str(e.value)
    assert named in message, message
    assert re.search(words, message), message

    out = tmp_path / "image.png"
    capsys.readouterr()
    assert main(["generate", str(folder), "--prompt", "a fox", "--steps", "2", "--out", str(out)]) == 2
    err = _error_lines(capsys.readouterr().err)
    assert len(err) == 1 and err[0].startswith("sdrt generate: error:") and named in err[0], err
    assert not out.exists()


def test_damage_is_caught_again_on_every_load_not_only_the_first(folder):
    """Refusing must not 'heal' the folder: the stamps are not updated for a bad file."""
    _flip_byte(folder / Stage.UNET.data_file)
    for _ in range(2):
        with pytest.raises(ArtifactError, match="content hash does not match"):
            load_manifest(folder)


def test_info_check_reports_the_corrupt_file(folder, capsys):
    _flip_byte(folder / Stage.UNET.data_file, at=0.9)
    assert main(["info", str(folder), "--check"]) == 2
    err = _error_lines(capsys.readouterr().err)
    assert len(err) == 1 and Stage.UNET.data_file in err[0] and "content hash does not match" in err[0]


def test_stamps_copied_with_a_folder_do_not_vouch_for_the_copy(folder, tmp_path):
    """A copy has new inodes, so the copied stamps do not match and the copy is
    re-hashed: a byte flipped in the copy is found although the stamps file came along."""
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    _flip_byte(copy / Stage.UNET.data_file, at=0.25)
    with pytest.raises(ArtifactError, match="content hash does not match"):
        load_manifest(copy)


def test_undamaged_copy_loads(folder):
    """The control for every case above: the same copy, undamaged, loads."""
    with Pipeline.load(folder) as pipe:
        assert pipe.height == load_manifest(folder).shape.height


def test_flipped_byte_in_the_ort_cache_is_caught_and_the_entry_rebuilt(folder):
    """ORT's optimized graphs in .sdrt-cache are loaded instead of the checked files,
    so they are checked the same way: a damaged entry is rebuilt, never used."""
    import numpy as np

    from sdrt.engines.onnxruntime import CACHE_DIR

    with Pipeline.load(folder, cache=False) as plain:
        want = plain("a fox", steps=2, seed=3).pixels
    with Pipeline.load(folder) as first:   # writes the cache
        assert np.array_equal(first("a fox", steps=2, seed=3).pixels, want)
    (data,) = (folder / CACHE_DIR).glob(f"{Stage.UNET.value}-*/{Stage.UNET.onnx_file}.data")
    _flip_byte(data, at=0.5)
    with Pipeline.load(folder) as again:
        assert np.array_equal(again("a fox", steps=2, seed=3).pixels, want)


def test_damaged_stamps_file_only_costs_a_rehash(folder):
    """The stamps are a cache of hash results: garbage there (even nested past the
    recursion limit) means re-hashing, never a refusal and never trust."""
    (folder / STAMPS_NAME).write_text("[" * 100_000 + "]" * 100_000)
    load_manifest(folder)
    _flip_byte(folder / Stage.UNET.data_file)
    (folder / STAMPS_NAME).write_text("{}")
    with pytest.raises(ArtifactError, match="content hash does not match"):
        load_manifest(folder)


@pytest.mark.parametrize("key,value,words", [
    ("num_train_timesteps", 10**6, "num_train_timesteps must be an integer from 2 to 100000, got 1000000"),
    ("num_train_timesteps", "1000", "num_train_timesteps must be an integer"),
    ("beta_start", float("nan"), "beta_start must be a number in (0, 1), got nan"),
    ("beta_end", 2.0, "beta_end must be a number in (0, 1), got 2.0"),
    ("trained_betas", ["a"] * 1000, "trained_betas must be 1000 values in (0, 1)"),
    ("beta_schedule", "cubic", "unknown beta_schedule 'cubic'"),
    ("steps_offset", 10**6, "steps_offset must be an integer in 0..999"),
], ids=["timesteps=1e6", "timesteps=str", "beta_start=nan", "beta_end=2", "trained_betas=str", "schedule",
        "steps_offset"])
def test_hostile_scheduler_config_is_refused_before_any_step(folder, key, value, words):
    """A consistent manifest vouching for a hostile scheduler config: the sampler
    tables refuse it (no gigabyte tables, no NaN blamed on the U-Net later)."""
    config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    _rerecord(folder, "scheduler/scheduler_config.json", json.dumps({**config, key: value}))
    steps = []
    with Pipeline.load(folder, cache=False) as pipe, pytest.raises(InvalidInput) as e:
        pipe("a fox", steps=2, scheduler="ddim", seed=0, on_step=lambda i, n: steps.append(i))
    assert words in str(e.value) and steps == []


def test_info_escapes_control_characters_from_the_manifest(folder, capsys):
    """`sdrt info` prints names and strings a downloaded manifest chose: an ANSI escape
    in them must come out escaped, not act on the terminal."""
    _edit_manifest(folder, lambda m: m.update(source="/models/\x1b[2Jfake\x07"))
    assert main(["info", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out and "/models/\\x1b[2Jfake\\x07" in out
