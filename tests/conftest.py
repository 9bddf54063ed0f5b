"""Shared fixtures: every registered mechanism, so the conformance suite covers each one."""

from __future__ import annotations

import pytest
import torch

from attnbench import get_mechanism, mechanism_names


def mechanism_params() -> list:
    """One pytest param per registered mechanism, skipped with its reason when unavailable."""
    params = []
    for name in mechanism_names():
        reason = get_mechanism(name).unavailable_reason("cpu")
        marks = [pytest.mark.skip(reason=f"{name}: {reason}")] if reason else []
        params.append(pytest.param(name, marks=marks, id=name))
    return params


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


def pytest_addoption(parser):
    parser.addoption("--benchmarks", action="store_true",
                     help="also collect tests/benchmarks (pytest-benchmark timings; slow, not tests)")


def pytest_ignore_collect(collection_path, config):
    """Benchmarks measure, they do not test: leave them out unless --benchmarks is given."""
    if "benchmarks" in collection_path.parts and not config.getoption("--benchmarks"):
        return True
    return None
