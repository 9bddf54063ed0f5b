"""The ``attnbench`` command line: list, run, scale, plot.

User errors (unknown names, bad options, malformed ranges) print one clear line and exit 2,
as argparse does for usage errors; no traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import torch

from attnbench import registry
from attnbench.registry import OptionError, UnknownMechanismError
from attnbench.tasks import UnknownTaskError, get_task, task_names


class UsageError(Exception):
    """A mistake in the command line; printed without a traceback, exit status 2."""


def parse_mechanism_options(items: Sequence[str]) -> dict[str, dict[str, str]]:
    """``["set.m=32", "set.eps=0.5"]`` -> ``{"set": {"m": "32", "eps": "0.5"}}``."""
    parsed: dict[str, dict[str, str]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        mech, dot, option = key.partition(".")
        if not sep or not dot or not mech or not option:
            raise UsageError(f"--opt {item!r}: expected MECHANISM.OPTION=VALUE, e.g. set.m=32")
        registry.get_mechanism(mech)
        parsed.setdefault(mech, {})[option] = value
    for mech, values in parsed.items():  # validate now, not deep inside a sweep
        registry.get_mechanism(mech).make_options(**values)
    return parsed


def _add_opt_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--opt", action="append", default=[], metavar="MECH.OPTION=VALUE",
                        help="a mechanism option, e.g. --opt set.m=32 (repeatable); "
                             "`attnbench list --mechanism NAME` shows a mechanism's options")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="attnbench",
        description="Benchmark attention mechanisms: correctness, time, memory and task "
                    "accuracy, SeT (Self-optimal Transport) among them.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("list", help="mechanisms and tasks, with availability on this machine",
                       description="List the registered mechanisms and tasks, whether each can "
                                   "run on this machine, and why not when it cannot.")
    p.add_argument("--mechanism", help="show one mechanism in full (options, FLOP formula)")
    p.add_argument("--device", default="cpu", help="device to check availability on (default: cpu)")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("run", help="train and evaluate one mechanism on one task",
                       description="Train and evaluate a model whose attention is MECHANISM on "
                                   "TASK, and append the result to results/.")
    p.add_argument("--mechanism", required=True, help="registered mechanism name (see `list`)")
    p.add_argument("--task", required=True, help="task name (see `list`)")
    _add_opt_argument(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("scale", help="sweep sequence length: time, memory, FLOPs, fitted scaling",
                       description="Measure every mechanism's time and memory over a range of "
                                   "sequence lengths and fit how they scale.")
    p.add_argument("--seq", default="256..16384",
                   help="a doubling range LO..HI, a list 256,1024 or one value (default 256..16384)")
    p.add_argument("--mechanism", default="all", help="comma list or `all` (default: all available)")
    _add_opt_argument(p)
    p.set_defaults(func=cmd_not_built)

    p = sub.add_parser("plot", help="draw the plots of a results folder",
                       description="Regenerate the comparison plots of a finished run.")
    p.add_argument("run_dir", help="a results folder written by `scale` or `run`")
    p.set_defaults(func=cmd_not_built)
    return parser


def cmd_list(args: argparse.Namespace) -> int:
    if args.mechanism:
        return _show_mechanism(args.mechanism, args.device)
    rows = []
    for name in registry.mechanism_names():
        cls = registry.get_mechanism(name)
        reason = cls.unavailable_reason(args.device)
        rows.append((name, cls.complexity, "2-D" if cls.needs_grid else "any",
                     "yes" if reason is None else "no",
                     cls.backend(args.device) if reason is None else "-",
                     reason or cls.summary))
    for name, why in registry.broken_plugins().items():
        rows.append((name, "?", "?", "no", "-", f"plug-in failed to load: {why}"))
    print(f"Mechanisms (device: {args.device})")
    _print_table(("name", "complexity", "tokens", "available", "backend", "notes"), rows)
    print()
    task_rows = []
    for name in task_names():
        cls = get_task(name)
        reason = cls.unavailable_reason()
        task_rows.append((name, "yes" if reason is None else "no",
                          cls.summary if reason is None else f"{reason}: {cls.summary}"))
    print("Tasks")
    _print_table(("name", "available", "notes"), task_rows)
    return 0


def _show_mechanism(name: str, device: str) -> int:
    import dataclasses

    cls = registry.get_mechanism(name)
    reason = cls.unavailable_reason(device)
    print(f"{cls.name}: {cls.summary}")
    print(f"  complexity:  {cls.complexity}")
    print(f"  tokens:      {'2-D grid required' if cls.needs_grid else 'sequences or 2-D grids'}")
    print(f"  devices:     {', '.join(cls.devices)}")
    print(f"  dtypes:      {', '.join(str(d).removeprefix('torch.') for d in cls.dtypes)}")
    print(f"  FLOPs (fwd): {cls.flops_formula}")
    print(f"  available:   {'yes' if reason is None else 'no: ' + reason} (on {device})")
    if reason is None:
        print(f"  backend:     {cls.backend(device)}")
    fields = dataclasses.fields(cls.Options)
    print("  options:" + ("" if fields else " none"))
    for f in fields:
        print(f"    {f.name} = {f.default!r}")
    return 0


def _print_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def cmd_run(args: argparse.Namespace) -> int:
    registry.get_mechanism(args.mechanism)
    parse_mechanism_options(args.opt)
    task = get_task(args.task)
    reason = task.unavailable_reason()
    if reason:
        print(f"attnbench run: task {args.task!r} is {reason}; nothing was run.", file=sys.stderr)
        return 1
    return task().run(args)


def cmd_not_built(args: argparse.Namespace) -> int:
    print(f"attnbench {args.command}: not built yet; nothing was measured.", file=sys.stderr)
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    torch.set_printoptions(precision=4)
    try:
        return args.func(args)
    except (UsageError, UnknownMechanismError, UnknownTaskError, OptionError) as exc:
        parser.exit(2, f"attnbench {args.command}: error: {exc}\n")


if __name__ == "__main__":
    sys.exit(main())
