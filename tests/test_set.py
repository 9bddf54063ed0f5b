"""SeT against a plain dense reference written from the specification, and its properties."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from attnbench import OptionError, build_mechanism
from mechanisms.set import kmeans, positional_log_prior

torch.backends.cudnn.deterministic = True


def small_set(**options):
    defaults = dict(m=9, anchors=6, iters=30, eps=0.5)
    return build_mechanism("set", 16, 2, **{**defaults, **options}).double()


def reference_set(module, x, grid=None):
    """The specification's forward pass, step by step, one head at a time, no log domain."""
    o = module.options
    b, n, c = x.shape
    h, d = module.num_heads, module.head_dim
    alpha = 1 / o.kernel_sigma**2
    w, bias = module.in_proj.weight, module.in_proj.bias
    u_all = x @ w[:c].T + bias[:c]
    v_all = x @ w[c:2 * c].T + bias[c:2 * c]
    q_all = x @ w[2 * c:].T + bias[2 * c:] if o.readout == "asymmetric" else None
    # positional prior M (n, m)
    if o.positional == "none":
        prior = torch.ones(n, o.m, dtype=x.dtype)
    elif grid is not None and (o.positional == "2d" or math.isqrt(o.m) ** 2 == o.m):
        s = math.isqrt(o.m)
        prior = torch.empty(n, o.m, dtype=x.dtype)
        for r in range(grid[0]):
            for col in range(grid[1]):
                for p in range(s):
                    for q in range(s):
                        gap = (r / grid[0] - p / s) ** 2 + (col / grid[1] - q / s) ** 2
                        prior[r * grid[1] + col, p * s + q] = math.exp(-gap / o.tau**2)
    else:
        i = torch.arange(n, dtype=x.dtype)[:, None] / n
        j = torch.arange(o.m, dtype=x.dtype)[None, :] / o.m
        prior = torch.exp(-((i - j) ** 2) / o.tau**2)
    out = torch.empty(b, n, c, dtype=x.dtype)
    for head in range(h):
        sl = slice(head * d, (head + 1) * d)
        z = module.anchors[head] / module.anchors[head].norm(dim=-1, keepdim=True)
        kzz = torch.exp(alpha * (z @ z.T - 1))
        lam, vec = torch.linalg.eigh(kzz)
        inv_sqrt = vec @ torch.diag(1 / (lam.clamp(min=0).sqrt() + 1e-2)) @ vec.T

        def plan(feat, z=z, inv_sqrt=inv_sqrt, refs=module.references[head]):
            unit = feat / feat.norm(dim=-1, keepdim=True)
            psi = (inv_sqrt @ torch.exp(alpha * (z @ unit.T - 1))).T  # (n, k)
            gibbs = torch.exp(psi @ refs.T / o.eps) * prior  # (n, m)
            row = torch.ones(n, dtype=x.dtype)
            for _ in range(o.iters):  # scaling form of Sinkhorn: columns, then rows
                col = (1 / o.m) / (gibbs.T @ row)
                row = (1 / n) / (gibbs @ col)
            return row[:, None] * gibbs * col[None, :]

        for s in range(b):
            t = plan(u_all[s, :, sl])
            refs = o.m * t.T @ v_all[s, :, sl]
            if q_all is not None:
                t = plan(q_all[s, :, sl])
            out[s, :, sl] = n * t @ refs
    return out @ module.proj.weight.T + module.proj.bias


@pytest.mark.parametrize("options, n, grid", [
    ({}, 11, None),
    ({"positional": "none"}, 11, None),
    ({}, 12, (3, 4)),  # m = 9: 2-D prior on a 3 × 3 reference grid
    ({"m": 8}, 12, (3, 4)),  # m not square: auto falls back to 1-D
    ({"readout": "asymmetric"}, 10, None),
    ({"eps": 0.05, "tau": 0.3, "kernel_sigma": 0.4}, 7, None),
])
def test_matches_the_dense_reference_in_float64(options, n, grid):
    m = small_set(**options)
    x = torch.randn(2, n, 16, dtype=torch.float64)
    torch.testing.assert_close(m(x, grid), reference_set(m, x, grid), rtol=1e-5, atol=1e-5)


def test_plan_marginals_and_implied_attention_after_convergence():
    m = small_set(iters=300, eps=1.0)
    x = torch.randn(2, 15, 16, dtype=torch.float64)
    plan = m.transport_plan(x)  # (B, H, n, m)
    assert plan.shape == (2, 2, 15, 9) and (plan >= 0).all()
    torch.testing.assert_close(plan.sum(-1), torch.full((2, 2, 15), 1 / 15, dtype=torch.float64),
                               rtol=0, atol=1e-12)  # rows are exact by construction
    torch.testing.assert_close(plan.sum(-2), torch.full((2, 2, 9), 1 / 9, dtype=torch.float64),
                               rtol=0, atol=1e-8)  # columns converge
    attn = m.attention_matrix(x)
    assert attn.shape == (2, 2, 15, 15) and (attn >= 0).all()
    torch.testing.assert_close(attn.sum(-1), torch.ones(2, 2, 15, dtype=torch.float64), rtol=0, atol=1e-7)
    torch.testing.assert_close(attn.sum(-2), torch.ones(2, 2, 15, dtype=torch.float64), rtol=0, atol=1e-7)


def test_early_stop_reaches_the_tolerance_in_fewer_iterations():
    m = small_set(iters=1000, tol=1e-6, eps=1.0)
    x = torch.randn(1, 20, 16, dtype=torch.float64)
    col = m.transport_plan(x).sum(-2) * 9
    assert (col - 1).abs().max() < 1e-5


@pytest.mark.parametrize("backward", ["recompute", "unroll"])
@pytest.mark.parametrize("readout", ["roundtrip", "asymmetric"])
def test_gradcheck_in_float64(backward, readout):
    m = build_mechanism("set", 8, 2, m=4, anchors=3, iters=4, backward=backward, readout=readout).double()
    x = torch.randn(1, 5, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(m, (x,), eps=1e-6, atol=1e-6, fast_mode=True)
    params = {"anchors": m.anchors.detach().clone().requires_grad_(),
              "references": m.references.detach().clone().requires_grad_()}

    def through_parameters(anchors, references):
        new = {"anchors": anchors, "references": references}
        return torch.func.functional_call(m, new, (x.detach(),))

    assert torch.autograd.gradcheck(through_parameters, tuple(params.values()), eps=1e-6, atol=1e-6,
                                    fast_mode=True)


def test_recompute_and_unroll_give_the_same_gradients():
    torch.manual_seed(1)
    a = build_mechanism("set", 16, 2, iters=7, backward="recompute").double()
    b = build_mechanism("set", 16, 2, iters=7, backward="unroll").double()
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 30, 16, dtype=torch.float64)
    for mod in (a, b):
        mod(x).square().sum().backward()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-9, atol=1e-12, msg=name)


def padded(x: torch.Tensor, lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """x (B, N, C) with junk after each sequence's length, and the (B, N) mask of real tokens."""
    mask = torch.arange(x.shape[1])[None, :] < torch.tensor(lengths)[:, None]
    return torch.where(mask[..., None], x, 7 * torch.randn_like(x)), mask


@pytest.mark.parametrize("grad", [True, False], ids=["autograd", "no_grad"])
@pytest.mark.parametrize("options", [{}, {"readout": "asymmetric"}, {"backward": "unroll"},
                                     {"positional": "none"}])
def test_padded_sequences_match_the_reference_on_their_real_tokens(options, grad):
    """Native masking: rows 1/L, the 1-D prior over real positions, the read-out scaled by L."""
    m = small_set(**options)
    x, mask = padded(torch.randn(3, 13, 16, dtype=torch.float64), [13, 6, 10])
    with torch.set_grad_enabled(grad):
        y = m(x, mask=mask)
    for row, length in enumerate((13, 6, 10)):
        expected = reference_set(m, x[row:row + 1, :length])[0]
        torch.testing.assert_close(y[row, :length], expected, rtol=1e-5, atol=1e-5)
    assert (y[~mask] == 0).all()


@pytest.mark.parametrize("backward", ["recompute", "unroll"])
def test_gradcheck_with_padding(backward):
    m = build_mechanism("set", 8, 2, m=4, anchors=3, iters=4, backward=backward).double()
    x, mask = padded(torch.randn(2, 6, 8, dtype=torch.float64), [6, 4])
    x.requires_grad_()
    assert torch.autograd.gradcheck(lambda t: m(t, mask=mask), (x,), eps=1e-6, atol=1e-6, fast_mode=True)


def test_permuting_tokens_permutes_the_output_without_positional_prior():
    m = small_set(positional="none")
    x = torch.randn(2, 13, 16, dtype=torch.float64)
    perm = torch.randperm(13)
    torch.testing.assert_close(m(x[:, perm]), m(x)[:, perm])
    with_prior = small_set(positional="1d")
    assert not torch.allclose(with_prior(x[:, perm]), with_prior(x)[:, perm])


def test_two_d_prior_is_the_product_of_row_and_column_terms():
    log_m = positional_log_prior(6, 4, 0.3, (2, 3), torch.empty(0, dtype=torch.float64))
    rows = positional_log_prior(2, 2, 0.3, None, torch.empty(0, dtype=torch.float64))  # (H, s)
    cols = positional_log_prior(3, 2, 0.3, None, torch.empty(0, dtype=torch.float64))  # (W, s)
    expected = (rows[:, None, :, None] + cols[None, :, None, :]).reshape(6, 4)
    torch.testing.assert_close(log_m, expected)


@pytest.mark.parametrize("options, message", [
    ({"m": 0}, "set.m must be >= 1"),
    ({"eps": 0.0}, "set.eps must be > 0"),
    ({"iters": 0}, "set.iters must be >= 1"),
    ({"tau": -1.0}, "set.tau must be > 0"),
    ({"anchors": 0}, "set.anchors must be >= 1"),
    ({"kernel_sigma": 0.0}, "set.kernel_sigma must be > 0"),
    ({"positional": "3d"}, "valid choices: auto, none, 1d, 2d"),
    ({"positional": "2d", "m": 10}, "m must be a perfect square"),
])
def test_bad_options_are_clear_errors(options, message):
    with pytest.raises(OptionError, match=message):
        build_mechanism("set", 16, 2, **{k: str(v) for k, v in options.items()})


def test_two_d_prior_without_a_grid_is_a_clear_error():
    m = build_mechanism("set", 16, 2, positional="2d", m=16)
    with pytest.raises(ValueError, match="positional='2d' needs a 2-D grid"):
        m(torch.randn(1, 10, 16))


@pytest.mark.parametrize("n, scale", [(n, s) for n in (1, 2, 333) for s in (1e-3, 1.0, 1e3)] + [(65536, 1e3)])
def test_no_nan_or_inf_in_forward_or_backward(n, scale):
    torch.manual_seed(0)
    m = build_mechanism("set", 32, 4, eps=0.01)
    x = (torch.randn(1, n, 32) * scale).requires_grad_()
    for dtype in (None, torch.bfloat16, torch.float16):
        m.zero_grad()
        x.grad = None
        with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            y = m(x)
        # loss normalised by its own size, so the true gradients fit in float16 at any scale
        (y.float().square().mean() / y.detach().float().square().mean()).backward()
        assert torch.isfinite(y).all(), dtype
        assert torch.isfinite(x.grad).all(), dtype
        for name, p in m.named_parameters():
            assert torch.isfinite(p.grad).all(), (dtype, name)


def test_never_builds_an_n_by_n_tensor():
    class Largest(TorchDispatchMode):
        biggest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor):
                    self.biggest = max(self.biggest, t.numel())
            return out

    n = 2048
    m = build_mechanism("set", 32, 2, m=16, anchors=16)
    x = torch.randn(1, n, 32, requires_grad=True)
    with Largest() as probe:
        m(x).sum().backward()
    assert probe.biggest <= 2 * n * 32  # (B, N, 2C) projections; n² = 4M would be far above


def test_asymmetric_flop_formula_matches_the_counter():
    from torch.utils.flop_counter import FlopCounterMode

    m = build_mechanism("set", 32, 4, readout="asymmetric", m=16, anchors=8)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        m(torch.randn(2, 50, 32))
    assert m.flops(2, 50).matmul == counter.get_total_flops()


@pytest.mark.parametrize("backend", ["torch", "sklearn"])
def test_init_from_data_sets_kmeans_centroids_and_records_it(backend):
    m = build_mechanism("set", 16, 2, m=8, anchors=4)
    data = torch.randn(4, 64, 16)
    before = m.transport_plan(data)
    record = m.init_from_data(data, backend=backend)
    assert record["method"] == f"kmeans ({backend})" and record["tokens"] == 256
    torch.testing.assert_close(m.anchors.norm(dim=-1), torch.ones(2, 4))
    assert not torch.allclose(m.transport_plan(data), before)
    clone = build_mechanism("set", 16, 2, m=8, anchors=4)
    clone.load_state_dict(m.state_dict())
    assert clone.init_record == record


def test_kmeans_finds_well_separated_clusters():
    centres = torch.tensor([[5.0, 0.0], [-5.0, 0.0], [0.0, 5.0]])
    points = centres.repeat_interleave(50, 0) + 0.1 * torch.randn(150, 2)
    for backend in ("torch", "sklearn"):
        found = kmeans(points, 3, 20, backend, seed=0)
        dist = torch.cdist(found, centres).min(1).values
        assert (dist < 0.2).all(), backend


def test_init_from_data_needs_enough_tokens():
    m = build_mechanism("set", 16, 2, m=64)
    with pytest.raises(OptionError, match="need at least max\\(anchors, m\\)=64 tokens, got 10"):
        m.init_from_data(torch.randn(1, 10, 16))
