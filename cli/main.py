"""The `sdrt` command: a thin dispatcher.

Each command lives in its own module of this package and registers itself through
a `register(subparsers)` function; argparse stops in those modules, which turn their
arguments into the library's configs and calls. Modules that need torch or a backend
(export, build, generate's pipeline) import it inside their handlers, so `sdrt --help`
and `sdrt generate` never load torch.

What a user sees when a command does not finish:
- their mistake or their machine's (cli/errors.py: sdrt's own errors and OS errors,
  a full disk among them): one line `sdrt CMD: error: ...` on stderr and exit code 2
  (SDRT_TRACEBACK=1 adds the traceback);
- a bug in sdrt (any other exception): the traceback and an `internal error` line,
  exit code 1;
- Ctrl-C while the command runs: one line `sdrt CMD: interrupted`, exit code 130.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

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
EXIT_USER_ERROR = 2
EXIT_INTERNAL_ERROR = 1
EXIT_INTERRUPTED = 130   # 128 + SIGINT, what a shell reports for a program Ctrl-C stopped


def build_parser():   # -> argparse.ArgumentParser, imported lazily (see the module docstring)
    import importlib

    from .parser import OneLineParser

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
    """Run one command line (default: this process's); return the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:   # --help, or a usage error already reported in one line
        return e.code if isinstance(e.code, int) else EXIT_USER_ERROR
    if not getattr(args, "handler", None):
        parser.print_help()
        return EXIT_USER_ERROR
    prog = f"sdrt {args.command}"
    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:   # noqa: BLE001 - sorted into user errors and bugs by _report
        return _report(prog, e)


def _report(prog: str, error: Exception) -> int:
    """One line for a user error (exit 2); the traceback and an internal-error line for a bug (exit 1)."""
    import traceback

    from .errors import message, user_error
    from .parser import one_line

    shown = user_error(error)
    if shown is not None:
        if os.environ.get("SDRT_TRACEBACK"):
            traceback.print_exception(error)
        print(one_line(f"{prog}: error: {message(shown)}"), file=sys.stderr)
        return EXIT_USER_ERROR
    traceback.print_exception(error)
    print(one_line(f"{prog}: internal error: {type(error).__name__}: {error} (a bug in sdrt, not a problem "
                   f"with what you asked for; please report it with the traceback above)"), file=sys.stderr)
    return EXIT_INTERNAL_ERROR


if __name__ == "__main__":
    sys.exit(main())
