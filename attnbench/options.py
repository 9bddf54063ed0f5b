"""Mechanism options from the command line: ``--opt set.m=32`` parsed and checked.

Part of the engine's public API: the CLI and the task harnesses share it.
"""

from __future__ import annotations

from collections.abc import Sequence

from attnbench import registry
from attnbench.registry import OptionError


def parse_mechanism_options(items: Sequence[str]) -> dict[str, dict[str, str]]:
    """``["set.m=32", "set.eps=0.5"]`` -> ``{"set": {"m": "32", "eps": "0.5"}}``, every option
    validated against its mechanism's ``Options`` now, not deep inside a run; mistakes raise
    ``OptionError`` (or ``UnknownMechanismError``) with one line naming the valid choices."""
    parsed: dict[str, dict[str, str]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        mech, dot, option = key.partition(".")
        if not sep or not dot or not mech or not option:
            raise OptionError(f"--opt {item!r}: expected MECHANISM.OPTION=VALUE, e.g. set.m=32")
        registry.get_mechanism(mech)
        parsed.setdefault(mech, {})[option] = value
    for mech, values in parsed.items():
        registry.get_mechanism(mech).make_options(**values)
    return parsed
