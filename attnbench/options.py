"""Mechanism options from the command line: ``--opt set.m=32`` parsed and checked, and, in the
sweeps, options as axes: ``--opt set.m=16,64`` runs each value as a variant of its own (``set[m=16]``,
``set[m=64]``).

Part of the engine's public API: the CLI and the task harnesses share it.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence

from attnbench import registry
from attnbench.registry import OptionError


def parse_mechanism_options(items: Sequence[str], axes: bool = False) -> dict[str, dict[str, str]]:
    """``["set.m=32", "set.eps=0.5"]`` -> ``{"set": {"m": "32", "eps": "0.5"}}``, every option
    validated against its mechanism's ``Options`` now, not deep inside a run; mistakes raise
    ``OptionError`` (or ``UnknownMechanismError``) with one line naming the valid choices.

    ``axes`` (the sweeps): a value may be a comma list, ``set.m=16,64``, each value checked alone
    and run as a variant of its own (``variants``); elsewhere one value per option."""
    parsed: dict[str, dict[str, str]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        mech, dot, option = key.partition(".")
        if not sep or not dot or not mech or not option:
            raise OptionError(f"--opt {item!r}: expected MECHANISM.OPTION=VALUE, e.g. set.m=32")
        registry.get_mechanism(mech)
        if "," in value and not axes:
            raise OptionError(f"--opt {item!r}: one value per option here; several values "
                              f"(a sweep axis) are for `attnbench scale`")
        if axes and not all(v.strip() for v in value.split(",")):
            raise OptionError(f"--opt {item!r}: an empty value in the list; expected e.g. {key}=16,64")
        parsed.setdefault(mech, {})[option] = value
    for mech, values in parsed.items():
        for combination in _combinations(values):
            registry.get_mechanism(mech).make_options(**combination)
    return parsed


@dataclasses.dataclass(frozen=True)
class Variant:
    """One mechanism with one value of each of its options: what one sweep series runs."""

    label: str  # "set[m=16,iters=5]": the mechanism and its swept options; "set" when none is swept
    mechanism: str
    options: dict[str, str]  # every option given, swept or not


def _combinations(values: dict[str, str]) -> list[dict[str, str]]:
    """The product of the comma lists, in the order given: {m: "16,64", iters: "5"} -> 2 dicts."""
    names = list(values)
    lists = [[v.strip() for v in values[k].split(",")] for k in names]
    return [dict(zip(names, combo, strict=True)) for combo in itertools.product(*lists)]


def variant_label(mechanism: str, swept: dict[str, str]) -> str:
    """``set[m=16,iters=5]``, or ``set`` when nothing is swept."""
    inner = ",".join(f"{k}={v}" for k, v in swept.items())
    return f"{mechanism}[{inner}]" if inner else mechanism


def split_label(label: str) -> tuple[str, dict[str, str]]:
    """``set[m=16,iters=5]`` -> ``("set", {"m": "16", "iters": "5"})``; ``softmax`` -> ``("softmax", {})``."""
    base, bracket, rest = str(label).partition("[")
    if not bracket or not rest.endswith("]"):
        return str(label), {}
    pairs = [p.partition("=") for p in rest[:-1].split(",") if p]
    return base, {k: v for k, _, v in pairs}


def variants(mechanisms: Sequence[str], options: dict[str, dict[str, str]]) -> list[Variant]:
    """Each mechanism once per combination of its swept options (``parse_mechanism_options(…,
    axes=True)``), mechanisms in the order given, values in the order given; options of a
    mechanism that is not swept are refused, so that none is silently dropped."""
    stray = sorted(set(options) - set(mechanisms))
    if stray:
        raise OptionError(f"--opt {stray[0]}.…: {stray[0]} is not among the mechanisms swept "
                          f"({', '.join(mechanisms)})")
    found = []
    for mech in mechanisms:
        given = options.get(mech, {})
        swept = [k for k, v in given.items() if "," in v]
        for combination in _combinations(given):
            found.append(Variant(variant_label(mech, {k: combination[k] for k in swept}), mech, combination))
    return found
