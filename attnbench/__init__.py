"""attnbench: a benchmark suite for attention mechanisms, SeT first among them."""

import logging

# torch.utils.cpp_extension (imported by torch.utils.benchmark and torchvision) warns at import
# on CUDA builds without a CUDA runtime; it is noise for every attnbench command.
logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)

from attnbench.mechanism import Flops, Mechanism  # noqa: E402
from attnbench.registry import (  # noqa: E402
    OptionError,
    UnknownMechanismError,
    build_mechanism,
    get_mechanism,
    mechanism_names,
    register_mechanism,
)

__version__ = "0.1.0"
__all__ = ["Flops", "Mechanism", "OptionError", "UnknownMechanismError", "build_mechanism",
           "get_mechanism", "mechanism_names", "register_mechanism", "__version__"]
