"""The task registry: one decorator to register a task harness, looked up by name.

Tasks reach mechanisms only through the mechanism registry; the engine sees a task only
through this small interface.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable
from typing import Any, ClassVar

_TASKS: dict[str, type[Task]] = {}


class UnknownTaskError(KeyError):
    """A task name that is not registered; the message lists the valid names."""

    def __str__(self) -> str:
        return str(self.args[0])


class TaskError(ValueError):
    """A task request that cannot be run as asked (a bad data folder, size or combination);
    the CLI prints it as one line and exits with status 2."""


class Task:
    """A task harness: its data, model head, metric and training loop."""

    name: ClassVar[str]
    summary: ClassVar[str] = ""

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
    # training step (``attnbench resolution``); ``train_side`` is their default preset's side.
    train_side: ClassVar[int | None] = None

    @classmethod
    def train_step(cls, mechanism: str, side: int, size: str, options: dict[str, Any],
                   device: str) -> tuple[Callable[[], None], int]:
        """One forward, backward and optimiser step of the task's model on synthetic side×side
        images: the step, and how many images it trains on."""
        raise TaskError(f"task {cls.name!r} has no resolution probe; tasks with one: "
                        f"{', '.join(resolution_tasks()) or 'none'}")


def register_task(cls: type[Task]) -> type[Task]:
    """Class decorator: add a ``Task`` subclass to the registry under ``cls.name``."""
    _TASKS[cls.name] = cls
    return cls


def task_names() -> list[str]:
    importlib.import_module("tasks")
    return sorted(_TASKS)


def get_task(name: str) -> type[Task]:
    importlib.import_module("tasks")
    try:
        return _TASKS[name]
    except KeyError:
        raise UnknownTaskError(
            f"unknown task {name!r}; valid choices: {', '.join(sorted(_TASKS))}") from None


def resolution_tasks() -> list[str]:
    """Tasks that offer ``train_step`` (image side matters for them)."""
    return [name for name in task_names() if _TASKS[name].train_step.__func__ is not Task.train_step.__func__]
