"""Fixtures of the COCO tests: the tiny set, and one finished run on it."""

from __future__ import annotations

from pathlib import Path

import pytest

from attnbench.cli import main
from tests.tasks.coco.tiny import make_tiny_coco, tiny_run_args


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_coco(tmp_path_factory.mktemp("tiny-coco"))


@pytest.fixture(scope="module")
def finished(tiny, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("finished")
    assert main(tiny_run_args(tiny, out, mechanism="set")) == 0
    return out
