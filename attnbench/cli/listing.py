"""``attnbench list``: the registered mechanisms and tasks, and whether each runs here."""

from __future__ import annotations

import argparse
import dataclasses
import typing

import torch

from attnbench import registry
from attnbench.cli.common import add_load_argument, print_table
from attnbench.task import broken_tasks, get_task, task_names
from attnbench.validate import nonempty


def add_parser(sub: argparse._SubParsersAction) -> None:
    """The ``list`` command's arguments."""
    p = sub.add_parser("list", help="mechanisms and tasks, with availability on this machine",
                       description="List the registered mechanisms and tasks, whether each can "
                                   "run on this machine, and why not when it cannot.")
    p.add_argument("--mechanism", type=nonempty, help="show one mechanism in full (options, FLOP formula)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="device to check availability on (default auto: cuda where torch sees a GPU)")
    add_load_argument(p)
    p.set_defaults(func=cmd_list)


def cmd_list(args: argparse.Namespace) -> int:
    if args.device == "auto":  # not device_of(): listing what cuda would offer is fine without one
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.mechanism:
        return _show_mechanism(args.mechanism, args.device)
    rows, backends = [], []
    for name in registry.mechanism_names():
        cls = registry.get_mechanism(name)
        reason = cls.unavailable_reason(args.device)
        rows.append((name, cls.complexity, "2-D" if cls.needs_grid else "any",
                     "yes" if cls.causal_problem() is None else "no",
                     "yes" if cls.decode_problem() is None else "no",
                     "yes" if reason is None else "no", reason or cls.summary))
        backends.append((name, cls.backend(args.device) if reason is None else "-"))
    for name, why in registry.broken_plugins().items():
        rows.append((name, "?", "?", "?", "?", "no", f"plug-in failed to load: {why}"))
    print(f"Mechanisms (device: {args.device}; causal, decode: `list --mechanism NAME` says why not)")
    print_table(("name", "complexity", "tokens", "causal", "decode", "available", "notes"), rows)
    print(f"\nBackends that run on {args.device}")
    print_table(("name", "backend"), backends)
    print()
    task_rows = []
    for name in task_names():
        cls = get_task(name)
        reason = cls.unavailable_reason()
        task_rows.append((name, "yes" if reason is None else "no",
                          cls.summary if reason is None else f"{reason}: {cls.summary}"))
    for name, why in broken_tasks().items():
        task_rows.append((name, "no", f"plug-in failed to load: {why}"))
    print("Tasks")
    print_table(("name", "available", "notes"), task_rows)
    return 0


def _show_mechanism(name: str, device: str) -> int:
    cls = registry.get_mechanism(name)
    reason = cls.unavailable_reason(device)
    print(f"{cls.name}: {cls.summary}")
    print(f"  complexity:  {cls.complexity}")
    print(f"  tokens:      {'2-D grid required' if cls.needs_grid else 'sequences or 2-D grids'}")
    padding = ("native, inside the batched computation" if cls.masking == "native"
               else "per length: each group of equally long sequences runs without its padding")
    print(f"  padding:     {padding}")
    causal = cls.causal_problem()
    print(f"  causal:      {'yes' if causal is None else 'no: ' + causal}")
    decode = cls.decode_problem()
    print(f"  decode:      {'yes' if decode is None else 'no: ' + decode}")
    print(f"  devices:     {', '.join(cls.devices)}")
    print(f"  dtypes:      {', '.join(str(d).removeprefix('torch.') for d in cls.dtypes)}")
    print(f"  FLOPs (fwd): {cls.flops_formula}")
    print(f"  available:   {'yes' if reason is None else 'no: ' + reason} (on {device})")
    if reason is None:
        print(f"  backend:     {cls.backend(device)}")
    fields = dataclasses.fields(cls.Options)
    print("  options:" + ("" if fields else " none"))
    hints = typing.get_type_hints(cls.Options)
    for f in fields:
        valid = f.metadata.get("range")  # attnbench.mechanism.option
        shown = f"  ({valid.describe(hints[f.name] is int)})" if valid else ""
        print(f"    {f.name} = {f.default!r}{shown}")
    return 0
