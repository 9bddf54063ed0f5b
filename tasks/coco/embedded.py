"""The embedded COCO set: a small real data set written once in the official 2017 layout.

Real objects cut from images that scikit-image and matplotlib ship (the 24 coins of ``coins``,
the ``horse`` silhouette, matplotlib's gift-box icon) pasted onto crops of real photos
(scikit-image's, scikit-learn's and matplotlib's samples), with exact instance masks. Val
images are other compositions: other coins, other regions of the photos, other horse textures.
``embedded_dataset()`` writes it once into the cache; ``data.py`` reads it like any --data folder.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from attnbench import TaskError
from tasks.coco.data import SPLITS, annotation_mask
from tasks.common.cache import build_once

EMBEDDED_NAME = "coco-composites-v1"  # the cache folder; bump the version when the builder changes
EMBEDDED_DATASET = "embedded:skimage-composites (COCO layout)"
EMBEDDED_DESCRIPTION = (
    "embedded skimage-composites in the COCO 2017 layout: 128×128 JPEGs of real objects (the coins of "
    "scikit-image's `coins`, its `horse` silhouette textured with photo crops, matplotlib's gift-box icon) "
    "pasted onto crops of real photos (scikit-image, scikit-learn and matplotlib samples); 3 categories; "
    "val: held-out coins, held-out photo regions and horse textures")
EMBEDDED_CATEGORIES = [{"id": 1, "name": "coin", "supercategory": "object"},
                       {"id": 2, "name": "horse", "supercategory": "animal"},
                       {"id": 3, "name": "gift", "supercategory": "object"}]
EMBEDDED_SIDE = 128
EMBEDDED_IMAGES = {"train2017": 640, "val2017": 160}
VAL_FRACTION = 0.3  # the right-hand part of every photo gives val backgrounds and textures
# scikit-image's photos that ship inside its wheel (no download), and the other packages' samples
SKIMAGE_PHOTOS = ("astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg", "motorcycle_left.png",
                  "hubble_deep_field.jpg", "ihc.png", "brick.png", "grass.png", "gravel.png")


@dataclasses.dataclass
class Cutout:
    """A real object: its pixels (h, w, 3) uint8 and its mask (h, w) bool, cropped to the mask."""

    pixels: np.ndarray
    mask: np.ndarray


def _skimage_file(name: str) -> Path:
    import skimage

    path = Path(skimage.__file__).parent / "data" / name
    if not path.is_file():
        raise TaskError(f"the embedded COCO set needs {name}, which this scikit-image does not ship "
                        f"({path}); pass --data DIR")
    return path


def _photos() -> list[np.ndarray]:
    """Real photos (H, W, 3) uint8 from scikit-image, scikit-learn and matplotlib."""
    import matplotlib.cbook
    from sklearn.datasets import load_sample_image

    photos = [np.asarray(Image.open(_skimage_file(n)).convert("RGB")) for n in SKIMAGE_PHOTOS]
    photos += [load_sample_image(n) for n in ("china.jpg", "flower.jpg")]
    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
        photos.append(np.asarray(Image.open(f).convert("RGB")))
    return photos


def _coins() -> list[Cutout]:
    """The 24 coins of scikit-image's ``coins``: Sobel elevation, watershed from dark/bright markers,
    holes filled, one connected region per coin (scikit-image's own segmentation recipe)."""
    from scipy import ndimage
    from skimage import filters, measure, segmentation

    gray = np.asarray(Image.open(_skimage_file("coins.png")).convert("L"))
    markers = np.zeros_like(gray, dtype=np.int32)
    markers[gray < 30], markers[gray > 150] = 1, 2
    regions = ndimage.binary_fill_holes(segmentation.watershed(filters.sobel(gray), markers) == 2)
    coins = []
    for prop in measure.regionprops(measure.label(regions)):
        if prop.area < 400:  # specks, not coins
            continue
        r0, c0, r1, c1 = prop.bbox
        coins.append(Cutout(np.repeat(gray[r0:r1, c0:c1, None], 3, axis=2), prop.image.copy()))
    return coins


def _horse() -> np.ndarray:
    """The horse silhouette of scikit-image's ``horse`` (black on white), cropped: (h, w) bool."""
    gray = np.asarray(Image.open(_skimage_file("horse.png")).convert("L"))
    mask = gray < 128
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return mask[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]


def _gift() -> Cutout:
    """matplotlib's gift-box icon (``Minduka_Present_Blue_Pack.png``), its alpha as the mask."""
    import matplotlib.cbook

    with matplotlib.cbook.get_sample_data("Minduka_Present_Blue_Pack.png") as f:
        rgba = np.asarray(Image.open(f).convert("RGBA"))
    mask = rgba[..., 3] >= 128
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    crop = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    return Cutout(rgba[crop][..., :3].copy(), mask[crop].copy())


def _region(photo: np.ndarray, split: str) -> np.ndarray:
    """The left (train) or right (val) part of a photo: the splits never share a pixel."""
    cut = round(photo.shape[1] * (1 - VAL_FRACTION))
    return photo[:, :cut] if split == "train2017" else photo[:, cut:]


def _random_crop(region: np.ndarray, rng: np.random.Generator, side: int,
                 smallest: float = 0.5) -> np.ndarray:
    """A random square crop of ``region`` (at least ``smallest`` of its short side), resized to side²."""
    h, w = region.shape[:2]
    size = int(rng.integers(max(8, int(smallest * min(h, w))), min(h, w) + 1))
    y, x = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
    crop = Image.fromarray(region[y:y + size, x:x + size])
    return np.asarray(crop.resize((side, side), Image.BILINEAR))


def _resized(cut: Cutout, width: int, angle: float, flip: bool) -> Cutout:
    """``cut`` scaled to ``width`` pixels wide, rotated by ``angle`` degrees and maybe mirrored."""
    height = max(2, round(cut.mask.shape[0] * width / cut.mask.shape[1]))
    pixels = Image.fromarray(cut.pixels).resize((width, height), Image.BILINEAR)
    mask = Image.fromarray(cut.mask.astype(np.uint8) * 255).resize((width, height), Image.BILINEAR)
    if angle:
        pixels = pixels.rotate(angle, Image.BILINEAR, expand=True)
        mask = mask.rotate(angle, Image.BILINEAR, expand=True)
    pixels_np, mask_np = np.asarray(pixels), np.asarray(mask) >= 128
    if flip:
        pixels_np, mask_np = pixels_np[:, ::-1], mask_np[:, ::-1]
    return Cutout(np.ascontiguousarray(pixels_np), np.ascontiguousarray(mask_np))


def _polygons(mask: np.ndarray) -> list[list[float]]:
    """Outer contours of a mask as COCO polygons: half-way between pixel centres, which pycocotools
    puts at +0.5, so that the polygon rasterises back to the mask."""
    from skimage import measure

    polys = []
    for contour in measure.find_contours(np.pad(mask, 1).astype(np.float32), 0.5):
        if len(contour) >= 3:  # (row, col) of the padded mask -> x, y of the image
            polys.append([round(float(v), 2) for v in (contour[:, ::-1] - 0.5).ravel()])
    return polys


def _compose(rng: np.random.Generator, split: str, photos: list[np.ndarray], coins: list[Cutout],
             horse: np.ndarray, gift: Cutout, side: int) -> tuple[np.ndarray, list[tuple[int, Any]]]:
    """One image: a photo crop with 1-4 objects pasted where their boxes do not overlap.

    Returns the image (side, side, 3) uint8 and [(category id, segmentation)] where coins are
    written as polygons and horses and gifts as compressed RLE; the pasted pixels are exactly
    those of the written mask (the polygon rasterised by pycocotools for coins).
    """
    canvas = _random_crop(_region(photos[rng.integers(len(photos))], split), rng, side).copy()
    taken: list[tuple[int, int, int, int]] = []
    objects = []
    for _ in range(int(rng.integers(1, 5))):
        category = int(rng.choice([1, 2, 3], p=[0.5, 0.25, 0.25]))
        if category == 1:
            coin = coins[rng.integers(len(coins))]
            tint = np.array([1.0, 1.0, 1.0] if rng.random() < 0.5 else [1.1, 0.95, 0.7])  # silver or gold
            cut = Cutout(np.clip(coin.pixels * tint, 0, 255).astype(np.uint8), coin.mask)
            width = int(rng.integers(side // 9, int(side / 3.5)))
            cut = _resized(cut, width, float(rng.uniform(0, 360)), False)
        elif category == 2:
            texture = _random_crop(_region(photos[rng.integers(len(photos))], split), rng, horse.shape[1])
            texture = np.asarray(Image.fromarray(texture).resize(horse.shape[::-1], Image.BILINEAR))
            cut = Cutout((texture * 0.6).astype(np.uint8), horse)  # a darkened, textured silhouette
            cut = _resized(cut, int(rng.integers(side // 3, side * 2 // 3)), float(rng.uniform(-10, 10)),
                           bool(rng.random() < 0.5))
        else:
            cut = _resized(gift, int(rng.integers(side // 6, int(side / 2.5))), float(rng.uniform(-20, 20)),
                           bool(rng.random() < 0.5))
        h, w = cut.mask.shape
        if h >= side or w >= side:
            continue
        for _try in range(30):
            y, x = int(rng.integers(0, side - h + 1)), int(rng.integers(0, side - w + 1))
            if all(x + w + 2 <= a or a + c + 2 <= x or y + h + 2 <= b or b + d + 2 <= y
                   for a, b, c, d in taken):
                break
        else:
            continue  # no free place: leave this object out
        taken.append((x, y, w, h))
        full = np.zeros((side, side), dtype=bool)
        full[y:y + h, x:x + w] = cut.mask
        if category == 1:
            segmentation: Any = _polygons(full)
            if not segmentation:
                continue
            full = annotation_mask(segmentation, side, side).astype(bool)
        else:
            rle = mask_utils.encode(np.asfortranarray(full.astype(np.uint8)))
            segmentation = {"size": [side, side], "counts": rle["counts"].decode("ascii")}
        patch = np.zeros((side, side, 3), dtype=np.uint8)
        patch[y:y + h, x:x + w] = cut.pixels
        canvas[full] = patch[full]  # exactly the pixels of the written mask
        objects.append((category, segmentation))
    return canvas, objects


def write_embedded(target: Path, images: dict[str, int] | None = None, side: int = EMBEDDED_SIDE,
                   seed: int = 0) -> Path:
    """Write the embedded set into ``target`` (a new folder) in the COCO 2017 layout."""
    images = images or EMBEDDED_IMAGES
    photos, coins, horse, gift = _photos(), _coins(), _horse(), _gift()
    held_out = {"train2017": [c for i, c in enumerate(coins) if i % 4 != 3],  # 18 train coins, 6 val
                "val2017": [c for i, c in enumerate(coins) if i % 4 == 3]}
    (target / "annotations").mkdir(parents=True)
    ann_id = 1
    for s, (split, count) in enumerate(images.items()):
        rng = np.random.default_rng([seed, s])
        folder = target / split
        folder.mkdir()
        entries, anns = [], []
        for k in range(count):
            image_id = (s + 1) * 1_000_000 + k + 1
            pixels, objects = _compose(rng, split, photos, held_out[split], horse, gift, side)
            name = f"{image_id:012d}.jpg"
            Image.fromarray(pixels).save(folder / name, quality=92)
            entries.append({"id": image_id, "file_name": name, "width": side, "height": side})
            for category, seg in objects:
                rle = (mask_utils.merge(mask_utils.frPyObjects(seg, side, side)) if isinstance(seg, list)
                       else seg)
                anns.append({"id": ann_id, "image_id": image_id, "category_id": category,
                             "segmentation": seg, "area": float(mask_utils.area(rle)),
                             "bbox": [float(v) for v in mask_utils.toBbox(rle)], "iscrowd": 0})
                ann_id += 1
        data = {"info": {"description": EMBEDDED_DESCRIPTION, "version": EMBEDDED_NAME},
                "licenses": [], "images": entries, "annotations": anns, "categories": EMBEDDED_CATEGORIES}
        (target / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))
    return target


def embedded_dataset(root: Path | None = None) -> Path:
    """The embedded set under ``root`` (default: the cache), written on first use."""
    complete = [f"annotations/instances_{split}.json" for split in SPLITS]
    return build_once(EMBEDDED_NAME, complete, write_embedded, root)
