"""argparse as sdrt's commands use it: every usage error is one line naming the
command, and text from files or arguments is printed on one line."""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn, Sequence


class OneLineParser(argparse.ArgumentParser):
    """argparse prints the whole usage block before a usage error; sdrt prints one
    line naming the bad value (like every other user error), with a pointer to --help."""

    def error(self, message: str) -> NoReturn:
        print(one_line(f"{self.prog}: error: {message} (see {self.prog} --help)"), file=sys.stderr)
        raise SystemExit(2)


class CommandParser(OneLineParser):
    """The parser of one command (`sdrt generate`). It refuses unknown options itself:
    argparse hands them up to the top-level parser, whose error would read
    `sdrt: error: unrecognized arguments` without naming the command or its --help."""

    def parse_known_args(self, args: Sequence[str] | None = None,
                         namespace: argparse.Namespace | None = None) -> tuple[argparse.Namespace, list[str]]:
        parsed, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return parsed, extras


def one_line(message: str) -> str:
    """The message with line breaks and other control characters escaped, so a value
    holding "\\n" (or U+0085, U+2028, a lone surrogate) cannot split or garble the line."""
    if message.isprintable():
        return message
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in message)
