"""The task contract (``Task``) and its registry: one decorator to register a task, looked up by name.

Every task, built-in or third-party, is found through the ``attnbench.task`` entry-point
group: the built-in ones (``tasks/imagenet``, ``tasks/coco``, …) are declared in attnbench's own
``pyproject.toml`` exactly as a plug-in package declares its own, so the engine never imports
them by name. Tasks reach mechanisms only through the mechanism registry; the engine sees a
task only through the small ``Task`` interface below.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from attnbench.registry import Registry, UnknownNameError

if TYPE_CHECKING:
    import pandas as pd

ENTRY_POINT_GROUP = "attnbench.tasks"


class UnknownTaskError(UnknownNameError):
    """A task name that is not registered; the message lists the valid names."""


class TaskError(ValueError):
    """A task request that cannot be run as asked (a bad data folder, size or combination);
    the CLI prints it as one line and exits with status 2."""


@dataclasses.dataclass(frozen=True)
class SweepScore:
    """What the accuracy sweep reads from a task's rows and how it judges a variant against the
    baseline: ``column`` (mean over seeds per n), better when higher or lower, and the breaking rule,
    worse than the baseline by more than ``margin`` (points of the column, or with ``relative`` % of
    the baseline's value). ``floor``: the row's column of the no-skill level drawn beside it (chance
    accuracy, a unigram model's perplexity), or None; ``best``: the row's best evaluation, or None."""

    column: str = "accuracy"
    label: str = "accuracy (%)"
    higher_is_better: bool = True
    margin: float = 10.0
    relative: bool = False
    floor: str | None = "chance"
    floor_label: str = "chance"
    best: str | None = "best_accuracy"
    decimals: int = 1  # how the console shows a value

    def worse_by(self, value: float, baseline: float) -> float:
        """How much worse ``value`` is than ``baseline``: in points, or in % of the baseline."""
        gap = baseline - value if self.higher_is_better else value - baseline
        return 100 * gap / baseline if self.relative else gap

    def margin_text(self) -> str:
        """"10 points below", "10 % above": what breaking means, before the baseline's name."""
        unit = " %" if self.relative else " points"
        return f"{self.margin:g}{unit} {'below' if self.higher_is_better else 'above'}"

    def rule(self, baseline: str) -> str:
        """The breaking rule in words."""
        moves = "falls" if self.higher_is_better else "rises"
        return (f"the smallest n at which a variant's mean {self.column} {moves} more than "
                f"{self.margin_text()} {baseline}'s at the same n")


ACCURACY = SweepScore()


class Task:
    """What the engine knows of a task: its name, options, how to run it, and three optional
    capabilities (a synthetic training step for ``attnbench resolution``, a model table for
    ``attnbench models``, sweep presets for ``attnbench scale --task``).
    ``tasks.common.harness.TrainingTask`` implements ``run`` once for every task that trains a model."""

    name: ClassVar[str]
    summary: ClassVar[str] = ""
    sizes: ClassVar[Sequence[str]] = ()  # model sizes (``--size``), if the task has several
    # the columns of its results rows that set up an experiment (image side, sequence length, …):
    # rows that differ in one are different experiments, never seeds of one (``results.config_columns``)
    config_columns: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def unavailable_reason(cls) -> str | None:
        """Why the task cannot run here (a missing package, not built yet), or None."""
        return None

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """Task-specific command-line options of ``attnbench run``."""

    def run(self, args: argparse.Namespace) -> int:
        """Train and evaluate; returns a process exit code."""
        raise NotImplementedError

    # Dense tasks, whose cost grows with the input side, offer the resolution probe a synthetic
    # training step (``attnbench resolution``): they set ``train_side`` (their default preset's
    # side) and implement ``train_step``.
    train_side: ClassVar[int | None] = None

    @classmethod
    def train_step(cls, mechanism: str, side: int, size: str, options: dict[str, Any],
                   device: str) -> tuple[Callable[[], None], int]:
        """One forward, backward and optimiser step of the task's model on synthetic side×side
        images: the step, and how many images it trains on."""
        raise TaskError(f"task {cls.name!r} has no resolution probe; tasks with one: "
                        f"{', '.join(resolution_tasks()) or 'none'}")

    # Sequence tasks that take ``--seq-len`` offer the accuracy sweep (``attnbench scale --task``) its
    # defaults per device, "cpu" and "cuda": {"seq": [64, 128, …], "mechanisms": ["softmax", …],
    # "seeds": [0], "args": ["--epochs", "2", …]} (the task arguments of every run: its step budget).
    sweep_presets: ClassVar[dict[str, dict[str, Any]]] = {}
    # A task whose rows carry ``val_accuracy``, the score of a validation split held out from training and
    # apart from the test split: the accuracy sweep tunes --lr/--weight-decay on it
    # (``attnbench.sweeps.tuning``).
    validation_split: ClassVar[bool] = False
    # what the sweep reads from the rows and judges: accuracy, higher is better (a language model:
    # perplexity, lower is better, broken when over 10 % above the baseline's)
    sweep_score: ClassVar[SweepScore] = ACCURACY

    @classmethod
    def sweep_preset(cls, device: str, task_args: Sequence[str]) -> dict[str, Any] | None:
        """The accuracy sweep's preset for ``device`` given the sweep's task arguments (a task with
        forms may keep a preset per form, MQAR's ``--form causal``); None: none for that device."""
        return cls.sweep_presets.get(device)

    @classmethod
    def model_table(cls, sizes: Sequence[str], mechanisms: Sequence[str],
                    **settings: Any) -> list[dict[str, Any]]:
        """``attnbench models``: parameters and forward FLOPs per (size, mechanism), measured."""
        raise TaskError(f"task {cls.name!r} has no model table; tasks with one: "
                        f"{', '.join(model_table_tasks()) or 'none'}")


def flag_value(args: Sequence[str], flag: str) -> str | None:
    """The value a command line gives ``flag`` (``--form causal`` or ``--form=causal``; the last one
    wins, as argparse reads it), or None."""
    value = None
    for i, item in enumerate(args):
        if item == flag and i + 1 < len(args):
            value = args[i + 1]
        elif item.startswith(f"{flag}="):
            value = item.partition("=")[2]
    return value


TASKS: Registry[type[Task]] = Registry("task", ENTRY_POINT_GROUP, UnknownTaskError)


def register_task(cls: type[Task]) -> type[Task]:
    """Class decorator: add a ``Task`` subclass to the registry under ``cls.name``."""
    return TASKS.register(cls)


def task_names() -> list[str]:
    """Every registered task name, sorted."""
    return TASKS.names()


def broken_tasks() -> dict[str, str]:
    """Task plug-ins that failed to load, with the reason."""
    return TASKS.broken()


def get_task(name: str) -> type[Task]:
    """The registered class for ``name``; an unknown name lists the valid ones."""
    return TASKS.get(name)


def resolution_tasks() -> list[str]:
    """Tasks that offer ``train_step`` (image side matters for them): those with a ``train_side``."""
    return [name for name in task_names() if TASKS.get(name).train_side is not None]


def sweep_tasks() -> list[str]:
    """Tasks with an accuracy sweep (``attnbench scale --task``): those with ``sweep_presets``."""
    return [name for name in task_names() if TASKS.get(name).sweep_presets]


def model_table_tasks() -> list[str]:
    """Tasks that offer ``model_table`` (``attnbench models``)."""
    base = Task.model_table.__func__
    return [name for name in task_names() if TASKS.get(name).model_table.__func__ is not base]


# ---- what task runs write --------------------------------------------------------------------


def finished_runs(table: pd.DataFrame, include_limited: bool = False) -> pd.DataFrame:
    """The rows of a task results table that plots and aggregates stand on: runs that finished
    (``status == "ok"``) and, unless ``include_limited``, were not smoke runs cut short by
    ``--max-steps`` / ``--limit-train`` / ``--limit-val``. ``table``: as ``read_task_table`` reads it."""
    rows = table[table["status"] == "ok"]
    if not include_limited:
        rows = rows[~rows["limited"].map(_truthy).astype(bool)]
    return rows


def _truthy(value: Any) -> bool:
    return str(value).strip().lower() in ("true", "1", "yes")
