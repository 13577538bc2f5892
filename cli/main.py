"""The `sdrt` command: a thin dispatcher.

Each command lives in its own module of this package and registers itself through
a `register(subparsers)` function; argparse stops in those modules, which turn their
arguments into the library's configs and calls. Modules that need torch or a backend
(export, build, generate's pipeline) import it inside their handlers, so `sdrt --help`
and `sdrt generate` never load torch.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Sequence

from sdrt.engines.errors import SdrtError

from .parser import OneLineParser, one_line

# Command -> the module that registers it, in the order `sdrt --help` lists them.
COMMANDS = {
    "generate": "sdrt.cli.generate",
    "info": "sdrt.cli.info",
    "demo": "sdrt.cli.demo",
    "tiny-model": "sdrt.cli.tiny_model",
    "export": "sdrt.cli.export",
    "build": "sdrt.cli.build",
    "bench": "sdrt.cli.bench",
}

# Errors that mean "the user asked for something wrong": one line, exit code 2.
USER_ERRORS = (SdrtError, ValueError, TypeError, FileNotFoundError, FileExistsError,
               NotADirectoryError, IsADirectoryError, PermissionError)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="sdrt",
        description="Stable Diffusion inference runtime: export a diffusers checkpoint to "
                    "static-shape ONNX, build TensorRT engines, and generate images with a "
                    "lean NumPy runtime (no torch at run time).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMANDS.values():
        importlib.import_module(module).register(sub)
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
