"""The `--backend` flag and every backend's options as flags, made from the registry
(engines/registry.py): one flag per option name (an option two backends share, such
as threads, is one flag), grouped per backend in `--help` with its summary and
whether it can run here. No backend is named in this module."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from sdrt.engines import registry

DEST_PREFIX = "backend_option_"


def add_backend_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", default=registry.DEFAULT, metavar="{" + ",".join(registry.names(auto=True)) + "}",
                   help=f"the engine backend (default {registry.DEFAULT}, the exact path); auto picks "
                        f"{', then '.join(registry.AUTO_ORDER)}: the first that can run here (TensorRT only where "
                        f"`sdrt build` built this artifact's engines) and says which on stderr")
    seen: set[str] = set()
    for name in registry.names():
        group = p.add_argument_group(f"{name} backend", registry.describe(name))
        for f in registry.fields(name):
            if f.name in seen:
                continue
            seen.add(f.name)
            _add_flag(group, f, registry.owners(f.name))


def _add_flag(group: Any, f: dataclasses.Field, owners: list[str]) -> None:
    meta = f.metadata
    text = meta["help"] + (f" [{', '.join(owners)}]" if len(owners) > 1 else "")
    dest = DEST_PREFIX + f.name
    if meta["type"] is bool:
        # None = not given, so only the flags a user typed reach the backend.
        group.add_argument(registry.flag(f), dest=dest, action="store_const", const=not f.default, default=None,
                           help=f"turn off (on by default): {text}" if f.default else text)
    else:
        group.add_argument(registry.flag(f), dest=dest, type=meta["type"], default=None, metavar=meta["metavar"],
                           choices=meta["choices"], help=text)


def given_options(args: argparse.Namespace) -> dict[str, Any]:
    """The backend options the command line gives, by option name."""
    return {k[len(DEST_PREFIX):]: v for k, v in vars(args).items() if k.startswith(DEST_PREFIX) and v is not None}


def backend_request(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    """(backend name or auto, its options), checked before anything loads: a flag of
    another backend is refused naming the backend that takes it."""
    backend = registry.parse(args.backend)
    options = given_options(args)
    registry.check_options(backend, options, flags=True)
    return backend, options
