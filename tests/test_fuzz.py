"""The command line against bad input: every option of every subcommand, and of ``run`` for every
task, with empty, negative, zero, huge, non-finite, unicode, wrong-type, duplicated and bad-path
values. Each case must end with exit status 0 or 2, never a traceback or a hang, and on 2 print
one line on stderr.

How the table is built and run:

- The options come from the parsers themselves: the argparse actions of each subcommand of
  ``build_parser()``, and of ``build_parser(task)``'s ``run`` for every registered task, so an
  option added later is fuzzed with no change here. Its values follow from its kind: a number
  (``type=`` of ``attnbench.validate``, or a plain int/float), a path check, ``choices``, a flag,
  or free text. Each option is given alone on top of a small valid command line (``base``). The
  mechanism options come the same way, from each registered mechanism's ``Options`` dataclass.
- Cases run in this process, ``attnbench.cli.main(argv)`` with stdout and stderr captured and
  ``SystemExit`` caught: starting a Python per case would take minutes for the thousands here.
- A case that happens to be valid must not start real work: each entry point where work begins
  is replaced by one that raises ``StartedWork``, which counts as success. ``TrainingTask.plan``
  runs every check of ``run`` and raises it at its last step, the model pre-flight
  (``check_model``, which builds models: seconds a case; its own tests cover it); the kernel and
  accuracy sweeps' ``run_sweep``, the resolution probe, the model table of ``models``, ``plot``'s
  redraw and ``report``'s build raise it before they start. ``test_every_command_reaches_its_
  work_and_stops_there`` checks that each base command line gets that far.
- A timer per case (``SIGALRM``, ``CASE_SECONDS``) turns a hang into a failure naming the case.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import signal
import traceback
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from attnbench import cli, get_mechanism, mechanism_names
from attnbench.cli import plot as plot_command
from attnbench.cli import report as report_command
from attnbench.cli import resolution as resolution_command
from attnbench.cli import scale as scale_command
from attnbench.sweeps import accuracy
from attnbench.task import get_task, model_table_tasks, task_names
from attnbench.validate import Number, PathCheck
from tasks.common.harness import TrainingTask

CASE_SECONDS = 20  # far above any case's time (a few ms to ~0.5 s): only a hang reaches it

NUMBERS = ["", "-1", "0", "1" + "0" * 30, "1e400", "nan", "inf", "-inf", "1.5", "0x10", "１２", "ünï"]
TEXTS = ["", "nope", "ünïcödé ☃", "-1", "nan", "a,b", "x=1", "set.m=", "set.iters=1000000000000",
         "set.kernel_sigma=1e-300", "softmax.qkv_bias=maybe"]
CHOICES = ["", "NOPE", "ünï"]


class StartedWork(BaseException):
    """Raised where a valid command would start real work (not an Exception: nothing catches it)."""


class CaseTimeout(BaseException):
    """A case ran past CASE_SECONDS."""


def _stop(*args, **kwargs):
    raise StartedWork


@pytest.fixture
def stop_before_work(monkeypatch):
    """Every entry point where a command starts work raises ``StartedWork``."""
    plan = TrainingTask.plan

    def plan_then_stop(self, args):
        plan(self, args)
        raise StartedWork

    monkeypatch.setattr(TrainingTask, "plan", plan_then_stop)
    for name in task_names():  # the model pre-flight, plan's last step, builds models: seconds each
        if issubclass(get_task(name), TrainingTask):
            monkeypatch.setattr(get_task(name), "check_model", _stop)
    for module, name in ((scale_command, "run_sweep"), (accuracy, "run_sweep"), (resolution_command, "probe"),
                         (plot_command, "redraw"), (report_command, "build")):
        monkeypatch.setattr(module, name, _stop)
    for task in model_table_tasks():
        monkeypatch.setattr(get_task(task), "model_table", classmethod(_stop))
    monkeypatch.setenv("LANGUAGE", "C")  # argparse's gettext then looks for no translation (a stat each)


@pytest.fixture(scope="module")
def places(tmp_path_factory) -> dict[str, Path]:
    """Paths of every kind a path option may be given, and a folder of results to plot."""
    root = tmp_path_factory.mktemp("fuzz")
    results = root / "results"
    results.mkdir()
    (results / "imagenet.csv").write_text("task,mechanism,dataset,status\nimagenet,softmax,x,ok\n")
    (root / "file.txt").write_text("not a folder\n")
    (root / "bad_plugin.py").write_text("def broken(:\n")
    return {"root": root, "results": results, "file": root / "file.txt", "plugin": root / "bad_plugin.py"}


def base(command: str, task: str | None, places: dict[str, Path]) -> dict[str, list[str]]:
    """A small valid command line per command: option -> its words (``""``: the positional)."""
    out = str(places["root"] / "out")
    return {
        "list": {},
        "run": {"--mechanism": ["softmax"], "--task": [task or "imagenet"]},
        "models": {"--mechanism": ["softmax"], "--size": ["micro"]},
        "scale": {"--seq": ["256"], "--mechanism": ["softmax"], "--threads": ["1"], "--out": [out]},
        "resolution": {"--task": ["coco"], "--mechanism": ["softmax"], "--threads": ["1"], "--out": [out]},
        "plot": {"": [str(places["results"])]},
        "report": {"": [str(places["results"])], "--out": [str(places["root"] / "report.html")]},
    }[command]


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def commands() -> list[tuple[str, str | None]]:
    """Every subcommand, and ``run`` once per registered task."""
    names = [name for name in subparsers(cli.build_parser()) if name != "run"]
    return [(name, None) for name in names] + [("run", task) for task in task_names()]


def values(action: argparse.Action, places: dict[str, Path]) -> list[str]:
    """The bad (and borderline) values for one option, from its kind."""
    root = places["root"]
    if isinstance(action.type, PathCheck):
        return ["", " ", str(root / "missing" / "x"), str(places["file"]), str(places["file"] / "below"),
                str(root), "/proc/attnbench-fuzz/unwritable", "ünïcödé"]
    if isinstance(action.type, Number) or action.type in (int, float):
        return NUMBERS
    if action.choices is not None:
        return [*CHOICES, str(next(iter(action.choices))).upper()]
    return [*TEXTS, str(places["plugin"])]


def cases(command: str, task: str | None, places: dict[str, Path]) -> Iterator[list[str]]:
    """Every option of the command alone on its base line, with each of its values; flags and
    options twice; positionals replaced."""
    parser = subparsers(cli.build_parser(task))[command]
    lines = base(command, task, places)
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            continue
        key = action.option_strings[-1] if action.option_strings else ""
        rest = [word for k, words in lines.items() if k != key for word in ([k, *words] if k else words)]
        prefix = [command, *rest]
        if action.nargs == 0:  # a flag: once, and twice
            yield [*prefix, key]
            yield [*prefix, key, key]
            continue
        for value in values(action, places):
            yield [*prefix, f"{key}={value}"] if key else [*prefix, value]
        if key:
            first = lines.get(key, values(action, places)[:1])
            yield [*prefix, key, *first, key, *values(action, places)[1:2]]


def run_case(argv: list[str]) -> tuple[object, str, str]:
    """(exit status or the exception, stdout, stderr) of ``attnbench ARGV`` in this process."""
    out, err = io.StringIO(), io.StringIO()

    def timeout(signum, frame):
        raise CaseTimeout

    previous = signal.signal(signal.SIGALRM, timeout)
    signal.setitimer(signal.ITIMER_REAL, CASE_SECONDS)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a warning is not the error message
            try:
                status: object = cli.main(argv)
            except SystemExit as exc:
                status = exc.code
            except StartedWork:
                status = "started work"
            except CaseTimeout:
                status = f"hung (> {CASE_SECONDS} s)"
            except BaseException:
                status = traceback.format_exc()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    return status, out.getvalue(), err.getvalue()


def problem(status: object, err: str) -> str | None:
    """What is wrong with a case's outcome, or None."""
    if status in (0, "started work"):
        return None
    if status != 2:
        return f"status {status}"
    lines = [line for line in err.splitlines() if line.strip()]
    if len(lines) != 1 or ": error: " not in lines[0] or not lines[0].startswith("attnbench"):
        return f"exit 2 without one error line: {err!r}"
    return None


@pytest.mark.parametrize("command, task", commands(), ids=lambda x: x or "")
def test_no_bad_value_gets_a_traceback_a_hang_or_more_than_one_line(command, task, places, stop_before_work):
    failures, count = [], 0
    for argv in cases(command, task, places):
        count += 1
        status, _, err = run_case(argv)
        why = problem(status, err)
        if why:
            failures.append(f"attnbench {' '.join(argv[0:])}: {why}")
    assert count > 10, f"only {count} cases for {command}"
    assert not failures, f"{len(failures)} of {count} cases failed:\n" + "\n".join(failures[:20])


def test_every_mechanism_option_takes_bad_values_in_one_line(places, stop_before_work):
    """``--opt MECH.KEY=VALUE`` for every field of every registered mechanism's options."""
    failures, count = [], 0
    lines = base("scale", None, places)
    prefix = ["scale", *[word for k, words in lines.items() for word in [k, *words]]]
    for mech in mechanism_names():
        for field in dataclasses.fields(get_mechanism(mech).Options):
            for value in [*NUMBERS, *CHOICES]:
                argv = [*prefix, "--opt", f"{mech}.{field.name}={value}"]
                count += 1
                status, _, err = run_case(argv)
                why = problem(status, err)
                if why:
                    failures.append(f"attnbench {' '.join(argv)}: {why}")
    assert count > 100
    assert not failures, f"{len(failures)} of {count} cases failed:\n" + "\n".join(failures[:20])


@pytest.mark.parametrize("command, task", commands(), ids=lambda x: x or "")
def test_every_command_reaches_its_work_and_stops_there(command, task, places, stop_before_work):
    """The base command lines are valid, so the cases above test one bad value each, and the
    stubs stand where the work starts (``list`` has none: it is the work)."""
    lines = base(command, task, places)
    argv = [command, *[word for k, words in lines.items() for word in ([k, *words] if k else words)]]
    status, _, err = run_case(argv)
    assert status == (0 if command == "list" else "started work"), err

