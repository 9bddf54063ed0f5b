"""The embedded Rotten Tomatoes set: written once in the SST-2 layout."""

from __future__ import annotations

import numpy as np

from tasks.glue import data, embedded


def test_embedded_set_is_written_once_in_the_sst2_layout(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNBENCH_CACHE", str(tmp_path))
    root = embedded.embedded_dataset()
    train, devs = data.read_task(root, data.get_task("sst2"))
    dev = devs["dev"]
    assert (len(train), len(dev)) == (4280, 583)  # 4,866 fresh/rotten snippets, 3 duplicates dropped
    assert 0.45 < np.mean(train.labels) < 0.55 and 0.45 < np.mean(dev.labels) < 0.55
    assert not set(train.text_a) & set(dev.text_a)
    stamp = (root / "SST-2" / "dev.tsv").stat().st_mtime_ns
    assert embedded.embedded_dataset() == root and (root / "SST-2" / "dev.tsv").stat().st_mtime_ns == stamp
