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
- Ctrl-C at any moment, start-up included (importing onnxruntime or torch, loading
  engines): one line `sdrt CMD: interrupted`, exit code 130. This module imports only
  the standard library before that guard is in place, and the parser is built
  inside it. Files are written atomically (engines/files.py), so nothing
  half-written is left under a final name.
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
    "tiny-lora": "sdrt.cli.tiny_lora",
    "export": "sdrt.cli.export",
    "build": "sdrt.cli.build",
    "bench": "sdrt.cli.bench",
    "serve": "sdrt.cli.serve",
    "worker": "sdrt.cli.worker",
}
EXIT_USER_ERROR = 2
EXIT_INTERNAL_ERROR = 1
EXIT_INTERRUPTED = 130   # 128 + SIGINT, what a shell reports for a program Ctrl-C stopped


def build_parser():   # -> argparse.ArgumentParser, imported lazily (see the module docstring)
    import importlib

    from .parser import CommandParser, OneLineParser

    parser = OneLineParser(
        prog="sdrt",
        description="Stable Diffusion inference runtime: export a diffusers checkpoint to "
                    "static-shape ONNX, build TensorRT engines, and generate images with a "
                    "lean NumPy runtime (no torch at run time).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=CommandParser)
    for module in COMMANDS.values():
        importlib.import_module(module).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command line (default: this process's); return the exit code.

    Called with no argv, main is the program itself and also guards its last moments:
    after it returns, a further Ctrl-C ends the process at once (exit status 130 in
    the shell) instead of printing a traceback from the interpreter's shutdown.
    """
    words = sys.argv[1:] if argv is None else list(argv)
    prog = f"sdrt {words[0]}" if words and words[0] in COMMANDS else "sdrt"
    try:
        try:
            return _run(words)
        except Exception as e:   # noqa: BLE001 - sorted into user errors and bugs by _report
            if _caused_by_interrupt(e):
                raise KeyboardInterrupt from e
            return _report(prog, e)
    except KeyboardInterrupt:
        if argv is None:
            _default_sigint()
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        if argv is None:
            _default_sigint()


def _run(words: list[str]) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(words)
    except SystemExit as e:   # --help, or a usage error already reported in one line
        return e.code if isinstance(e.code, int) else EXIT_USER_ERROR
    if not getattr(args, "handler", None):
        parser.print_help()
        return EXIT_USER_ERROR
    return int(args.handler(args) or 0)


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


def _caused_by_interrupt(error: BaseException) -> bool:
    """Whether a Ctrl-C is behind `error`. Libraries turn one that lands while they
    import into their own errors: pybind11 modules (onnxruntime) raise ImportError
    "initialization failed", diffusers' lazy modules wrap that in a RuntimeError."""
    pending, seen = [error], set()
    while pending:
        e = pending.pop()
        if isinstance(e, KeyboardInterrupt):
            return True
        if e is not None and id(e) not in seen:
            seen.add(id(e))
            pending += [e.__cause__, e.__context__]
    return False


def _default_sigint() -> None:
    """Let a further Ctrl-C end the process at once (exit status 130), the way a
    program without Python's KeyboardInterrupt behaves. An inherited "ignore SIGINT"
    (nohup, a background job) is left alone."""
    import signal
    import threading

    if (threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGINT) is signal.default_int_handler):
        signal.signal(signal.SIGINT, signal.SIG_DFL)


if __name__ == "__main__":
    sys.exit(main())
