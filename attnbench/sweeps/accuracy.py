"""``attnbench scale --task T``: the accuracy sweep, accuracy against sequence length.

One model is trained and evaluated per point (mechanism variant, n, seed), each by the task's own
``attnbench run --task T --mechanism M --seq-len N --seed S …`` in a process of its own
(``attnbench.measure.worker.run_isolated``) under the kernel sweep's memory limit and a time limit per
point: an out-of-memory, a crash or a time-out becomes a row with its status and message, and the
sweep goes on. Every point of a sweep gets the same budget: the same task arguments (the step
budget of the task's preset) or, with ``--time-budget``, the same seconds of training. Where the
points run (here, ``--jobs`` at once, Ray, Slurm) is ``attnbench.sweeps.launchers``'s; with a ``--lr`` /
``--weight-decay`` grid each point trains several runs and its best by validation stands for it
(``attnbench.sweeps.tuning``).

A sweep folder holds ``accuracy.csv`` (one row per point, appended atomically as each finishes:
the task's row, the variant, status, message and the sweep's context), ``meta.json`` (the sweep's
settings; ``--resume`` refuses a folder whose settings differ), ``breaking.csv`` (each variant's
breaking length: the smallest n at which its mean accuracy over seeds falls more than
``MARGIN`` points below softmax's, or sdpa's), the plots (``attnbench.plots.accuracy``), and ``points/``: each
point's run folder and log. The engine sees the task only through the task registry.

What is judged is the task's ``sweep_score`` (``attnbench.task.SweepScore``, recorded in meta.json):
accuracy, higher is better, for most tasks; a language model's perplexity, lower is better, broken
where it rises more than 10 % above the baseline's at the same n.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import pandas as pd

from attnbench.plots.accuracy import accuracy_sweep_plots
from attnbench.results.aggregate import baseline_of, failures, format_spread, sweep_stats
from attnbench.results.tables import (
    read_meta,
    read_table,
    write_table,
)
from attnbench.sweeps import tuning
from attnbench.sweeps.base import SweepError, SweepFolder, parse_mechanisms, parse_seq
from attnbench.sweeps.launchers import Launcher, LocalLauncher
from attnbench.sweeps.points import (
    AccuracyConfig,
    PointJob,
    Progress,
    RunCommand,
    context,
    parse_seeds,
    points,
    precision,
)
from attnbench.sweeps.tuning import (
    GRID,
    mark_selected,
    tuned_view,
    value_text,
)
from attnbench.task import ACCURACY, SweepScore, UnknownTaskError, get_task, sweep_tasks

MARGIN = ACCURACY.margin  # points of accuracy below the baseline at which a variant counts as broken
# (a task's other columns follow these: a language model's perplexity, say)
COLUMNS = ["task", "mechanism", "variant", "options", "seq_len", "seed", "lr", "weight_decay", "status",
           "selected", "accuracy", "val_accuracy", "best_accuracy", "chance", "steps", "step_ms", "tokens_s",
           "peak_mem_mib", "params", "softmax_params", "flops_per_step", "time_budget", "message", "point_s",
           "device", "threads", "dtype", "git_commit"]
KEY = ["variant", "seq_len", "seed"]  # a point; with a grid (``tuning``) it trains several runs
RUN_KEY = [*KEY, *GRID]  # one run
REQUIRED = [*KEY, "mechanism", "status"]  # what a folder's accuracy.csv must hold to be read (and its score)
# settings a resumed sweep must share with its folder
SHARED = ("task", "args", "time_budget", "device")


def plan(task: str, device: str, seq: str | None = None, mechanisms: str | None = None,
         seeds: str | None = None, task_args: Sequence[str] = (), **settings: Any) -> AccuracyConfig:
    """The sweep of ``task`` on ``device``: its preset for the device, each entry the flag's value
    where one is given; ``task_args`` come after the preset's (a flag given again wins there)."""
    cls = get_task(task)
    reason = cls.unavailable_reason()
    if reason:
        raise SweepError(f"task {task!r} is {reason}")
    if not cls.sweep_presets:
        raise SweepError(f"task {task!r} has no accuracy sweep (no sweep presets); tasks with one: "
                         f"{', '.join(sweep_tasks()) or 'none'}")
    preset = cls.sweep_preset(device, task_args)
    if preset is None:
        raise SweepError(f"task {task!r} has no sweep preset for {device}; presets: "
                         f"{', '.join(cls.sweep_presets)}")
    cfg = AccuracyConfig(
        task=task, device=device,
        seq=parse_seq(seq) if seq is not None else list(preset["seq"]),
        mechanisms=parse_mechanisms(mechanisms if mechanisms is not None else ",".join(preset["mechanisms"])),
        seeds=parse_seeds(seeds) if seeds is not None else list(preset["seeds"]),
        args=[*preset.get("args", []), *task_args], **settings)
    cfg.validate()
    if len(cfg.grid()) > 1 and not getattr(cls, "validation_split", False):
        held_out = [t for t in sweep_tasks() if getattr(get_task(t), "validation_split", False)]
        raise SweepError(f"task {task!r} holds out no validation split, which picks each point's best of "
                         f"--lr/--weight-decay; tasks with one: {', '.join(held_out) or 'none'}")
    return cfg


def task_score(task: str) -> SweepScore:
    """What a sweep of ``task`` judges: the task's ``sweep_score`` (accuracy where it is not installed)."""
    try:
        return get_task(task).sweep_score
    except UnknownTaskError:
        return ACCURACY


def recorded_score(meta: dict[str, Any]) -> SweepScore:
    """The score a sweep folder's meta.json recorded, else its task's, else accuracy."""
    recorded = meta.get("score")
    if isinstance(recorded, dict):
        try:
            return SweepScore(**recorded)
        except TypeError:  # a field this version does not know: judge by the task's own
            pass
    return task_score(str(meta.get("task", meta.get("sweep", {}).get("task", ""))))


def read_points(path: Path, columns: list[str] | None = None) -> pd.DataFrame:
    """A sweep's ``accuracy.csv``: the ``REQUIRED`` columns, n and seed numbers in every row and the
    accuracy in every ``ok`` one; a damaged table is a ``ResultsError`` naming it."""
    return read_table(path, columns, required=REQUIRED, numbers=["seq_len", "seed"], ok_numbers=["accuracy"],
                      kind="accuracy")


def _check_resume(cfg: AccuracyConfig, old: dict[str, Any], out: Path) -> None:
    """A resumed sweep must train as its folder did (``old``: the settings its meta.json records): same
    task, task arguments, budget, device and, for every mechanism in both, the same options."""
    mine = dataclasses.asdict(cfg)
    for key in SHARED:
        if key in old and old[key] != mine[key]:
            raise SweepError(f"--resume: {out} was swept with {key}={old[key]!r}, this sweep asks for "
                             f"{mine[key]!r}; choose another --out")
    for mech in set(old.get("mechanisms", [])) & set(cfg.mechanisms):
        before, now = old.get("options", {}).get(mech, {}), cfg.options.get(mech, {})
        if before != now:
            raise SweepError(f"--resume: {out} ran {mech} with options {before or 'none'}, this sweep asks "
                             f"for {now or 'none'}; choose another --out")


class AccuracyFolder(SweepFolder):
    """An accuracy sweep's folder: ``accuracy.csv``, and each point's run under ``points/``."""

    table, columns, kind, schema = "accuracy.csv", COLUMNS, "an accuracy sweep", "accuracy"

    def foreign(self) -> str | None:
        recorded = read_meta(self.meta_path)
        if recorded.get("kind", "accuracy") != "accuracy":  # a kernel sweep's folder, say: keep its meta.json
            return f"a {recorded['kind']} run"
        return super().foreign()

    def check_resume(self) -> None:
        if self.meta_path.exists():
            _check_resume(self.cfg, self.recorded().get("sweep", {}), self.out)


def check_sweep_out(cfg: AccuracyConfig, out: Path, resume: bool) -> None:
    """The sweep ``cfg`` may write to ``out`` (``SweepFolder.check``); else a ``SweepError``."""
    AccuracyFolder(cfg, out).check(resume)


def run_sweep(cfg: AccuracyConfig, out: Path, resume: bool, argv: list[str],
              log: TextIO | None = None, launcher: Launcher | None = None, *,
              run: RunCommand) -> pd.DataFrame:
    """Train every point not already in ``out/accuracy.csv``, where ``launcher`` runs them (default:
    here, one at a time), each point's ``attnbench run`` by ``run`` in its own process; returns the
    full table."""
    log = log or sys.stderr
    folder = AccuracyFolder(cfg, out)
    folder.check(resume)
    csv = folder.csv
    score = task_score(cfg.task)
    folder.write_meta(folder.meta(argv, resume, kind="accuracy", task=cfg.task,
                                  dtype=precision(cfg.args, cfg.device), sweep=dataclasses.asdict(cfg),
                                  score=dataclasses.asdict(score)))
    done = read_points(csv, COLUMNS) if csv.exists() else folder.read(COLUMNS)
    grid = {c: done[c].map(value_text) for c in GRID}
    seen = {(str(v), int(n), int(s), lr, wd) for v, n, s, lr, wd in zip(
        done["variant"], done["seq_len"], done["seed"], grid["lr"], grid["weight_decay"], strict=True)}
    todo = [p for p in points(cfg) if p.key not in seen]
    if seen:
        print(f"resuming: {len(seen)} points already in {csv} (failures too: delete a row to run it again), "
              f"{len(todo)} to go", file=log)
    launcher = launcher or LocalLauncher()
    progress = Progress(todo, log, launcher.width, score)
    try:
        job = PointJob(cfg, out.resolve(), context(cfg), run)
        with contextlib.closing(launcher.run(todo, job, progress)) as finished:
            for point, row in finished:
                folder.append([row], then=mark_selected)
                progress.report(point, row)
    except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM: the points cut short are killed, the rows stay
        raise folder.interrupted(exc, argv, total=len(seen) + len(todo), unit="points") from None
    return folder.read(COLUMNS)


# ---- what a researcher reads ------------------------------------------------------------------


def breaking_lengths(table: pd.DataFrame, margin: float | None = None,
                     baseline: str | None = None, score: SweepScore = ACCURACY) -> pd.DataFrame:
    """Each variant's breaking length: the smallest n at which its mean score over seeds is worse
    than the baseline's at the same n by more than ``margin`` (default the score's: accuracy more
    than 10 points below; perplexity more than 10 % above). Lengths where the baseline did
    not finish cannot be judged (``baseline_missing_n``); failed points are left out of the means
    and listed (``failed``). ``breaking``: the length; ``none`` when it never breaks where judged;
    ``n/a: no softmax`` when the baseline finished at none of its lengths, ``n/a: no accuracy``
    when the variant finished at none (words a CSV reader does not take for missing values).
    ``gap``: how much worse, in the margin's units. ``baseline``: default ``baseline_of(table)``."""
    baseline = baseline or baseline_of(table)
    margin = score.margin if margin is None else margin
    column = score.column
    stats = sweep_stats(table, score) if column in table.columns else pd.DataFrame(
        columns=["variant", "seq_len", column, "seeds"])
    base = stats[stats["variant"] == baseline].set_index("seq_len")[column]
    failed = failures(table)
    labels = [v for v in dict.fromkeys(table["variant"]) if v != baseline]
    rows = []
    for label in labels:
        mine = stats[stats["variant"] == label].sort_values("seq_len")
        judged, missing, broke = [], [], None
        for r in mine.itertuples():
            n = int(r.seq_len)
            if n not in base.index or not math.isfinite(base[n]):
                missing.append(n)
                continue
            judged.append(n)
            mine_mean = getattr(r, column)
            gap = score.worse_by(mine_mean, base[n])
            if broke is None and round(gap, 9) > margin:
                broke = {"breaking_n": n, column: mine_mean, f"baseline_{column}": base[n],
                         "gap": gap, "seeds": r.seeds}
        mine_failed = failed[failed["variant"] == label].sort_values("seq_len")
        rows.append({
            "variant": label, "mechanism": table[table["variant"] == label]["mechanism"].iloc[0],
            "breaking": str(broke["breaking_n"]) if broke else "none" if judged else
                        f"n/a: no {baseline}" if missing else f"n/a: no {column}",
            **(broke or {"breaking_n": math.nan, column: math.nan, f"baseline_{column}": math.nan,
                         "gap": math.nan, "seeds": math.nan}),
            "judged_n": ",".join(map(str, judged)), "baseline_missing_n": ",".join(map(str, missing)),
            "failed": ", ".join(f"n={int(r.seq_len)} seed={int(r.seed)}: {r.status}"
                                for r in mine_failed.itertuples()),
            "baseline": baseline, "margin": margin, "rule": score.rule(baseline)})
    columns = ["variant", "mechanism", "breaking", "breaking_n", column, f"baseline_{column}", "gap",
               "seeds", "judged_n", "baseline_missing_n", "failed", "baseline", "margin", "rule"]
    return pd.DataFrame(rows, columns=columns).astype({"breaking_n": "Int64", "seeds": "Int64"})


def accuracy_grid(table: pd.DataFrame, score: SweepScore = ACCURACY) -> pd.DataFrame:
    """Variants by n: mean ± std of the score over seeds with their n, or what stopped the points."""
    stats = sweep_stats(table, score) if score.column in table.columns else pd.DataFrame(
        columns=["variant", "seq_len"])
    failed = failures(table)
    cells: dict[str, dict[int, str]] = {}
    for label in dict.fromkeys(table["variant"]):
        row = cells.setdefault(label, {})
        for n in sorted(table["seq_len"].dropna().unique()):
            mine = stats[(stats["variant"] == label) & (stats["seq_len"] == n)]
            bad = failed[(failed["variant"] == label) & (failed["seq_len"] == n)]["status"]
            column = score.column
            text = (format_spread(mine[column].iloc[0], mine[f"{column}_std"].iloc[0],
                                  int(mine["seeds"].iloc[0])) if len(mine) else "-")
            if len(bad):
                text += f" [{', '.join(f'{k} x{c}' for k, c in bad.value_counts().items())}]"
            row[int(n)] = text
    grid = pd.DataFrame.from_dict(cells, orient="index")
    grid.index.name = "variant"
    return grid


@dataclasses.dataclass
class Finished:
    """What ``finish`` wrote: the breaking lengths, and the files (``breaking.csv`` and the plots)."""

    breaking: pd.DataFrame
    paths: list[Path]


def finish(out: Path, log: TextIO | None = None) -> Finished:
    """Write ``breaking.csv`` and the plots of a sweep folder: of each point's run that stands for
    it, its best by validation where the sweep was tuned (``attnbench.sweeps.tuning``), labelled so."""
    meta = read_meta(out / "meta.json")
    score = recorded_score(meta)
    table = read_points(out / "accuracy.csv")
    if table.empty:
        raise SweepError(f"{out / 'accuracy.csv'} holds no points")
    tuned = tuning.label(table)
    view = tuned_view(table)
    breaking = breaking_lengths(view, score=score).assign(tuned=tuned)
    write_table(out / "breaking.csv", breaking)
    paths = accuracy_sweep_plots(view, breaking, out, meta, tuned, score)
    print(f"wrote {out / 'accuracy.csv'}, {out / 'breaking.csv'} and {len(paths)} plot files",
          file=log or sys.stderr)
    return Finished(breaking, [out / "breaking.csv", *paths])


def _text(column: pd.Series) -> pd.Series:
    """A column as the console shows it: "-" where empty."""
    return column.map(lambda v: "-" if pd.isna(v) or str(v) == "" else str(v))


def summary(out: Path) -> str:
    """The console summary: the score (accuracy) per variant and n, then the breaking lengths."""
    score = recorded_score(read_meta(out / "meta.json"))
    column, digits = score.column, score.decimals
    runs = read_table(out / "accuracy.csv", kind="accuracy")
    table, tuned = tuned_view(runs), tuning.label(runs)
    breaking = read_table(out / "breaking.csv")
    baseline = str(breaking["baseline"].iloc[0]) if len(breaking) else baseline_of(table)
    with pd.option_context("display.width", 250, "display.max_columns", 30, "display.max_colwidth", 60):
        parts = [f"{score.label} per variant and n: mean ± std over seeds (n = seeds); [failures]"
                 f"{'; ' + tuned if tuned else ''}\n{accuracy_grid(table, score).to_string()}"]
        if len(breaking):
            shown = pd.DataFrame({
                "variant": breaking["variant"], "breaking length": breaking["breaking"],
                f"{column} there vs {baseline}": [
                    f"{a:.{digits}f} vs {b:.{digits}f}" if math.isfinite(a) else "-"
                    for a, b in zip(breaking[column], breaking[f"baseline_{column}"], strict=True)],
                "judged at n": _text(breaking["judged_n"]),
                f"no {baseline} at n": _text(breaking["baseline_missing_n"]),
                "did not finish": _text(breaking["failed"])})
            parts.append(f"breaking length: {score.rule(baseline)}\n{shown.to_string(index=False)}")
        else:
            parts.append(f"no breaking lengths: nothing but {baseline} in this sweep")
    return "\n\n".join(parts)


def compare(out: Path, other: Path) -> pd.DataFrame:
    """The score (accuracy) of this sweep against a saved one, point by point (variant, n, seed);
    written to ``compare.csv``."""
    column = recorded_score(read_meta(out / "meta.json")).column
    mine, theirs = read_table(out / "accuracy.csv", kind="accuracy"), read_points(other / "accuracy.csv")
    if theirs.empty:
        raise SweepError(f"--compare {other}: no accuracy.csv there")
    mine, theirs = tuned_view(mine), tuned_view(theirs)  # each point's run that stands for it
    keep = [*KEY, "status", column, "step_ms", "peak_mem_mib"]
    mine = mine.drop_duplicates(KEY, keep="last").reindex(columns=keep)
    theirs = theirs.drop_duplicates(KEY, keep="last").reindex(columns=keep)
    both = mine.merge(theirs, on=KEY, how="outer", suffixes=("", "_before"))
    both = both.sort_values(["seq_len", "variant", "seed"])
    both[f"{column}_change"] = both[column] - both[f"{column}_before"]
    both["time_ratio"] = both["step_ms"] / both["step_ms_before"]
    both["memory_ratio"] = both["peak_mem_mib"] / both["peak_mem_mib_before"]
    result = both[[*KEY, "status", "status_before", column, f"{column}_before", f"{column}_change",
                   "time_ratio", "memory_ratio"]].reset_index(drop=True)
    write_table(out / "compare.csv", result)
    return result


def compare_text(result: pd.DataFrame, other: Path, out: Path) -> str:
    """The comparison as the console shows it: one line per point."""
    shown = result.copy()
    score = recorded_score(read_meta(out / "meta.json"))
    column, digits = score.column, score.decimals
    for c in ("status", "status_before"):
        shown[c] = shown[c].fillna("not run")
    for c in (column, f"{column}_before"):
        shown[c] = shown[c].map(lambda v: f"{v:.{digits}f}" if pd.notna(v) else "-")
    shown[f"{column}_change"] = shown[f"{column}_change"].map(
        lambda v: f"{v:+.{digits}f}" if pd.notna(v) else "-")
    for c in ("time_ratio", "memory_ratio"):
        shown[c] = shown[c].map(lambda v: f"{v:.2f}x" if pd.notna(v) else "-")
    with pd.option_context("display.width", 250, "display.max_rows", 10_000):
        return (f"compared with {other}: {column} here minus there, point by point -> {out / 'compare.csv'}\n"
                f"{shown.to_string(index=False)}")
