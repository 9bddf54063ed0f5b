"""``attnbench report``: one self-contained page of results, HTML or Markdown."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from attnbench.cli.common import UsageError
from attnbench.report.page import ReportError, build, write
from attnbench.results.tables import RESULTS
from attnbench.sweeps.base import MAX_N
from attnbench.validate import existing_dir, int_in, output_file


def add_parser(sub: argparse._SubParsersAction) -> None:
    """The ``report`` command's arguments."""
    p = sub.add_parser("report", help="one self-contained page of results: HTML, or Markdown",
                       description="Write every result in and under the folders on one page: first the "
                                   "verdict (per sweep: the accuracy fronts and breaking lengths, the "
                                   "exponents and crossovers), then the kernel sweeps with their fits, the "
                                   "accuracy sweeps, every task table with its seed spreads, the resolution "
                                   "probes, the comparison with a saved run, and the run contexts. HTML: one "
                                   "file, plots embedded, no network; Markdown: plots in a folder beside it. "
                                   "Writes nothing into the folders.")
    p.add_argument("folders", type=existing_dir, nargs="*", default=[Path("results")], metavar="DIR",
                   help="folders of results (default: results)")
    p.add_argument("--out", type=output_file, default=None,
                   help="the page to write (default: results/report.html, git-ignored; report.md with "
                        "--format md)")
    p.add_argument("--format", choices=["html", "md"], default=None,
                   help="html (default) or md; default: from --out's suffix")
    p.add_argument("--compare", type=existing_dir, default=None, metavar="SAVED_RUN",
                   help="a saved sweep folder or folder of task tables to compare with")
    p.add_argument("--include-limited", action="store_true",
                   help="also show task runs cut short by --max-steps/--limit-train/--limit-val (smoke runs)")
    p.add_argument("--fit-min-n", type=int_in(1, MAX_N), default=None,
                   help="fit exponents over n >= this (default: what the sweep's fits.csv used, else 1024)")
    p.add_argument("--title", default="attnbench report", help="the page's title")
    p.set_defaults(func=cmd_report)


def cmd_report(args: argparse.Namespace) -> int:
    fmt = args.format or ("md" if args.out is not None and args.out.suffix.lower() in (".md", ".markdown")
                          else "html")
    out = args.out or RESULTS / f"report.{fmt}"
    try:
        report = build(args.folders, args.compare, args.include_limited, args.fit_min_n, args.title,
                       ["attnbench", *sys.argv[1:]])
    except ReportError as exc:
        raise UsageError(str(exc)) from None
    written = write(report, out, fmt)
    for path in written:
        print(path)
    print(f"attnbench report: {len(report.sections)} sections, {report.figures()} plots -> {out}",
          file=sys.stderr)
    return 0
