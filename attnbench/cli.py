"""The ``attnbench`` command line: list, run, models, scale, resolution, plot, report.

User errors (unknown names, bad options, malformed ranges) print one clear line and exit 2,
as argparse does for usage errors; no traceback.
"""

from __future__ import annotations

import argparse
import io
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import torch

from attnbench import __version__, launchers, registry
from attnbench.interrupt import Interrupted, interrupts
from attnbench.options import parse_mechanism_options
from attnbench.probe import default_threads
from attnbench.registry import LoadError, OptionError, UnknownMechanismError
from attnbench.resolution import ProbeConfig, ResolutionError, check_probe_out, probe, recorded_probe
from attnbench.results import RESULTS, ResultsError, new_run_dir, read_meta
from attnbench.run_record import finished_table, held_run, recorded_loads, resumed_argv, run_folder
from attnbench.sweep import (
    SweepConfig,
    SweepError,
    check_sweep_out,
    compare,
    default_out_dir,
    finish,
    parse_mechanisms,
    parse_seq,
    read_sweep,
    run_sweep,
)
from attnbench.task import (
    TaskError,
    UnknownTaskError,
    broken_tasks,
    get_task,
    model_table_tasks,
    resolution_tasks,
    sweep_tasks,
    task_names,
)
from attnbench.tuning import parse_values
from attnbench.validate import (
    MAX_SECONDS,
    MAX_THREADS,
    Once,
    Parser,
    existing_dir,
    float_in,
    int_in,
    nonempty,
    one_of,
    output_dir,
    output_file,
)

MAX_N = 2**24  # the longest sequence a sweep takes (attnbench.sweep)
MAX_MIB = 2.0**30  # a memory limit, MiB: 1 PiB
LOADING = ("list", "run", "models", "scale", "resolution")  # the commands that build a mechanism or task


class UsageError(Exception):
    """A mistake in the command line; printed without a traceback, exit status 2."""


def _add_opt_argument(parser: argparse.ArgumentParser, axes: bool = False) -> None:
    swept = "; a comma list, set.m=16,64, runs each value as a variant of its own" if axes else ""
    parser.add_argument("--opt", action="append", default=[], metavar="MECH.OPTION=VALUE",
                        help=f"a mechanism option, e.g. --opt set.m=32 (repeatable){swept}; "
                             "`attnbench list --mechanism NAME` shows a mechanism's options")


def _add_load_argument(parser: argparse.ArgumentParser) -> None:
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


def build_parser(task: str | None = None) -> argparse.ArgumentParser:
    """The command line; ``task`` adds that task's options to ``run``."""
    parser = Parser(
        prog="attnbench",
        description="Benchmark attention mechanisms: correctness, time, memory and task "
                    "accuracy, SeT (Self-optimal Transport) among them.")
    parser.add_argument("--version", action="version", version=f"attnbench {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("list", help="mechanisms and tasks, with availability on this machine",
                       description="List the registered mechanisms and tasks, whether each can "
                                   "run on this machine, and why not when it cannot.")
    p.add_argument("--mechanism", type=nonempty, help="show one mechanism in full (options, FLOP formula)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="device to check availability on (default auto: cuda where torch sees a GPU)")
    _add_load_argument(p)
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("run", help="train and evaluate one mechanism on one task",
                       description="Train and evaluate a model whose attention is MECHANISM on "
                                   "TASK, and append the result to results/local/TASK.csv.",
                       epilog=None if task else "Each task has options of its own: "
                                                "`attnbench run --task NAME --help` lists them.")
    p.add_argument("--mechanism", required=True, type=nonempty, help="registered mechanism name (see `list`)")
    p.add_argument("--task", required=True, type=one_of(task_names, "task"), action=Once,
                   help="task name (see `list`)")
    _add_opt_argument(p)
    _add_load_argument(p)
    if task is not None:
        get_task(task).add_arguments(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("models", help="backbone sizes: parameters and FLOPs per mechanism, measured",
                       description="Build every SeTformer backbone size with every mechanism and print "
                                   "its parameters and forward FLOPs on one image, counted by PyTorch's "
                                   "FlopCounterMode (plus the mechanism's formula where the counter is "
                                   "blind: natten, xformers).")
    p.add_argument("--size", default="all", type=nonempty, help="comma list of sizes, or all (default)")
    p.add_argument("--mechanism", default="all", type=nonempty,
                   help="comma list of mechanisms, or all (default)")
    p.add_argument("--img-size", type=int_in(16, 4096), default=224,
                   help="image side in pixels (default 224)")
    p.add_argument("--classes", type=int_in(1, 100_000), default=1000,
                   help="classes of the head (default 1000)")
    p.add_argument("--task", default="imagenet", type=nonempty,
                   help="the task whose model is built (default imagenet: the SeTformer classifier)")
    p.add_argument("--csv", type=output_file, default=None, help="also write the table to this CSV file")
    _add_load_argument(p)
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("scale", help="sweep sequence length: time, memory, FLOPs, fitted scaling; "
                                     "with --task, accuracy",
                       description="Measure every mechanism's time and memory over a range of "
                                   "sequence lengths, each configuration in its own process, and "
                                   "fit how they scale. Writes scale.csv, fits.csv, meta.json and "
                                   "plots to --out. With --task: the accuracy sweep, one model trained "
                                   "and evaluated per mechanism, length and seed, each in its own process; "
                                   "writes accuracy.csv, breaking.csv, meta.json and plots.",
                       epilog="Accuracy sweep: `attnbench scale --task mqar` runs the task's preset for "
                              "this device; --seq, --mechanism, --seeds replace its entries, and task "
                              "arguments after `--` (scale --task mqar -- --epochs 2) follow its own.")
    p.add_argument("--seq", default=None, type=nonempty,
                   help="a doubling range LO..HI, a list 256,1024 or one value (default 256..16384; "
                        "with --task: the task's preset)")
    p.add_argument("--mechanism", default=None, type=nonempty,
                   help="comma list, or `all` = every registered one; those that cannot run here are "
                        "recorded as unavailable with the reason (default: all; with --task: the preset's)")
    p.add_argument("--task", default=None, type=nonempty,
                   help="sweep accuracy on this task instead of kernel cost (a task with sweep presets; "
                        "another name is answered with those that have them)")
    p.add_argument("--seeds", default=None, type=nonempty, metavar="S,S,...",
                   help="with --task: seeds, one model each (default: the task's preset)")
    p.add_argument("--time-budget", type=float_in(0, MAX_SECONDS, lo_open=True), default=None,
                   metavar="SECONDS",
                   help="with --task: train every point for this many seconds instead of the preset's "
                        "equal optimiser steps")
    p.add_argument("task_args", nargs="*", metavar="-- TASK_ARGS",
                   help="with --task: arguments of `attnbench run --task T` for every point, after `--`")
    t = p.add_argument_group("accuracy sweep: tuning (with --task)")
    t.add_argument("--lr", default=None, type=nonempty, metavar="LR,LR,...",
                   help="learning rates: every point trains each, and its best on the task's validation "
                        "split (held out from training) stands for it (default: the task's own)")
    t.add_argument("--weight-decay", default=None, type=nonempty, metavar="WD,WD,...",
                   help="weight decays, a grid with --lr as for it (default: the task's own)")
    g = p.add_argument_group("accuracy sweep: where the points run (with --task)")
    g.add_argument("--launcher", default="local", choices=launchers.LAUNCHERS,
                   help="local: this machine (default); ray: a Ray task per point, on a Ray started here "
                        "or at --address; slurm: a Slurm job per point through submitit")
    g.add_argument("--jobs", type=int_in(1, 4096), default=None, metavar="N",
                   help="points at once: local, each on a GPU or --threads cores of its own, never shared "
                        "(default 1); ray and slurm, at most so many in flight (default: what fits)")
    g.add_argument("--address", default=None, type=nonempty,
                   help="with --launcher ray: a running cluster's address (default: start Ray here)")
    g.add_argument("--slurm-partition", default=None, type=nonempty, help="with --launcher slurm: partition")
    g.add_argument("--slurm-time", type=int_in(1, 10**6), default=None, metavar="MINUTES",
                   help="--launcher slurm: each job's time limit (default: a point's --budget + 5 min)")
    g.add_argument("--slurm-gpus", type=int_in(0, 64), default=None, metavar="N",
                   help="with --launcher slurm: GPUs per job (default: 1 with --device cuda, else 0)")
    g.add_argument("--slurm-cluster", default="slurm", choices=("slurm", "local"),
                   help="with --launcher slurm: slurm (default), or local: the same jobs as processes on "
                        "this machine (submitit's local executor), to try a sweep before a cluster")
    p.add_argument("--batch", type=int_in(1, 4096), default=1, help="batch size B (default 1)")
    p.add_argument("--heads", type=int_in(1, 256), default=4, help="attention heads H (default 4)")
    p.add_argument("--head-dim", type=int_in(1, 1024), default=32, help="channels per head d (default 32)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16", "float64"])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto = cuda when available, else cpu")
    p.add_argument("--mode", default="fwd", choices=["fwd", "fwd+bwd", "both", "decode"],
                   help="forward only (no autograd), forward and backward, or both (default fwd); decode: "
                        "generation at each context n (prefill, time per generated token, cache bytes; "
                        "--seq defaults to 1024..131072)")
    p.add_argument("--layout", default="1d", choices=["1d", "2d"],
                   help="tokens as a sequence, or as a square image grid (square n only)")
    p.add_argument("--causal", action="store_true",
                   help="each mechanism's causal form (token t sees tokens 0..t; sequences only); one "
                        "without a causal form is recorded as unavailable with the reason")
    p.add_argument("--kv-heads", type=int_in(1, 256), default=None, metavar="H_KV",
                   help="key/value heads (grouped-query attention; 1 = multi-query) of the mechanisms "
                        "that take kv_heads; must divide --heads (default: one per head)")
    _add_opt_argument(p, axes=True)
    p.add_argument("--threads", type=int_in(1, MAX_THREADS), default=None,
                   help="CPU threads (default: torch's default here, less the cores busy when the "
                        "sweep starts; recorded with every row)")
    p.add_argument("--budget", type=float_in(0, MAX_SECONDS, lo_open=True), default=None,
                   help="seconds per configuration before it is recorded as a time-out (default 120; "
                        "with --task, per point: 1800, or twice --time-budget + 300 s where more)")
    p.add_argument("--min-time", type=float_in(0, 3600, lo_open=True), default=0.5,
                   help="seconds of timed runs per configuration, at least 5 runs (default 0.5)")
    p.add_argument("--memory-limit", type=float_in(1, MAX_MIB), default=None, metavar="MIB",
                   help="CPU memory a configuration may take before it counts as out of memory "
                        "(default: 85%% of the memory available now)")
    p.add_argument("--out", type=output_dir, default=None,
                   help="output folder (default: a new timestamped folder under results/runs/, git-ignored)")
    p.add_argument("--resume", action="store_true",
                   help="skip configurations already in --out/scale.csv (with --task: points in "
                        "accuracy.csv) and measure the rest")
    p.add_argument("--compare", type=existing_dir, default=None, metavar="OTHER_RUN",
                   help="a saved run folder: write time/memory ratios against it, flag regressions "
                        "(with --task: accuracy differences per point)")
    p.add_argument("--fit-min-n", type=int_in(1, MAX_N), default=1024,
                   help="fit exponents over n >= this (small n measure overheads; default 1024)")
    _add_load_argument(p)
    p.add_argument("--compile", action="store_true",
                   help="run each mechanism under torch.compile (compile time recorded apart; default eager)")
    p.add_argument("--rounds", type=int_in(1, 100), default=3,
                   help="interleaved timing rounds per n: A B C A B C ..., each row the median over its "
                        "rounds (default 3)")
    p.add_argument("--retries", type=int_in(0, 100), default=2,
                   help="times a configuration is measured again when it was not clean (default 2)")
    p.add_argument("--max-slowdown", type=float_in(0, 100, lo_open=True), default=0.25, metavar="FRACTION",
                   help="a round is disturbed when the machine probe beside it is more than this much "
                        "slower than the sweep's best (default 0.25)")
    p.add_argument("--max-spread", type=float_in(0, 100, lo_open=True), default=0.5, metavar="FRACTION",
                   help="a row is not clean when its runs' IQR, or the range of its round medians, "
                        "exceeds this fraction of its median (default 0.5)")
    p.set_defaults(func=cmd_scale)

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
    _add_opt_argument(p)
    p.add_argument("--out", type=output_dir, default=None,
                   help="output folder (default: a new timestamped folder under results/runs/, git-ignored)")
    p.add_argument("--resume", action="store_true",
                   help="continue the probe in --out: sides already in its resolution.csv are not measured "
                        "again (the settings must match; the memory limit defaults to the recorded one)")
    _add_load_argument(p)
    p.set_defaults(func=cmd_resolution)

    p = sub.add_parser("plot", help="redraw every plot of a results folder",
                       description="Redraw every plot in and under a folder: each `scale` sweep's (with its "
                                   "fit and ratio tables), each `resolution` probe's, and each task results "
                                   "table's (results/local/imagenet.csv and the like), beside what it draws "
                                   "from; prints every file it wrote.")
    p.add_argument("run_dir", type=existing_dir,
                   help="a folder written by `scale` or `resolution`, or a folder of task tables and run "
                        "folders (results/local, results/reference, results)")
    p.add_argument("--fit-min-n", type=int_in(1, MAX_N), default=1024, help="fit exponents over n >= this")
    p.add_argument("--include-limited", action="store_true",
                   help="also draw task runs cut short by --max-steps/--limit-train/--limit-val (smoke runs)")
    p.set_defaults(func=cmd_plot)

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
    return parser


def cmd_list(args: argparse.Namespace) -> int:
    if args.device == "auto":  # not _device(): listing what cuda would offer is fine without one
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.mechanism:
        return _show_mechanism(args.mechanism, args.device)
    rows, backends = [], []
    for name in registry.mechanism_names():
        cls = registry.get_mechanism(name)
        reason = cls.unavailable_reason(args.device)
        rows.append((name, cls.complexity, "2-D" if cls.needs_grid else "any",
                     "yes" if cls.causal_problem() is None else "no",
                     "yes" if cls.decode_problem() is None else "no",
                     "yes" if reason is None else "no", reason or cls.summary))
        backends.append((name, cls.backend(args.device) if reason is None else "-"))
    for name, why in registry.broken_plugins().items():
        rows.append((name, "?", "?", "?", "?", "no", f"plug-in failed to load: {why}"))
    print(f"Mechanisms (device: {args.device}; causal, decode: `list --mechanism NAME` says why not)")
    _print_table(("name", "complexity", "tokens", "causal", "decode", "available", "notes"), rows)
    print(f"\nBackends that run on {args.device}")
    _print_table(("name", "backend"), backends)
    print()
    task_rows = []
    for name in task_names():
        cls = get_task(name)
        reason = cls.unavailable_reason()
        task_rows.append((name, "yes" if reason is None else "no",
                          cls.summary if reason is None else f"{reason}: {cls.summary}"))
    for name, why in broken_tasks().items():
        task_rows.append((name, "no", f"plug-in failed to load: {why}"))
    print("Tasks")
    _print_table(("name", "available", "notes"), task_rows)
    return 0


def _show_mechanism(name: str, device: str) -> int:
    import dataclasses
    import typing

    cls = registry.get_mechanism(name)
    reason = cls.unavailable_reason(device)
    print(f"{cls.name}: {cls.summary}")
    print(f"  complexity:  {cls.complexity}")
    print(f"  tokens:      {'2-D grid required' if cls.needs_grid else 'sequences or 2-D grids'}")
    padding = ("native, inside the batched computation" if cls.masking == "native"
               else "per length: each group of equally long sequences runs without its padding")
    print(f"  padding:     {padding}")
    causal = cls.causal_problem()
    print(f"  causal:      {'yes' if causal is None else 'no: ' + causal}")
    decode = cls.decode_problem()
    print(f"  decode:      {'yes' if decode is None else 'no: ' + decode}")
    print(f"  devices:     {', '.join(cls.devices)}")
    print(f"  dtypes:      {', '.join(str(d).removeprefix('torch.') for d in cls.dtypes)}")
    print(f"  FLOPs (fwd): {cls.flops_formula}")
    print(f"  available:   {'yes' if reason is None else 'no: ' + reason} (on {device})")
    if reason is None:
        print(f"  backend:     {cls.backend(device)}")
    fields = dataclasses.fields(cls.Options)
    print("  options:" + ("" if fields else " none"))
    hints = typing.get_type_hints(cls.Options)
    for f in fields:
        valid = f.metadata.get("range")  # attnbench.mechanism.option
        shown = f"  ({valid.describe(hints[f.name] is int)})" if valid else ""
        print(f"    {f.name} = {f.default!r}{shown}")
    return 0


def _print_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


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


def _pick(text: str, valid: Sequence[str], what: str) -> list[str]:
    """``all`` or a comma list, each checked against ``valid``."""
    if text.strip() == "all":
        return list(valid)
    names = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [n for n in names if n not in valid]
    if unknown or not names:
        raise UsageError(f"unknown {what} {', '.join(map(repr, unknown)) or repr(text)}; "
                         f"valid choices: {', '.join(valid)}, all")
    return names


def cmd_models(args: argparse.Namespace) -> int:
    task = get_task(args.task)  # the backbone lives with the tasks that train it
    if args.task not in model_table_tasks():
        raise UsageError(f"--task {args.task}: no model table; valid choices: "
                         f"{', '.join(model_table_tasks())}")
    sizes = _pick(args.size, list(task.sizes), "size")
    mechanisms = _pick(args.mechanism, registry.mechanism_names(), "mechanism")
    if args.img_size < 16 or args.classes < 1:
        raise UsageError("--img-size must be >= 16 and --classes >= 1")
    rows = task.model_table(sizes, mechanisms, img_size=args.img_size, num_classes=args.classes)
    table = pd.DataFrame(rows)
    print(f"SeTformer backbone sizes at {args.img_size}×{args.img_size}, {args.classes} classes: parameters "
          "and forward FLOPs of one image (FlopCounterMode: matmuls and convolutions, 2 FLOPs per "
          "multiply-add; GMACs = GFLOPs / 2, the unit papers print as 'FLOPs'; attention elementwise "
          "from the mechanisms' formulas)")
    fmt = lambda value, digits: "-" if pd.isna(value) else f"{value:.{digits}f}"
    rows = [(r.size, r.mechanism, fmt(r.params / 1e6, 2), fmt(r.gflops, 2), fmt(r.gmacs, 2),
             fmt(r.attn_elementwise_gflops, 3), r.note) for r in table.itertuples()]
    header = ("size", "mechanism", "params (M)", "GFLOPs", "GMACs", "attn elementwise GFLOPs", "notes")
    _print_table(header, rows)
    print("Paper, for scale: SeTformer-Mini 16M parameters, Swin-T 28M (4.5 GMACs); NAT-Mini 20M.")
    if args.csv is not None:
        from attnbench.results import write_table

        write_table(args.csv, table)
    return 0


def _available_mib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _device(choice: str) -> str:
    """``auto`` resolved; ``cuda`` refused clearly where there is none."""
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: CUDA is not available on this machine; "
                         "valid choices here: cpu, auto")
    return choice


def _memory_limit(given: float | None) -> float | None:
    """--memory-limit in MiB, or 85% of the memory available now."""
    available = _available_mib()
    limit = given if given is not None else (0.85 * available if available else None)
    if limit is not None and limit <= 0:
        raise UsageError(f"--memory-limit must be > 0 MiB, got {limit:g}")
    return limit


def cmd_scale(args: argparse.Namespace) -> int:
    from attnbench.sweep import summary  # the console summary: fits with intervals, ratios, the machine

    if args.task is not None:
        return _accuracy_sweep(args)
    for flag, given in (("--seeds", args.seeds is not None), ("--time-budget", args.time_budget is not None),
                        (f"{' '.join(args.task_args)!r}", bool(args.task_args)),
                        *((f"--{k.replace('_', '-')}", getattr(args, k) != default)
                          for k, default in ACCURACY_ONLY.items())):
        if given:
            raise UsageError(f"{flag} is for the accuracy sweep: add --task (tasks with one: "
                             f"{', '.join(sweep_tasks()) or 'none'})")
    device = _device(args.device)
    limit = _memory_limit(args.memory_limit)
    threads, note = args.threads, ""
    if threads is None:
        threads, note = default_threads(torch.get_num_threads()) if device == "cpu" else (1, "")
    cfg = SweepConfig(
        mechanisms=parse_mechanisms(args.mechanism or "all"),
        seq=parse_seq(args.seq or default_seq(args.mode)),
        modes=["fwd", "fwd+bwd"] if args.mode == "both" else [args.mode], batch=args.batch,
        heads=args.heads, head_dim=args.head_dim, dtype=args.dtype, device=device,
        threads=threads, layout=args.layout, causal=args.causal or args.mode == "decode",
        kv_heads=args.kv_heads,
        options=parse_mechanism_options(args.opt, axes=True), budget=args.budget or 120.0,
        min_run_time=args.min_time,
        memory_limit_mib=limit if device == "cpu" else None,
        load=[str(Path(s).resolve()) if s.endswith(".py") else s for s in args.load],
        compile=args.compile, rounds=args.rounds, retries=args.retries, max_slowdown=args.max_slowdown,
        max_spread=args.max_spread)
    if args.compare is not None and not (args.compare / "scale.csv").is_file():
        raise UsageError(f"--compare {args.compare}: no scale.csv there")
    if args.compare is not None and read_sweep(args.compare / "scale.csv").empty:
        raise UsageError(f"--compare {args.compare}: its scale.csv holds no measurements")  # now, not after
    if args.resume and args.out is None:
        raise UsageError("--resume needs --out pointing at the run to finish")
    if args.resume:  # a damaged folder is refused now, in one line, before anything starts
        read_sweep(args.out / "scale.csv")
        read_meta(args.out / "meta.json")
    out = args.out or default_out_dir(RESULTS)
    check_sweep_out(cfg, out, args.resume)  # a foreign or inconsistent --out: one line, nothing before
    if note:
        print(note)
    print(f"attnbench scale: {_count_variants(cfg.mechanisms, cfg.variants())} x {len(cfg.seq)} lengths x "
          f"{len(cfg.modes)} modes on {device} ({cfg.threads} threads, "
          f"{'compiled' if cfg.compile else 'eager'}{', causal' if cfg.causal else ''}, "
          f"{cfg.rounds} interleaved rounds) -> {out}",
          file=sys.stderr)
    run_sweep(cfg, out, args.resume, ["attnbench", *sys.argv[1:]])
    fits = finish(out, args.fit_min_n)
    print(summary(out, fits))
    if args.compare is not None:
        ratios = compare(out, args.compare)
        flagged = ratios[ratios["regression"]]
        print(f"compared with {args.compare}: {len(ratios)} configurations, {len(flagged)} regressions "
              f"(> 10% slower beyond noise; {int(ratios['noisy'].sum())} pairs noisy, not judged) "
              f"-> {out / 'compare.csv'}")
        if len(flagged):
            print(flagged.to_string(index=False))
    return 0


def default_seq(mode: str) -> str:
    """--seq when none is given: decode reaches the long contexts where a KV cache is what costs."""
    return "1024..131072" if mode == "decode" else "256..16384"


def _count_variants(mechanisms: Sequence[str], variants: Sequence[object]) -> str:
    """'5 mechanisms', or '5 mechanisms (7 variants)' where options are swept."""
    text = f"{len(mechanisms)} mechanism{'s' if len(mechanisms) != 1 else ''}"
    return text if len(variants) == len(mechanisms) else f"{text} ({len(variants)} variants)"


# flags of the accuracy sweep (``scale --task``) that the kernel sweep has no use for, with their defaults
ACCURACY_ONLY = {"lr": None, "weight_decay": None, "launcher": "local", "jobs": None, "address": None,
                 "slurm_partition": None, "slurm_time": None, "slurm_gpus": None, "slurm_cluster": "slurm"}
# flags of the kernel sweep that the accuracy sweep (``scale --task``) has no use for
KERNEL_ONLY = ("batch", "heads", "head_dim", "dtype", "mode", "layout", "causal", "kv_heads", "min_time",
               "compile", "rounds", "retries", "max_slowdown", "max_spread", "fit_min_n")


def _check_launcher_flags(args: argparse.Namespace) -> None:
    """A launcher's own flags only with that launcher."""
    own = {"ray": ["address"], "slurm": ["slurm_partition", "slurm_time", "slurm_gpus", "slurm_cluster"]}
    for kind, names in own.items():
        given = [f"--{k.replace('_', '-')}" for k in names if getattr(args, k) != ACCURACY_ONLY[k]]
        if given and args.launcher != kind:
            raise UsageError(f"{', '.join(given)}: for --launcher {kind} (this sweep's launcher: "
                             f"{args.launcher})")


def _accuracy_sweep(args: argparse.Namespace) -> int:
    """``scale --task T``: train and evaluate every (mechanism variant, n, seed), then the breaking
    lengths, the plots and the console summary (``attnbench.accuracy``)."""
    from attnbench import accuracy

    defaults = vars(build_parser().parse_args(["scale"]))
    given = [f"--{k.replace('_', '-')}" for k in KERNEL_ONLY if getattr(args, k) != defaults[k]]
    if given:
        raise UsageError(f"{', '.join(given)}: for the kernel sweep (scale without --task); the task's own "
                         f"options go after `--`: scale --task {args.task} -- --epochs 2")
    _check_launcher_flags(args)
    device = _device(args.device)
    limit = _memory_limit(args.memory_limit)
    cfg = accuracy.plan(
        args.task, device, args.seq, args.mechanism, args.seeds, args.task_args,
        options=parse_mechanism_options(args.opt, axes=True), time_budget=args.time_budget,
        limit_s=args.budget or accuracy.point_limit(args.time_budget),
        memory_limit_mib=limit if device == "cpu" else None, threads=args.threads or 1,
        load=[str(Path(s).resolve()) if s.endswith(".py") else s for s in args.load],
        lrs=parse_values(args.lr, "--lr", 0, strict=True) if args.lr is not None else [],
        weight_decays=(parse_values(args.weight_decay, "--weight-decay", 0, strict=False)
                       if args.weight_decay is not None else []))
    if args.compare is not None and not (args.compare / "accuracy.csv").is_file():
        raise UsageError(f"--compare {args.compare}: no accuracy.csv there (a folder of `scale --task`)")
    if (args.compare is not None
            and accuracy.read_points(args.compare / "accuracy.csv").empty):
        raise UsageError(f"--compare {args.compare}: its accuracy.csv holds no points")  # now, not after
    if args.resume and args.out is None:
        raise UsageError("--resume needs --out pointing at the sweep to finish")
    out = args.out or new_run_dir(f"accuracy-{args.task}")
    accuracy.check_sweep_out(cfg, out, args.resume)  # a foreign or inconsistent --out: one line alone
    if args.threads is None and args.jobs is not None:  # a share of the cores each
        cfg.threads = max(1, len(launchers.usable_cores()) // args.jobs)
    elif args.threads is None:  # once the request is known to be sound: this looks at the machine for a while
        cfg.threads, note = default_threads(torch.get_num_threads()) if device == "cpu" else \
            (torch.get_num_threads(), "")
        if note:
            print(note)
    launcher = launchers.make_launcher(
        args.launcher, jobs=args.jobs, device=device, threads=cfg.threads, out=out, address=args.address,
        memory_mib=args.memory_limit,
        slurm=launchers.SlurmOptions(args.slurm_partition, args.slurm_time, args.slurm_gpus,
                                     args.slurm_cluster))
    budget = (f"{cfg.time_budget:g} s of training per point" if cfg.time_budget is not None
              else "equal optimiser steps")
    memory = f"{cfg.memory_limit_mib / 1024:.1f} GiB" if cfg.memory_limit_mib else "device memory"
    runs = len(cfg.grid())
    grid = f" x {runs} runs of the grid" if runs > 1 else ""
    shown = args.launcher != "local" or launcher.width > 1
    where = f"{args.launcher}, {launcher.width} at once" if shown else ""
    print(f"attnbench scale --task {cfg.task}: {_count_variants(cfg.mechanisms, cfg.variants())} x "
          f"{len(cfg.seq)} lengths x {len(cfg.seeds)} seed{'s' if len(cfg.seeds) > 1 else ''}{grid} = "
          f"{len(accuracy.points(cfg))} {'runs' if runs > 1 else 'points'} on {device} "
          f"({cfg.threads} thread{'s' if cfg.threads > 1 else ''}{'; ' + where if where else ''}), {budget}, "
          f"limits {cfg.limit_s:g} s and {memory} per point -> {out}",
          file=sys.stderr)
    accuracy.run_sweep(cfg, out, args.resume, ["attnbench", *sys.argv[1:]], launcher=launcher)
    accuracy.finish(out)
    print(accuracy.summary(out))
    if args.compare is not None:
        print(accuracy.compare_text(accuracy.compare(out, args.compare), args.compare, out))
    return 0


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
    device = _device(args.device)
    if args.resume and args.out is None:
        raise UsageError("--resume continues the probe in --out: give --out FOLDER")
    memory = args.memory_limit
    if args.resume and memory is None and (args.out / "resolution.csv").exists():  # the limit it ran under
        memory = recorded_probe(args.out).get("memory_limit_mib")
    cfg = ProbeConfig(
        task=args.task, mechanisms=parse_mechanisms(args.mechanism), size=args.size,
        start=args.start_side or task.train_side, max_side=args.max_side, granularity=args.granularity,
        memory_limit_mib=_memory_limit(memory) if device == "cpu" else None, budget=args.budget,
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


def cmd_plot(args: argparse.Namespace) -> int:
    from attnbench import accuracy
    from attnbench.plots import discover, redraw

    found = discover([args.run_dir]) if args.run_dir.is_dir() else None
    if found is None or found.empty():
        raise UsageError(f"{args.run_dir}: no scale.csv there (a folder written by `scale`), nor "
                         "accuracy.csv (`scale --task`), nor resolution.csv (`resolution`), nor a task "
                         "results table such as results/local/imagenet.csv, in it or under it")
    written = redraw([args.run_dir], args.fit_min_n, args.include_limited)
    for folder in found.accuracy:
        if (folder / "accuracy.csv").is_file():
            written += accuracy.finish(folder, log=io.StringIO()).paths
    for path in written:
        print(path)
    if not written:
        hint = "" if args.include_limited else " (smoke runs are drawn with --include-limited)"
        print(f"attnbench plot: nothing to draw in {args.run_dir}: no finished run{hint}", file=sys.stderr)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from attnbench.report import ReportError, build, write

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


def _command(argv: Sequence[str] | None) -> int:
    """Parse the command line and run its command; a user's mistake is one line and exit 2."""
    given = sys.argv[1:] if argv is None else list(argv)
    loaded: set[str] = set()  # --load: before any parser, as the tasks it adds bring options of their own
    _load_plugins(given[0] if given else "", [*_requested_loads(given), *recorded_loads(given)], loaded)
    words = resumed_argv(given, build_parser)  # run --resume DIR
    parser = build_parser(requested_task(words))
    args = parser.parse_args(words)
    torch.set_printoptions(precision=4)
    try:
        if args.command in LOADING:  # an abbreviated --loa, which the scan above missed; then the paths
            _load_plugins(args.command, args.load, loaded)  # as other processes (and a resume) load them
            args.load = [registry.plugin_spec(spec) for spec in args.load]
        return args.func(args)
    except (UsageError, UnknownMechanismError, UnknownTaskError, OptionError, SweepError, TaskError,
            ResolutionError, ResultsError) as exc:
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


def main(argv: Sequence[str] | None = None) -> int:
    """``attnbench …``: the command's exit status. Ctrl-C or SIGTERM ends it with one line saying
    what was kept and how to go on (``attnbench.interrupt``), status 130 or 143; a reader that
    goes away (``attnbench list | head -1``) ends it quietly, status 141 as for SIGPIPE."""
    words = sys.argv[1:] if argv is None else list(argv)
    try:
        with interrupts():
            try:
                return _command(argv)
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


if __name__ == "__main__":
    sys.exit(main())
