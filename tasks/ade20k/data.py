"""ADE20K data: the official ADEChallengeData2016 layout, its validation, and the joint
image/label transforms (mmseg's pipeline). The embedded set (``embedded.py``) is written in this
very layout and read here.

Layout (``--data DIR``)::

    DIR/images/training/ADE_train_00000001.jpg      DIR/annotations/training/ADE_train_00000001.png
    DIR/images/validation/ADE_val_00000001.jpg      DIR/annotations/validation/ADE_val_00000001.png

Annotations are one-channel PNGs of class indices: 0 = "other" (not evaluated), 1..150 the
classes of objectInfo150. As mmseg's ``reduce_zero_label``: 0 -> 255 (ignored), k -> k - 1.

Checked when the data set is opened (headers only, fast even for 22k files): the folders, an
image without its annotation or the reverse, unreadable headers, annotations whose size differs
from their image's. Checked when a pair is loaded (the pixels): decoding, a label above 150, an
annotation with colour channels. Every problem is a TaskError of one line naming the file.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as TF

from attnbench import TaskError
from tasks.common.image_folder import IMAGENET_MEAN, IMAGENET_STD, UnreadableImage, opened_image, read_image

NUM_CLASSES = 150
IGNORE_INDEX = 255
SPLITS = ("training", "validation")
LAYOUT = ("expected images/{training,validation}/*.jpg and annotations/{training,validation}/*.png "
          "with the same names (the ADEChallengeData2016 layout)")


# ---- the folder layout ---------------------------------------------------------------------------


def find_pairs(root: Path, split: str) -> list[tuple[Path, Path]]:
    """(image, annotation) of every ``split`` image, sorted by name; TaskErrors for a bad layout."""
    if not root.exists():
        raise TaskError(f"--data {root}: no such folder; {LAYOUT}")
    if not root.is_dir():
        raise TaskError(f"--data {root}: not a folder; {LAYOUT}")
    image_dir, ann_dir = root / "images" / split, root / "annotations" / split
    for folder in (image_dir, ann_dir):
        if not folder.is_dir():
            raise TaskError(f"--data {root}: no {folder.relative_to(root)}/ folder in it; {LAYOUT}")
    images = {p.stem: p for p in image_dir.iterdir() if p.suffix.lower() in (".jpg", ".jpeg")}
    anns = {p.stem: p for p in ann_dir.iterdir() if p.suffix.lower() == ".png"}
    if not images:
        raise TaskError(f"--data {root}: images/{split}/ holds no .jpg images; {LAYOUT}")
    for have, lack, what in ((images, anns, "annotation"), (anns, images, "image")):
        orphans = sorted(set(have) - set(lack))
        if orphans:
            first = have[orphans[0]]
            where = "annotations" if what == "annotation" else "images"
            more = f" (and {len(orphans) - 1} more)" if len(orphans) > 1 else ""
            raise TaskError(f"--data {root}: {first.relative_to(root)} has no {what} in {where}/{split}/ "
                            f"with the same name{more}")
    return [(images[s], anns[s]) for s in sorted(images)]


def check_sizes(pairs: Sequence[tuple[Path, Path]], root: Path) -> None:
    """Every file's header is readable and every annotation has its image's size (headers only)."""
    for image, ann in pairs:
        sizes = []
        for path in (image, ann):
            try:
                with opened_image(path) as f:
                    sizes.append(f.size)
            except UnreadableImage as exc:
                raise TaskError(f"--data {root}: cannot read {path.relative_to(root)}: "
                                f"{exc.reason}") from None
        if sizes[0] != sizes[1]:
            (w, h), (aw, ah) = sizes
            raise TaskError(f"--data {root}: {ann.relative_to(root)} is {aw}×{ah} but its image is {w}×{h}; "
                            "an annotation must have its image's size")


def read_pair(image_path: Path, ann_path: Path) -> tuple[Tensor, Tensor]:
    """Image (3, H, W) uint8 and reduced labels (H, W) uint8 (0 -> 255, k -> k - 1), checked."""
    try:
        image = np.asarray(read_image(image_path))
        annotation = read_image(ann_path, mode=None)
    except UnreadableImage as exc:
        raise TaskError(f"cannot decode {exc}") from None
    mode, labels = annotation.mode, np.asarray(annotation)
    if labels.ndim != 2 or mode not in ("L", "P", "I", "I;16"):
        raise TaskError(f"annotation {ann_path} is a {mode} image; expected one channel of class indices "
                        "(PNG mode L: 0 = other, 1..150)")
    if labels.shape != image.shape[:2]:
        raise TaskError(f"annotation {ann_path} is {labels.shape[1]}×{labels.shape[0]} but its image is "
                        f"{image.shape[1]}×{image.shape[0]}")
    top = int(labels.max()) if labels.size else 0
    if top > NUM_CLASSES or int(labels.min()) < 0:
        bad = top if top > NUM_CLASSES else int(labels.min())
        raise TaskError(f"annotation {ann_path} holds label {bad}; expected 0 (other, ignored) or "
                        f"1..{NUM_CLASSES}")
    labels = labels.astype(np.int64)
    reduced = np.where(labels == 0, IGNORE_INDEX, labels - 1).astype(np.uint8)
    return torch.from_numpy(image.copy()).permute(2, 0, 1), torch.from_numpy(reduced)


class ADE20KSegmentation(Dataset):
    """One split of an ADEChallengeData2016-layout folder; items go through a joint transform.

    An item is ``(image, labels, error)``: the error is "" or the one-line message of a file that
    failed to load, raised as a TaskError in the main process (``raise_errors``), so a problem
    in a loader worker still reads as one line naming the file.
    """

    def __init__(self, root: Path, split: str, transform: Any, check: bool = True) -> None:
        self.root, self.split, self.transform = root, split, transform
        self.pairs = find_pairs(root, split)
        if check:
            check_sizes(self.pairs, root)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[Tensor | None, Tensor | None, str]:
        try:
            image, labels = read_pair(*self.pairs[index])
        except TaskError as exc:
            return None, None, f"--data {self.root}: {exc}"
        image, labels = self.transform(image, labels)
        return image, labels, ""


def collate(batch: list[tuple[Tensor | None, Tensor | None, str]]) -> tuple[Any, Any, str]:
    """Stack images (B, 3, H, W) and labels (B, H, W) int64; or carry the first error message."""
    errors = [e for _, _, e in batch if e]
    if errors:
        return None, None, errors[0]
    images = torch.stack([b[0] for b in batch])
    labels = torch.stack([b[1] for b in batch]).long()
    return images, labels, ""


def raise_errors(loader: Any):
    """Yield ``(images, labels, 0)`` batches (0: nothing skipped, for the trainer); a batch that
    carries a load error becomes a TaskError here, in the main process."""
    for images, labels, error in loader:
        if error:
            raise TaskError(error)
        yield images, labels, 0


# ---- joint transforms (mmseg's ADE20K pipeline) ----------------------------------------------------


def _scale_to(h: int, w: int, short: float, long: float) -> tuple[int, int]:
    """(H, W) resized, aspect kept, to fit within short × long (mmseg's keep_ratio rescale)."""
    s = min(long / max(h, w), short / min(h, w))
    return max(1, round(h * s)), max(1, round(w * s))


def _normalise(image: Tensor) -> Tensor:
    return TF.normalize(image.float().div_(255), IMAGENET_MEAN, IMAGENET_STD)


class TrainTransform:
    """Random rescale (ratio 0.5-2 of the base scale crop × 4·crop), random crop (at most 75 % of
    one class, 10 tries), flip, photometric distortion, normalise, pad (image 0, labels 255).

    (3, H, W) uint8, (H, W) uint8 -> (3, crop, crop) float32, (crop, crop) uint8.
    """

    def __init__(self, crop: int, ratio_range: tuple[float, float] = (0.5, 2.0), cat_max_ratio: float = 0.75,
                 hflip: float = 0.5, photometric: bool = True) -> None:
        self.crop, self.ratio_range, self.cat_max_ratio, self.hflip = crop, ratio_range, cat_max_ratio, hflip
        # mmseg's PhotoMetricDistortion (brightness ±32, contrast and saturation 0.5-1.5, hue ±18°)
        self.jitter = v2.ColorJitter(32 / 255, 0.5, 0.5, 18 / 360) if photometric else None

    def __call__(self, image: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        lo, hi = self.ratio_range
        ratio = lo + (hi - lo) * torch.rand(()).item()
        size = _scale_to(image.shape[1], image.shape[2], self.crop * ratio, 4 * self.crop * ratio)
        image = TF.resize(image, list(size), InterpolationMode.BILINEAR, antialias=True)
        labels = TF.resize(labels[None], list(size), InterpolationMode.NEAREST)[0]
        top, left = self._crop_origin(labels)
        image = image[:, top:top + self.crop, left:left + self.crop]
        labels = labels[top:top + self.crop, left:left + self.crop]
        if torch.rand(()).item() < self.hflip:
            image, labels = image.flip(-1), labels.flip(-1)
        if self.jitter is not None:
            image = self.jitter(image)
        image = _normalise(image)
        ph, pw = self.crop - image.shape[1], self.crop - image.shape[2]
        if ph > 0 or pw > 0:  # smaller than the crop: pad bottom and right
            image = torch.nn.functional.pad(image, (0, pw, 0, ph), value=0.0)
            labels = torch.nn.functional.pad(labels, (0, pw, 0, ph), value=IGNORE_INDEX)
        return image, labels

    def _crop_origin(self, labels: Tensor) -> tuple[int, int]:
        h, w = labels.shape
        origin = (0, 0)
        for _ in range(10):
            origin = (int(torch.randint(0, max(h - self.crop, 0) + 1, ())),
                      int(torch.randint(0, max(w - self.crop, 0) + 1, ())))
            if self.cat_max_ratio >= 1:
                break
            window = labels[origin[0]:origin[0] + self.crop, origin[1]:origin[1] + self.crop]
            counts = torch.bincount(window[window != IGNORE_INDEX].flatten().long())
            counts = counts[counts > 0]
            if len(counts) > 1 and counts.max() < self.cat_max_ratio * counts.sum():
                break
        return origin


class EvalTransform:
    """Single scale: the image resized (aspect kept) to fit crop × 4·crop, normalised; the labels
    stay at full resolution, where the metric is computed (as mmseg does).

    (3, H, W) uint8, (H, W) uint8 -> (3, h, w) float32, (H, W) uint8.
    """

    def __init__(self, crop: int) -> None:
        self.crop = crop

    def __call__(self, image: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        size = _scale_to(image.shape[1], image.shape[2], self.crop, 4 * self.crop)
        image = TF.resize(image, list(size), InterpolationMode.BILINEAR, antialias=True)
        return _normalise(image), labels


def class_frequencies(root: Path, split: str) -> dict[int, float]:
    """Fraction of labelled pixels per reduced class index over a split (for reports and tests)."""
    counts = np.zeros(256, np.int64)
    for _, ann in find_pairs(root, split):
        counts += np.bincount(np.asarray(Image.open(ann)).ravel(), minlength=256)
    counts[0] = 0  # "other"
    total = max(1, counts.sum())
    return {k - 1: counts[k] / total for k in range(1, NUM_CLASSES + 1) if counts[k]}
