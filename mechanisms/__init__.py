"""Built-in attention mechanisms, one module each; importing this package registers them."""

from mechanisms import sdpa, softmax  # noqa: F401
