"""Image classification data in the ImageNet folder layout, and the standard transforms.

``ROOT/train/<class>/*`` and ``ROOT/val/<class>/*`` through torchvision's ``ImageFolder``,
checked with one clear line per problem; the ImageNet normalisation every image task shares.

Undecodable images are skipped and counted, not fatal (choice): a warning names each file,
the count goes into the results row, and an epoch in which nothing decodes is an error. An image
is undecodable for whatever reason PIL fails on it, a decompression bomb included (``read_image``,
which every image task reads through).
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import default_collate
from torchvision import datasets
from torchvision.transforms import InterpolationMode, v2

from attnbench import TaskError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ---- reading one image ---------------------------------------------------------------------


class UnreadableImage(ValueError):
    """An image file that cannot be decoded: ``path: reason``."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


@contextmanager
def opened_image(path: Path) -> Iterator[Image.Image]:
    """``PIL.Image.open(path)``; any failure to read or decode it inside the block is an
    ``UnreadableImage``. An image over PIL's pixel limit (its DecompressionBombWarning, and the
    error past twice the limit) is refused too: decoding it could take all the memory there is."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                yield image
    except UnreadableImage:
        raise
    except Exception as exc:  # PIL raises many kinds (OSError, SyntaxError, struct.error, …) for one cause
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise UnreadableImage(path, reason) from None


def read_image(path: Path, mode: str | None = "RGB") -> Image.Image:
    """The image at ``path`` decoded (converted to ``mode``; None: as stored), or ``UnreadableImage``."""
    with opened_image(path) as image:
        return image.convert(mode) if mode is not None else image.copy()


# ---- the folder layout ---------------------------------------------------------------------


def check_layout(root: Path) -> tuple[Path, Path]:
    """``root/train`` and ``root/val``, or a TaskError saying what is missing."""
    expected = "expected train/<class>/*.JPEG and val/<class>/*.JPEG (the ImageNet layout)"
    if not root.exists():
        raise TaskError(f"--data {root}: no such folder; {expected}")
    if not root.is_dir():
        raise TaskError(f"--data {root}: not a folder; {expected}")
    if not any(root.iterdir()):
        raise TaskError(f"--data {root}: the folder is empty; {expected}")
    missing = [s for s in ("train", "val") if not (root / s).is_dir()]
    if missing:
        raise TaskError(f"--data {root}: no {' or '.join(f'{m}/' for m in missing)} folder in it; {expected}")
    return root / "train", root / "val"


class SkippingImageFolder(datasets.ImageFolder):
    """``ImageFolder`` that can take its classes from another split, and returns None for an
    image that fails to decode (after a warning naming it) so the batch can drop it."""

    def __init__(self, root: Path, transform: Callable | None, classes: Sequence[str] | None = None) -> None:
        self._given = list(classes) if classes is not None else None
        super().__init__(str(root), transform=transform, allow_empty=classes is not None)

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        if self._given is None:
            return super().find_classes(directory)
        return self._given, {c: i for i, c in enumerate(self._given)}

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int] | None:
        path, target = self.samples[index]
        try:
            image = read_image(Path(path))  # decodes the whole file
        except UnreadableImage as exc:
            print(f"warning: skipping undecodable image {exc}", file=sys.stderr)
            return None
        return (self.transform(image) if self.transform else image), target


def image_folders(root: Path, train_tf: Callable, val_tf: Callable) -> tuple[SkippingImageFolder,
                                                                               SkippingImageFolder]:
    """Train and val splits of an ImageNet-layout folder, val labelled with train's classes."""
    train_dir, val_dir = check_layout(root)
    try:
        train = SkippingImageFolder(train_dir, train_tf)
    except FileNotFoundError as exc:  # no class folders, or a class folder without images
        raise TaskError(f"--data {root}: train/ {_first_line(exc)}") from None
    stray = sorted({p.name for p in val_dir.iterdir() if p.is_dir()} - set(train.classes))
    if stray:
        raise TaskError(f"--data {root}: val/ has classes that train/ lacks: {', '.join(stray[:5])}"
                        + (" …" if len(stray) > 5 else ""))
    val = SkippingImageFolder(val_dir, val_tf, classes=train.classes)
    if len(val) == 0:
        raise TaskError(f"--data {root}: val/ holds no images in class folders; expected "
                        "val/<class>/*.JPEG")
    return train, val


def _first_line(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[0].lower() + text[1:] if text else text


def collate_skipping(batch: list[Any]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Collate the samples that decoded: (images, targets, how many were skipped)."""
    good = [b for b in batch if b is not None]
    skipped = len(batch) - len(good)
    if not good:
        return torch.empty(0), torch.empty(0, dtype=torch.long), skipped
    images, targets = default_collate(good)
    return images, targets, skipped


# ---- transforms ------------------------------------------------------------------------------


def train_transform(img_size: int, crop_scale: float, hflip: float, randaugment: int) -> v2.Compose:
    """The standard ImageNet training transform: random resized crop, flip, RandAugment."""
    steps: list[Any] = [v2.RandomResizedCrop(img_size, scale=(crop_scale, 1.0),
                                             interpolation=InterpolationMode.BICUBIC, antialias=True)]
    if hflip > 0:
        steps.append(v2.RandomHorizontalFlip(hflip))
    if randaugment > 0:
        steps.append(v2.RandAugment(num_ops=2, magnitude=randaugment))
    steps += [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return v2.Compose(steps)


def eval_transform(img_size: int, crop_ratio: float = 0.875) -> v2.Compose:
    """The standard evaluation transform: resize to img_size / crop_ratio, centre crop."""
    return v2.Compose([
        v2.Resize(round(img_size / crop_ratio), interpolation=InterpolationMode.BICUBIC, antialias=True),
        v2.CenterCrop(img_size), v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
