"""The ``attnbench`` command line: list, run, models, scale, resolution, plot, report.

User errors (unknown names, bad options, malformed ranges) print one clear line and exit 2,
as argparse does for usage errors; no traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import torch

from attnbench import registry
from attnbench.options import parse_mechanism_options
from attnbench.probe import default_threads
from attnbench.registry import OptionError, UnknownMechanismError
from attnbench.resolution import ProbeConfig, ResolutionError, probe
from attnbench.results import RESULTS, new_run_dir
from attnbench.sweep import (
    SweepConfig,
    SweepError,
    compare,
    default_out_dir,
    finish,
    parse_mechanisms,
    parse_seq,
    run_sweep,
)
from attnbench.tasks import (
    TaskError,
    UnknownTaskError,
    broken_tasks,
    get_task,
    model_table_tasks,
    resolution_tasks,
    task_names,
)


class UsageError(Exception):
    """A mistake in the command line; printed without a traceback, exit status 2."""


def _add_opt_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--opt", action="append", default=[], metavar="MECH.OPTION=VALUE",
                        help="a mechanism option, e.g. --opt set.m=32 (repeatable); "
                             "`attnbench list --mechanism NAME` shows a mechanism's options")


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
    parser = argparse.ArgumentParser(
        prog="attnbench",
        description="Benchmark attention mechanisms: correctness, time, memory and task "
                    "accuracy, SeT (Self-optimal Transport) among them.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("list", help="mechanisms and tasks, with availability on this machine",
                       description="List the registered mechanisms and tasks, whether each can "
                                   "run on this machine, and why not when it cannot.")
    p.add_argument("--mechanism", help="show one mechanism in full (options, FLOP formula)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="device to check availability on (default auto: cuda where torch sees a GPU)")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("run", help="train and evaluate one mechanism on one task",
                       description="Train and evaluate a model whose attention is MECHANISM on "
                                   "TASK, and append the result to results/local/TASK.csv.",
                       epilog=None if task else "Each task has options of its own: "
                                                "`attnbench run --task NAME --help` lists them.")
    p.add_argument("--mechanism", required=True, help="registered mechanism name (see `list`)")
    p.add_argument("--task", required=True, help="task name (see `list`)")
    _add_opt_argument(p)
    if task is not None:
        get_task(task).add_arguments(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("models", help="backbone sizes: parameters and FLOPs per mechanism, measured",
                       description="Build every SeTformer backbone size with every mechanism and print "
                                   "its parameters and forward FLOPs on one image, counted by PyTorch's "
                                   "FlopCounterMode (plus the mechanism's formula where the counter is "
                                   "blind: natten, xformers).")
    p.add_argument("--size", default="all", help="comma list of sizes, or all (default)")
    p.add_argument("--mechanism", default="all", help="comma list of mechanisms, or all (default)")
    p.add_argument("--img-size", type=int, default=224, help="image side in pixels (default 224)")
    p.add_argument("--classes", type=int, default=1000, help="classes of the head (default 1000)")
    p.add_argument("--task", default="imagenet",
                   help="the task whose model is built (default imagenet: the SeTformer classifier)")
    p.add_argument("--csv", type=Path, default=None, help="also write the table to this CSV file")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("scale", help="sweep sequence length: time, memory, FLOPs, fitted scaling",
                       description="Measure every mechanism's time and memory over a range of "
                                   "sequence lengths, each configuration in its own process, and "
                                   "fit how they scale. Writes scale.csv, fits.csv, meta.json and "
                                   "plots to --out.")
    p.add_argument("--seq", default="256..16384",
                   help="a doubling range LO..HI, a list 256,1024 or one value (default 256..16384)")
    p.add_argument("--mechanism", default="all",
                   help="comma list, or `all` = every registered one; those that cannot run here are "
                        "recorded as unavailable with the reason (default: all)")
    p.add_argument("--batch", type=int, default=1, help="batch size B (default 1)")
    p.add_argument("--heads", type=int, default=4, help="attention heads H (default 4)")
    p.add_argument("--head-dim", type=int, default=32, help="channels per head d (default 32)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16", "float64"])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto = cuda when available, else cpu")
    p.add_argument("--mode", default="fwd", choices=["fwd", "fwd+bwd", "both"],
                   help="forward only (no autograd), forward and backward, or both (default fwd)")
    p.add_argument("--layout", default="1d", choices=["1d", "2d"],
                   help="tokens as a sequence, or as a square image grid (square n only)")
    _add_opt_argument(p)
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (default: torch's default here, less the cores busy when the "
                        "sweep starts; recorded with every row)")
    p.add_argument("--budget", type=float, default=120.0,
                   help="seconds per configuration before it is recorded as a time-out (default 120)")
    p.add_argument("--min-time", type=float, default=0.5,
                   help="seconds of timed runs per configuration, at least 5 runs (default 0.5)")
    p.add_argument("--memory-limit", type=float, default=None, metavar="MIB",
                   help="CPU memory a configuration may take before it counts as out of memory "
                        "(default: 85%% of the memory available now)")
    p.add_argument("--out", type=Path, default=None,
                   help="output folder (default: a new timestamped folder under results/runs/, git-ignored)")
    p.add_argument("--resume", action="store_true",
                   help="skip configurations already in --out/scale.csv and measure the rest")
    p.add_argument("--compare", type=Path, default=None, metavar="OTHER_RUN",
                   help="a saved run folder: write time/memory ratios against it, flag regressions")
    p.add_argument("--fit-min-n", type=int, default=1024,
                   help="fit exponents over n >= this (small n measure overheads; default 1024)")
    p.add_argument("--load", action="append", default=[], metavar="MODULE",
                   help="import a module or .py file that registers extra mechanisms (repeatable)")
    p.add_argument("--compile", action="store_true",
                   help="run each mechanism under torch.compile (compile time recorded apart; default eager)")
    p.add_argument("--rounds", type=int, default=3,
                   help="interleaved timing rounds per n: A B C A B C ..., each row the median over its "
                        "rounds (default 3)")
    p.add_argument("--retries", type=int, default=2,
                   help="times a configuration is measured again when it was not clean (default 2)")
    p.add_argument("--max-slowdown", type=float, default=0.25, metavar="FRACTION",
                   help="a round is disturbed when the machine probe beside it is more than this much "
                        "slower than the sweep's best (default 0.25)")
    p.add_argument("--max-spread", type=float, default=0.5, metavar="FRACTION",
                   help="a row is not clean when its runs' IQR, or the range of its round medians, "
                        "exceeds this fraction of its median (default 0.5)")
    p.set_defaults(func=cmd_scale)

    p = sub.add_parser("resolution", help="dense tasks: largest image side each mechanism trains at",
                       description="For a dense task (coco, ade20k), run one synthetic training step "
                                   "per mechanism at growing image sides, each in its own process under "
                                   "a memory limit: the training side, doubling until a step fails, then "
                                   "bisection. Writes resolution.csv, summary.csv, meta.json and a plot.")
    p.add_argument("--task", required=True, help="a task with a resolution probe (coco, ade20k)")
    p.add_argument("--mechanism", default="set,softmax",
                   help="comma list, or `all` (default: set,softmax)")
    p.add_argument("--size", default="micro", help="backbone size (default micro)")
    p.add_argument("--start-side", type=int, default=None,
                   help="first side in pixels (default: the task's training side)")
    p.add_argument("--max-side", type=int, default=4096, help="largest side to try (default 4096)")
    p.add_argument("--granularity", type=int, default=32, help="bisection step in pixels (default 32)")
    p.add_argument("--memory-limit", type=float, default=None, metavar="MIB",
                   help="CPU memory a step may take before it counts as out of memory "
                        "(default: 85%% of the memory available now)")
    p.add_argument("--budget", type=float, default=300.0,
                   help="seconds per side (building, timing, memory) before it counts as too slow "
                        "(default 300)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto = cuda when available, else cpu")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's default here)")
    _add_opt_argument(p)
    p.add_argument("--out", type=Path, default=None,
                   help="output folder (default: a new timestamped folder under results/runs/, git-ignored)")
    p.add_argument("--load", action="append", default=[], metavar="MODULE",
                   help="import a module or .py file that registers extra tasks or mechanisms (repeatable)")
    p.set_defaults(func=cmd_resolution)

    p = sub.add_parser("plot", help="redraw every plot of a results folder",
                       description="Redraw every plot in and under a folder: each `scale` sweep's (with its "
                                   "fit and ratio tables), each `resolution` probe's, and each task results "
                                   "table's (results/local/imagenet.csv and the like), beside what it draws "
                                   "from; prints every file it wrote.")
    p.add_argument("run_dir", type=Path,
                   help="a folder written by `scale` or `resolution`, or a folder of task tables and run "
                        "folders (results/local, results/reference, results)")
    p.add_argument("--fit-min-n", type=int, default=1024, help="fit exponents over n >= this")
    p.add_argument("--include-limited", action="store_true",
                   help="also draw task runs cut short by --max-steps/--limit-train/--limit-val (smoke runs)")
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser("report", help="one self-contained page of results: HTML, or Markdown",
                       description="Write every result in and under the folders on one page: the run "
                                   "contexts, the kernel sweeps with their fits, the accuracy sweeps, every "
                                   "task table with its seed spreads, the resolution probes, and the "
                                   "comparison with a saved run. HTML: one file, plots embedded, no network; "
                                   "Markdown: plots in a folder beside it. Writes nothing into the folders.")
    p.add_argument("folders", type=Path, nargs="*", default=[Path("results")], metavar="DIR",
                   help="folders of results (default: results)")
    p.add_argument("--out", type=Path, default=None,
                   help="the page to write (default: results/report.html, git-ignored; report.md with "
                        "--format md)")
    p.add_argument("--format", choices=["html", "md"], default=None,
                   help="html (default) or md; default: from --out's suffix")
    p.add_argument("--compare", type=Path, default=None, metavar="SAVED_RUN",
                   help="a saved sweep folder or folder of task tables to compare with")
    p.add_argument("--include-limited", action="store_true",
                   help="also show task runs cut short by --max-steps/--limit-train/--limit-val (smoke runs)")
    p.add_argument("--fit-min-n", type=int, default=None,
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
                     "yes" if reason is None else "no", reason or cls.summary))
        backends.append((name, cls.backend(args.device) if reason is None else "-"))
    for name, why in registry.broken_plugins().items():
        rows.append((name, "?", "?", "no", f"plug-in failed to load: {why}"))
    print(f"Mechanisms (device: {args.device})")
    _print_table(("name", "complexity", "tokens", "available", "notes"), rows)
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

    cls = registry.get_mechanism(name)
    reason = cls.unavailable_reason(device)
    print(f"{cls.name}: {cls.summary}")
    print(f"  complexity:  {cls.complexity}")
    print(f"  tokens:      {'2-D grid required' if cls.needs_grid else 'sequences or 2-D grids'}")
    padding = ("native, inside the batched computation" if cls.masking == "native"
               else "per length: each group of equally long sequences runs without its padding")
    print(f"  padding:     {padding}")
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

    for spec in args.load:
        registry.load_module(spec)
    device = _device(args.device)
    limit = _memory_limit(args.memory_limit)
    threads, note = args.threads, ""
    if threads is None:
        threads, note = default_threads(torch.get_num_threads()) if device == "cpu" else (1, "")
    if note:
        print(note)
    cfg = SweepConfig(
        mechanisms=parse_mechanisms(args.mechanism), seq=parse_seq(args.seq),
        modes=["fwd", "fwd+bwd"] if args.mode == "both" else [args.mode], batch=args.batch,
        heads=args.heads, head_dim=args.head_dim, dtype=args.dtype, device=device,
        threads=threads, layout=args.layout,
        options=parse_mechanism_options(args.opt), budget=args.budget, min_run_time=args.min_time,
        memory_limit_mib=limit if device == "cpu" else None,
        load=[str(Path(s).resolve()) if s.endswith(".py") else s for s in args.load],
        compile=args.compile, rounds=args.rounds, retries=args.retries, max_slowdown=args.max_slowdown,
        max_spread=args.max_spread)
    if args.compare is not None and not (args.compare / "scale.csv").is_file():
        raise UsageError(f"--compare {args.compare}: no scale.csv there")
    if args.resume and args.out is None:
        raise UsageError("--resume needs --out pointing at the run to finish")
    out = args.out or default_out_dir(RESULTS)
    print(f"attnbench scale: {len(cfg.mechanisms)} mechanisms x {len(cfg.seq)} lengths x "
          f"{len(cfg.modes)} modes on {device} ({cfg.threads} threads, "
          f"{'compiled' if cfg.compile else 'eager'}, {cfg.rounds} interleaved rounds) -> {out}",
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


def cmd_resolution(args: argparse.Namespace) -> int:
    for spec in args.load:
        registry.load_module(spec)
    get_task(args.task)  # unknown names raise with the valid choices
    probed = resolution_tasks()
    if args.task not in probed:
        raise UsageError(f"--task {args.task}: no resolution probe (image side does not drive its cost); "
                         f"valid choices: {', '.join(probed) or 'none'}")
    device = _device(args.device)
    task = get_task(args.task)
    cfg = ProbeConfig(
        task=args.task, mechanisms=parse_mechanisms(args.mechanism), size=args.size,
        start=args.start_side or task.train_side, max_side=args.max_side, granularity=args.granularity,
        memory_limit_mib=_memory_limit(args.memory_limit) if device == "cpu" else None, budget=args.budget,
        threads=args.threads or torch.get_num_threads(), device=device,
        options=parse_mechanism_options(args.opt),
        load=[str(Path(s).resolve()) if s.endswith(".py") else s for s in args.load])
    out = args.out or new_run_dir(f"resolution-{args.task}")
    limit = f"{cfg.memory_limit_mib / 1024:.1f} GiB" if cfg.memory_limit_mib else "device memory"
    print(f"attnbench resolution: {args.task}, {len(cfg.mechanisms)} mechanisms from {cfg.start} px on "
          f"{device} ({cfg.threads} threads), limit {limit}, {cfg.budget:g} s per side -> {out}",
          file=sys.stderr)
    probe(cfg, out, ["attnbench", *sys.argv[1:]])
    summary = pd.read_csv(out / "summary.csv")
    with pd.option_context("display.width", 200, "display.max_columns", 20, "display.max_colwidth", 60):
        shown = summary.drop(columns=["task", "memory_limit_mib", "budget_s", "max_side"])
        print(shown.to_string(index=False))
    print(f"wrote {out / 'resolution.csv'}, {out / 'summary.csv'} and {out / 'resolution.png'}")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from attnbench.plots import discover, redraw

    if not args.run_dir.is_dir() or discover([args.run_dir]).empty():
        raise UsageError(f"{args.run_dir}: no scale.csv there (a folder written by `scale`), nor "
                         "resolution.csv (`resolution`), nor a task results table such as "
                         "results/local/imagenet.csv, in it or under it")
    written = redraw([args.run_dir], args.fit_min_n, args.include_limited)
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser(requested_task(sys.argv[1:] if argv is None else argv))
    args = parser.parse_args(argv)
    torch.set_printoptions(precision=4)
    try:
        return args.func(args)
    except (UsageError, UnknownMechanismError, UnknownTaskError, OptionError, SweepError, TaskError,
            ResolutionError) as exc:
        parser.exit(2, f"attnbench {args.command}: error: {exc}\n")


if __name__ == "__main__":
    sys.exit(main())
