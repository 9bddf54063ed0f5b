"""Sequential images: pixels to tokens, the embedded MNIST-5k, CIFAR-10's python batches (a tiny
fake in the real format), runs on both, and the clear errors."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from attnbench.cli import main
from tasks.seqimage import data
from tests.tasks.common.test_sequence import CONTRACT

PER_BATCH = 4  # images in each fake data_batch_k (5 of them) and in test_batch


def fake_image(i: int) -> np.ndarray:
    """(32, 32, 3) uint8: equal channels v(r, c) = (7 r + 3 c + i) mod 256, so gray = v."""
    r, c = np.mgrid[:32, :32]
    v = ((7 * r + 3 * c + i) % 256).astype(np.uint8)
    return np.stack([v, v, v], axis=-1)


def write_fake_cifar(root: Path) -> Path:
    """``root/cifar-10-batches-py`` with five training batches, a test batch and the meta file, pickled
    as CIFAR-10's python version is: rows of 3072 bytes (the red plane, then green, then blue)."""
    folder = root / data.CIFAR_FOLDER
    folder.mkdir(parents=True)
    names = [f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]
    for b, name in enumerate(names):
        images = [fake_image(b * PER_BATCH + j) for j in range(PER_BATCH)]
        if name == "test_batch":
            images[0] = np.stack([np.full((32, 32), v, np.uint8) for v in (100, 50, 200)], axis=-1)
        rows = np.stack([im.transpose(2, 0, 1).reshape(-1) for im in images])
        batch = {"batch_label": name, "data": rows, "labels": [(b + j) % 10 for j in range(PER_BATCH)],
                 "filenames": [f"{name}_{j}.png" for j in range(PER_BATCH)]}
        (folder / name).write_bytes(pickle.dumps(batch))
    meta = {"label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                            "truck"], "num_cases_per_batch": PER_BATCH, "num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta))
    return root


@pytest.fixture
def cifar(tmp_path, monkeypatch) -> Path:
    """A fake CIFAR-10 folder, with torchvision's MD5 check of the real files relaxed to "exists"."""
    import torchvision.datasets.cifar as tv_cifar

    monkeypatch.setattr(tv_cifar, "check_integrity", lambda path, md5=None: Path(path).is_file())
    return write_fake_cifar(tmp_path / "cifar")


@pytest.fixture(scope="module")
def mnist_cache(tmp_path_factory):
    """The embedded MNIST-5k written once into a cache of this module's own."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ATTNBENCH_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


def test_tokens_read_pixels_row_by_row_as_intensity_plus_one_and_resize_to_the_side():
    images = torch.arange(16, dtype=torch.uint8).reshape(1, 4, 4) * 17  # 0, 17, …, 255
    assert data.tokens(images, 4).tolist() == [[17 * k + 1 for k in range(16)]]
    flat = torch.full((3, 28, 28), 90, dtype=torch.uint8)
    small = data.tokens(flat, 14)
    assert small.shape == (3, 196) and (small == 91).all()  # a flat image stays flat when resized
    assert data.tokens(torch.full((1, 2, 2), 255, dtype=torch.uint8), 5).max() == 256
    assert [data.square_side(n) for n in (1024, 784, 1000)] == [32, 28, None]


def test_cifar_batches_are_read_in_grayscale(cifar):
    (train_images, train_labels), (test_images, test_labels) = data.cifar10(cifar)
    assert train_images.shape == (5 * PER_BATCH, 32, 32) and train_images.dtype == torch.uint8
    assert test_images.shape == (PER_BATCH, 32, 32) and len(test_labels) == PER_BATCH
    assert torch.equal(train_images[5], torch.from_numpy(fake_image(5)[..., 0]))  # equal channels: gray = v
    assert train_labels.tolist()[:PER_BATCH] == [0, 1, 2, 3]
    assert (test_images[0] == 82).all()  # 0.2989 · 100 + 0.587 · 50 + 0.114 · 200 = 82.04
    ids = data.tokens(train_images, 32)
    assert ids[5, 32 * 3 + 4] == (7 * 3 + 3 * 4 + 5) % 256 + 1  # pixel (row 3, column 4)


def test_a_run_on_cifar_records_the_contract_row(cifar, tmp_path):
    argv = ["run", "--task", "seqimage", "--mechanism", "linear", "--data", str(cifar), "--batch-size", "4",
            "--max-steps", "2", "--out", str(tmp_path / "run"), "--results", str(tmp_path / "seqimage.csv")]
    assert main(argv) == 0
    row = pd.read_csv(tmp_path / "seqimage.csv").iloc[0]
    assert all(column in row.index for column in CONTRACT), [c for c in CONTRACT if c not in row.index]
    assert (row["dataset"], row["seq_len"], row["side"], row["steps"]) == ("cifar10-gray", 1024, 32, 2)
    # a tenth of the 20 training images held out for validation, scored once after training
    assert (row["train_examples"], row["val_examples"], row["test_examples"]) == (18, 2, 4)
    assert row["chance"] == 10.0
    assert 0 <= row["val_accuracy"] <= 100
    assert row["vocab_size"] == 257 and row["num_classes"] == 10


def test_the_embedded_digits_are_mnist5k_and_a_run_resizes_them(mnist_cache, tmp_path):
    (train_images, train_labels), (test_images, test_labels) = data.mnist()
    assert train_images.shape == (4000, 28, 28) and test_images.shape == (1000, 28, 28)
    assert torch.bincount(train_labels).tolist() == [400] * 10
    assert torch.bincount(test_labels).tolist() == [100] * 10
    assert train_images.float().mean() > 10  # real digits, not blanks
    argv = ["run", "--task", "seqimage", "--mechanism", "softmax", "--seq-len", "196", "--limit-train", "64",
            "--limit-val", "32", "--max-steps", "2", "--out", str(tmp_path / "run"),
            "--results", str(tmp_path / "seqimage.csv")]
    assert main(argv) == 0
    row = pd.read_csv(tmp_path / "seqimage.csv").iloc[0]
    assert (row["dataset"], row["seq_len"], row["side"], row["test_examples"]) == ("mnist5k", 196, 14, 32)


def test_bad_options_get_one_clear_line(tmp_path, cli_error):
    argv = ["run", "--task", "seqimage", "--mechanism", "softmax", "--out", str(tmp_path / "run")]
    assert ("--seq-len 1000 is not a square: seqimage reads side × side pixels; use 961 (31²) or 1024 (32²)"
            in cli_error([*argv, "--seq-len", "1000"]))
    empty = tmp_path / "empty"
    empty.mkdir()
    assert f"--data {empty}: no cifar-10-batches-py/ folder" in cli_error([*argv, "--data", str(empty)])


def test_corrupted_cifar_files_get_one_clear_line(tmp_path, cli_error):
    root = write_fake_cifar(tmp_path / "cifar")  # the real MD5 check: the fake files fail it
    argv = ["run", "--task", "seqimage", "--mechanism", "softmax", "--data", str(root), "--out",
            str(tmp_path / "run")]
    assert "CIFAR-10 could not be read (Dataset not found or corrupted" in cli_error(argv)


def test_the_validation_split_is_a_fixed_tenth_held_out_of_training():
    images = torch.arange(50, dtype=torch.uint8)[:, None, None].expand(50, 2, 2)
    labels = torch.arange(50) % 10
    (train_images, train_labels), (val_images, val_labels) = data.hold_out((images, labels))
    assert (len(train_labels), len(val_labels)) == (45, 5)
    seen, held = set(train_images[:, 0, 0].tolist()), set(val_images[:, 0, 0].tolist())
    assert seen.isdisjoint(held) and len(seen | held) == 50
    assert torch.equal(train_labels, train_images[:, 0, 0].long() % 10)  # images keep their labels
    again = data.hold_out((images, labels))[1][0]
    assert torch.equal(again, val_images)  # the same split every time, whatever the run's seed
    assert len(data.hold_out((images[:3], labels[:3]))[1][1]) == 1  # at least one
