"""``attnbench run``: train and evaluate one mechanism on one task (``run_alone``: the same
command on its own, as an accuracy sweep's point runs it in a process of its own)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from attnbench import registry
from attnbench.cli.common import UsageError, add_load_argument, add_opt_argument, execute
from attnbench.options import parse_mechanism_options
from attnbench.results.run_record import finished_table, held_run, run_folder
from attnbench.task import get_task, task_names
from attnbench.validate import Once, Parser, nonempty, one_of


def add_parser(sub: argparse._SubParsersAction, task: str | None = None) -> None:
    """The ``run`` command's arguments; ``task`` adds that task's own."""
    p = sub.add_parser("run", help="train and evaluate one mechanism on one task",
                       description="Train and evaluate a model whose attention is MECHANISM on "
                                   "TASK, and append the result to results/local/TASK.csv.",
                       epilog=None if task else "Each task has options of its own: "
                                                "`attnbench run --task NAME --help` lists them.")
    p.add_argument("--mechanism", required=True, type=nonempty, help="registered mechanism name (see `list`)")
    p.add_argument("--task", required=True, type=one_of(task_names, "task"), action=Once,
                   help="task name (see `list`)")
    add_opt_argument(p)
    add_load_argument(p)
    if task is not None:
        get_task(task).add_arguments(p)
    p.set_defaults(func=cmd_run)


def cmd_run(args: argparse.Namespace) -> int:
    resume = getattr(args, "resume", None)  # a task of the harness has --resume
    if resume is not None and (table := finished_table(resume)) is not None:
        print(f"attnbench run: {run_folder(resume)} already finished; its row is in {table}")
        return 0
    out = getattr(args, "out", None)
    if resume is None and out is not None and (held := held_run(out)) is not None:
        raise UsageError(f"--out {out} holds {held}; continue it with --resume {out}, or choose another "
                         "--out")
    registry.get_mechanism(args.mechanism)
    args.mechanism_options = parse_mechanism_options(args.opt)
    task = get_task(args.task)
    reason = task.unavailable_reason()
    if reason:
        print(f"attnbench run: task {args.task!r} is {reason}; nothing was run.", file=sys.stderr)
        return 1
    return task().run(args)


def build_run_parser(task: str | None = None) -> argparse.ArgumentParser:
    """The command line of ``attnbench run`` alone; ``task`` adds that task's options."""
    parser = Parser(prog="attnbench")
    add_parser(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"), task)
    return parser


def run_alone(argv: Sequence[str]) -> int:
    """``attnbench run …`` (``argv`` starts with ``run``) as the command line runs it: its exit
    status, a user's mistake one line and status 2. An accuracy sweep runs each point so, in a
    process of its own."""
    return execute(argv, build_run_parser)
