"""The embedded ADE20K set: written once, in the official layout, train and val sources disjoint."""

from __future__ import annotations

import numpy as np
from PIL import Image

from tasks.ade20k import data, embedded

# ---- the embedded data set and the model -------------------------------------------------------------


def test_the_embedded_set_is_written_once_in_the_official_layout(tmp_path, monkeypatch):
    monkeypatch.setattr(embedded, "EMBEDDED_TRAIN", 12)
    monkeypatch.setattr(embedded, "EMBEDDED_VAL", 4)
    root = embedded.embedded_dataset(tmp_path)
    train = data.find_pairs(root, "training")
    val = data.find_pairs(root, "validation")
    assert (len(train), len(val)) == (12, 4)
    assert train[0][0].name == "ADE_train_00000001.jpg" and val[0][1].name == "ADE_val_00000001.png"
    data.check_sizes(train + val, root)
    ann = Image.open(train[0][1])
    assert ann.mode == "L" and ann.size == (embedded.SCENE_W, embedded.SCENE_H)
    values = set()
    for _, a in train + val:
        values |= set(np.unique(np.asarray(Image.open(a))).tolist())
    assert values <= set(embedded.EMBEDDED_CLASSES) and {1, 127} <= values  # objectInfo150: wall, animal
    stamp = train[0][1].stat().st_mtime_ns
    assert embedded.embedded_dataset(tmp_path) == root and train[0][1].stat().st_mtime_ns == stamp


def test_train_and_validation_sources_are_disjoint():
    train, val = embedded._sources("training"), embedded._sources("validation")
    assert not any(np.array_equal(t[0], v[0]) and np.array_equal(t[1], v[1])
                   for t in train["coins"] for v in val["coins"])
    assert train["textures"][1].shape[0] + val["textures"][1].shape[0] == 512  # brick rows split
    assert train["fur"].shape[1] + val["fur"].shape[1] == 451  # chelsea columns split
