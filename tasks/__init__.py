"""Task harnesses, one module each; importing this package registers them.

Tasks from the design card that are not built yet are registered as such, so that
``attnbench list`` and ``attnbench run`` say so plainly instead of pretending.
"""

from attnbench.tasks import Task, register_task
from tasks import (
    ade20k,  # noqa: F401  (registers the task)
    coco,  # noqa: F401  (registers the task)
    glue,  # noqa: F401  (registers the task)
    imagenet,  # noqa: F401  (registers the task)
)

_PLANNED: dict[str, str] = {}


def _planned(task_name: str, task_summary: str) -> type[Task]:
    class Planned(Task):
        name = task_name
        summary = task_summary

        @classmethod
        def unavailable_reason(cls) -> str | None:
            return "not built yet"

    Planned.__name__ = Planned.__qualname__ = f"Planned_{task_name}"
    return register_task(Planned)


for _name, _summary in _PLANNED.items():
    _planned(_name, _summary)
