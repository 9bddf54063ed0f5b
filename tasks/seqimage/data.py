"""Images as pixel sequences (LRA's "Image" task): grayscale intensities, one token per pixel.

Two sources, both as (images (S, H, W) uint8, labels (S,) long) per split:

- the embedded MNIST-5k (``tasks.common.mnist5k``: 4,000 train / 1,000 test real digits, read
  from the PNG folders it writes, the very split the imagenet task uses);
- CIFAR-10's python version, ``DIR/cifar-10-batches-py``, through ``torchvision.datasets.CIFAR10``
  (checksums verified, nothing downloaded), turned grayscale with the ITU-R 601 luma weights
  that LRA uses (tf.image.rgb_to_grayscale): 32 × 32, the 1,024 tokens of LRA.

``tokens`` resizes to side × side (bilinear, antialiased; unchanged at the native side) and reads
the pixels row by row: token = intensity + 1 (0 is the padding id, which these sequences never need).

Neither source ships a validation split: ``hold_out`` takes ``VAL_FRACTION`` (10 %) of the training
images, chosen by a permutation of a fixed seed (the same images for every run, whatever its
``--seed``), out of training: 400 of MNIST-5k's 4,000 (3,600 left to train on), 5,000 of CIFAR-10's
50,000.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

from attnbench import TaskError
from tasks.common import mnist5k

LEVELS = 256  # grayscale intensities: tokens 1 … 256
LUMA = (0.2989, 0.5870, 0.1140)  # R, G, B weights of tf.image.rgb_to_grayscale (ITU-R 601-2)
CIFAR_FOLDER = "cifar-10-batches-py"
CIFAR_CLASSES = 10
Split = tuple[Tensor, Tensor]  # images (S, H, W) uint8, labels (S,) long
VAL_FRACTION = 0.1  # of the training images, held out as the validation split
VAL_SEED = 0  # of the permutation that picks them: one validation split for every run


def hold_out(train: Split, fraction: float = VAL_FRACTION) -> tuple[Split, Split]:
    """(training, validation): ``fraction`` of the training images (at least one) picked by a fixed
    permutation, and the rest in their order."""
    images, labels = train
    count = max(1, round(fraction * len(labels)))
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(VAL_SEED))
    val, kept = order[:count].sort().values, order[count:].sort().values
    return (images[kept], labels[kept]), (images[val], labels[val])


def square_side(seq_len: int) -> int | None:
    """The side of a square image of ``seq_len`` pixels, or None when there is none."""
    side = math.isqrt(seq_len)
    return side if side * side == seq_len else None


def tokens(images: Tensor, side: int) -> Tensor:
    """images (S, H, W) uint8 -> token ids (S, side * side) long, row by row, intensity + 1."""
    if images.shape[1:] != (side, side):
        resized = F.interpolate(images[:, None].float(), size=(side, side), mode="bilinear", antialias=True,
                                align_corners=False)
        images = resized[:, 0].round().clamp(0, LEVELS - 1)
    return images.reshape(len(images), side * side).long() + 1


def mnist() -> tuple[Split, Split]:
    """(train, test) of the embedded MNIST-5k: 28 × 28 digits, ten classes."""
    from torchvision import datasets
    from torchvision.transforms import v2

    root = mnist5k.embedded_dataset()
    read = v2.Compose([v2.Grayscale(), v2.PILToTensor()])
    splits = []
    for split in ("train", "val"):
        folder = datasets.ImageFolder(str(root / split), transform=read)
        images = torch.stack([folder[i][0][0] for i in range(len(folder))])  # (S, 28, 28) uint8
        splits.append((images, torch.tensor(folder.targets)))
    return splits[0], splits[1]


def cifar10(root: Path) -> tuple[Split, Split]:
    """(train, test) of CIFAR-10 under ``root/cifar-10-batches-py``, grayscale: 32 × 32, ten classes."""
    from torchvision import datasets

    expected = (f"expected {CIFAR_FOLDER}/ in it (CIFAR-10's python version: data_batch_1 … data_batch_5, "
                "test_batch, batches.meta)")
    if not (root / CIFAR_FOLDER).is_dir():
        raise TaskError(f"--data {root}: no {CIFAR_FOLDER}/ folder; {expected}")
    splits = []
    for train in (True, False):
        try:
            cifar = datasets.CIFAR10(str(root), train=train, download=False)
        except (RuntimeError, OSError, ValueError) as exc:  # missing files, checksums, unpickling
            raise TaskError(f"--data {root}: CIFAR-10 could not be read ({str(exc).splitlines()[0]}); "
                            f"{expected}") from None
        gray = (cifar.data.astype(np.float64) @ np.asarray(LUMA)).round().clip(0, LEVELS - 1)  # (S, 32, 32)
        splits.append((torch.from_numpy(gray.astype(np.uint8)), torch.tensor(cifar.targets)))
    return splits[0], splits[1]
