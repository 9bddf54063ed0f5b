"""What a training run records of its command line, so that ``attnbench run --resume DIR`` alone
goes on with the run's own settings, and a finished run is not run twice.

The harness writes ``settings`` (every option of ``attnbench run`` as it was resolved, paths
absolute) into the run folder's ``meta.json`` and into each ``checkpoint.pt`` (a checkpoint copied
elsewhere keeps them); once the run's row is in its table, ``meta.json`` names that table
(``row_in``). On ``--resume`` the CLI reads them back (``resumed_argv``, ``finished_table``).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from attnbench.results.tables import ResultsError, read_meta, write_meta
from attnbench.task import task_names

SETTINGS = "settings"  # the key in meta.json and checkpoint.pt
ROW_IN = "row_in"  # meta.json: the table holding the finished run's row
# Not settings: the subcommand and its function, what the CLI derives, and where the run is
# (--resume names the folder; --out is that folder).
NOT_SETTINGS = frozenset({"command", "func", "mechanism_options", "resume", "out"})
# Where the row goes, and the plug-ins that are loaded, may be chosen anew on resume; everything else
# must match the record.
OVERRIDABLE = frozenset({"results", "load"})
_UNRECORDABLE = object()  # a value JSON cannot hold: left out of the record


def settings_of(args: argparse.Namespace) -> dict[str, Any]:
    """The run's options as JSON values (paths absolute strings), for ``meta.json`` and checkpoints."""
    record = {}
    for key, value in vars(args).items():
        plain = plain_value(value)
        if key not in NOT_SETTINGS and plain is not _UNRECORDABLE:
            record[key] = plain
    return record


def plain_value(value: Any) -> Any:
    """``value`` as the record holds it: paths absolute, tuples as lists; anything that JSON cannot
    hold is ``_UNRECORDABLE``."""
    if isinstance(value, Path):
        return str(value.expanduser().resolve())
    if isinstance(value, (list, tuple)):
        items = [plain_value(v) for v in value]
        return _UNRECORDABLE if _UNRECORDABLE in items else items
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return _UNRECORDABLE


def run_folder(path: Path) -> Path:
    """The run folder of ``--resume RUN_DIR`` or ``--resume RUN_DIR/checkpoint.pt``."""
    return path if path.is_dir() else path.parent


def recorded_settings(path: Path) -> dict[str, Any] | None:
    """The settings a run recorded (``meta.json``, else the checkpoint), or None for a folder that
    holds none (a run from before the record, or no run at all). A damaged ``meta.json`` is a
    ``ResultsError``."""
    folder = run_folder(path)
    settings = read_meta(folder / "meta.json").get(SETTINGS)
    if isinstance(settings, dict):
        return settings
    import torch

    file = path if path.is_file() else folder / "checkpoint.pt"
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception:  # missing or unreadable: the harness says so when it loads it
        return None
    settings = state.get(SETTINGS) if isinstance(state, dict) else None
    return settings if isinstance(settings, dict) else None


def finished_table(path: Path) -> Path | None:
    """The table that holds the row of the finished run at ``path``, or None when it has none yet."""
    table = read_meta(run_folder(path) / "meta.json").get(ROW_IN)
    return Path(table) if isinstance(table, str) else None


def held_run(folder: Path) -> str | None:
    """What run ``folder`` holds that a new run must not write over (its history would be appended
    to): a finished one, or one stopped after an epoch; None for a new or empty folder."""
    table = finished_table(folder)
    if table is not None:
        return f"a finished run (its row is in {table})"
    if (folder / "checkpoint.pt").exists():
        return "a run stopped before its end (its checkpoint.pt)"
    return None


def mark_finished(folder: Path, table: Path) -> None:
    """Record in ``folder/meta.json`` that the run's row is in ``table``."""
    meta = read_meta(folder / "meta.json")
    meta[ROW_IN] = str(table.resolve())
    write_meta(folder / "meta.json", meta)


def resumed_argv(argv: list[str], build: Callable[[str | None], argparse.ArgumentParser]) -> list[str]:
    """``run … --resume PATH``: ``argv`` with every option the run recorded and ``argv`` leaves
    out written after it, so that the task (and its options) come from the record too; an option
    given with another value than the recorded one is one line (exit 2). Any other command line,
    or a folder without a record, is returned as it is. ``build(task)``: a new parser."""
    resume = flag_value(argv, "--resume") if argv[:1] == ["run"] else None
    if not resume:
        return argv
    path = Path(resume).expanduser()
    if not path.exists():
        _subparser(build(None), "run").error(f"argument --resume: {resume}: no such file or folder")
    try:
        settings = recorded_settings(path)
    except ResultsError as exc:
        _subparser(build(None), "run").error(f"--resume {resume}: {exc}")
    if settings is None:  # a run from before the record: its options are given again (the harness checks)
        if flag_value(argv, "--task") is None:
            _subparser(build(None), "run").error(
                f"--resume {resume}: no record of a run's settings there (meta.json, checkpoint.pt); "
                "give the run's options (--task, --mechanism, …) again")
        return argv
    task = flag_value(argv, "--task") or settings.get("task")
    parser = build(task if task in task_names() else None)  # an unknown one: the parser names it
    run = _subparser(parser, "run")
    actions = {a.dest: a for a in run._actions if a.option_strings}
    given = _given(parser, run, argv)
    folder = run_folder(path)
    conflicts = []
    if "out" in given and plain_value(given["out"]) != str(folder.resolve()):
        conflicts.append(f"--out {given['out']} given, but the run's folder is {folder}")
    for key, recorded in settings.items():
        if key in given and key not in OVERRIDABLE and key in actions:
            now = plain_value(given[key])
            if _normal(now) != _normal(recorded):
                flag = actions[key].option_strings[-1]
                conflicts.append(f"{flag} {_shown(now)} given, but the run recorded "
                                 f"{flag} {_shown(recorded)}")
    if conflicts:
        run.error(f"--resume {resume}: {'; '.join(conflicts)} (leave a flag out to keep the run's value)")
    tokens = []
    for key, recorded in settings.items():
        action = actions.get(key)
        if action is None or key in given or key in NOT_SETTINGS or recorded is None:
            continue  # not an option (any more), given, or left to the preset
        flag = action.option_strings[-1]
        if action.nargs == 0:  # a switch (store_true): present or not
            tokens += [flag] if recorded else []
        elif isinstance(recorded, list):
            tokens += [f"{flag}={item}" for item in recorded]
        else:
            tokens.append(f"{flag}={recorded}")
    return [*argv, *tokens]


def recorded_loads(argv: list[str]) -> list[str]:
    """The ``--load`` modules recorded by the run that ``run … --resume PATH`` continues, for the CLI to
    import before it reads the record (its task may be one of them); none for any other command line,
    or a folder without a readable record (``resumed_argv`` then says what is wrong)."""
    resume = flag_value(argv, "--resume") if argv[:1] == ["run"] else None
    try:
        settings = recorded_settings(Path(resume).expanduser()) if resume else None
    except ResultsError:
        return []
    loads = settings.get("load") if settings else None
    return [str(spec) for spec in loads] if isinstance(loads, list) else []


def flag_value(argv: list[str], flag: str) -> str | None:
    """The value of the first ``FLAG VALUE`` or ``FLAG=VALUE`` in ``argv``, or None."""
    for i, item in enumerate(argv):
        if item == flag and i + 1 < len(argv):
            return argv[i + 1]
        if item.startswith(flag + "="):
            return item.partition("=")[2]
    return None


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


def _given(parser: argparse.ArgumentParser, run: argparse.ArgumentParser, argv: list[str]) -> dict[str, Any]:
    """The options of ``run`` written in ``argv``, parsed (argparse's defaults left out)."""
    dests = {a.dest for a in run._actions if a.option_strings}
    for action in run._actions:
        action.default, action.required = argparse.SUPPRESS, False
    return {k: v for k, v in vars(parser.parse_args(argv)).items() if k in dests}


def _normal(value: Any) -> Any:
    """Repeatable options compare as sets of values, in any order."""
    return sorted(map(str, value)) if isinstance(value, list) else value


def _shown(value: Any) -> str:
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)
