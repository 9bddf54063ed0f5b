"""The ADE20K task: its loader against tiny hand-made files in the official layout, each bad
input's one-line error, the metric against known answers, the embedded builder, the model, and
a tiny run end to end."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from attnbench.cli import main
from attnbench.tasks import TaskError
from tasks import _ade20k_data as data
from tasks._seg_metrics import confusion_matrix, segmentation_scores
from tasks.segmentation import build_segmenter, make_train_step


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


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_ade(tmp_path_factory.mktemp("tiny-ade"))


# ---- the loader ------------------------------------------------------------------------------------


def test_the_loader_reads_the_official_layout_and_reduces_the_zero_label(tiny):
    pairs = data.find_pairs(tiny, "training")
    assert [p[0].name for p in pairs][:2] == ["ADE_train_00000001.jpg", "ADE_train_00000002.jpg"]
    assert all(i.stem == a.stem for i, a in pairs)
    raw = np.asarray(Image.open(pairs[0][1]))
    image, labels = data.read_pair(*pairs[0])
    assert image.shape == (3, *raw.shape) and image.dtype == torch.uint8
    assert set(torch.unique(labels).tolist()) == {2, 4, 255}  # 3 -> 2, 5 -> 4, 0 -> 255
    assert torch.equal(labels == 255, torch.from_numpy(raw == 0))
    train = data.ADE20KSegmentation(tiny, "training", data.TrainTransform(32))
    x, y, error = train[0]
    assert error == "" and x.shape == (3, 32, 32) and x.dtype == torch.float32 and y.shape == (32, 32)
    assert set(torch.unique(y).tolist()) <= {2, 4, 255}
    val = data.ADE20KSegmentation(tiny, "validation", data.EvalTransform(32))
    x, y, _ = val[0]
    assert min(x.shape[1:]) == 32  # resized to the crop side, the labels stay at full size
    assert y.shape == np.asarray(Image.open(val.pairs[0][1])).shape


def _error(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return err.strip().splitlines()[-1]


def tiny_run_args(data_dir: Path, out: Path, *extra: str, mechanism: str = "softmax") -> list[str]:
    return ["run", "--mechanism", mechanism, "--task", "ade20k", "--data", str(data_dir), "--size", "micro",
            "--crop-size", "32", "--channels", "8", "--epochs", "1", "--batch-size", "3", "--workers", "0",
            "--out", str(out / "run"), "--results", str(out / "ade20k.csv"), *extra]


@pytest.mark.parametrize("damage, message", [
    ("missing", "no such folder; expected images/{training,validation}/*.jpg and annotations/"),
    ("no-annotations", "no annotations/validation/ folder in it"),
    ("image-without-annotation", "images/training/ADE_train_00000002.jpg has no annotation in "
                                 "annotations/training/ with the same name"),
    ("annotation-without-image", "annotations/validation/ADE_val_00000009.png has no image in "
                                 "images/validation/"),
    ("wrong-size", "annotations/training/ADE_train_00000001.png is 10×12 but its image is"),
    ("unreadable", "cannot read images/training/ADE_train_00000003.jpg"),
    ("label-above-150", "holds label 151; expected 0 (other, ignored) or 1..150"),
])
def test_bad_data_gets_one_clear_line(damage, message, tmp_path, capsys):
    root = tmp_path / "ade"
    if damage != "missing":
        make_tiny_ade(root, train=3, val=1)
    if damage == "no-annotations":
        for f in (root / "annotations" / "validation").iterdir():
            f.unlink()
        (root / "annotations" / "validation").rmdir()
    elif damage == "image-without-annotation":
        (root / "annotations" / "training" / "ADE_train_00000002.png").unlink()
    elif damage == "annotation-without-image":
        Image.new("L", (8, 8)).save(root / "annotations" / "validation" / "ADE_val_00000009.png")
    elif damage == "wrong-size":
        Image.new("L", (10, 12)).save(root / "annotations" / "training" / "ADE_train_00000001.png")
    elif damage == "unreadable":
        (root / "images" / "training" / "ADE_train_00000003.jpg").write_bytes(b"not a JPEG at all")
    elif damage == "label-above-150":
        ann = root / "annotations" / "training" / "ADE_train_00000002.png"
        labels = np.asarray(Image.open(ann)).copy()
        labels[5, 5] = 151
        Image.fromarray(labels, mode="L").save(ann)
    line = _error(tiny_run_args(root, tmp_path), capsys)
    assert message in line, line


def test_an_annotation_with_colour_channels_is_refused(tiny, tmp_path):
    image, ann = data.find_pairs(tiny, "training")[0]
    rgb = tmp_path / "rgb.png"
    Image.open(ann).convert("RGB").save(rgb)
    with pytest.raises(TaskError, match="is a RGB image; expected one channel of class indices"):
        data.read_pair(image, rgb)


def test_a_load_error_in_a_worker_reaches_the_main_process_as_one_task_error(tiny, tmp_path):
    ds = data.ADE20KSegmentation(tiny, "training", data.TrainTransform(32))
    broken = tmp_path / "broken.png"
    broken.write_bytes(Image.open(ds.pairs[0][1]).tobytes()[:20])  # a header-less PNG
    ds.pairs[1] = (ds.pairs[1][0], broken)
    loader = torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=data.collate, num_workers=1)
    with pytest.raises(TaskError, match="broken.png"):
        list(data.raise_errors(loader))


# ---- the metric ------------------------------------------------------------------------------------


def _scores(pred: list[list[int]], target: list[list[int]], classes: int = 4) -> dict:
    return segmentation_scores(confusion_matrix(torch.tensor(pred), torch.tensor(target), classes))


def test_a_perfect_prediction_scores_one():
    target = [[0, 0, 1, 1], [2, 2, 255, 1]]
    s = _scores([[0, 0, 1, 1], [2, 2, 3, 1]], target)  # the ignored pixel's prediction does not count
    assert s["miou"] == 1.0 and s["aacc"] == 1.0 and s["macc"] == 1.0
    assert s["classes_present"] == 3 and math.isnan(s["iou"][3])  # class 3: no truth, no prediction


def test_an_entirely_wrong_prediction_scores_zero():
    s = _scores([[1, 1, 0, 0], [3, 3, 3, 3]], [[0, 0, 1, 1], [2, 2, 2, 2]])
    assert s["miou"] == 0.0 and s["aacc"] == 0.0 and s["macc"] == 0.0


def test_a_partial_prediction_matches_the_hand_computed_answer():
    s = _scores([[0, 0, 1, 1], [2, 2, 2, 0]], [[0, 0, 0, 1], [1, 2, 2, 255]])
    # (truth, prediction) pairs: (0,0) ×2, (0,1), (1,1), (1,2), (2,2) ×2; the ignored pixel is out
    # class 0: hit 2, truth 3, predicted 2 -> 2/3; class 1: hit 1, truth 2, predicted 2 -> 1/3;
    # class 2: hit 2, truth 2, predicted 3 -> 2/3
    assert s["iou"][:3].tolist() == pytest.approx([2 / 3, 1 / 3, 2 / 3])
    assert s["miou"] == pytest.approx((2 / 3 + 1 / 3 + 2 / 3) / 3)
    assert s["aacc"] == pytest.approx(5 / 7)  # 7 labelled pixels, 5 right
    assert s["macc"] == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)


def test_ignored_pixels_and_absent_classes_are_left_out():
    all_ignored = _scores([[1, 2]], [[255, 255]])
    assert math.isnan(all_ignored["miou"]) and math.isnan(all_ignored["aacc"])
    # a class predicted but absent from the truth counts as IoU 0 (mmseg); one never seen, not at all
    s = _scores([[0, 3]], [[0, 0]])
    assert s["iou"][0].item() == 0.5 and s["iou"][3].item() == 0.0 and s["miou"] == 0.25
    assert math.isnan(s["iou"][1]) and math.isnan(s["iou"][2])


def test_the_confusion_matrix_sums_over_images():
    a = confusion_matrix(torch.tensor([0, 1]), torch.tensor([0, 0]), 2)
    b = confusion_matrix(torch.tensor([1, 1]), torch.tensor([1, 255]), 2)
    assert (a + b).tolist() == [[1, 1], [0, 1]]


# ---- the embedded data set and the model -------------------------------------------------------------


def test_the_embedded_set_is_written_once_in_the_official_layout(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "EMBEDDED_TRAIN", 12)
    monkeypatch.setattr(data, "EMBEDDED_VAL", 4)
    root = data.embedded_dataset(tmp_path)
    train = data.find_pairs(root, "training")
    val = data.find_pairs(root, "validation")
    assert (len(train), len(val)) == (12, 4)
    assert train[0][0].name == "ADE_train_00000001.jpg" and val[0][1].name == "ADE_val_00000001.png"
    data.check_sizes(train + val, root)
    ann = Image.open(train[0][1])
    assert ann.mode == "L" and ann.size == (data.SCENE_W, data.SCENE_H)
    values = set()
    for _, a in train + val:
        values |= set(np.unique(np.asarray(Image.open(a))).tolist())
    assert values <= set(data.EMBEDDED_CLASSES) and {1, 127} <= values  # objectInfo150: wall, animal
    stamp = train[0][1].stat().st_mtime_ns
    assert data.embedded_dataset(tmp_path) == root and train[0][1].stat().st_mtime_ns == stamp


def test_train_and_validation_sources_are_disjoint():
    train, val = data._sources("training"), data._sources("validation")
    assert not any(np.array_equal(t[0], v[0]) and np.array_equal(t[1], v[1])
                   for t in train["coins"] for v in val["coins"])
    assert train["textures"][1].shape[0] + val["textures"][1].shape[0] == 512  # brick rows split
    assert train["fur"].shape[1] + val["fur"].shape[1] == 451  # chelsea columns split


@pytest.mark.parametrize("mechanism", ["softmax", "set"])
def test_the_segmenter_predicts_every_class_at_input_resolution(mechanism):
    model = build_segmenter("micro", mechanism, 150, channels=16).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 96))
    assert list(out) == ["out"] and out["out"].shape == (2, 150, 64, 96)
    model.train()
    out = model(torch.randn(2, 3, 64, 64))
    assert out["out"].shape == out["aux"].shape == (2, 150, 64, 64)
    assert not any(n.startswith(("backbone.head", "backbone.norm")) for n, _ in model.named_parameters())


def test_every_mechanism_gets_the_grid_of_its_stage():
    model = build_segmenter("micro", "softmax", 150, channels=8).eval()
    grids = []
    hooks = [m.register_forward_pre_hook(lambda mod, args: grids.append(tuple(args[1])))
             for m in model.mechanisms()]  # a block calls mixer(tokens, grid)
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 96))
    for h in hooks:
        h.remove()
    assert grids == [(16, 24), (8, 12), (4, 6), (4, 6), (2, 3)]  # micro: depths 1-1-2-1, strides 4..32


def test_make_train_step_changes_the_weights():
    step = make_train_step("softmax", 64, num_classes=5)
    optimizer = next(c.cell_contents for c in step.__closure__  # the closure holds the optimiser
                     if isinstance(c.cell_contents, torch.optim.Optimizer))
    before = [p.detach().clone() for p in optimizer.param_groups[0]["params"]]
    step()
    after = optimizer.param_groups[0]["params"]
    assert any(not torch.equal(a, b) for a, b in zip(after, before, strict=True))
    with pytest.raises(ValueError, match="side must be >= 32"):
        make_train_step("softmax", 16)


# ---- end to end ------------------------------------------------------------------------------------


def test_a_tiny_run_trains_evaluates_and_records_a_row(tiny, tmp_path):
    assert main(tiny_run_args(tiny, tmp_path, "--epochs", "2", "--aux-weight", "0.4", mechanism="set")) == 0
    table = pd.read_csv(tmp_path / "ade20k.csv")
    assert len(table) == 1
    row = table.iloc[0]
    assert (row["task"], row["mechanism"], row["size"]) == ("ade20k", "set", "micro")
    assert (row["epochs"], row["iters"]) == (2, 4)  # 6 images, batches of 3
    assert row["dataset"] == f"ade20k:{tiny.name}" and row["num_classes"] == 150
    assert 0 <= row["miou"] <= 100 and 0 <= row["aacc"] <= 100 and row["classes_present"] >= 2
    assert row["head"] == "upernet+fcn-aux" and row["mechanism_init"].startswith("kmeans")
    assert row["params"] > 0 and row["gflops"] > 0 and row["train_img_s"] > 0 and row["peak_mem_mib"] > 0
    assert (row["train_images"], row["val_images"], row["status"]) == (6, 2, "ok")
    history = pd.read_csv(tmp_path / "run" / "history.csv")
    assert len(history) == 2 and (tmp_path / "run" / "checkpoint.pt").is_file()
    assert list(tmp_path.glob("miou_ade20k_*.png"))
    # resuming the finished run evaluates it once more and appends a second row
    assert main(tiny_run_args(tiny, tmp_path, "--epochs", "2", "--aux-weight", "0.4", "--resume",
                              str(tmp_path / "run"), mechanism="set")) == 0
    table = pd.read_csv(tmp_path / "ade20k.csv")
    assert len(table) == 2 and table.iloc[1]["miou"] == pytest.approx(row["miou"])


@pytest.mark.parametrize("extra, message", [
    (["--crop-size", "16"], "--crop-size must be >= 32"),
    (["--aux-weight", "-1"], "--aux-weight must be >= 0"),
    (["--opt", "set.m=16"], "options of set do not apply to --mechanism softmax"),
    (["--backbone-weights", "/nonexistent/run"], "--backbone-weights /nonexistent/run: no checkpoint there"),
])
def test_bad_options_get_one_clear_line(extra, message, tiny, tmp_path, capsys):
    assert message in _error(tiny_run_args(tiny, tmp_path, *extra), capsys)
