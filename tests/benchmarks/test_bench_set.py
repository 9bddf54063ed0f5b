"""pytest-benchmark timings of SeT against sdpa (run with ``pytest tests/benchmarks --benchmarks``).

Issue #3's configuration: batch 1, 4 heads, head dim 32, m = 64, float32, forward without
autograd and forward + backward. Timings only; correctness is the test suite's job, but each
benchmark checks that its output is finite before timing it.
"""

from __future__ import annotations

import pytest
import torch

from attnbench import build_mechanism
from attnbench.measure import make_step

HEADS, HEAD_DIM = 4, 32


@pytest.mark.parametrize("n", [1024, 4096, 16384])
@pytest.mark.parametrize("name", ["set", "sdpa"])
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def test_forward(benchmark, name, n, mode):
    torch.manual_seed(0)
    options = {"m": 64} if name == "set" else {}
    module = build_mechanism(name, HEADS * HEAD_DIM, HEADS, **options)
    x = torch.randn(1, n, HEADS * HEAD_DIM)
    with torch.no_grad():
        assert torch.isfinite(module(x)).all()
    benchmark.group = f"{mode} n={n}"
    benchmark.extra_info.update(threads=torch.get_num_threads(), dtype="float32", batch=1,
                                heads=HEADS, head_dim=HEAD_DIM)
    benchmark.pedantic(make_step(module, x, None, mode), rounds=5, warmup_rounds=1)
