"""The ``attnbench`` command line: list, run, models, scale, resolution, plot, report.

One module per command beside this one, each with its parser builder (``add_parser``) and its
handler. User errors (unknown names, bad options, malformed ranges) print one clear line and exit 2,
as argparse does for usage errors; no traceback (``attnbench.cli.common.execute``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from attnbench import __version__
from attnbench.cli import listing, models, plot, report, resolution, run, scale
from attnbench.cli.common import UsageError, execute
from attnbench.validate import Parser

__all__ = ["UsageError", "build_parser", "main"]


def build_parser(task: str | None = None) -> argparse.ArgumentParser:
    """The command line; ``task`` adds that task's options to ``run``."""
    parser = Parser(
        prog="attnbench",
        description="Benchmark attention mechanisms: correctness, time, memory and task "
                    "accuracy, SeT (Self-optimal Transport) among them.")
    parser.add_argument("--version", action="version", version=f"attnbench {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    listing.add_parser(sub)
    run.add_parser(sub, task)
    models.add_parser(sub)
    scale.add_parser(sub)
    resolution.add_parser(sub)
    plot.add_parser(sub)
    report.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``attnbench …``: the command's exit status. Ctrl-C or SIGTERM ends it with one line saying
    what was kept and how to go on (``attnbench.interrupt``), status 130 or 143; a reader that
    goes away (``attnbench list | head -1``) ends it quietly, status 141 as for SIGPIPE."""
    return execute(argv, build_parser)


if __name__ == "__main__":
    sys.exit(main())
