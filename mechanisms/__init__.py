"""Built-in attention mechanisms, one module each.

Importing this package imports every module in it, and each module registers its mechanism
with ``@register_mechanism``: adding a mechanism is adding a file. Modules whose names start
with ``_`` hold shared helpers and register nothing.
"""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")
