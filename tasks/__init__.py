"""The built-in tasks, one folder each, and what they share.

``tasks/<name>/`` holds everything that is one task's alone: its data reader and embedded-set
builder (``data.py``, ``embedded.py``), its model head (``model.py``), its metric
(``metrics.py``), its plots and its task class (``task.py``). ``tasks/common/`` holds what several
tasks share: the training harness with the one epoch loop (``harness.py``, ``trainer.py``,
``distributed.py``), the SeTformer backbone, the text encoder, the image-folder reader and the
cache the embedded sets are written to.

Nothing imports this package by name: each task is an entry point of the group
``attnbench.task`` in attnbench's ``pyproject.toml``, as a third-party task would be.
"""
