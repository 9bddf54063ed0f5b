"""GLUE (``--task glue``): the GLUE layout, tokenizer and batches (``data.py``), the embedded
Rotten Tomatoes set (``embedded.py``), GLUE's metrics (``metrics.py``), the score plot
(``plots.py``) and the task (``task.py``) on the text encoder of ``tasks.common``."""

from tasks.glue.task import Glue

__all__ = ["Glue"]
