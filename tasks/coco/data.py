"""COCO instance data: the official 2017 layout read and checked, and the small real set attnbench embeds.

The layout (``--data DIR``)::

    DIR/annotations/instances_train2017.json    DIR/train2017/*.jpg
    DIR/annotations/instances_val2017.json      DIR/val2017/*.jpg

Each annotation file is checked once when it is read: the keys of an instances file, a bbox
that is [x, y, width, height] inside its image, category and image ids that exist, every image
file present, and every mask the size of its image (an RLE's ``size`` and runs, a polygon's points).
Each problem is a ``TaskError`` of one line naming the file, the annotation and what is wrong.

Training follows the usual Mask R-CNN practice: crowd annotations are left out of the targets,
boxes under a pixel wide or high are dropped, and images left without an annotation are
skipped. Evaluation runs on every val image (COCOeval reads the crowd regions itself).
An image that fails to decode is skipped with a warning naming it and counted (as in
``tasks/common/image_folder.py``); one whose size differs from its ``width``/``height`` is an error.
Without ``--data`` the embedded set (``embedded.py``) is written in this very layout and read here.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils
from torch import Tensor
from torch.utils.data import Dataset

from attnbench import TaskError
from tasks.common.image_folder import UnreadableImage, read_image

SPLITS = ("train2017", "val2017")
LAYOUT = ("expected DIR/annotations/instances_train2017.json, DIR/annotations/instances_val2017.json, "
          "DIR/train2017/*.jpg and DIR/val2017/*.jpg (the COCO 2017 layout)")
ANNOTATION_KEYS = ("id", "image_id", "category_id", "bbox", "segmentation", "area", "iscrowd")
IMAGE_KEYS = ("id", "file_name", "width", "height")
POLYGON_SLACK = 1.0  # pixels a polygon point may lie beyond its image's edge (rounding in real files)


# ---- the layout and its annotation files -------------------------------------------------------


def check_layout(root: Path, label: str) -> dict[str, tuple[Path, Path]]:
    """{split: (annotation file, image folder)}, or a TaskError naming what is missing."""
    if not root.exists():
        raise TaskError(f"{label}: no such folder; {LAYOUT}")
    if not root.is_dir():
        raise TaskError(f"{label}: not a folder; {LAYOUT}")
    found = {}
    for split in SPLITS:
        file, folder = root / "annotations" / f"instances_{split}.json", root / split
        if not file.is_file():
            raise TaskError(f"{label}: no annotations/{file.name} in it; {LAYOUT}")
        if not folder.is_dir():
            raise TaskError(f"{label}: no {split}/ folder in it; {LAYOUT}")
        found[split] = (file, folder)
    return found


@dataclasses.dataclass
class CocoSplit:
    """One checked instances file: its JSON as read (what COCOeval takes as ground truth), its
    images, and each image's annotations."""

    name: str  # "train2017" or "val2017"
    annotation_file: Path
    image_dir: Path
    data: dict[str, Any]
    images: dict[int, dict[str, Any]]  # image id -> image entry
    annotations: dict[int, list[dict[str, Any]]]  # image id -> its annotations, file order
    categories: list[dict[str, Any]]  # sorted by id


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def read_split(annotation_file: Path, image_dir: Path) -> CocoSplit:
    """Read and check one instances file against its image folder (see the module docstring)."""
    where = str(annotation_file)

    def fail(message: str) -> TaskError:
        return TaskError(f"{where}: {message}")

    try:
        data = json.loads(annotation_file.read_text())
    except json.JSONDecodeError as exc:
        raise fail(f"not valid JSON (line {exc.lineno} column {exc.colno}: {exc.msg})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise fail(f"cannot be read ({exc})") from None
    if not isinstance(data, dict):
        raise fail("not an instances file (expected a JSON object with images, annotations, categories)")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise fail(f"lacks the list {key!r} (an instances file has images, annotations, categories)")
    categories: dict[int, dict[str, Any]] = {}
    for i, cat in enumerate(data["categories"]):
        if not isinstance(cat, dict) or not _is_int(cat.get("id")) or not isinstance(cat.get("name"), str):
            raise fail(f"category #{i} is not an object with an integer 'id' and a 'name'")
        if cat["id"] in categories:
            raise fail(f"category id {cat['id']} appears twice")
        categories[cat["id"]] = cat
    if not categories:
        raise fail("has no categories")
    images: dict[int, dict[str, Any]] = {}
    for i, img in enumerate(data["images"]):
        if not isinstance(img, dict):
            raise fail(f"image #{i} is not an object")
        missing = [k for k in IMAGE_KEYS if k not in img]
        if missing:
            raise fail(f"image #{i} lacks key {missing[0]!r} (images have {', '.join(IMAGE_KEYS)})")
        if not (_is_int(img["id"]) and isinstance(img["file_name"], str) and _is_int(img["width"])
                and _is_int(img["height"]) and img["width"] > 0 and img["height"] > 0):
            raise fail(f"image #{i} needs an integer id, a file_name and positive integer width and height")
        if img["id"] in images:
            raise fail(f"image id {img['id']} appears twice")
        images[img["id"]] = img
    present = {p.name for p in image_dir.iterdir()}
    absent = [img for img in images.values() if img["file_name"] not in present]
    if absent:
        raise fail(f"image {absent[0]['id']}'s file {image_dir.name}/{absent[0]['file_name']} does not exist "
                   f"({len(absent)} of {len(images)} image files missing)")
    names = ", ".join(f"{c['id']} {c['name']}" for c in list(categories.values())[:8])
    names += " …" if len(categories) > 8 else ""
    per_image: dict[int, list[dict[str, Any]]] = {i: [] for i in images}
    ids: set[int] = set()
    for i, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict):
            raise fail(f"annotation #{i} is not an object")
        missing = [k for k in ANNOTATION_KEYS if k not in ann]
        if missing:
            raise fail(f"annotation #{i} lacks key {missing[0]!r} (instances annotations have "
                       f"{', '.join(ANNOTATION_KEYS)})")
        name = f"annotation {ann['id']}"
        if not _is_int(ann["id"]) or ann["id"] in ids:
            raise fail(f"annotation #{i}: id {ann['id']!r} is not an integer used once")
        ids.add(ann["id"])
        if not _is_int(ann["image_id"]) or ann["image_id"] not in images:
            raise fail(f"{name}: image_id {ann['image_id']!r} is not among the images")
        if not _is_int(ann["category_id"]) or ann["category_id"] not in categories:
            raise fail(f"{name}: category_id {ann['category_id']!r} is not among the categories ({names})")
        if not _is_int(ann["iscrowd"]) or ann["iscrowd"] not in (0, 1):
            raise fail(f"{name}: iscrowd is {ann['iscrowd']!r}, not 0 or 1")
        if not _is_number(ann["area"]) or ann["area"] < 0:
            raise fail(f"{name}: area {ann['area']!r} is not a number >= 0")
        img = images[ann["image_id"]]
        _check_bbox(ann["bbox"], img, fail, name)
        _check_segmentation(ann["segmentation"], img, fail, name)
        per_image[ann["image_id"]].append(ann)
    return CocoSplit(annotation_file.stem.removeprefix("instances_"), annotation_file, image_dir, data,
                     images, per_image, sorted(categories.values(), key=lambda c: c["id"]))


def _check_bbox(box: Any, img: dict[str, Any], fail: Callable[[str], TaskError], name: str) -> None:
    """[x, y, width, height], finite, width and height >= 0, inside the image (a pixel of slack)."""
    w, h = img["width"], img["height"]
    if not (isinstance(box, list) and len(box) == 4 and all(_is_number(v) for v in box)):
        raise fail(f"{name}: bbox {box!r} is not [x, y, width, height] of four numbers")
    x, y, bw, bh = box
    if bw < 0 or bh < 0:
        raise fail(f"{name}: bbox {box} has a negative width or height")
    s = POLYGON_SLACK
    if x < -s or y < -s or x + bw > w + s or y + bh > h + s:
        raise fail(f"{name}: bbox {box} reaches outside its image {img['id']} of {w}×{h} (width×height)")


def _check_segmentation(seg: Any, img: dict[str, Any], fail: Callable[[str], TaskError], name: str) -> None:
    """Polygons [[x0, y0, x1, y1, …], …] with every point in the image, or an RLE of the image's size."""
    w, h = img["width"], img["height"]
    if isinstance(seg, dict):
        size, counts = seg.get("size"), seg.get("counts")
        if not (isinstance(size, list) and len(size) == 2 and all(_is_int(v) for v in size)):
            raise fail(f"{name}: RLE segmentation lacks a 'size' of [height, width]")
        if size != [h, w]:
            raise fail(f"{name}: its RLE mask is {size[0]}×{size[1]} but its image {img['id']} is {h}×{w} "
                       "(height×width)")
        if isinstance(counts, list):
            if not all(_is_int(c) and c >= 0 for c in counts) or sum(counts) != h * w:
                raise fail(f"{name}: its uncompressed RLE counts do not add up to {h}×{w} pixels")
        elif not isinstance(counts, str):
            raise fail(f"{name}: RLE segmentation needs 'counts' as a list or a compressed string")
        elif sum(compressed_counts(counts) or [-1]) != h * w:
            raise fail(f"{name}: its compressed RLE counts {counts[:20]!r} are not a run-length code of "
                       f"{h}×{w} pixels")
        return
    if not isinstance(seg, list) or not seg:
        raise fail(f"{name}: segmentation is neither polygons [[x0, y0, …], …] nor an RLE {{size, counts}}")
    for poly in seg:
        if not (isinstance(poly, list) and len(poly) >= 4 and len(poly) % 2 == 0
                and all(_is_number(v) for v in poly)):
            raise fail(f"{name}: polygon {str(poly)[:40]} is not a flat list of x, y pairs")
        xy = np.asarray(poly, dtype=np.float64).reshape(-1, 2)
        low, high = xy.min(0), xy.max(0)
        s = POLYGON_SLACK
        if low.min() < -s or high[0] > w + s or high[1] > h + s:
            bad = xy[np.argmax((xy[:, 0] > w + s) | (xy[:, 1] > h + s) | (xy < -s).any(1))]
            raise fail(f"{name}: polygon point ({bad[0]:g}, {bad[1]:g}) lies outside its image {img['id']} "
                       f"of {w}×{h} (width×height): a mask of the wrong size?")


def compressed_counts(text: str) -> list[int] | None:
    """The run lengths of a compressed RLE string (COCO's code: 6-bit digits from '0', 5 bits of
    value each, 0x20 "more follows", 0x10 the sign of the last; from the third run on, each is the
    difference from the run two before), or None when ``text`` is not such a code or a run is < 0."""
    counts: list[int] = []
    value, shift = 0, 0
    for char in text:
        digit = ord(char) - 48
        if not 0 <= digit < 64:
            return None
        value |= (digit & 0x1F) << shift
        shift += 5
        if digit & 0x20:
            continue
        if digit & 0x10:
            value -= 1 << shift  # negative: sign-extend
        if len(counts) > 2:
            value += counts[-2]
        if value < 0:
            return None
        counts.append(value)
        value, shift = 0, 0
    return counts if shift == 0 else None


def read_layout(root: Path, label: str) -> tuple[CocoSplit, CocoSplit]:
    """The checked train and val splits; val's categories must be train's."""
    found = check_layout(root, label)
    train, val = (read_split(*found[s]) for s in SPLITS)
    if [c["id"] for c in train.categories] != [c["id"] for c in val.categories]:
        raise TaskError(f"{label}: the category ids of instances_val2017.json differ from those of "
                        "instances_train2017.json")
    if not val.images:
        raise TaskError(f"{label}: instances_val2017.json lists no images")
    return train, val


def annotation_mask(segmentation: Any, height: int, width: int) -> np.ndarray:
    """A polygon list or RLE (compressed or not) as a (height, width) uint8 mask."""
    if isinstance(segmentation, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation["counts"], list):
        rle = mask_utils.frPyObjects(segmentation, height, width)
    else:
        rle = segmentation
    return mask_utils.decode(rle)


# ---- the dataset ---------------------------------------------------------------------------------


def usable(ann: dict[str, Any]) -> bool:
    """An annotation that trains: not a crowd region, box at least a pixel wide and high."""
    return ann["iscrowd"] == 0 and ann["bbox"][2] >= 1 and ann["bbox"][3] >= 1


class CocoInstances(Dataset):
    """Images and Mask R-CNN targets of one split.

    Training (``train=True``): images with at least one usable annotation, flipped horizontally
    with probability ``hflip``; target ``boxes`` (N, 4) float x0, y0, x1, y1 in pixels,
    ``labels`` (N,) int64 in 1..K (the categories in id order), ``masks`` (N, H, W) uint8.
    Evaluation: every image; the target holds only ``image_id``. An item is
    (image (3, H, W) float in [0, 1], target), or None when the image fails to decode.
    """

    def __init__(self, split: CocoSplit, train: bool, hflip: float = 0.0) -> None:
        self.split, self.train, self.hflip = split, train, hflip
        self.label_of = {c["id"]: i + 1 for i, c in enumerate(split.categories)}
        ids = sorted(split.images)
        self.ids = [i for i in ids if any(usable(a) for a in split.annotations[i])] if train else ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Any]] | None:
        image_id = self.ids[index]
        info = self.split.images[image_id]
        path = self.split.image_dir / info["file_name"]
        try:
            pil = read_image(path)
        except UnreadableImage as exc:
            print(f"warning: skipping undecodable image {exc}", file=sys.stderr)
            return None
        w, h = info["width"], info["height"]
        if pil.size != (w, h):
            raise TaskError(f"{self.split.annotation_file}: image {image_id} ({info['file_name']}) is "
                            f"{pil.size[0]}×{pil.size[1]} but the file says {w}×{h} (width×height)")
        image = torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1).float().div_(255)  # (3, H, W)
        if not self.train:
            return image, {"image_id": image_id}
        anns = [a for a in self.split.annotations[image_id] if usable(a)]
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]  # x, y, w, h -> x0, y0, x1, y1
        boxes[:, 0::2].clamp_(0, w)
        boxes[:, 1::2].clamp_(0, h)
        masks = torch.from_numpy(np.stack([annotation_mask(a["segmentation"], h, w) for a in anns]))
        labels = torch.tensor([self.label_of[a["category_id"]] for a in anns], dtype=torch.int64)
        if self.hflip > 0 and torch.rand(()) < self.hflip:
            image, masks = image.flip(-1), masks.flip(-1)
            boxes = torch.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], dim=1)
        return image, {"boxes": boxes, "labels": labels, "masks": masks, "image_id": image_id}


def collate(batch: list[Any]) -> tuple[list[Tensor], list[dict[str, Any]], int]:
    """The samples that decoded, as lists (images differ in size): (images, targets, skipped)."""
    good = [b for b in batch if b is not None]
    return [b[0] for b in good], [b[1] for b in good], len(batch) - len(good)
