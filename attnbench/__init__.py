"""attnbench: a benchmark suite for attention mechanisms, SeT first among them.

The public API that mechanisms and tasks build on: the mechanism contract and registry, the
task contract and registry, their errors, and the parsing of mechanism options.
"""

import logging

# torch.utils.cpp_extension (imported by torch.utils.benchmark and torchvision) warns at import
# on CUDA builds without a CUDA runtime; it is noise for every attnbench command.
logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)

from attnbench.mechanism import Flops, Mechanism  # noqa: E402
from attnbench.options import parse_mechanism_options  # noqa: E402
from attnbench.registry import (  # noqa: E402
    OptionError,
    UnknownMechanismError,
    build_mechanism,
    get_mechanism,
    mechanism_names,
    register_mechanism,
)
from attnbench.task import Task, TaskError, UnknownTaskError, get_task, register_task, task_names  # noqa: E402

__version__ = "0.1.0"
__all__ = ["Flops", "Mechanism", "OptionError", "Task", "TaskError", "UnknownMechanismError",
           "UnknownTaskError", "build_mechanism", "get_mechanism", "get_task", "mechanism_names",
           "parse_mechanism_options", "register_mechanism", "register_task", "task_names", "__version__"]
