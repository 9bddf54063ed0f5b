"""Fixtures of the ImageNet tests: the tiny folder, and one finished run on it."""

from __future__ import annotations

from pathlib import Path

import pytest

from attnbench.cli import main
from tests.tasks.imagenet.tiny import make_tiny_imagenet, tiny_run_args


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_imagenet(tmp_path_factory.mktemp("tiny-imagenet"))


@pytest.fixture(scope="module")
def finished(tiny, tmp_path_factory) -> Path:
    """One two-epoch run with the full ImageNet recipe (MixUp, CutMix, RandAugment) on the tiny set."""
    out = tmp_path_factory.mktemp("finished")
    assert main(tiny_run_args(tiny, out, mechanism="set")) == 0
    return out
