"""pytest-benchmark timings of SeT against linear attention and sdpa (run with
``pytest tests/benchmarks --benchmarks``).

Issue #13's configuration: batch 1, 4 heads, head dim 32, m = 64, float32, forward without
autograd and forward + backward; SeT at its defaults (OTKE's prior placement and update order)
and with each other prior placement. Timings only; correctness is the test suite's job, but each
benchmark checks that its output is finite before timing it. The official figures come from
``attnbench scale``, which alternates mechanisms and records the machine.
"""

from __future__ import annotations

import pytest
import torch

from attnbench import build_mechanism
from attnbench.measure.timing import make_step

HEADS, HEAD_DIM = 4, 32
CASES = [("set", {}), ("set", {"prior": "plan"}), ("set", {"prior": "kernel"}), ("linear", {}), ("sdpa", {})]


@pytest.mark.parametrize("n", [1024, 4096, 16384, 65536])
@pytest.mark.parametrize("name, options", CASES, ids=lambda c: c if isinstance(c, str) else
                         ",".join(f"{k}={v}" for k, v in c.items()) or "defaults")
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def test_forward(benchmark, name, options, n, mode):
    if name == "sdpa" and n > 16384:
        pytest.skip("sdpa is quadratic: n = 65,536 is past this machine's memory")
    torch.manual_seed(0)
    options = {"m": 64, **options} if name == "set" else options
    module = build_mechanism(name, HEADS * HEAD_DIM, HEADS, **options)
    x = torch.randn(1, n, HEADS * HEAD_DIM)
    with torch.no_grad():
        assert torch.isfinite(module(x)).all()
    benchmark.group = f"{mode} n={n}"
    benchmark.extra_info.update(threads=torch.get_num_threads(), dtype="float32", batch=1,
                                heads=HEADS, head_dim=HEAD_DIM, options=options)
    benchmark.pedantic(make_step(module, x, None, mode), rounds=5, warmup_rounds=1)
