"""Typed backend options: the field helper every backend's `Options` record uses,
and the value checks they share.

A backend declares its options as a frozen dataclass whose fields carry their help
text (and, where the flag is not `--field-name`, the flag) in `metadata`, so the
registry can refuse another backend's option by name and the CLI can make one flag
per option without knowing any backend.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from .errors import InvalidInput

# Each intra-op thread is an OS thread, made when the engine is: 100,000 of them
# exhaust the machine, and past int32 ONNX Runtime raises a bare TypeError.
MAX_THREADS = 1024


def option(default: Any, help: str, *, type: type = str, flag: str | None = None, metavar: str | None = None,
           choices: Sequence[str] | None = None) -> Any:
    """One option field. `type` is what the CLI parses the flag's value as (bool: a
    switch, `--name` when the default is False, `--no-name` when it is True)."""
    return dataclasses.field(default=default, metadata={
        "help": help, "type": type, "flag": flag, "metavar": metavar,
        "choices": tuple(choices) if choices else None})


def check_threads(threads: Any) -> None:
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise InvalidInput(f"threads must be a positive integer or None, got {threads!r}")
    if threads is not None and threads > MAX_THREADS:
        raise InvalidInput(f"threads {threads} is more than {MAX_THREADS}: use 1 to {MAX_THREADS}, "
                           f"or None for the backend's default")


def check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise InvalidInput(f"{name} must be True or False, got {value!r}")


def check_index(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidInput(f"{name} must be a GPU index (0, 1, ...), got {value!r}")
