"""Built-in attention mechanisms, one module each.

Each module registers its mechanism with ``@register_mechanism`` and is declared as an entry
point of the group ``attnbench.mechanisms`` in attnbench's ``pyproject.toml``, exactly as a
third-party plug-in declares its own: the engine loads them all through that group and never
imports this package by name. Adding a mechanism is adding a file and its entry-point line
(``tests/test_layout.py`` fails for a module without one). Modules of shared helpers that register
no mechanism (``chunked``, ``fla_kernels``, ``recurrent``: the gated linear recurrences' kernels
and common layer) are imported by the mechanisms that use them and have no entry point.
"""
