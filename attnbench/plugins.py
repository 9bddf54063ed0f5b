"""Importing this module loads every mechanism and every task, built-in or third-party, once,
through their entry-point groups (``attnbench.mechanisms``, ``attnbench.task``).

For a fork server to preload (``attnbench.measure.worker``): the processes it forks then start with the
mechanisms and the task harnesses (torchvision and the like) already imported, without the
engine naming the packages that hold them.
"""

from attnbench import registry, task

registry.mechanism_names()
task.task_names()
