"""A tiny ImageNet-layout folder and the arguments of a tiny run, for the ImageNet tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

WNIDS = ["n01440764", "n01443537", "n01484850"]  # tench, goldfish, great white shark


def make_tiny_imagenet(root: Path, train_per_class: int = 8, val_per_class: int = 3,
                       corrupt: bool = True) -> Path:
    """train/<wnid>/*.JPEG and val/<wnid>/*.JPEG: one colour per class, odd sizes; with
    ``corrupt``, one undecodable JPEG in each split takes the place of a good one."""
    rng = np.random.default_rng(0)
    colours = [(200, 40, 40), (40, 200, 40), (40, 40, 200)]
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for wnid, colour in zip(WNIDS, colours, strict=True):
            folder = root / split / wnid
            folder.mkdir(parents=True)
            for i in range(count):
                h, w = rng.integers(24, 48, size=2)
                pixels = np.clip(np.array(colour) + rng.normal(0, 30, (h, w, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{wnid}_{i}.JPEG", quality=90)
        if corrupt:
            bad = root / split / WNIDS[-1] / f"{WNIDS[-1]}_0.JPEG"
            bad.write_bytes(b"\xff\xd8 this is not a JPEG")
    return root


def tiny_run_args(data: Path, out: Path, *extra: str, mechanism: str = "softmax") -> list[str]:
    return ["run", "--mechanism", mechanism, "--task", "imagenet", "--data", str(data), "--size", "micro",
            "--img-size", "32", "--epochs", "2", "--batch-size", "8", "--workers", "0",
            "--out", str(out / "run"), "--results", str(out / "imagenet.csv"), *extra]
