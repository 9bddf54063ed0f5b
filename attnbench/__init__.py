"""attnbench: a benchmark suite for attention mechanisms, SeT first among them."""

from attnbench.mechanism import Flops, Mechanism
from attnbench.registry import (
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
