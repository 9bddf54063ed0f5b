"""The embedded ADE20K set: a small real data set in the ADEChallengeData2016 layout.

Scenes composited from real images that scikit-image, scikit-learn and matplotlib ship, every
pixel labelled exactly with ADE20K's own class indices; train and val from disjoint regions of
every source. ``embedded_dataset()`` writes it once into the cache; ``data.py`` reads it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from tasks.ade20k.data import SPLITS
from tasks.common.cache import build_once

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
    """The embedded set in the ADEChallengeData2016 layout under ``root`` (default: the cache),
    written on first use."""
    complete = [f"{kind}/{split}" for kind in ("images", "annotations") for split in SPLITS]
    return build_once(EMBEDDED_NAME, complete, write_embedded, root)


def write_embedded(folder: Path) -> None:
    """Write ``EMBEDDED_TRAIN`` training and ``EMBEDDED_VAL`` validation scenes into ``folder``."""
    for split, count, stem, seed in (("training", EMBEDDED_TRAIN, "ADE_train", 0),
                                     ("validation", EMBEDDED_VAL, "ADE_val", 1)):
        src, rng = _sources(split), np.random.default_rng(seed)
        (folder / "images" / split).mkdir(parents=True)
        (folder / "annotations" / split).mkdir(parents=True)
        for i in range(1, count + 1):
            image, labels = compose_scene(rng, src)
            Image.fromarray(image).save(folder / "images" / split / f"{stem}_{i:08d}.jpg", quality=90)
            Image.fromarray(labels, mode="L").save(folder / "annotations" / split / f"{stem}_{i:08d}.png")
