"""ListOps (``--task listops``): the expression generator (``generator.py``), LRA's file layout
(``data.py``), the generated set written once in it (``embedded.py``) and the task (``task.py``)
on the shared sequence encoder of ``tasks.common.sequence``."""

from tasks.listops.task import ListOps

__all__ = ["ListOps"]
