"""The COCO task: the official-layout reader and its errors, COCOeval on known answers, the
embedded builder, Mask R-CNN on the backbone, and a tiny run end to end."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from attnbench.cli import main
from attnbench.tasks import TaskError
from tasks import _coco_data, _coco_eval
from tasks.detection import backbone_of, build_detector, make_train_step, synthetic_batch

W, H = 64, 48  # every hand-made image is 64 wide, 48 high


def _rect_mask(x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    mask = np.zeros((H, W), dtype=np.uint8)
    mask[y0:y1, x0:x1] = 1
    return mask


def _rle(mask: np.ndarray, compressed: bool = True) -> dict[str, Any]:
    if compressed:
        rle = mask_utils.encode(np.asfortranarray(mask))
        return {"size": [H, W], "counts": rle["counts"].decode("ascii")}
    flat = mask.flatten(order="F")  # column-major runs, starting with zeros
    changes = np.flatnonzero(np.diff(np.concatenate([[0], flat, [2]])) != 0)
    counts = np.diff(np.concatenate([[0], changes])).tolist()
    return {"size": [H, W], "counts": counts if flat[0] == 0 else [0, *counts]}


def _ann(ann_id: int, image_id: int, category: int, segmentation: Any, crowd: int = 0) -> dict[str, Any]:
    h_, w_ = H, W
    if isinstance(segmentation, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, h_, w_))
    elif isinstance(segmentation["counts"], list):
        rle = mask_utils.frPyObjects(segmentation, h_, w_)
    else:
        rle = segmentation
    return {"id": ann_id, "image_id": image_id, "category_id": category, "segmentation": segmentation,
            "area": float(mask_utils.area(rle)), "bbox": [float(v) for v in mask_utils.toBbox(rle)],
            "iscrowd": crowd}


def make_tiny_coco(root: Path) -> Path:
    """The official layout with two categories (ids 1 and 7), polygon, compressed and uncompressed
    RLE masks, a crowd region and a train image without annotations."""
    rng = np.random.default_rng(0)
    images = {"train2017": [1, 2, 3], "val2017": [10, 11]}
    square = [[8.0, 8.0, 24.0, 8.0, 24.0, 24.0, 8.0, 24.0]]  # a 16×16 polygon
    anns = {"train2017": [_ann(1, 1, 1, square),
                          _ann(2, 1, 7, _rle(_rect_mask(40, 30, 60, 44), compressed=False), crowd=1),
                          _ann(3, 2, 7, _rle(_rect_mask(30, 10, 50, 40)))],
            "val2017": [_ann(4, 10, 1, square), _ann(5, 11, 7, _rle(_rect_mask(30, 10, 50, 40))),
                        _ann(6, 11, 1, [[2.0, 2.0, 14.0, 2.0, 14.0, 14.0, 2.0, 14.0]])]}
    (root / "annotations").mkdir(parents=True)
    for split, ids in images.items():
        (root / split).mkdir()
        for i in ids:
            pixels = rng.integers(0, 255, (H, W, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / split / f"{i:012d}.jpg")
        data = {"images": [{"id": i, "file_name": f"{i:012d}.jpg", "width": W, "height": H} for i in ids],
                "annotations": anns[split],
                "categories": [{"id": 1, "name": "square"}, {"id": 7, "name": "block"}]}
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))
    return root


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_coco(tmp_path_factory.mktemp("tiny-coco"))


# ---- the reader ----------------------------------------------------------------------------------


def test_the_reader_gives_mask_rcnn_targets_without_crowds_or_empty_images(tiny):
    train, val = _coco_data.read_layout(tiny, "tiny")
    data = _coco_data.CocoInstances(train, train=True)
    assert data.ids == [1, 2]  # image 3 has no annotation: skipped in training
    image, target = data[0]
    assert image.shape == (3, H, W) and 0 <= image.min() and image.max() <= 1
    assert target["labels"].tolist() == [1]  # the crowd region of image 1 is left out
    assert target["boxes"].tolist() == [[8.0, 8.0, 24.0, 24.0]]  # x0, y0, x1, y1
    assert target["masks"].shape == (1, H, W) and target["masks"].sum() == 16 * 16
    _, target = data[1]
    assert target["labels"].tolist() == [2]  # category id 7 is the second category: label 2
    assert torch.equal(target["masks"][0], torch.from_numpy(_rect_mask(30, 10, 50, 40)))
    assert target["boxes"].tolist() == [[30.0, 10.0, 50.0, 40.0]]
    evaluation = _coco_data.CocoInstances(val, train=False)
    assert evaluation.ids == [10, 11] and evaluation[1][1] == {"image_id": 11}


def test_horizontal_flips_move_boxes_and_masks_together(tiny):
    train, _ = _coco_data.read_layout(tiny, "tiny")
    plain = _coco_data.CocoInstances(train, train=True)[1]
    image, target = _coco_data.CocoInstances(train, train=True, hflip=1.0)[1]
    assert torch.equal(image, plain[0].flip(-1)) and torch.equal(target["masks"], plain[1]["masks"].flip(-1))
    assert target["boxes"].tolist() == [[W - 50.0, 10.0, W - 30.0, 40.0]]


def test_uncompressed_rle_decodes_to_its_mask():
    mask = _rect_mask(40, 30, 60, 44)
    assert np.array_equal(_coco_data.annotation_mask(_rle(mask, compressed=False), H, W), mask)


def _broken(tiny: Path, tmp_path: Path, split: str, change) -> Path:
    """A copy of the tiny set whose ``split`` annotation file went through ``change(data)``."""
    import shutil

    root = tmp_path / "broken"
    shutil.copytree(tiny, root)
    path = root / "annotations" / f"instances_{split}.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))
    return root


def _set(key: str, value: Any, index: int = 0, what: str = "annotations"):
    def change(data: dict[str, Any]) -> None:
        data[what][index][key] = value
    return change


@pytest.mark.parametrize("change, message", [
    (lambda d: d.pop("annotations"), "lacks the list 'annotations'"),
    (lambda d: d["annotations"][0].pop("bbox"), "annotation #0 lacks key 'bbox'"),
    (_set("bbox", [1, 2, -3, 4]), "annotation 1: bbox [1, 2, -3, 4] has a negative width or height"),
    (_set("bbox", [1, 2, 3]), "annotation 1: bbox [1, 2, 3] is not [x, y, width, height]"),
    (_set("bbox", [50, 2, 30, 4]), "bbox [50, 2, 30, 4] reaches outside its image 1 of 64×48"),
    (_set("category_id", 99), "annotation 1: category_id 99 is not among the categories (1 square, 7 block)"),
    (_set("image_id", 42), "annotation 1: image_id 42 is not among the images"),
    (_set("segmentation", {"size": [24, 32], "counts": "abc"}, 2),
     "annotation 3: its RLE mask is 24×32 but its image 2 is 48×64 (height×width)"),
    (_set("segmentation", {"size": [H, W], "counts": [5, 10]}, 1),
     "annotation 2: its uncompressed RLE counts do not add up to 48×64 pixels"),
    (_set("segmentation", [[8.0, 8.0, 124.0, 8.0, 124.0, 24.0]]),
     "annotation 1: polygon point (124, 8) lies outside its image 1 of 64×48 (width×height): a mask of the "
     "wrong size?"),
    (_set("segmentation", [[8.0, 8.0, 24.0]]), "annotation 1: polygon [8.0, 8.0, 24.0] is not a flat list"),
    (_set("file_name", "missing.jpg", what="images"),
     "image 1's file train2017/missing.jpg does not exist (1 of 3 image files missing)"),
    (_set("width", "wide", what="images"), "image #0 needs an integer id, a file_name and positive integer"),
])
def test_malformed_annotations_name_the_problem(change, message, tiny, tmp_path):
    root = _broken(tiny, tmp_path, "train2017", change)
    with pytest.raises(TaskError) as exc:
        _coco_data.read_layout(root, "tiny")
    assert message in str(exc.value) and "instances_train2017.json" in str(exc.value)
    assert "\n" not in str(exc.value)


def test_invalid_json_and_an_image_of_another_size_are_errors(tiny, tmp_path):
    root = _broken(tiny, tmp_path, "val2017", lambda d: None)
    (root / "annotations" / "instances_val2017.json").write_text('{"images": [}')
    with pytest.raises(TaskError, match=r"instances_val2017.json: not valid JSON \(line 1 column 13"):
        _coco_data.read_layout(root, "tiny")
    make_tiny_coco(tmp_path / "resized")
    Image.new("RGB", (32, 32)).save(tmp_path / "resized" / "train2017" / f"{2:012d}.jpg")
    train, _ = _coco_data.read_layout(tmp_path / "resized", "tiny")
    with pytest.raises(TaskError, match="image 2 .* is 32×32 but the file says 64×48"):
        _coco_data.CocoInstances(train, train=True)[1]


def _error(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return err.strip().splitlines()[-1]


def tiny_run_args(data: Path, out: Path, *extra: str, mechanism: str = "softmax") -> list[str]:
    return ["run", "--mechanism", mechanism, "--task", "coco", "--data", str(data), "--size", "micro",
            "--min-size", "64", "--max-size", "64", "--detector", "light", "--epochs", "1",
            "--batch-size", "2", "--workers", "0", "--threads", "1", "--out", str(out / "run"),
            "--results", str(out / "coco.csv"), *extra]


@pytest.mark.parametrize("layout, message", [
    ("missing", "no such folder; expected DIR/annotations/instances_train2017.json"),
    ("no-annotations", "no annotations/instances_train2017.json in it; expected"),
    ("no-val-folder", "no val2017/ folder in it; expected"),
])
def test_missing_folders_and_files_say_the_expected_layout(layout, message, tiny, tmp_path, capsys):
    data = tmp_path / "data"
    if layout != "missing":
        import shutil

        shutil.copytree(tiny, data)
        if layout == "no-annotations":
            (data / "annotations" / "instances_train2017.json").unlink()
        else:
            shutil.rmtree(data / "val2017")
    line = _error(tiny_run_args(data, tmp_path), capsys)
    assert message in line and "(the COCO 2017 layout)" in line


@pytest.mark.parametrize("extra, message", [
    (["--min-size", "16"], "--min-size must be >= 32"),
    (["--max-size", "48"], "--max-size must be >= --min-size (64), got 48"),
    (["--hflip", "2"], "--hflip must be a probability in [0, 1], got 2.0"),
    (["--eval-every", "-1"], "--eval-every must be >= 0"),
    (["--detector", "huge"], "argument --detector: invalid choice: 'huge'"),
    (["--opt", "set.m=16"], "options of set do not apply to --mechanism softmax"),
    (["--batch-size", "8"], "fewer than one batch of 8 per process"),
])
def test_bad_options_get_one_clear_line(extra, message, tiny, tmp_path, capsys):
    assert message in _error(tiny_run_args(tiny, tmp_path, *extra), capsys)


# ---- the evaluator -------------------------------------------------------------------------------


def _truth_as_predictions(split: _coco_data.CocoSplit) -> tuple[list[dict], list[dict]]:
    """Every ground-truth object of ``split`` as a detection with score 1, box and mask exact."""
    data = _coco_data.CocoInstances(split, train=True)
    category_of = {label: cid for cid, label in data.label_of.items()}
    bbox, segm = [], []
    for i in range(len(data)):
        _, t = data[i]
        output = {"boxes": t["boxes"], "labels": t["labels"], "scores": torch.ones(len(t["labels"])),
                  "masks": t["masks"][:, None].float()}
        b, s = _coco_eval.to_coco_results(t["image_id"], output, category_of)
        bbox += b
        segm += s
    return bbox, segm


def test_perfect_predictions_score_ap_100_and_none_score_0(tiny):
    _, val = _coco_data.read_layout(tiny, "tiny")
    gt = _coco_eval.ground_truth(val.data)
    bbox, segm = _truth_as_predictions(val)
    assert len(bbox) == len(segm) == 3
    perfect = _coco_eval.evaluate_all(gt, bbox, segm)
    for kind in ("box", "mask"):
        assert [perfect[f"{kind}_{m}"] for m in ("AP", "AP50", "AP75")] == [100.0] * 3
    empty = _coco_eval.evaluate_all(gt, [], [])
    for kind in ("box", "mask"):
        assert [empty[f"{kind}_{m}"] for m in ("AP", "AP50", "AP75")] == [0.0] * 3
    assert np.isnan(empty["box_APl"])  # no large object in the ground truth: COCOeval's -1


def test_half_the_objects_found_scores_51_of_101_recall_points(tiny):
    """Two squares (category 1) in val; one found exactly: precision 1 up to recall 0.5, nothing beyond,
    so AP = 51/101 over COCO's 101 recall points; the other category is perfect (AP 100)."""
    _, val = _coco_data.read_layout(tiny, "tiny")
    gt = _coco_eval.ground_truth(val.data)
    bbox, segm = _truth_as_predictions(val)
    keep = [i for i, b in enumerate(bbox) if not (b["image_id"] == 11 and b["category_id"] == 1)]
    result = _coco_eval.evaluate_all(gt, [bbox[i] for i in keep], [segm[i] for i in keep])
    expected = (100 * 51 / 101 + 100) / 2  # the mean over the two categories
    assert result["box_AP"] == pytest.approx(expected) and result["mask_AP"] == pytest.approx(expected)


def test_a_box_shifted_by_half_its_width_is_a_miss(tiny):
    _, val = _coco_data.read_layout(tiny, "tiny")
    gt = _coco_eval.ground_truth(val.data)
    bbox, _ = _truth_as_predictions(val)
    for b in bbox:
        b["bbox"][0] += b["bbox"][2] / 2  # IoU 1/3: below every threshold of 0.50:0.95
    box, _ = _coco_eval.evaluate(gt, bbox, "bbox")
    assert box["AP"] == 0.0 and box["AP50"] == 0.0


# ---- the embedded data set -----------------------------------------------------------------------


def test_the_embedded_set_is_written_once_in_the_official_layout(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNBENCH_CACHE", str(tmp_path))
    monkeypatch.setattr(_coco_data, "EMBEDDED_IMAGES", {"train2017": 12, "val2017": 6})
    root = _coco_data.embedded_dataset()
    assert root == tmp_path / _coco_data.EMBEDDED_NAME
    train, val = _coco_data.read_layout(root, "embedded")  # every check of a --data folder passes
    assert (len(train.images), len(val.images)) == (12, 6)
    assert [c["name"] for c in train.categories] == ["coin", "horse", "gift"]
    side = _coco_data.EMBEDDED_SIDE
    for split in (train, val):
        for image_id, anns in split.annotations.items():
            assert anns, f"image {image_id} has no object"
            for a in anns:
                mask = _coco_data.annotation_mask(a["segmentation"], side, side)
                rle = mask_utils.encode(np.asfortranarray(mask))
                assert a["area"] == mask.sum() > 0
                assert a["bbox"] == pytest.approx(mask_utils.toBbox(rle).tolist())
    pixels = lambda s, i: np.asarray(Image.open(s.image_dir / s.images[i]["file_name"]))
    assert pixels(train, min(train.images)).shape == (side, side, 3)
    train_pixels = {pixels(train, i).tobytes() for i in train.images}
    assert not any(pixels(val, i).tobytes() in train_pixels for i in val.images)
    assert not set(train.images) & set(val.images)
    stamp = (root / "annotations" / "instances_val2017.json").stat().st_mtime_ns
    assert _coco_data.embedded_dataset() == root
    assert (root / "annotations" / "instances_val2017.json").stat().st_mtime_ns == stamp


# ---- the model -----------------------------------------------------------------------------------


@pytest.mark.parametrize("mechanism", ["softmax", "set"])
def test_mask_rcnn_trains_and_predicts_on_the_backbone(mechanism):
    model = build_detector("micro", mechanism, 3, min_size=64, max_size=64, detector="light")
    maps = model.backbone(torch.zeros(1, 3, 64, 64))
    assert list(maps) == ["0", "1", "2", "3", "pool"]
    assert [tuple(m.shape[-2:]) for m in maps.values()] == [(16, 16), (8, 8), (4, 4), (2, 2), (1, 1)]
    images, targets = synthetic_batch(64, 3)
    losses = model.train()(images, targets)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness",
                           "loss_rpn_box_reg"}
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    assert all(p.grad is not None for p in model.parameters())  # none unused: DDP needs every one
    assert backbone_of(model).mechanism == mechanism
    with torch.no_grad():
        outputs = model.eval()(images)
    assert len(outputs) == 2
    for out in outputs:
        n = len(out["scores"])
        assert out["boxes"].shape == (n, 4) and out["labels"].shape == (n,)
        assert out["masks"].shape == (n, 1, 64, 64)


def test_make_train_step_updates_the_weights(monkeypatch):
    optimisers = []

    class Recorded(torch.optim.AdamW):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            optimisers.append(self)

    monkeypatch.setattr(torch.optim, "AdamW", Recorded)
    step = make_train_step("softmax", 64)
    params = [p for g in optimisers[0].param_groups for p in g["params"]]
    before = [p.detach().clone() for p in params]
    step()
    assert optimisers[0].state  # the optimiser took a step
    changed = [not torch.equal(p, b) for p, b in zip(params, before, strict=True)]
    assert sum(changed) > len(changed) // 2
    with pytest.raises(ValueError, match="side must be >= 32"):
        make_train_step("softmax", 16)


def test_the_task_offers_the_resolution_probe_its_step():
    from attnbench.tasks import get_task, resolution_tasks

    assert "coco" in resolution_tasks() and get_task("coco").train_side == 128
    step, images = get_task("coco").train_step("set", 64, "micro", {}, "cpu")
    assert images == 2
    step()


# ---- end to end ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def finished(tiny, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("finished")
    assert main(tiny_run_args(tiny, out, mechanism="set")) == 0
    return out


def test_a_tiny_run_trains_evaluates_and_records_a_tidy_row(finished, tiny):
    table = pd.read_csv(finished / "coco.csv")
    assert len(table) == 1
    row = table.iloc[0]
    assert (row["task"], row["mechanism"], row["size"], row["detector"]) == ("coco", "set", "micro", "light")
    assert row["dataset"] == f"coco-layout:{tiny.name}" and row["num_classes"] == 2
    assert (row["img_size"], row["tokens_stage1"], row["epochs"]) == (64, 256, 1)
    for column in ("box_AP", "box_AP50", "mask_AP", "mask_AP50"):
        assert 0 <= row[column] <= 100
    assert row["train_images"] == 2 and row["val_images"] == 2 and row["status"] == "ok"
    assert row["params"] > row["backbone_params"] > 0 and row["backbone_gflops"] > 0
    assert row["train_img_s"] > 0 and row["eval_img_s"] > 0 and row["peak_mem_mib"] > 0
    assert row["mechanism_init"].startswith("kmeans")
    run = finished / "run"
    meta = json.loads((run / "meta.json").read_text())
    assert meta["preset"] == "coco" and meta["categories"] == ["square", "block"]
    history = pd.read_csv(run / "history.csv")
    assert len(history) == 1 and history["loss_mask"].iloc[0] > 0
    assert (run / "checkpoint.pt").is_file()
    assert list(finished.glob("coco_ap_*.png"))


def test_resume_refuses_a_checkpoint_of_another_run(finished, tiny, tmp_path, capsys):
    line = _error(tiny_run_args(tiny, tmp_path, "--resume", str(finished / "run")), capsys)
    assert "the checkpoint is of another run (mechanism: 'set' there, 'softmax' now)" in line


def test_without_data_the_embedded_set_is_named_in_the_row(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(_coco_data, "EMBEDDED_IMAGES", {"train2017": 4, "val2017": 2})
    argv = ["run", "--mechanism", "softmax", "--task", "coco", "--min-size", "64", "--max-size", "64",
            "--epochs", "1", "--batch-size", "2", "--workers", "0", "--threads", "1", "--mechanism-init",
            "random", "--out", str(tmp_path / "run"), "--results", str(tmp_path / "coco.csv")]
    assert main(argv) == 0
    row = pd.read_csv(tmp_path / "coco.csv").iloc[0]
    assert row["dataset"] == _coco_data.EMBEDDED_DATASET and row["size"] == "micro"
    assert row["detector"] == "light" and row["val_images"] == 2
