"""Fixtures of the GLUE tests: a tiny SST-2 folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.tasks.glue.tiny import NEGATIVE, POSITIVE, write_glue


@pytest.fixture(scope="module")
def sentiment(tmp_path_factory) -> Path:
    """A tiny SST-2 folder: 40 train and 8 dev sentences."""
    root = tmp_path_factory.mktemp("glue")
    lines = [f"{s} number {i} .\t{y}" for i in range(5) for y, group in ((1, POSITIVE), (0, NEGATIVE))
             for s in group]
    write_glue(root, {"SST-2": {"train.tsv": "sentence\tlabel\n" + "\n".join(lines) + "\n",
                                "dev.tsv": "sentence\tlabel\n" + "\n".join(lines[:8]) + "\n"}})
    return root
