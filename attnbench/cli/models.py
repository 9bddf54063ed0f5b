"""``attnbench models``: backbone sizes, parameters and FLOPs per mechanism, measured."""

from __future__ import annotations

import argparse

import pandas as pd

from attnbench import registry
from attnbench.cli.common import UsageError, add_load_argument, pick, print_table
from attnbench.results.tables import write_table
from attnbench.task import get_task, model_table_tasks
from attnbench.validate import int_in, nonempty, output_file


def add_parser(sub: argparse._SubParsersAction) -> None:
    """The ``models`` command's arguments."""
    p = sub.add_parser("models", help="backbone sizes: parameters and FLOPs per mechanism, measured",
                       description="Build every SeTformer backbone size with every mechanism and print "
                                   "its parameters and forward FLOPs on one image, counted by PyTorch's "
                                   "FlopCounterMode (plus the mechanism's formula where the counter is "
                                   "blind: natten, xformers).")
    p.add_argument("--size", default="all", type=nonempty, help="comma list of sizes, or all (default)")
    p.add_argument("--mechanism", default="all", type=nonempty,
                   help="comma list of mechanisms, or all (default)")
    p.add_argument("--img-size", type=int_in(16, 4096), default=224,
                   help="image side in pixels (default 224)")
    p.add_argument("--classes", type=int_in(1, 100_000), default=1000,
                   help="classes of the head (default 1000)")
    p.add_argument("--task", default="imagenet", type=nonempty,
                   help="the task whose model is built (default imagenet: the SeTformer classifier)")
    p.add_argument("--csv", type=output_file, default=None, help="also write the table to this CSV file")
    add_load_argument(p)
    p.set_defaults(func=cmd_models)


def cmd_models(args: argparse.Namespace) -> int:
    task = get_task(args.task)  # the backbone lives with the tasks that train it
    if args.task not in model_table_tasks():
        raise UsageError(f"--task {args.task}: no model table; valid choices: "
                         f"{', '.join(model_table_tasks())}")
    sizes = pick(args.size, list(task.sizes), "size")
    mechanisms = pick(args.mechanism, registry.mechanism_names(), "mechanism")
    if args.img_size < 16 or args.classes < 1:
        raise UsageError("--img-size must be >= 16 and --classes >= 1")
    rows = task.model_table(sizes, mechanisms, img_size=args.img_size, num_classes=args.classes)
    table = pd.DataFrame(rows)
    print(f"SeTformer backbone sizes at {args.img_size}×{args.img_size}, {args.classes} classes: parameters "
          "and forward FLOPs of one image (FlopCounterMode: matmuls and convolutions, 2 FLOPs per "
          "multiply-add; GMACs = GFLOPs / 2, the unit papers print as 'FLOPs'; attention elementwise "
          "from the mechanisms' formulas)")
    fmt = lambda value, digits: "-" if pd.isna(value) else f"{value:.{digits}f}"
    rows = [(r.size, r.mechanism, fmt(r.params / 1e6, 2), fmt(r.gflops, 2), fmt(r.gmacs, 2),
             fmt(r.attn_elementwise_gflops, 3), r.note) for r in table.itertuples()]
    header = ("size", "mechanism", "params (M)", "GFLOPs", "GMACs", "attn elementwise GFLOPs", "notes")
    print_table(header, rows)
    print("Paper, for scale: SeTformer-Mini 16M parameters, Swin-T 28M (4.5 GMACs); NAT-Mini 20M.")
    if args.csv is not None:
        write_table(args.csv, table)
    return 0
