"""Stopping a long command cleanly: Ctrl-C (SIGINT) or SIGTERM ends ``run``, ``scale`` and
``resolution`` with one line saying what was kept and how to go on, never a traceback.

The signal raises a ``KeyboardInterrupt`` wherever the command is (SIGTERM too, inside
``interrupts``); the code that knows what it wrote catches it on the way up and raises
it again with that said (``keeping``), and ``attnbench.cli.main`` prints the line and exits
with 128 + the signal's number: 130 for Ctrl-C, 143 for SIGTERM.
"""

from __future__ import annotations

import _thread
import contextlib
import shlex
import signal
import sys
import threading
from collections.abc import Iterator, Mapping, Sequence


class Interrupted(KeyboardInterrupt):
    """A command stopped by a signal; ``kept`` says what it kept and how to go on (one line).

    A ``KeyboardInterrupt``, so that no ``except Exception`` on the way up takes it for a failure.
    """

    def __init__(self, signum: int = signal.SIGINT, kept: str = "") -> None:
        super().__init__(kept)
        self.signum, self.kept = signum, kept

    @property
    def exit_status(self) -> int:
        return 128 + self.signum

    @property
    def cause(self) -> str:
        return "Ctrl-C" if self.signum == signal.SIGINT else signal.Signals(self.signum).name


def keeping(exc: KeyboardInterrupt, kept: str) -> Interrupted:
    """``exc`` (Ctrl-C, or an ``Interrupted``) again, now saying what was kept:
    ``raise keeping(exc, "kept …; resume with: …") from None``."""
    return Interrupted(getattr(exc, "signum", signal.SIGINT), kept)


@contextlib.contextmanager
def interrupts() -> Iterator[None]:
    """Within the block, Ctrl-C and SIGTERM raise ``Interrupted`` in the main thread; one that
    Python swallows, raised where it prints "Exception ignored" instead (a fork handler, as a data
    loader starts its workers; a ``__del__``), is raised again at the next line that can take it.
    The old handlers after."""

    inside = True

    def interrupt(signum: int, frame: object) -> None:
        raise Interrupted(signum)

    def again(signum: int) -> None:
        if inside:
            _thread.interrupt_main(signum)

    def unraisable(info: sys.UnraisableHookArgs) -> None:
        if isinstance(info.exc_value, KeyboardInterrupt):  # ours, swallowed: again, once out of here
            timer = threading.Timer(0.05, again, args=(getattr(info.exc_value, "signum", signal.SIGINT),))
            timer.daemon = True
            timer.start()
        else:
            previous_hook(info)

    try:
        previous = {s: signal.signal(s, interrupt) for s in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # not the main thread: the signals stay as they were
        yield
        return
    previous_hook, sys.unraisablehook = sys.unraisablehook, unraisable
    try:
        yield
    finally:
        inside = False
        sys.unraisablehook = previous_hook
        for s, handler in previous.items():
            signal.signal(s, handler)


def command_with(argv: Sequence[str], drop: Mapping[str, bool], add: Sequence[str]) -> str:
    """``argv`` as a shell command line without the options in ``drop`` (option -> whether it
    takes a value; ``--opt X`` and ``--opt=X`` alike), with ``add`` at the end."""
    kept: list[str] = []
    skip = False
    for word in argv:
        if skip:
            skip = False
            continue
        name = word.split("=", 1)[0]
        if name in drop:
            skip = drop[name] and "=" not in word
            continue
        kept.append(word)
    return shlex.join([*kept, *add])
