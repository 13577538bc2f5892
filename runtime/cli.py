"""The `sdrt` command line: a thin dispatcher.

Each subcommand lives in the module that owns its work and registers itself through
a `register(subparsers)` function; argparse stops at those modules, which turn their
arguments into frozen configs and call the library. Modules that need torch
(export, build) import it inside their handlers, so `sdrt generate` never loads it.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import NoReturn, Sequence

from sdrt.engines.errors import SdrtError

# (module, what it adds), in the order `sdrt --help` lists them.
COMMAND_MODULES = (
    "sdrt.runtime.commands",      # demo, generate, info
    "sdrt.export.commands",       # tiny-model, export
    "sdrt.export.build_commands", # build
    "sdrt.runtime.bench",         # bench
)

# Errors that mean "the user asked for something wrong": one line, exit code 2.
USER_ERRORS = (SdrtError, ValueError, TypeError, FileNotFoundError, FileExistsError,
               NotADirectoryError, IsADirectoryError, PermissionError)


class _OneLineParser(argparse.ArgumentParser):
    """argparse prints the whole usage block before a usage error; sdrt prints one
    line naming the bad value (like every other user error), with a pointer to --help.
    Subparsers inherit the class, so every subcommand behaves the same."""

    def error(self, message: str) -> "NoReturn":
        print(one_line(f"{self.prog}: error: {message} (see {self.prog} --help)"), file=sys.stderr)
        raise SystemExit(2)


def one_line(message: str) -> str:
    """The message with line breaks and other control characters escaped, so a value
    holding "\n" (or U+0085, U+2028, a lone surrogate) cannot split or garble the line."""
    if message.isprintable():
        return message
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in message)


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(
        prog="sdrt",
        description="Stable Diffusion inference runtime: export a diffusers checkpoint to "
                    "static-shape ONNX, build TensorRT engines, and generate images with a "
                    "lean NumPy runtime (no torch at run time).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:
                raise
            continue  # that part of sdrt is not in this build
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:   # --help, or a usage error already reported in one line
        return e.code if isinstance(e.code, int) else 2
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    try:
        return int(args.handler(args) or 0)
    except USER_ERRORS as e:
        print(one_line(f"sdrt {args.command}: error: {e}"), file=sys.stderr)
        if os.environ.get("SDRT_TRACEBACK"):
            raise
        return 2
    except KeyboardInterrupt:
        print(f"sdrt {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
