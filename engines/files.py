"""Atomic file writes and content hashes.

Every file sdrt writes goes to a temporary name in the destination folder and is
renamed into place (rename is atomic on POSIX and Windows within one volume), so an
interrupted export or build never leaves a half-written file under its final name.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

TEMP_PREFIX = ".sdrt-tmp-"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` if the block succeeds.

    The caller writes the file (or lets a library write it) at the yielded path. On
    an exception the temporary file is removed and `path` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=path.suffix, dir=path.parent)
    # mkstemp creates 0600; give the file the mode an ordinary open() would, so an
    # artifact folder can be shared with the user a service runs as.
    os.fchmod(fd, 0o666 & ~_UMASK)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        _fsync(tmp_path)
        os.replace(tmp_path, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()


@contextlib.contextmanager
def temp_folder(parent: str | os.PathLike[str], prefix: str = TEMP_PREFIX) -> Iterator[Path]:
    """A new temporary folder inside `parent` (created if needed), removed with whatever
    is left in it when the block ends. Callers build a stage, a cache entry or a whole
    checkpoint in it and rename the finished result into place, so an interrupted write
    leaves only a temporary name (`remove_temp_files`, export's leftover check)."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    try:
        # mkdtemp makes it 0700; a renamed-into-place folder must be as readable as
        # one made by mkdir (shared artifact folders, checkpoints, caches).
        tmp.chmod(0o777 & ~_UMASK)
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def fsync_tree(folder: Path) -> None:
    """Flush every file under `folder` before it is renamed into place."""
    for path in sorted(folder.rglob("*")):
        if path.is_file() and not path.is_symlink():
            _fsync(path)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes | memoryview) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json_object(path: str | os.PathLike[str], error: type[Exception], what: str) -> dict[str, Any]:
    """Read a JSON file that must hold an object; any fault is `error` naming the file.

    RecursionError is caught too: a hostile file nested 100,000 deep makes the JSON
    parser raise it rather than JSONDecodeError.
    """
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise error(f"{path}: unreadable {what} ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict):
        raise error(f"{path}: malformed {what} (not a JSON object but {type(data).__name__})")
    return data


def remove_temp_files(folder: str | os.PathLike[str]) -> list[Path]:
    """Delete temporaries left by an interrupted write in `folder` (not recursive)."""
    removed = []
    folder = Path(folder)
    if folder.is_dir():
        for p in folder.glob(TEMP_PREFIX + "*"):
            with contextlib.suppress(OSError):
                p.unlink()
                removed.append(p)
    return removed


def sha256_file(path: str | os.PathLike[str]) -> str:
    # hashlib.file_digest is 3.11+; JetPack 6 ships Python 3.10.
    digest = hashlib.sha256()
    buf = bytearray(1 << 22)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            digest.update(view[:n])
    return digest.hexdigest()


def _read_umask() -> int:
    # Read once at import: os.umask can only be read by setting it, which is not
    # safe while other threads create files.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def _fsync(path: Path) -> None:
    # Flush the data before the rename, so a power cut cannot leave the final name
    # pointing at an empty file.
    with open(path, "rb") as f:
        os.fsync(f.fileno())
