"""Fixtures of the ADE20K tests: the tiny folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.tasks.ade20k.tiny import make_tiny_ade


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_ade(tmp_path_factory.mktemp("tiny-ade"))
