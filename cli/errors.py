"""Which exceptions are the user's to fix, and how they read on one line.

A user error is sdrt's own (`SdrtError`: a bad value, a missing or damaged file, a
backend that cannot run here) or the operating system's (`OSError`: a full disk, a
permission, a file that vanished). Anything else is a bug in sdrt, and cli/main.py
shows its traceback instead of blaming the user.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
from pathlib import Path
from typing import Iterator

from sdrt.engines.errors import SdrtError
from sdrt.engines.files import TEMP_PREFIX

# The Rust-backed writers (tokenizers, safetensors) raise their own exception types
# for I/O failures, with the OS error only in the message: "... (os error 28)".
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)\s*$")
_DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


def user_error(error: BaseException) -> Exception | None:
    """`error` as the user should see it, or None when it is a bug in sdrt."""
    if isinstance(error, (SdrtError, OSError)):
        return error
    if isinstance(error, Exception):
        found = _RUST_OS_ERROR.search(str(error))
        if found and int(found.group(1)) in errno.errorcode:
            code = int(found.group(1))
            return OSError(code, os.strerror(code))
    return None


def message(error: Exception) -> str:
    """sdrt's own messages as they are; an OSError as `PATH: what happened`, naming the
    folder rather than the temporary file an atomic write was filling, and saying what
    to do about a full disk."""
    if isinstance(error, SdrtError) or not isinstance(error, OSError) or not error.strerror:
        return str(error) or type(error).__name__
    text = error.strerror
    name = error.filename2 if error.filename2 is not None else error.filename
    if name is not None:
        path = os.fsdecode(name) if isinstance(name, (str, bytes, os.PathLike)) else str(name)
        if os.path.basename(path).startswith(TEMP_PREFIX):
            path = os.path.dirname(path) or "."
        text = f"{path}: {text}"
    if error.errno in _DISK_FULL:
        text += "; free some space and run the command again"
    return text


@contextlib.contextmanager
def writing_into(path: Path) -> Iterator[None]:
    """Name `path` in an OS error that names no file. A full disk met by torch, onnx,
    Pillow or safetensors while they write says only "No space left on device"; the
    user also needs to know where."""
    try:
        yield
    except Exception as e:
        if isinstance(e, SdrtError):
            raise
        os_error = user_error(e)
        if isinstance(os_error, OSError) and os_error.errno and os_error.filename is None:
            raise OSError(os_error.errno, os_error.strerror or os.strerror(os_error.errno), str(path)) from e
        raise
