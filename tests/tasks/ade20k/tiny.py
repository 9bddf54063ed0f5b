"""A tiny ADEChallengeData2016-layout folder made by hand and the arguments of a tiny run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def make_tiny_ade(root: Path, train: int = 6, val: int = 2) -> Path:
    """images/{training,validation}/*.jpg + annotations/*.png of odd sizes: a left half of file label 3
    (sky, blue), a right half of 5 (tree, green), a top band of 0 (other)."""
    rng = np.random.default_rng(0)
    for split, stem, count in (("training", "ADE_train", train), ("validation", "ADE_val", val)):
        (root / "images" / split).mkdir(parents=True)
        (root / "annotations" / split).mkdir(parents=True)
        for i in range(1, count + 1):
            h, w = int(rng.integers(40, 56)), int(rng.integers(48, 72))
            labels = np.full((h, w), 3, np.uint8)
            labels[:, w // 2:] = 5
            labels[:4] = 0
            image = np.where(labels[..., None] == 3, [90, 140, 230], [30, 120, 40]).astype(np.uint8)
            image = np.clip(image + rng.normal(0, 12, image.shape), 0, 255).astype(np.uint8)
            Image.fromarray(image).save(root / "images" / split / f"{stem}_{i:08d}.jpg", quality=92)
            Image.fromarray(labels, mode="L").save(root / "annotations" / split / f"{stem}_{i:08d}.png")
    return root


def tiny_run_args(data_dir: Path, out: Path, *extra: str, mechanism: str = "softmax") -> list[str]:
    return ["run", "--mechanism", mechanism, "--task", "ade20k", "--data", str(data_dir), "--size", "micro",
            "--crop-size", "32", "--channels", "8", "--epochs", "1", "--batch-size", "3", "--workers", "0",
            "--out", str(out / "run"), "--results", str(out / "ade20k.csv"), *extra]
