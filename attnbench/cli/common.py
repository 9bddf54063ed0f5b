"""What the commands share: the usage error, the ``--opt`` and ``--load`` arguments, the device and
memory-limit defaults, a plain table printer, and ``execute``, which loads the ``--load`` plug-ins
before the parser is built (a task they add brings its options), parses a command line and runs
its command (one line and exit 2 for a user's mistake; Ctrl-C, SIGTERM and a closed pipe ended
with one line)."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from attnbench import registry
from attnbench.interrupt import Interrupted, interrupts
from attnbench.registry import LoadError, OptionError, UnknownMechanismError
from attnbench.results.run_record import recorded_loads, resumed_argv
from attnbench.results.tables import ResultsError
from attnbench.sweeps.base import SweepError
from attnbench.task import TaskError, UnknownTaskError, task_names

MAX_MIB = 2.0**30  # a memory limit, MiB: 1 PiB
LOADING = ("list", "run", "models", "scale", "resolution")  # the commands that build a mechanism or task


class UsageError(Exception):
    """A mistake in the command line; printed without a traceback, exit status 2."""


def add_opt_argument(parser: argparse.ArgumentParser, axes: bool = False) -> None:
    swept = "; a comma list, set.m=16,64, runs each value as a variant of its own" if axes else ""
    parser.add_argument("--opt", action="append", default=[], metavar="MECH.OPTION=VALUE",
                        help=f"a mechanism option, e.g. --opt set.m=32 (repeatable){swept}; "
                             "`attnbench list --mechanism NAME` shows a mechanism's options")


def add_load_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--load", action="append", default=[], metavar="MODULE",
                        help="import a module or .py file that registers extra mechanisms or tasks "
                             "(repeatable)")


def requested_task(argv: Sequence[str]) -> str | None:
    """The registered task named by ``run … --task NAME``, so that its own options can be added."""
    if not argv or argv[0] != "run":
        return None
    for i, item in enumerate(argv):
        name = argv[i + 1] if item == "--task" and i + 1 < len(argv) else item.partition("--task=")[2]
        if name:
            return name if name in task_names() else None
    return None


def print_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def pick(text: str, valid: Sequence[str], what: str) -> list[str]:
    """``all`` or a comma list, each checked against ``valid``."""
    if text.strip() == "all":
        return list(valid)
    names = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [n for n in names if n not in valid]
    if unknown or not names:
        raise UsageError(f"unknown {what} {', '.join(map(repr, unknown)) or repr(text)}; "
                         f"valid choices: {', '.join(valid)}, all")
    return names


def _available_mib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def device_of(choice: str) -> str:
    """``auto`` resolved; ``cuda`` refused clearly where there is none."""
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: CUDA is not available on this machine; "
                         "valid choices here: cpu, auto")
    return choice


def memory_limit(given: float | None) -> float | None:
    """--memory-limit in MiB, or 85% of the memory available now."""
    available = _available_mib()
    limit = given if given is not None else (0.85 * available if available else None)
    if limit is not None and limit <= 0:
        raise UsageError(f"--memory-limit must be > 0 MiB, got {limit:g}")
    return limit


Build = Callable[[str | None], argparse.ArgumentParser]  # a parser; a task named adds its options to run
ERRORS = (UsageError, UnknownMechanismError, UnknownTaskError, OptionError, SweepError, TaskError,
          ResultsError)


def _command(argv: Sequence[str] | None, build: Build) -> int:
    """Parse the command line and run its command; a user's mistake is one line and exit 2."""
    given = sys.argv[1:] if argv is None else list(argv)
    loaded: set[str] = set()  # --load: before any parser, as the tasks it adds bring options of their own
    _load_plugins(given[0] if given else "", [*_requested_loads(given), *recorded_loads(given)], loaded)
    words = resumed_argv(given, build)  # run --resume DIR
    parser = build(requested_task(words))
    args = parser.parse_args(words)
    torch.set_printoptions(precision=4)
    try:
        if args.command in LOADING:  # an abbreviated --loa, which the scan above missed; then the paths
            _load_plugins(args.command, args.load, loaded)  # as other processes (and a resume) load them
            args.load = [registry.plugin_spec(spec) for spec in args.load]
        return args.func(args)
    except ERRORS as exc:
        parser.exit(2, f"attnbench {args.command}: error: {exc}\n")


def _requested_loads(words: Sequence[str]) -> list[str]:
    """The modules ``--load`` names in a command line that takes it, read before its parser is built."""
    if not words or words[0] not in LOADING:
        return []
    specs = []
    for i, word in enumerate(words):
        if word == "--":  # the task's own arguments follow (scale --task T -- …)
            break
        if word == "--load" and i + 1 < len(words):
            specs.append(words[i + 1])
        elif word.startswith("--load="):
            specs.append(word.partition("=")[2])
    return specs


def _load_plugins(command: str, specs: Sequence[str], loaded: set[str]) -> None:
    """Import the ``--load`` modules that ``loaded`` does not hold yet (adding them): the tasks they
    register are then choices of ``run --task``, with their own options. One that fails to import
    is one line and exit 2."""
    for spec in specs:
        if registry.plugin_spec(spec) in loaded:
            continue
        try:
            registry.load_module(spec)
        except LoadError as exc:
            print(f"attnbench {command}: error: {exc}", file=sys.stderr)
            raise SystemExit(2) from None
        loaded.add(registry.plugin_spec(spec))


def execute(argv: Sequence[str] | None, build: Build) -> int:
    """The command line ``argv`` parsed by ``build``'s parser and run: the command's exit status.
    Ctrl-C or SIGTERM ends it with one line saying what was kept and how to go on, status 130 or
    143; a reader that goes away ends it quietly, status 141 as for SIGPIPE."""
    words = sys.argv[1:] if argv is None else list(argv)
    try:
        with interrupts():
            try:
                return _command(argv, build)
            finally:
                sys.stdout.flush()  # a reader gone away shows here, not at exit
    except KeyboardInterrupt as exc:
        stopped = exc if isinstance(exc, Interrupted) else Interrupted()
        if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 speaks for all
            command = " ".join(["attnbench", *words[:1]])
            print(f"{command}: interrupted ({stopped.cause})" + (f"; {stopped.kept}" if stopped.kept else ""),
                  file=sys.stderr)
        return stopped.exit_status
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 128 + signal.SIGPIPE
