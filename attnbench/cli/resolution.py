"""``attnbench resolution``: the largest image side each mechanism trains at, on a dense task."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd
import torch

from attnbench.cli.common import (
    MAX_MIB,
    UsageError,
    add_load_argument,
    add_opt_argument,
    device_of,
    memory_limit,
)
from attnbench.options import parse_mechanism_options
from attnbench.results.tables import new_run_dir
from attnbench.sweeps.base import parse_mechanisms
from attnbench.sweeps.resolution import ProbeConfig, check_probe_out, probe, recorded_probe
from attnbench.task import get_task, resolution_tasks
from attnbench.validate import MAX_SECONDS, MAX_THREADS, float_in, int_in, nonempty, output_dir


def add_parser(sub: argparse._SubParsersAction) -> None:
    """The ``resolution`` command's arguments."""
    p = sub.add_parser("resolution", help="dense tasks: largest image side each mechanism trains at",
                       description="For a dense task (coco, ade20k), run one synthetic training step "
                                   "per mechanism at growing image sides, each in its own process under "
                                   "a memory limit: the training side, doubling until a step fails, then "
                                   "bisection. Writes resolution.csv, summary.csv, meta.json and a plot.")
    p.add_argument("--task", required=True, type=nonempty,
                   help="a task with a resolution probe (coco, ade20k)")
    p.add_argument("--mechanism", default="set,softmax", type=nonempty,
                   help="comma list, or `all` (default: set,softmax)")
    p.add_argument("--size", default="micro", type=nonempty, help="backbone size (default micro)")
    p.add_argument("--start-side", type=int_in(1, 65536), default=None,
                   help="first side in pixels (default: the task's training side)")
    p.add_argument("--max-side", type=int_in(1, 65536), default=4096,
                   help="largest side to try (default 4096)")
    p.add_argument("--granularity", type=int_in(1, 4096), default=32,
                   help="bisection step in pixels (default 32)")
    p.add_argument("--memory-limit", type=float_in(1, MAX_MIB), default=None, metavar="MIB",
                   help="CPU memory a step may take before it counts as out of memory "
                        "(default: 85%% of the memory available now)")
    p.add_argument("--budget", type=float_in(0, MAX_SECONDS, lo_open=True), default=300.0,
                   help="seconds per side (building, timing, memory) before it counts as too slow "
                        "(default 300)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto = cuda when available, else cpu")
    p.add_argument("--threads", type=int_in(1, MAX_THREADS), default=None,
                   help="CPU threads (default: torch's default here)")
    add_opt_argument(p)
    p.add_argument("--out", type=output_dir, default=None,
                   help="output folder (default: a new timestamped folder under results/runs/, git-ignored)")
    p.add_argument("--resume", action="store_true",
                   help="continue the probe in --out: sides already in its resolution.csv are not measured "
                        "again (the settings must match; the memory limit defaults to the recorded one)")
    add_load_argument(p)
    p.set_defaults(func=cmd_resolution)


def cmd_resolution(args: argparse.Namespace) -> int:
    get_task(args.task)  # unknown names raise with the valid choices
    probed = resolution_tasks()
    if args.task not in probed:
        raise UsageError(f"--task {args.task}: no resolution probe (image side does not drive its cost); "
                         f"valid choices: {', '.join(probed) or 'none'}")
    task = get_task(args.task)
    if task.sizes and args.size not in task.sizes:  # before any work: a row of errors is no answer
        raise UsageError(f"argument --size: unknown size {args.size!r} of task {args.task}; "
                         f"valid choices: {', '.join(task.sizes)}")
    device = device_of(args.device)
    if args.resume and args.out is None:
        raise UsageError("--resume continues the probe in --out: give --out FOLDER")
    memory = args.memory_limit
    if args.resume and memory is None and (args.out / "resolution.csv").exists():  # the limit it ran under
        memory = recorded_probe(args.out).get("memory_limit_mib")
    cfg = ProbeConfig(
        task=args.task, mechanisms=parse_mechanisms(args.mechanism), size=args.size,
        start=args.start_side or task.train_side, max_side=args.max_side, granularity=args.granularity,
        memory_limit_mib=memory_limit(memory) if device == "cpu" else None, budget=args.budget,
        threads=args.threads or torch.get_num_threads(), device=device,
        options=parse_mechanism_options(args.opt),
        load=[str(Path(s).resolve()) if s.endswith(".py") else s for s in args.load])
    out = args.out or new_run_dir(f"resolution-{args.task}")
    check_probe_out(cfg, out, args.resume)  # a foreign or inconsistent --out: one line, nothing before
    limit = f"{cfg.memory_limit_mib / 1024:.1f} GiB" if cfg.memory_limit_mib else "device memory"
    print(f"attnbench resolution: {args.task}, {len(cfg.mechanisms)} mechanisms from {cfg.start} px on "
          f"{device} ({cfg.threads} threads), limit {limit}, {cfg.budget:g} s per side -> {out}",
          file=sys.stderr)
    probe(cfg, out, ["attnbench", *sys.argv[1:]], resume=args.resume)
    summary = pd.read_csv(out / "summary.csv")
    with pd.option_context("display.width", 200, "display.max_columns", 20, "display.max_colwidth", 60):
        shown = summary.drop(columns=["task", "memory_limit_mib", "budget_s", "max_side"])
        print(shown.to_string(index=False))
    print(f"wrote {out / 'resolution.csv'}, {out / 'summary.csv'} and {out / 'resolution.png'}")
    return 0
