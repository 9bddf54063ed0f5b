"""One validation layer for the command line: every value is checked as it is parsed, before any
work starts, and a bad one is one line naming the option, the value and what is valid (exit 2).

``int_in``, ``float_in`` and the path checks are argparse ``type=`` factories (argparse prints
their refusal as ``attnbench run: error: argument --lr: …``); ``Range`` is the one description
of a valid interval, shared with the mechanism options (``attnbench.mechanism.option``);
``Parser`` is argparse with one-line errors and every range said in ``--help``.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

SEED_MAX = 2**32 - 1  # NumPy's seed range; torch and Python take it too
MAX_THREADS = 1024
MAX_SECONDS = 7 * 86400.0  # a time budget: a week
_NUMBER = re.compile(r"^-\d+$|^-\d*\.\d+$")  # argparse's negative numbers: values, not options


@dataclasses.dataclass(frozen=True)
class Range:
    """Finite numbers from ``lo`` to ``hi``, both ends in by default; either end may be open or absent."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def __contains__(self, value: float) -> bool:
        if isinstance(value, float) and not math.isfinite(value):
            return False
        if self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo):
            return False
        return self.hi is None or (value < self.hi if self.hi_open else value <= self.hi)

    def describe(self, integer: bool) -> str:
        """``an int in [1, 64]``, ``a finite number in (0, 10]``, ``a finite number >= 0``."""
        kind = "an int" if integer else "a finite number"
        if self.lo is not None and self.hi is not None:
            return (f"{kind} in {'(' if self.lo_open else '['}{_text(self.lo)}, "
                    f"{_text(self.hi)}{')' if self.hi_open else ']'}")
        if self.lo is not None:
            return f"{kind} {'>' if self.lo_open else '>='} {_text(self.lo)}"
        if self.hi is not None:
            return f"{kind} {'<' if self.hi_open else '<='} {_text(self.hi)}"
        return kind

    def check(self, value: Any, integer: bool) -> str | None:
        """What is wrong with ``value`` (already converted), or None when it is valid."""
        number = isinstance(value, int) if integer else isinstance(value, (int, float))
        if isinstance(value, bool) or not number or value not in self:
            return f"must be {self.describe(integer)}"
        return None


def _text(x: float) -> str:
    """1, 4294967295, 0.5, 1e-06: exact for ints, short for the rest."""
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e16 else f"{x:g}"


class Number:
    """``type=`` for a number in a range: ``int_in(1, 64)`` or ``float_in(0, 10, lo_open=True)``."""

    def __init__(self, kind: type, valid: Range) -> None:
        self.kind, self.range = kind, valid
        self.__name__ = kind.__name__  # how argparse names the type in its own messages

    def __call__(self, text: str) -> int | float:
        try:
            value = self.kind(text.strip())
        except (ValueError, OverflowError):
            value = None
        if value is None or self.range.check(value, self.kind is int):
            raise argparse.ArgumentTypeError(f"invalid value {text!r}; valid: {self.describe()}")
        return value

    def describe(self) -> str:
        return self.range.describe(self.kind is int)


def int_in(lo: int, hi: int) -> Number:
    """An int in ``[lo, hi]``."""
    return Number(int, Range(lo, hi))


def float_in(lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False) -> Number:
    """A finite float in ``[lo, hi]``; ``lo_open``/``hi_open`` leave an end out."""
    return Number(float, Range(lo, hi, lo_open, hi_open))


# ---- paths ------------------------------------------------------------------------------------


class PathCheck:
    """``type=`` for a path of one kind; ``describe`` says which, for ``--help``."""

    def __init__(self, check: Callable[[Path], str | None], description: str, hint: str = "") -> None:
        self.check, self.description, self.hint = check, description, hint
        self.__name__ = "path"

    def expecting(self, hint: str) -> PathCheck:
        """The same check, its refusals ending ``; expected HINT`` (a data folder's layout)."""
        return PathCheck(self.check, self.description, hint)

    def __call__(self, text: str) -> Path:
        if not text.strip():
            raise argparse.ArgumentTypeError(f"an empty path; expected {self.description}")
        path = Path(text)
        try:
            path = path.expanduser()
            problem = self.check(path)
        except (OSError, ValueError, RuntimeError) as exc:  # a name too long, a NUL byte, ~nobody
            problem = f"not a usable path ({exc})"
        if problem:
            hint = f"; expected {self.hint}" if self.hint else ""
            raise argparse.ArgumentTypeError(f"{text}: {problem}{hint}")
        return path

    def describe(self) -> str:
        return self.description


def _writable_folder(path: Path) -> str | None:
    """Why files cannot be made at ``path`` (a folder, made if missing), or None when they can."""
    existing = path
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is a file, not a folder"
    try:  # the honest test, whoever runs it (root ignores permission bits, not read-only mounts)
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        return f"cannot write in {existing} ({exc.strerror or exc})"
    return None


def _existing_dir(path: Path) -> str | None:
    if not path.exists():
        return "no such folder"
    return None if path.is_dir() else "is a file; expected a folder"


def _existing_file(path: Path) -> str | None:
    if not path.exists():
        return "no such file"
    return None if path.is_file() else "is a folder; expected a file"


def _existing_path(path: Path) -> str | None:
    return None if path.exists() else "no such file or folder"


def _output_dir(path: Path) -> str | None:
    if path.exists() and not path.is_dir():
        return "is a file; expected a folder (made if missing)"
    return _writable_folder(path)


def _output_file(path: Path) -> str | None:
    if path.is_dir():
        return "is a folder; expected a file"
    if path.exists() and not os.access(path, os.W_OK):
        return "is not writable"
    return _writable_folder(path.parent)


existing_dir = PathCheck(_existing_dir, "an existing folder")
existing_file = PathCheck(_existing_file, "an existing file")
existing_path = PathCheck(_existing_path, "an existing file or folder")
output_dir = PathCheck(_output_dir, "a writable folder, made if missing")
output_file = PathCheck(_output_file, "a writable file")


def nonempty(text: str) -> str:
    """``type=`` for text that must say something: an empty value is refused, never read as the default."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty value; give one, or leave the option out for its default")
    return text


def one_of(names: Callable[[], Sequence[str]], what: str) -> Callable[[str], str]:
    """``type=`` for a registered name (looked up when parsed): ``unknown task 'X'; valid choices: …``."""

    def check(text: str) -> str:
        valid = list(names())
        if text not in valid:
            raise argparse.ArgumentTypeError(f"unknown {what} {text!r}; valid choices: {', '.join(valid)}")
        return text

    check.__name__ = what
    return check


class Once(argparse.Action):
    """An option that may be repeated only with the same value (``--task a --task b`` is refused)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        old = getattr(namespace, self.dest, None)
        if old is not None and old != self.default and old != values:
            parser.error(f"argument {option_string}: given twice ({old!r}, then {values!r}); give it once")
        setattr(namespace, self.dest, values)


# ---- the parser -------------------------------------------------------------------------------


class RangeHelpFormatter(argparse.HelpFormatter):
    """Adds each option's valid values, from its ``type=``, to its help: ``… (valid: an int in [1, 64])``."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help
        describe = getattr(action.type, "describe", None)
        if text and text != argparse.SUPPRESS and describe is not None:
            text = f"{text} (valid: {describe()})"
        return text


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``attnbench run: error: …``, exit 2; ``--help`` has the
    usage) and the valid range of every option in its help. Subcommands get the same class."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", RangeHelpFormatter)
        super().__init__(*args, **kwargs)

    def parse_known_args(self, args: Sequence[str] | None = None,
                         namespace: argparse.Namespace | None = None) -> tuple[argparse.Namespace, list[str]]:
        self._words = list(sys.argv[1:] if args is None else args)  # for ``error``: what it was given
        return super().parse_known_args(args, namespace)

    def unknown_options(self) -> list[str]:
        """The words given to this parser that look like options it does not have (``--bogus``),
        before any ``--`` and its first positional (a subcommand's words are its own)."""
        unknown = []
        for word in getattr(self, "_words", []):
            if word == "--" or not word.startswith("-"):
                if word == "--" or self._subparsers is not None:
                    break
                continue
            name = word.split("=", 1)[0]
            if len(word) > 1 and not _NUMBER.match(word) and not any(
                    flag.startswith(name) for flag in self._option_string_actions):
                unknown.append(word)
        return unknown

    def error(self, message: str) -> None:  # type: ignore[override]
        message = " ".join(message.split())  # argparse's own messages may wrap
        unknown = self.unknown_options() if message.startswith("the following arguments are required") else []
        if unknown:  # argparse checks what is missing before what is unknown: the mistake is the latter
            message = f"unrecognized arguments: {' '.join(unknown)}; {message}"
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")
