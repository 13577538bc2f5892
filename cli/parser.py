"""argparse as sdrt's commands use it: every usage error is one line, and text from
files or arguments is printed on one line."""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn


class OneLineParser(argparse.ArgumentParser):
    """argparse prints the whole usage block before a usage error; sdrt prints one
    line naming the bad value (like every other user error), with a pointer to --help."""

    def error(self, message: str) -> NoReturn:
        print(one_line(f"{self.prog}: error: {message} (see {self.prog} --help)"), file=sys.stderr)
        raise SystemExit(2)


def one_line(message: str) -> str:
    """The message with line breaks and other control characters escaped, so a value
    holding "\\n" (or U+0085, U+2028, a lone surrogate) cannot split or garble the line."""
    if message.isprintable():
        return message
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in message)
