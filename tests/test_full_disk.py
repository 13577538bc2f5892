"""A full disk is the user's to fix: one line naming where, exit code 2, and nothing
half-written left behind under a final name.

Two ways: in-process, a write made to fail with ENOSPC (runs everywhere); and on a
real, tiny tmpfs (needs root and permission to mount; skipped, saying why, where
mounting is refused), which also catches writers that do not raise OSError
(safetensors, tokenizers) and ONNX Runtime writing its optimized-graph cache.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from sdrt.cli.main import main
from sdrt.engines.files import TEMP_PREFIX
from sdrt.engines.manifest import MANIFEST_NAME

FULL = "No space left on device; free some space and run the command again"


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if not ln.startswith("[")]   # progress lines start with [   1.2s]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# -- in-process: a write fails with ENOSPC ------------------------------------------

def test_generate_on_a_full_disk_names_the_folder_and_leaves_no_png(sd15_artifacts, tmp_path, monkeypatch, capsys):
    from PIL import Image

    def half_then_full(self, fp, *args, **kwargs):
        Path(fp).write_bytes(b"\x89PNG\r\n\x1a\n half")   # a partial file under the temporary name
        _no_space()
    monkeypatch.setattr(Image.Image, "save", half_then_full)
    out = tmp_path / "out" / "fox.png"
    assert main(["generate", str(sd15_artifacts), "--prompt", "a fox", "--steps", "1", "--out", str(out)]) == 2
    assert _one_error_line(capsys.readouterr().err) == f"sdrt generate: error: {out.parent}: {FULL}"
    assert list(out.parent.iterdir()) == []


def test_bench_json_on_a_full_disk_is_one_line(sd15_artifacts, tmp_path, monkeypatch, capsys):
    import sdrt.engines.files as files

    monkeypatch.setattr(files.Path, "write_bytes", _no_space)
    report = tmp_path / "bench.json"
    assert main(["bench", str(sd15_artifacts), "--steps", "1", "--runs", "1", "--warmup", "0",
                 "--json", str(report)]) == 2
    assert _one_error_line(capsys.readouterr().err) == f"sdrt bench: error: {report}: {FULL}"
    assert list(tmp_path.iterdir()) == []


def test_export_on_a_full_disk_is_one_line_and_leaves_an_incomplete_folder(tiny_sd15, tmp_path, monkeypatch, capsys):
    import onnx

    monkeypatch.setattr(onnx, "save_model", _no_space)
    out = tmp_path / "art"
    assert main(["export", str(tiny_sd15), "--out", str(out), "--no-verify"]) == 2
    assert _one_error_line(capsys.readouterr().err) == f"sdrt export: error: {out}: {FULL}"
    assert not (out / MANIFEST_NAME).exists()
    assert not list(out.rglob(TEMP_PREFIX + "*"))


def test_build_on_a_full_disk_is_one_line_and_leaves_no_engine(sd15_artifacts, tmp_path, monkeypatch, capsys):
    """TensorRT and CUDA are stand-ins (as in test_interrupted): only the write path runs."""
    import sdrt.engines.files as files
    from sdrt.engines import cache, cuda, tensorrt
    from sdrt.engines import build

    folder = tmp_path / "art"
    shutil.copytree(sd15_artifacts, folder, ignore=shutil.ignore_patterns(".sdrt-cache"))
    monkeypatch.setattr(tensorrt, "import_tensorrt", lambda: object())
    monkeypatch.setattr(tensorrt, "current_platform", lambda trt, device: cache.Platform("10.3.0", "Fake GPU", "8.7"))
    monkeypatch.setattr(cuda, "set_device", lambda device: None)
    monkeypatch.setattr(build, "build_plan", lambda trt, onnx_path, config: b"plan")
    monkeypatch.setattr(files.Path, "write_bytes", _no_space)
    assert main(["build", str(folder), "--no-verify"]) == 2
    assert _one_error_line(capsys.readouterr().err) == f"sdrt build: error: {cache.engine_dir(folder)}: {FULL}"
    assert not [p for p in cache.engine_dir(folder).iterdir()]


# -- a real full disk: a tiny tmpfs ---------------------------------------------------

@pytest.fixture
def tmpfs(tmp_path):
    """mount_tmpfs(size_bytes) -> a fresh tmpfs of that size; unmounted afterwards."""
    mounted = []

    def mount(size: int) -> Path:
        where = tmp_path / f"tmpfs{len(mounted)}"
        where.mkdir()
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root and CAP_SYS_ADMIN): {proc.stderr.strip()}")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", str(where)], check=False)


def _fill(folder: Path) -> None:
    """Take every free byte."""
    try:
        with open(folder / "filler", "wb") as f:
            while True:
                f.write(b"\0" * 4096)
                f.flush()
    except OSError as e:
        assert e.errno == errno.ENOSPC
    assert os.statvfs(folder).f_bavail == 0


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def test_tiny_model_on_a_real_full_disk(tmpfs, tmp_path, capsys):
    """Every amount of room runs out in a different writer (plain files, the tokenizers
    library, safetensors); each is one line and no folder is left."""
    for size in (64 << 10, 2 << 20, 8 << 20):
        disk = tmpfs(size)
        assert main(["tiny-model", str(disk / "m")]) == 2, size
        assert _one_error_line(capsys.readouterr().err) == f"sdrt tiny-model: error: {disk / 'm'}: {FULL}"
        assert list(disk.iterdir()) == [], size


def test_export_on_a_real_full_disk(tmpfs, tiny_sd15, capsys):
    for size in (64 << 10, 8 << 20):
        disk = tmpfs(size)
        out = disk / "art"
        assert main(["export", str(tiny_sd15), "--out", str(out), "--no-verify"]) == 2, size
        assert _one_error_line(capsys.readouterr().err) == f"sdrt export: error: {out}: {FULL}"
        assert not (out / MANIFEST_NAME).exists() and not list(disk.rglob(TEMP_PREFIX + "*"))


def test_generate_into_a_real_full_disk(tmpfs, sd15_artifacts, capsys):
    disk = tmpfs(64 << 10)
    _fill(disk)
    out = disk / "fox.png"
    assert main(["generate", str(sd15_artifacts), "--prompt", "a fox", "--steps", "1", "--out", str(out)]) == 2
    assert _one_error_line(capsys.readouterr().err) == f"sdrt generate: error: {disk}: {FULL}"
    assert [p.name for p in disk.iterdir() if p.name != "filler"] == []


def test_generate_from_an_artifact_folder_on_a_full_disk_runs_without_the_graph_cache(tmpfs, sd15_artifacts, tmp_path,
                                                                                      capsys):
    """ONNX Runtime's failed write of the optimized graph is not a broken artifact: the
    cache is an optimization, so generation goes on without it."""
    from sdrt.engines.onnxruntime import CACHE_DIR

    src = tmp_path / "copy"
    shutil.copytree(sd15_artifacts, src, ignore=shutil.ignore_patterns(".sdrt-cache"))
    disk = tmpfs(_size(src) + (2 << 20))   # room for the copy, rounded up to pages
    folder = disk / "art"
    shutil.copytree(src, folder)
    _fill(disk)
    out = tmp_path / "fox.png"
    assert main(["generate", str(folder), "--prompt", "a fox", "--steps", "1", "--out", str(out)]) == 0, \
        capsys.readouterr().err
    assert out.is_file()
    assert not [p for p in (folder / CACHE_DIR).rglob("*") if p.is_file()]
