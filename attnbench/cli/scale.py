"""``attnbench scale``: the kernel sweep, and with ``--task`` the accuracy sweep."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from attnbench.cli.common import (
    MAX_MIB,
    UsageError,
    add_load_argument,
    add_opt_argument,
    device_of,
    memory_limit,
)
from attnbench.cli.run import run_alone
from attnbench.measure.probe import default_threads
from attnbench.options import parse_mechanism_options
from attnbench.results.tables import RESULTS, new_run_dir, read_meta
from attnbench.sweeps import accuracy, decode, launchers
from attnbench.sweeps.base import MAX_N, parse_mechanisms, parse_seq
from attnbench.sweeps.kernel import (
    SweepConfig,
    check_sweep_out,
    compare,
    default_out_dir,
    finish,
    read_sweep,
    run_sweep,
    summary,
)
from attnbench.sweeps.points import point_limit, points
from attnbench.sweeps.tuning import parse_values
from attnbench.task import sweep_tasks
from attnbench.validate import (
    MAX_SECONDS,
    MAX_THREADS,
    Parser,
    existing_dir,
    float_in,
    int_in,
    nonempty,
    output_dir,
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    """The ``scale`` command's arguments."""
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
    add_opt_argument(p, axes=True)
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
    add_load_argument(p)
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


def cmd_scale(args: argparse.Namespace) -> int:
    if args.task is not None:
        return _accuracy_sweep(args)
    for flag, given in (("--seeds", args.seeds is not None), ("--time-budget", args.time_budget is not None),
                        (f"{' '.join(args.task_args)!r}", bool(args.task_args)),
                        *((f"--{k.replace('_', '-')}", getattr(args, k) != default)
                          for k, default in ACCURACY_ONLY.items())):
        if given:
            raise UsageError(f"{flag} is for the accuracy sweep: add --task (tasks with one: "
                             f"{', '.join(sweep_tasks()) or 'none'})")
    device = device_of(args.device)
    limit = memory_limit(args.memory_limit)
    threads, note = args.threads, ""
    if threads is None:
        threads, note = default_threads(torch.get_num_threads()) if device == "cpu" else (1, "")
    cfg = SweepConfig(
        mechanisms=parse_mechanisms(args.mechanism or "all"),
        seq=parse_seq(args.seq or default_seq(args.mode)),
        modes=["fwd", "fwd+bwd"] if args.mode == "both" else [args.mode], batch=args.batch,
        heads=args.heads, head_dim=args.head_dim, dtype=args.dtype, device=device,
        threads=threads, layout=args.layout, causal=args.causal or args.mode == decode.MODE,
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
    return decode.DEFAULT_SEQ if mode == decode.MODE else "256..16384"


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


def _defaults() -> dict[str, object]:
    """Every ``scale`` flag's default, as the parser sets it."""
    parser = Parser(prog="attnbench")
    add_parser(parser.add_subparsers(dest="command"))
    return vars(parser.parse_args(["scale"]))


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
    lengths, the plots and the console summary (``attnbench.sweeps.accuracy``)."""
    defaults = _defaults()
    given = [f"--{k.replace('_', '-')}" for k in KERNEL_ONLY if getattr(args, k) != defaults[k]]
    if given:
        raise UsageError(f"{', '.join(given)}: for the kernel sweep (scale without --task); the task's own "
                         f"options go after `--`: scale --task {args.task} -- --epochs 2")
    _check_launcher_flags(args)
    device = device_of(args.device)
    limit = memory_limit(args.memory_limit)
    cfg = accuracy.plan(
        args.task, device, args.seq, args.mechanism, args.seeds, args.task_args,
        options=parse_mechanism_options(args.opt, axes=True), time_budget=args.time_budget,
        limit_s=args.budget or point_limit(args.time_budget),
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
          f"{len(points(cfg))} {'runs' if runs > 1 else 'points'} on {device} "
          f"({cfg.threads} thread{'s' if cfg.threads > 1 else ''}{'; ' + where if where else ''}), {budget}, "
          f"limits {cfg.limit_s:g} s and {memory} per point -> {out}",
          file=sys.stderr)
    accuracy.run_sweep(cfg, out, args.resume, ["attnbench", *sys.argv[1:]], launcher=launcher,
                       run=run_alone)
    accuracy.finish(out)
    print(accuracy.summary(out))
    if args.compare is not None:
        print(accuracy.compare_text(accuracy.compare(out, args.compare), args.compare, out))
    return 0
