"""ADE20K data: the official ADEChallengeData2016 layout, its validation, joint image/label
transforms, and the small real data set attnbench embeds in that layout.

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

import shutil
import tempfile
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

from attnbench.tasks import TaskError
from tasks._data import IMAGENET_MEAN, IMAGENET_STD, cache_root

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
                with Image.open(path) as f:
                    sizes.append(f.size)
            except (OSError, ValueError, SyntaxError) as exc:
                raise TaskError(f"--data {root}: cannot read {path.relative_to(root)}: {exc}") from None
        if sizes[0] != sizes[1]:
            (w, h), (aw, ah) = sizes
            raise TaskError(f"--data {root}: {ann.relative_to(root)} is {aw}×{ah} but its image is {w}×{h}; "
                            "an annotation must have its image's size")


def read_pair(image_path: Path, ann_path: Path) -> tuple[Tensor, Tensor]:
    """Image (3, H, W) uint8 and reduced labels (H, W) uint8 (0 -> 255, k -> k - 1), checked."""
    try:
        with Image.open(image_path) as f:
            image = np.asarray(f.convert("RGB"))
        with Image.open(ann_path) as f:
            mode = f.mode
            labels = np.asarray(f)
    except (OSError, ValueError, SyntaxError) as exc:
        raise TaskError(f"cannot decode {image_path.name} or its annotation {ann_path}: {exc}") from None
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


# ---- the embedded data set -------------------------------------------------------------------------

# Class indices of ADE20K's objectInfo150 (1-based, as in the annotation PNGs), checked against
# the list mmseg's ADE20KDataset and the CSAIL objectInfo150 table share.
EMBEDDED_CLASSES = {1: "wall", 10: "grass", 14: "earth;ground", 23: "painting;picture",
                    127: "animal;animate;being;beast;brute;creature;fauna", 143: "plate"}
EMBEDDED_NAME = "ade20k-skimage-composites"  # its folder in the cache
EMBEDDED_DATASET = "embedded skimage-composites (ADE20K layout)"  # its name in every results row
EMBEDDED_DESCRIPTION = (
    "embedded skimage-composites (ADE20K layout): scenes composited from real images that scikit-image, "
    "scikit-learn and matplotlib ship; brick wall (wall), grass (grass), gravel (earth) textures, photo "
    "crops hung on the wall (painting), the horse silhouette with cat-fur texture (animal), thresholded "
    "coins (plate); every pixel labelled exactly; train and val from disjoint regions of every source")
EMBEDDED_TRAIN, EMBEDDED_VAL = 480, 120
SCENE_H, SCENE_W = 160, 192


def _sources(split: str) -> dict[str, Any]:
    """The real source pixels of one split: disjoint regions of every image (train: first 62.5 %)."""
    import matplotlib.cbook
    from scipy import ndimage
    from skimage import data as sk
    from skimage.filters import threshold_otsu
    from sklearn.datasets import load_sample_image

    def part(a: np.ndarray, axis: int) -> np.ndarray:
        cut = round(a.shape[axis] * 0.625)
        index = [slice(None)] * a.ndim
        index[axis] = slice(0, cut) if split == "training" else slice(cut, None)
        return a[tuple(index)]

    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
        hopper = np.asarray(Image.open(f).convert("RGB"))
    photos = [sk.astronaut(), sk.coffee(), sk.rocket(), load_sample_image("china.jpg"),
              load_sample_image("flower.jpg"), hopper]
    textures = {1: sk.brick(), 10: sk.grass(), 14: sk.gravel()}  # wall, grass, earth (gray, 512²)
    coins = sk.coins()
    mask = ndimage.binary_fill_holes(ndimage.binary_opening(coins > threshold_otsu(coins), iterations=2))
    regions, count = ndimage.label(mask)
    found = []
    for i, box in enumerate(ndimage.find_objects(regions)):
        m = regions[box] == i + 1
        h, w = m.shape  # a coin: round (fills ~π/4 of a square box), not a blob of lit background
        if 800 < m.sum() < 4000 and 0.8 < h / w < 1.25 and m.sum() > 0.6 * h * w:
            found.append((m, coins[box]))
    found.sort(key=lambda c: c[0].size)  # hold out every 4th coin by size for validation
    chosen = [c for i, c in enumerate(found) if (i % 4 == 3) == (split == "validation")]
    return {"photos": [part(p, 1) for p in photos], "textures": {k: part(t, 0) for k, t in textures.items()},
            "fur": part(sk.chelsea(), 1), "horse": ~sk.horse(), "coins": chosen}


def _crop(rng: np.random.Generator, source: np.ndarray, h: int, w: int) -> np.ndarray:
    """A random region of ``source`` resized to (h, w), 3 channels uint8."""
    sh, sw = source.shape[:2]
    scale = rng.uniform(0.6, 1.0) * min(sh / h, sw / w, 2.5)  # never blow a small source up past 2.5×
    ch, cw = max(1, min(sh, round(h * scale))), max(1, min(sw, round(w * scale)))
    y, x = rng.integers(0, sh - ch + 1), rng.integers(0, sw - cw + 1)
    patch = Image.fromarray(source[y:y + ch, x:x + cw]).convert("RGB").resize((w, h), Image.BILINEAR)
    return np.asarray(patch)


def _paste(image: np.ndarray, labels: np.ndarray, mask: np.ndarray,
           pixels: np.ndarray, label: int, top: int, left: int) -> None:
    """Put ``pixels`` where ``mask`` is set, at (top, left), clipped to the scene; labels follow exactly."""
    h, w = mask.shape
    y0, x0 = max(top, 0), max(left, 0)
    y1, x1 = min(top + h, image.shape[0]), min(left + w, image.shape[1])
    if y1 <= y0 or x1 <= x0:
        return
    m = mask[y0 - top:y1 - top, x0 - left:x1 - left]
    image[y0:y1, x0:x1][m] = pixels[y0 - top:y1 - top, x0 - left:x1 - left][m]
    labels[y0:y1, x0:x1][m] = label


def _resize_mask(mask: np.ndarray, h: int, w: int) -> np.ndarray:
    return np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((w, h), Image.NEAREST)) > 127


def compose_scene(rng: np.random.Generator, src: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """One scene (H, W, 3) uint8 and its exact label map (H, W) uint8 in ADE20K indices (1-based).

    A wall above a slanted horizon, ground below (grass, earth, or both side by side), maybe a
    painting on the wall, maybe the horse standing on the ground, and a few coins on the ground.
    """
    h, w = SCENE_H, SCENE_W
    ys, xs = np.mgrid[0:h, 0:w]
    horizon = rng.uniform(0.3, 0.6) * h + rng.uniform(-0.15, 0.15) * (xs - w / 2)
    ground = rng.choice([10, 14])
    labels = np.where(ys < horizon, 1, ground).astype(np.uint8)
    if rng.random() < 0.35:  # a second ground on one side of a slanted border
        border = rng.uniform(0.3, 0.7) * w + rng.uniform(-0.3, 0.3) * (ys - h)
        labels[(ys >= horizon) & (xs > border)] = 24 - ground  # the other of grass (10), earth (14)
    image = np.zeros((h, w, 3), np.uint8)
    for k in (1, 10, 14):
        image[labels == k] = _crop(rng, src["textures"][k], h, w)[labels == k]
    wall_bottom = int(horizon.min())
    if wall_bottom > 28 and rng.random() < 0.8:  # a painting: a real photo hung on the wall
        ph = rng.integers(20, max(21, min(wall_bottom - 4, 72)))
        pw = rng.integers(24, 80)
        top, left = rng.integers(2, max(3, wall_bottom - ph - 1)), rng.integers(0, w - pw)
        photo = src["photos"][rng.integers(len(src["photos"]))]
        full = np.zeros((h, w, 3), np.uint8)
        full[top:top + ph, left:left + pw] = _crop(rng, photo, ph, pw)
        frame = np.zeros((h, w), bool)
        frame[top:top + ph, left:left + pw] = True
        _paste(image, labels, frame, full, 23, 0, 0)
    if rng.random() < 0.8:  # the horse, textured with cat fur, standing on the ground
        hw = int(rng.uniform(0.35, 0.75) * w)
        hh = round(hw * src["horse"].shape[0] / src["horse"].shape[1])
        shape = _resize_mask(src["horse"], hh, hw)
        if rng.random() < 0.5:
            shape = shape[:, ::-1]
        left = rng.integers(-hw // 4, w - 3 * hw // 4)
        feet = rng.uniform(horizon.max() + 4, h + hh * 0.15)
        _paste(image, labels, shape, _crop(rng, src["fur"], hh, hw), 127, int(feet) - hh, left)
    for _ in range(rng.integers(0, 5)):  # coins lying on the ground
        mask, pixels = src["coins"][rng.integers(len(src["coins"]))]
        s = rng.uniform(0.5, 1.1)
        ch, cw = max(4, round(mask.shape[0] * s)), max(4, round(mask.shape[1] * s))
        coin = _resize_mask(mask, ch, cw)
        rgb = np.repeat(np.asarray(Image.fromarray(pixels).resize((cw, ch), Image.BILINEAR))[..., None], 3, 2)
        top = rng.integers(int(horizon.max()), h - ch // 2)
        _paste(image, labels, coin, rgb, 143, top, rng.integers(-cw // 2, w - cw // 2))
    return image, labels


def embedded_dataset(root: Path | None = None) -> Path:
    """The embedded set in the ADEChallengeData2016 layout under ``root``, written on first use
    (into a temporary folder, renamed into place: concurrent ranks never see half of it)."""
    target = (root or cache_root()) / EMBEDDED_NAME
    if all((target / kind / s).is_dir() for kind in ("images", "annotations") for s in SPLITS):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{EMBEDDED_NAME}."))
    try:
        for split, count, stem, seed in (("training", EMBEDDED_TRAIN, "ADE_train", 0),
                                         ("validation", EMBEDDED_VAL, "ADE_val", 1)):
            src, rng = _sources(split), np.random.default_rng(seed)
            (tmp / "images" / split).mkdir(parents=True)
            (tmp / "annotations" / split).mkdir(parents=True)
            for i in range(1, count + 1):
                image, labels = compose_scene(rng, src)
                Image.fromarray(image).save(tmp / "images" / split / f"{stem}_{i:08d}.jpg", quality=90)
                Image.fromarray(labels, mode="L").save(tmp / "annotations" / split / f"{stem}_{i:08d}.png")
        try:
            tmp.rename(target)
        except OSError:  # another process finished first: theirs is as good as ours
            if not (target / "annotations" / "validation").is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def class_frequencies(root: Path, split: str) -> dict[int, float]:
    """Fraction of labelled pixels per reduced class index over a split (for reports and tests)."""
    counts = np.zeros(256, np.int64)
    for _, ann in find_pairs(root, split):
        counts += np.bincount(np.asarray(Image.open(ann)).ravel(), minlength=256)
    counts[0] = 0  # "other"
    total = max(1, counts.sum())
    return {k - 1: counts[k] / total for k in range(1, NUM_CLASSES + 1) if counts[k]}
