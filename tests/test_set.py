"""SeT against a plain dense reference written from the specification, and its properties."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import mechanisms.set as set_module
from attnbench import OptionError, build_mechanism
from mechanisms.set import SeTOptions, kmeans, positional_log_prior, positional_prior

torch.backends.cudnn.deterministic = True

PRIORS = ["similarity-and-plan", "plan", "kernel"]
ORDERS = ["rows-then-columns", "columns-then-rows"]


def small_set(**options):
    defaults = dict(m=9, anchors=6, iters=30, eps=0.5)
    return build_mechanism("set", 16, 2, **{**defaults, **options}).double()


def two_d_prior(o, grid):
    square = math.isqrt(o.m) ** 2 == o.m
    return grid is not None and (o.positional == "2d" or (o.positional == "auto" and square))


def references_used(o, n, grid=None):
    """The specification's rule: at most n references (m_cap=tokens), a square grid on a 2-D prior."""
    if o.m_cap == "none" or n >= o.m:
        return o.m
    return min(math.isqrt(o.m), math.isqrt(n)) ** 2 if two_d_prior(o, grid) else n


def reference_set(module, x, grid=None):
    """The specification's forward pass, step by step, one head at a time: the plan built
    densely, Sinkhorn in the plain scaling form on exp(G) (no shift, no log domain)."""
    o = module.options
    b, n, c = x.shape
    h, d = module.num_heads, module.head_dim
    refs_used = references_used(o, n, grid)
    alpha = 1 / o.kernel_sigma**2
    w, bias = module.in_proj.weight, module.in_proj.bias
    u_all = x @ w[:c].T + bias[:c]
    v_all = x @ w[c:2 * c].T + bias[c:2 * c]
    q_all = x @ w[2 * c:].T + bias[2 * c:] if o.readout == "asymmetric" else None
    # squared position gaps (n, m) of the positional prior M = exp(−gap / τ²)
    if o.positional == "none":
        gap = torch.zeros(n, refs_used, dtype=x.dtype)
    elif two_d_prior(o, grid):
        s = math.isqrt(refs_used)
        gap = torch.empty(n, refs_used, dtype=x.dtype)
        for r in range(grid[0]):
            for col in range(grid[1]):
                for p in range(s):
                    for q in range(s):
                        gap[r * grid[1] + col, p * s + q] = ((r / grid[0] - p / s) ** 2
                                                             + (col / grid[1] - q / s) ** 2)
    else:
        i = torch.arange(n, dtype=x.dtype)[:, None] / n
        j = torch.arange(refs_used, dtype=x.dtype)[None, :] / refs_used
        gap = (i - j) ** 2
    log_prior = -gap / o.tau**2
    prior = torch.exp(log_prior)
    out = torch.empty(b, n, c, dtype=x.dtype)
    for head in range(h):
        sl = slice(head * d, (head + 1) * d)
        z = module.anchors[head] / module.anchors[head].norm(dim=-1, keepdim=True)
        kzz = torch.exp(alpha * (z @ z.T - 1))
        lam, vec = torch.linalg.eigh(kzz)
        inv_sqrt = vec @ torch.diag(1 / (lam.clamp(min=0).sqrt() + 1e-2)) @ vec.T

        def plan(feat, z=z, inv_sqrt=inv_sqrt, refs=module.references[head, :refs_used]):
            unit = feat / feat.norm(dim=-1, keepdim=True)
            psi = (inv_sqrt @ torch.exp(alpha * (z @ unit.T - 1))).T  # (n, k)
            if o.embedding_norm == "keep":  # OTKE's kernel layer: ‖x‖ κ(Zᵀx / ‖x‖)
                psi = feat.norm(dim=-1, keepdim=True) * psi
            scores = psi @ refs.T  # S (n, m)
            if o.prior == "similarity-and-plan":
                logits = prior * scores / o.eps  # M ⊙ S before the exponential
            elif o.prior == "kernel":
                logits = scores / o.eps + log_prior  # M inside the Gibbs kernel
            else:
                logits = scores / o.eps
            gibbs = torch.exp(logits)
            row, col = torch.ones(n, dtype=x.dtype), torch.ones(refs_used, dtype=x.dtype)
            for _ in range(o.iters):
                if o.order == "rows-then-columns":
                    row = (1 / n) / (gibbs @ col)
                    col = (1 / refs_used) / (gibbs.T @ row)
                else:
                    col = (1 / refs_used) / (gibbs.T @ row)
                    row = (1 / n) / (gibbs @ col)
            t = row[:, None] * gibbs * col[None, :]
            return t * prior if o.prior != "kernel" else t  # M ⊙ T after Sinkhorn

        for s in range(b):
            p = plan(u_all[s, :, sl])
            if o.renormalise:
                refs = (p.T @ v_all[s, :, sl]) / p.sum(0)[:, None]
            else:
                refs = refs_used * p.T @ v_all[s, :, sl]
            if q_all is not None:
                p = plan(q_all[s, :, sl])
            out[s, :, sl] = (p @ refs) / p.sum(1)[:, None] if o.renormalise else n * p @ refs
    return out @ module.proj.weight.T + module.proj.bias


ALL_COMBINATIONS = list(itertools.product(PRIORS, ORDERS, [False, True], ["none", "1d", "2d"],
                                          ["roundtrip", "asymmetric"]))


@pytest.mark.parametrize("prior, order, renormalise, positional, readout", ALL_COMBINATIONS,
                         ids=["-".join(map(str, c)) for c in ALL_COMBINATIONS])
def test_every_combination_matches_the_dense_reference_in_float64(prior, order, renormalise, positional,
                                                                  readout):
    m = small_set(prior=prior, order=order, renormalise=renormalise, positional=positional,
                  readout=readout, iters=10, tau=0.3)
    grid = (3, 4) if positional == "2d" else None
    x = torch.randn(2, 12, 16, dtype=torch.float64)
    torch.testing.assert_close(m(x, grid), reference_set(m, x, grid), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("options, n, grid", [
    ({}, 11, None),
    ({"positional": "none"}, 11, None),
    ({}, 12, (3, 4)),  # m = 9: 2-D prior on a 3 × 3 reference grid
    ({"m": 8}, 12, (3, 4)),  # m not square: auto falls back to 1-D
    ({"readout": "asymmetric"}, 10, None),
    ({"eps": 0.05, "tau": 0.3, "kernel_sigma": 0.4}, 7, None),
    ({"eps": 0.1, "tau": 0.1, "iters": 10, "m": 16}, 40, (5, 8)),  # OTKE's defaults, a real grid
])
def test_matches_the_dense_reference_in_float64(options, n, grid):
    m = small_set(**options)
    x = torch.randn(2, n, 16, dtype=torch.float64)
    torch.testing.assert_close(m(x, grid), reference_set(m, x, grid), rtol=1e-5, atol=1e-5)


KEEP_COMBINATIONS = list(itertools.product(PRIORS, [False, True], ["roundtrip", "asymmetric"]))


@pytest.mark.parametrize("prior, renormalise, readout", KEEP_COMBINATIONS,
                         ids=["-".join(map(str, c)) for c in KEEP_COMBINATIONS])
def test_the_kept_embedding_norm_matches_the_dense_reference_in_float64(prior, renormalise, readout):
    m = small_set(embedding_norm="keep", prior=prior, renormalise=renormalise, readout=readout, iters=10,
                  tau=0.3)
    x = torch.randn(2, 12, 16, dtype=torch.float64)
    torch.testing.assert_close(m(x), reference_set(m, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("options", [
    {}, {"embedding_norm": "keep"}, {"embedding_norm": "keep", "readout": "asymmetric"},
    {"embedding_norm": "keep", "order": "columns-then-rows", "renormalise": True}])
def test_gradients_match_the_dense_reference_in_float64(options):
    """Autograd through the dense reference and SeT's own backward give the same gradients of
    the input and of every parameter."""
    m = small_set(iters=10, tau=0.3, **options)
    x = torch.randn(2, 12, 16, dtype=torch.float64)
    weight = torch.randn(2, 12, 16, dtype=torch.float64)
    grads = []
    for run in (m, lambda t: reference_set(m, t)):
        m.zero_grad()
        xg = x.clone().requires_grad_()
        (run(xg) * weight).sum().backward()
        grads.append((xg.grad, {k: p.grad.clone() for k, p in m.named_parameters()}))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-6, atol=1e-9)
    for k in grads[0][1]:
        torch.testing.assert_close(grads[0][1][k], grads[1][1][k], rtol=1e-6, atol=1e-9, msg=k)


def test_the_kept_norm_scales_the_logits_with_the_features():
    """ψ is positively homogeneous with keep (‖cu‖ = c‖u‖) and scale-free with drop."""
    torch.manual_seed(0)
    u = torch.randn(1, 2, 7, 8, dtype=torch.float64)
    keep, drop = small_set(embedding_norm="keep"), small_set()
    drop.load_state_dict(keep.state_dict())
    torch.testing.assert_close(keep.embed(3 * u), 3 * keep.embed(u))
    torch.testing.assert_close(drop.embed(3 * u), drop.embed(u))
    torch.testing.assert_close(keep.embed(u), u.norm(dim=-1, keepdim=True) * drop.embed(u))


def test_the_defaults_follow_otke():
    o = SeTOptions()
    assert (o.prior, o.order, o.renormalise, o.iters, o.tau) == (
        "similarity-and-plan", "rows-then-columns", False, 10, 0.1)


@pytest.mark.parametrize("n, grid", [(37, None), (1024, None), (256, (16, 16)), (4096, (64, 64))])
def test_marginals_converge_within_1e_5_in_the_default_ten_iterations(n, grid):
    """OTKE's placement and order at the defaults (m 64, ε 0.5, τ 0.1, L 10), float32: columns
    exact by construction, rows within 1e-5; the kernel placement is still far off."""
    torch.manual_seed(0)
    m = build_mechanism("set", 32, 4, m_cap="tokens")
    x = torch.randn(2, n, 32)
    plan = m.transport_plan(x, grid, with_prior=False)  # Sinkhorn's T, before ⊙ M
    refs = min(n, 64)  # m_cap=tokens: at most n references
    assert plan.shape[-1] == refs
    assert ((plan.sum(-2) * refs - 1).abs().max()) < 1e-5
    assert ((plan.sum(-1) * n - 1).abs().max()) < 1e-5
    inside = build_mechanism("set", 32, 4, prior="kernel")
    inside.load_state_dict(m.state_dict())
    plan = inside.transport_plan(x, grid)
    assert ((plan.sum(-1) * n - 1).abs().max()) > 1e-3  # log M = −100: 10 iterations are not enough


def test_the_post_multiplied_prior_leaves_the_marginals_below_uniform_unless_renormalised():
    m = small_set(tau=0.3)
    x = torch.randn(2, 12, 16, dtype=torch.float64)
    plan = m.transport_plan(x)  # T ⊙ M: every mass at most the uniform one
    assert (plan.sum(-2) * 9 < 1 - 1e-3).all() and (plan.sum(-1) * 12 < 1).all()
    m = small_set(tau=0.3, renormalise=True)
    attn = m.attention_matrix(x)  # each output a convex combination of values
    assert (attn >= 0).all()
    torch.testing.assert_close(attn.sum(-1), torch.ones(2, 2, 12, dtype=torch.float64), rtol=0, atol=1e-12)


@pytest.mark.parametrize("order", ORDERS)
def test_plan_marginals_and_implied_attention_after_convergence(order):
    m = small_set(iters=300, eps=1.0, positional="none", order=order)
    x = torch.randn(2, 15, 16, dtype=torch.float64)
    plan = m.transport_plan(x)  # (B, H, n, m)
    assert plan.shape == (2, 2, 15, 9) and (plan >= 0).all()
    exact, converged = (-2, -1) if order == "rows-then-columns" else (-1, -2)
    size = {-1: 15, -2: 9}
    torch.testing.assert_close(plan.sum(exact), torch.full(plan.sum(exact).shape, 1 / size[exact],
                               dtype=torch.float64), rtol=0, atol=1e-12)  # exact by construction
    torch.testing.assert_close(plan.sum(converged), torch.full(plan.sum(converged).shape, 1 / size[converged],
                               dtype=torch.float64), rtol=0, atol=1e-8)  # converges
    attn = m.attention_matrix(x)
    assert attn.shape == (2, 2, 15, 15) and (attn >= 0).all()
    torch.testing.assert_close(attn.sum(-1), torch.ones(2, 2, 15, dtype=torch.float64), rtol=0, atol=1e-7)
    torch.testing.assert_close(attn.sum(-2), torch.ones(2, 2, 15, dtype=torch.float64), rtol=0, atol=1e-7)


@pytest.mark.parametrize("order", ORDERS)
def test_early_stop_reaches_the_tolerance_in_fewer_iterations(order, monkeypatch):
    steps = []
    loop = set_module._scaling_iterations

    def counting(*args, **kwargs):
        result = loop(*args, **kwargs)
        steps.append(len(result[0]))
        return result

    monkeypatch.setattr(set_module, "_scaling_iterations", counting)
    m = small_set(iters=1000, tol=1e-6, eps=1.0, order=order)
    x = torch.randn(1, 20, 16, dtype=torch.float64)
    plan = m.transport_plan(x, with_prior=False)
    assert (plan.sum(-1) * 20 - 1).abs().max() < 1e-5 and (plan.sum(-2) * 9 - 1).abs().max() < 1e-5
    assert steps and max(steps) < 1000
    steps.clear()
    x, mask = padded(torch.randn(2, 20, 16, dtype=torch.float64), [20, 12])  # padding: marginal 0
    y = m(x, mask=mask)
    assert steps and max(steps) < 1000
    for row, length in enumerate((20, 12)):
        expected = reference_set(m, x[row:row + 1, :length])[0]  # all 1000 iterations
        torch.testing.assert_close(y[row, :length], expected, rtol=1e-4, atol=1e-4)


# ---- the scaling domain against the log domain ---------------------------------------------


def force_log_domain(monkeypatch):
    """Make every plan fail its range check, so the log-domain fallback computes it."""
    calls = []
    fallback = set_module.log_sinkhorn_plan

    def spy(*args, **kwargs):
        calls.append(1)
        return fallback(*args, **kwargs)

    monkeypatch.setattr(set_module, "_in_range", lambda *args: torch.tensor(False))
    monkeypatch.setattr(set_module, "log_sinkhorn_plan", spy)
    return calls


@pytest.mark.parametrize("backward", ["recompute", "unroll"])
@pytest.mark.parametrize("prior, order", list(itertools.product(PRIORS, ORDERS)))
def test_scaling_and_log_domain_agree_in_outputs_and_gradients(prior, order, backward, monkeypatch):
    torch.manual_seed(3)
    m = small_set(prior=prior, order=order, backward=backward, iters=10, readout="asymmetric")
    x = torch.randn(2, 13, 16, dtype=torch.float64)
    results = []
    for log_domain in (False, True):
        if log_domain:
            calls = force_log_domain(monkeypatch)
        m.zero_grad()
        xg = x.clone().requires_grad_()
        y = m(xg)
        (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
        results.append((y.detach(), xg.grad, {k: p.grad.clone() for k, p in m.named_parameters()}))
    assert calls == [1, 1]  # both plans of the asymmetric read-out
    (y0, gx0, gp0), (y1, gx1, gp1) = results
    torch.testing.assert_close(y0, y1, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(gx0, gx1, rtol=1e-5, atol=1e-9)
    for k in gp0:
        torch.testing.assert_close(gp0[k], gp1[k], rtol=1e-5, atol=1e-9, msg=k)


@pytest.mark.parametrize("grad", [True, False], ids=["autograd", "no_grad"])
@pytest.mark.parametrize("order", ORDERS)
def test_the_fallback_takes_over_where_the_scalings_leave_the_float_range(order, grad, monkeypatch):
    """ε = 0.01 with large scores (logits spanning ~10⁴) in float32: the scalings span more than
    float32 holds, the plan comes from the log domain and matches the float64 log domain (also
    without autograd, where the fused passes have already folded u and M into the kernel)."""
    torch.manual_seed(0)
    m = build_mechanism("set", 16, 2, m=9, anchors=6, eps=0.01, tau=0.3, order=order)
    with torch.no_grad():
        m.references.mul_(50)  # scores of a trained model, not of the random initialisation
    x = torch.randn(2, 30, 16)
    exact = copy.deepcopy(m).double()
    with monkeypatch.context() as patch:
        calls = []
        fallback = set_module.log_sinkhorn_plan
        patch.setattr(set_module, "log_sinkhorn_plan", lambda *a, **k: calls.append(1) or fallback(*a, **k))
        with torch.set_grad_enabled(grad):
            y = m(x)
        assert calls and torch.isfinite(y).all()
    force_log_domain(monkeypatch)
    expected = exact(x.double())
    torch.testing.assert_close(y.double(), expected, rtol=0, atol=1e-4 * expected.abs().max().item())


def test_the_scaling_loop_reads_nothing_on_the_host(monkeypatch):
    """No .item(), bool(), float(), int() or .tolist() inside the Sinkhorn iterations or their
    backward, and exactly one host read (the range check) per forward pass."""
    reads = []

    def counted(name):
        original = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            if guard:
                raise AssertionError(f"Tensor.{name} inside the Sinkhorn loop")
            reads.append(name)
            return original(self, *args, **kwargs)
        return read

    guard = False
    for name in ("__bool__", "item", "__float__", "__int__", "__index__", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, counted(name))
    loop, backward = set_module._scaling_iterations, set_module._ScalingSinkhorn.backward

    def guarded(fn):
        def run(*args, **kwargs):
            nonlocal guard
            guard = True
            try:
                return fn(*args, **kwargs)
            finally:
                guard = False
        return run

    monkeypatch.setattr(set_module, "_scaling_iterations", guarded(loop))
    monkeypatch.setattr(set_module._ScalingSinkhorn, "backward", staticmethod(guarded(backward)))
    for options in ({}, {"order": "columns-then-rows", "readout": "asymmetric"}):
        m = build_mechanism("set", 32, 4, **options)
        x = torch.randn(2, 50, 32, requires_grad=True)
        reads.clear()
        y = m(x)
        assert reads == ["__bool__"]  # the one range check, all plans at once
        reads.clear()
        y.sum().backward()
        assert reads == []


# ---- gradients ---------------------------------------------------------------------------


def gradcheck_module(m, x, mask=None):
    assert torch.autograd.gradcheck(lambda t: m(t, mask=mask), (x,), eps=1e-6, atol=1e-6, fast_mode=True)
    params = {"anchors": m.anchors.detach().clone().requires_grad_(),
              "references": m.references.detach().clone().requires_grad_()}

    def through_parameters(anchors, references):
        new = {"anchors": anchors, "references": references}
        return torch.func.functional_call(m, new, (x.detach(),), {"mask": mask})

    assert torch.autograd.gradcheck(through_parameters, tuple(params.values()), eps=1e-6, atol=1e-6,
                                    fast_mode=True)


@pytest.mark.parametrize("options", [
    {}, {"backward": "unroll"}, {"readout": "asymmetric"}, {"readout": "asymmetric", "backward": "unroll"},
    {"order": "columns-then-rows"}, {"order": "columns-then-rows", "backward": "unroll"},
    {"prior": "plan", "renormalise": True}, {"prior": "kernel"},
    {"renormalise": True, "readout": "asymmetric"},
    {"embedding_norm": "keep"},
    {"embedding_norm": "keep", "readout": "asymmetric", "order": "columns-then-rows"},
])
def test_gradcheck_in_float64(options):
    m = build_mechanism("set", 8, 2, m=4, anchors=3, iters=4, **options).double()
    x = torch.randn(1, 5, 8, dtype=torch.float64, requires_grad=True)
    gradcheck_module(m, x)


@pytest.mark.parametrize("backward", ["recompute", "unroll"])
@pytest.mark.parametrize("order", ORDERS)
def test_gradcheck_in_the_log_domain(backward, order, monkeypatch):
    force_log_domain(monkeypatch)
    m = build_mechanism("set", 8, 2, m=4, anchors=3, iters=4, backward=backward, order=order).double()
    x, mask = padded(torch.randn(2, 6, 8, dtype=torch.float64), [6, 4])
    gradcheck_module(m, x.requires_grad_(), mask)


@pytest.mark.parametrize("order", ORDERS)
def test_recompute_and_unroll_give_the_same_gradients(order):
    torch.manual_seed(1)
    a = build_mechanism("set", 16, 2, iters=7, backward="recompute", order=order).double()
    b = build_mechanism("set", 16, 2, iters=7, backward="unroll", order=order).double()
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 30, 16, dtype=torch.float64)
    for mod in (a, b):
        mod(x).square().sum().backward()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-9, atol=1e-12, msg=name)


def anchor_gradient(anchors):
    torch.manual_seed(5)
    m = build_mechanism("set", 32, 4, m=16, anchors=8).to(anchors.dtype)
    with torch.no_grad():
        m.anchors.copy_(anchors)
    x = torch.randn(2, 64, 32, dtype=anchors.dtype)
    (m(x) * torch.randn(2, 64, 32, dtype=anchors.dtype)).sum().backward()
    return m.anchors.grad.norm()


def test_duplicated_anchors_keep_the_anchor_gradient_bounded():
    """Coinciding anchors make κ(Z, Z) singular (float32 eigh then returns eigenvalues at or
    below 0, clamped): the anchor gradient stays finite, at the limit of the exact gradients of
    anchors that nearly coincide (float64, exact there)."""
    torch.manual_seed(0)
    anchors = torch.randn(4, 8, 8)
    dup = anchors.clone()
    dup[:, 1] = dup[:, 0]  # two anchors coincide in every head
    dup[:, 3] = dup[:, 2]  # and two more
    near = dup.clone()
    near[:, [1, 3]] += 1e-3 * torch.randn(4, 2, 8)  # distinct, but only just
    grad, close = anchor_gradient(dup), anchor_gradient(near.double())
    assert torch.isfinite(grad) and grad < 1.5 * close and close < 1.5 * grad


def test_the_whitening_backward_is_exact_away_from_zero_and_bounded_at_zero():
    c = 1e-2
    vec = torch.linalg.qr(torch.randn(5, 5, dtype=torch.float64))[0]
    lam = torch.tensor([0.0, 0.0, 0.3, 1.0, 2.5], dtype=torch.float64)
    kernel = (vec * lam) @ vec.T
    grad = torch.randn(5, 5, dtype=torch.float64)
    kernel.requires_grad_()
    set_module._InverseSqrtPSD.apply(kernel, c).backward(grad)
    assert kernel.grad.abs().max() <= 1 / (2 * c**3) * grad.abs().sum()  # OTKE's bound
    spread = torch.tensor([0.1, 0.2, 0.3, 1.0, 2.5], dtype=torch.float64)  # every eigenvalue above c²
    well_posed = ((vec * spread) @ vec.T).requires_grad_()
    whiten = set_module._InverseSqrtPSD.apply
    assert torch.autograd.gradcheck(lambda k: whiten((k + k.T) / 2, c), (well_posed,))


# ---- padding -------------------------------------------------------------------------------


def padded(x: torch.Tensor, lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """x (B, N, C) with junk after each sequence's length, and the (B, N) mask of real tokens."""
    mask = torch.arange(x.shape[1])[None, :] < torch.tensor(lengths)[:, None]
    return torch.where(mask[..., None], x, 7 * torch.randn_like(x)), mask


PADDING_OPTIONS = [{}, {"readout": "asymmetric"}, {"backward": "unroll"}, {"positional": "none"},
                   {"order": "columns-then-rows"}, {"order": "columns-then-rows", "backward": "unroll"},
                   {"prior": "kernel"}, {"prior": "plan", "renormalise": True},
                   {"renormalise": True, "readout": "asymmetric"},
                   {"embedding_norm": "keep"}, {"embedding_norm": "keep", "readout": "asymmetric"},
                   {"embedding_norm": "keep", "order": "columns-then-rows", "renormalise": True}]


@pytest.mark.parametrize("log_domain", [False, True], ids=["scaling", "log-domain"])
@pytest.mark.parametrize("grad", [True, False], ids=["autograd", "no_grad"])
@pytest.mark.parametrize("options", PADDING_OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items())
                         or "defaults")
def test_padded_sequences_match_the_reference_on_their_real_tokens(options, grad, log_domain, monkeypatch):
    """Native masking: rows 1/L, the 1-D prior over real positions, the read-out scaled by L."""
    m = small_set(**options)
    x, mask = padded(torch.randn(3, 13, 16, dtype=torch.float64), [13, 6, 10])
    if log_domain:
        force_log_domain(monkeypatch)
    with torch.set_grad_enabled(grad):
        y = m(x, mask=mask)
    for row, length in enumerate((13, 6, 10)):
        expected = reference_set(m, x[row:row + 1, :length])[0]
        torch.testing.assert_close(y[row, :length], expected, rtol=1e-5, atol=1e-5)
    assert (y[~mask] == 0).all()


@pytest.mark.parametrize("options", PADDING_OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items())
                         or "defaults")
def test_padding_gets_no_gradient_and_real_gradients_match_unpadded_runs(options):
    m = small_set(**options)
    x, mask = padded(torch.randn(3, 13, 16, dtype=torch.float64), [13, 6, 10])
    weight = torch.randn_like(x)
    xp = x.clone().requires_grad_()
    (m(xp, mask=mask) * weight).sum().backward()
    assert (xp.grad[~mask] == 0).all()
    for row, length in enumerate((13, 6, 10)):
        alone = x[row:row + 1, :length].clone().requires_grad_()
        (m(alone) * weight[row:row + 1, :length]).sum().backward()
        torch.testing.assert_close(xp.grad[row, :length], alone.grad[0], rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("embedding_norm", ["drop", "keep"])
@pytest.mark.parametrize("backward", ["recompute", "unroll"])
@pytest.mark.parametrize("order", ORDERS)
def test_gradcheck_with_padding(backward, order, embedding_norm):
    m = build_mechanism("set", 8, 2, m=4, anchors=3, iters=4, backward=backward, order=order,
                        embedding_norm=embedding_norm).double()
    x, mask = padded(torch.randn(2, 6, 8, dtype=torch.float64), [6, 4])
    x.requires_grad_()
    assert torch.autograd.gradcheck(lambda t: m(t, mask=mask), (x,), eps=1e-6, atol=1e-6, fast_mode=True)


# ---- the number of references: at most n (m_cap) --------------------------------------------


@pytest.mark.parametrize("options, n, grid, used", [
    ({}, 7, None, 7), ({}, 16, None, 16), ({}, 40, None, 16), ({"m_cap": "none"}, 7, None, 16),
    ({}, 12, (3, 4), 9), ({}, 6, (2, 3), 4), ({}, 64, (8, 8), 16), ({"positional": "1d"}, 12, (3, 4), 12),
    ({"positional": "none"}, 12, (3, 4), 12), ({"m": 15}, 12, (3, 4), 12),
    ({"positional": "2d"}, 2, (1, 2), 1),
])
def test_a_plan_never_uses_more_references_than_tokens(options, n, grid, used):
    """min(m, n) references, the largest square grid of at most that on a 2-D prior; m_cap=none: m."""
    m = build_mechanism("set", 16, 2, **{"m": 16, "anchors": 4, "m_cap": "tokens", **options})
    assert m.references_used(n, grid) == used
    assert m.transport_plan(torch.randn(1, n, 16), grid).shape == (1, 2, n, used)
    assert m.references_used(n, grid) == references_used(m.options, n, grid)  # the test's own rule


CAP_OPTIONS = [{}, {"order": "columns-then-rows"}, {"readout": "asymmetric"}, {"prior": "kernel"},
               {"prior": "plan", "renormalise": True}, {"positional": "none"}, {"embedding_norm": "keep"},
               {"m_cap": "none"}]


@pytest.mark.parametrize("options", CAP_OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items())
                         or "defaults")
@pytest.mark.parametrize("n, grid", [(7, None), (12, (3, 4)), (6, (2, 3))])
def test_fewer_tokens_than_references_match_the_dense_reference_in_float64(options, n, grid):
    m = small_set(m=16, tau=0.3, iters=10, **{"m_cap": "tokens", **options})
    x = torch.randn(2, n, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(2, n, 16, dtype=torch.float64)
    y, expected = m(x, grid), reference_set(m, x, grid)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    got = torch.autograd.grad((y * weight).sum(), [x, m.references])
    want = torch.autograd.grad((expected * weight).sum(), [x, m.references])
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-9)
    if m.options.m_cap == "tokens":  # the references past those used get no gradient
        assert (got[1][:, references_used(m.options, n, grid):] == 0).all()


@pytest.mark.parametrize("log_domain", [False, True], ids=["scaling", "log-domain"])
@pytest.mark.parametrize("grad", [True, False], ids=["autograd", "no_grad"])
@pytest.mark.parametrize("options", CAP_OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items())
                         or "defaults")
def test_padded_sequences_shorter_than_m_use_their_own_count_of_references(options, grad, log_domain,
                                                                             monkeypatch):
    """With m = 16 and real lengths 13, 6 and 10, each sequence uses its own min(m, length)
    references, as it would alone: values and gradients at real tokens match it unpadded."""
    m = small_set(m=16, **{"m_cap": "tokens", **options})
    lengths = [13, 6, 10]
    x, mask = padded(torch.randn(3, 14, 16, dtype=torch.float64), lengths)
    if log_domain:
        force_log_domain(monkeypatch)
    with torch.set_grad_enabled(grad):
        y = m(x, mask=mask)
    for row, length in enumerate(lengths):
        torch.testing.assert_close(y[row, :length], reference_set(m, x[row:row + 1, :length])[0],
                                   rtol=1e-5, atol=1e-5)
    assert (y[~mask] == 0).all()
    if grad:
        weight = torch.randn_like(x)
        xp = x.clone().requires_grad_()
        (m(xp, mask=mask) * weight).sum().backward()
        assert (xp.grad[~mask] == 0).all()
        for row, length in enumerate(lengths):
            alone = x[row:row + 1, :length].clone().requires_grad_()
            (m(alone) * weight[row:row + 1, :length]).sum().backward()
            torch.testing.assert_close(xp.grad[row, :length], alone.grad[0], rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("order", ORDERS)
def test_gradcheck_with_padding_shorter_than_m(order):
    m = build_mechanism("set", 8, 2, m=6, anchors=3, iters=4, order=order, m_cap="tokens").double()
    x, mask = padded(torch.randn(2, 5, 8, dtype=torch.float64), [5, 3])
    x.requires_grad_()
    assert torch.autograd.gradcheck(lambda t: m(t, mask=mask), (x,), eps=1e-6, atol=1e-6, fast_mode=True)


# ---- the whitening and fold, kept between forwards without autograd ------------------------------


def count_eigh(monkeypatch):
    calls = []
    eigh = torch.linalg.eigh
    monkeypatch.setattr(torch.linalg, "eigh", lambda *a, **k: calls.append(1) or eigh(*a, **k))
    return calls


def fresh_output(m, x):
    """The output of a copy of ``m`` that has never kept anything."""
    clone = copy.deepcopy(m)
    clone._terms = None
    with torch.no_grad():
        return clone(x)


def test_forwards_without_autograd_reuse_the_whitening_until_the_parameters_change(monkeypatch):
    torch.manual_seed(0)
    m = small_set(readout="asymmetric")
    x = torch.randn(2, 12, 16, dtype=torch.float64)
    calls = count_eigh(monkeypatch)
    with torch.no_grad():
        first = m(x)
        again = m(x)
    with torch.inference_mode():
        inside = m(x)
    assert len(calls) == 1  # one eigendecomposition for three forwards (both plans share it)
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    torch.testing.assert_close(inside, first, rtol=0, atol=0)
    torch.testing.assert_close(first, reference_set(m, x), rtol=1e-5, atol=1e-5)
    calls.clear()  # (the reference's own)
    with torch.no_grad():
        m.anchors.add_(0.1)  # an in-place update: the version counter moves
        moved = m(x)
    assert len(calls) == 1
    torch.testing.assert_close(moved, fresh_output(m, x), rtol=0, atol=0)
    with torch.no_grad():
        m.references.mul_(2)
        torch.testing.assert_close(m(x), fresh_output(m, x), rtol=0, atol=0)
    other = small_set(readout="asymmetric")
    m.load_state_dict(other.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(m(x), fresh_output(other, x), rtol=0, atol=0)
    m.anchors = torch.nn.Parameter(torch.randn_like(m.anchors))  # a new parameter object
    with torch.no_grad():
        torch.testing.assert_close(m(x), fresh_output(m, x), rtol=0, atol=0)


@pytest.mark.parametrize("optimiser", [
    lambda p: torch.optim.AdamW(p, lr=0.1), lambda p: torch.optim.AdamW(p, lr=0.1, foreach=True),
    lambda p: torch.optim.AdamW(p, lr=0.1, fused=True),  # does not move the version counters
    lambda p: torch.optim.SGD(p, lr=0.1)], ids=["adamw", "adamw-foreach", "adamw-fused", "sgd"])
def test_evaluation_after_training_steps_sees_the_new_parameters(optimiser):
    """Evaluate, train, evaluate: the second evaluation is that of the trained parameters, with
    every optimiser (a fused one updates without moving the version counters: the training
    forward, with autograd, drops what was kept)."""
    torch.manual_seed(0)
    m = small_set()
    x = torch.randn(2, 12, 16, dtype=torch.float64)
    opt = optimiser(m.parameters())
    with torch.no_grad():
        before = m(x)
    for _ in range(2):
        opt.zero_grad()
        m(x).square().sum().backward()
        opt.step()
    with torch.no_grad():
        after = m(x)
    assert not torch.allclose(after, before)
    torch.testing.assert_close(after, fresh_output(m, x), rtol=0, atol=0)
    torch.testing.assert_close(after, reference_set(m, x), rtol=1e-5, atol=1e-5)


def test_what_is_kept_under_inference_mode_serves_later_forwards_and_copies(monkeypatch):
    m = small_set()
    x = torch.randn(1, 12, 16, dtype=torch.float64)
    calls = count_eigh(monkeypatch)
    with torch.inference_mode():
        first = m(x)
    with torch.no_grad():
        torch.testing.assert_close(m(x), first, rtol=0, atol=0)
    assert len(calls) == 1
    copied = copy.deepcopy(m)  # what is kept carries no autograd history (deepcopy refuses that)
    with torch.no_grad():
        torch.testing.assert_close(copied(x), first, rtol=0, atol=0)
    m(x.clone().requires_grad_()).sum().backward()  # and autograd still reaches the parameters
    assert m.anchors.grad.abs().sum() > 0


def test_forwards_with_autograd_or_under_a_dispatch_mode_keep_nothing(monkeypatch):
    from torch.utils.flop_counter import FlopCounterMode

    m = small_set()
    x = torch.randn(1, 12, 16, dtype=torch.float64)
    calls = count_eigh(monkeypatch)
    m(x)
    m(x)
    assert len(calls) == 2 and m._terms is None
    with torch.no_grad():
        m(x)
        with FlopCounterMode(display=False) as counter:
            m(x)
    assert len(calls) == 4  # the counter sees the whitening's products (flops() counts them)
    assert counter.get_total_flops() == m.flops(1, 12).matmul


# ---- the positional prior ------------------------------------------------------------------


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


def test_the_prior_is_built_once_per_size_grid_dtype_and_device():
    cpu = torch.device("cpu")
    first = positional_prior(40, 16, 0.1, (5, 8), torch.float32, cpu)
    assert positional_prior(40, 16, 0.1, (5, 8), torch.float32, cpu) is first
    assert positional_prior(41, 16, 0.1, None, torch.float32, cpu) is not first
    assert positional_prior(40, 16, 0.1, (8, 5), torch.float32, cpu) is not first
    assert positional_prior(40, 16, 0.1, (5, 8), torch.float64, cpu).dtype == torch.float64
    exact = positional_log_prior(40, 16, 0.1, (5, 8), torch.empty(0)).exp()
    floor = torch.finfo(torch.float32).tiny / torch.finfo(torch.float32).eps
    torch.testing.assert_close(first, torch.where(exact < floor, 0, exact), rtol=1e-6, atol=0)
    assert (first == 0).any() and first[first > 0].min() > torch.finfo(torch.float32).tiny  # no subnormals
    assert not first.requires_grad and not first.is_inference()
    m = build_mechanism("set", 32, 4, m=16)
    positional_prior.cache_clear()
    x = torch.randn(1, 40, 32)
    m(x, (5, 8))
    with torch.inference_mode():
        m(x, (5, 8))
    m(x, (5, 8)).sum().backward()  # a prior first built under inference mode still serves autograd
    info = positional_prior.cache_info()
    assert (info.misses, info.hits) == (1, 2)


# ---- options, stability, memory, FLOPs --------------------------------------------------------


@pytest.mark.parametrize("options, message", [
    ({"m": 0}, r"set.m=0 must be an int in \[1, 4096\]"),
    ({"eps": 0.0}, r"set.eps=0.0 must be a finite number in \[1e-06, 1000000\]"),
    ({"eps": "inf"}, r"set.eps=inf must be a finite number"),
    ({"iters": 0}, r"set.iters=0 must be an int in \[1, 10000\]"),
    ({"iters": 10**12}, r"set.iters=1000000000000 must be an int in \[1, 10000\]"),
    ({"tau": -1.0}, "set.tau=-1.0 must be a finite number in"),
    ({"anchors": 0}, "set.anchors=0 must be an int in"),
    ({"kernel_sigma": 0.0}, r"set.kernel_sigma=0.0 must be a finite number in \[0.001, 1000\]"),
    ({"kernel_sigma": 1e-300}, "set.kernel_sigma=1e-300 must be a finite number in"),
    ({"tol": "nan"}, "set.tol=nan must be a finite number in"),
    ({"positional": "3d"}, "valid choices: auto, none, 1d, 2d"),
    ({"positional": "2d", "m": 10}, "m must be a perfect square"),
    ({"prior": "logits"}, "valid choices: similarity-and-plan, plan, kernel"),
    ({"order": "rows"}, "valid choices: rows-then-columns, columns-then-rows"),
    ({"renormalise": "maybe"}, "set.renormalise='maybe' is not a valid bool"),
    ({"embedding_norm": "scale"}, "valid choices: drop, keep"),
    ({"m_cap": "half"}, "valid choices: tokens, none"),
])
def test_bad_options_are_clear_errors(options, message):
    with pytest.raises(OptionError, match=message):
        build_mechanism("set", 16, 2, **{k: str(v) for k, v in options.items()})


@pytest.mark.parametrize("options, message", [
    ({"prior": "logits"}, "set.prior must be one of similarity-and-plan, plan, kernel; got 'logits'"),
    ({"order": "rows"}, "set.order must be one of rows-then-columns, columns-then-rows; got 'rows'"),
    ({"renormalise": "yes"}, "set.renormalise must be true or false; got 'yes'"),
    ({"embedding_norm": "scale"}, "set.embedding_norm must be drop or keep; got 'scale'"),
    ({"m_cap": "half"}, "set.m_cap must be tokens or none; got 'half'"),
])
def test_bad_options_given_as_values_are_clear_errors(options, message):
    with pytest.raises(OptionError, match=message):
        SeTOptions(**options)


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


@pytest.mark.parametrize("options", [{}, {"order": "columns-then-rows"},
                                     {"prior": "kernel", "renormalise": True}])
@pytest.mark.parametrize("n", [1, 64, 4096])
def test_finite_at_the_default_eps_in_half_precision_autocast(options, n):
    torch.manual_seed(0)
    m = build_mechanism("set", 32, 4, **options)
    x = torch.randn(2, n, 32).requires_grad_()
    for dtype in (torch.bfloat16, torch.float16):
        with torch.autocast("cpu", dtype=dtype):
            y = m(x)
        y.float().square().mean().backward()
        assert torch.isfinite(y).all() and torch.isfinite(x.grad).all(), dtype


@pytest.mark.parametrize("options", [{}, {"readout": "asymmetric", "renormalise": True}])
def test_never_builds_an_n_by_n_tensor(options):
    class Largest(TorchDispatchMode):
        biggest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor):
                    self.biggest = max(self.biggest, t.numel())
            return out

    n = 2048
    m = build_mechanism("set", 32, 2, m=16, anchors=16, **options)
    x = torch.randn(1, n, 32, requires_grad=True)
    with Largest() as probe:
        m(x).sum().backward()
    proj = 3 if options.get("readout") == "asymmetric" else 2
    assert probe.biggest <= proj * n * 32  # (B, N, 2C or 3C) projections; n² = 4M would be far above


@pytest.mark.parametrize("options", [{"readout": "asymmetric"}, {"renormalise": True}, {"prior": "kernel"},
                                     {"positional": "none", "order": "columns-then-rows"}])
@pytest.mark.parametrize("log_domain", [False, True], ids=["scaling", "log-domain"])
def test_flop_formula_matches_the_counter(options, log_domain, monkeypatch):
    from torch.utils.flop_counter import FlopCounterMode

    if log_domain:
        force_log_domain(monkeypatch)
    m = build_mechanism("set", 32, 4, m=16, anchors=8, **options)
    for n, grid in ((50, None), (64, (8, 8)), (9, None), (12, (3, 4))):  # the last two use fewer refs
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            m(torch.randn(2, n, 32), grid)
        plans = 2 if options.get("readout") == "asymmetric" else 1
        # the fallback recomputes U (or Q), the embedding and the logits
        refs = m.references_used(n, grid)
        recomputed = plans * (2 * 2 * n * 32 * 32 + 2 * 2 * 4 * n * (8 * refs + 8 * 8)) if log_domain else 0
        assert m.flops(2, n, grid).matmul + recomputed == counter.get_total_flops()


class ElementPasses(TorchDispatchMode):
    """Counts, for every operation but matrix products and views, the elements it passes over
    (the largest of its inputs and outputs), in total and per operation."""

    SKIP = {"mm", "bmm", "addmm", "baddbmm", "_linalg_eigh", "view", "_unsafe_view", "transpose", "t",
            "expand", "slice", "unsqueeze", "squeeze", "as_strided", "permute", "alias", "select",
            "split", "split_with_sizes", "unbind", "detach", "_reshape_alias"}

    def __init__(self):
        super().__init__()
        self.total, self.by_op = 0, {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__.rstrip("_")
        if name not in self.SKIP:
            leaves = torch.utils._pytree.tree_leaves((args, kwargs, out))
            count = max([t.numel() for t in leaves if isinstance(t, torch.Tensor)] or [0])
            self.total += count
            self.by_op[name] = self.by_op.get(name, 0) + count
        return out


@pytest.mark.parametrize("options", [{}, {"prior": "kernel"}, {"prior": "plan", "renormalise": True},
                                     {"readout": "asymmetric"}, {"positional": "none"},
                                     {"order": "columns-then-rows"}, {"embedding_norm": "keep"}])
def test_the_elementwise_count_is_the_passes_the_forward_makes(options):
    """flops().elementwise is the element passes of the forward (to 10 %), and each plan costs
    one exponential pass over its (n, m) kernel, not 2L as a log-domain Sinkhorn does."""
    n, heads, k, m = 2048, 4, 32, 64
    mech = build_mechanism("set", 128, heads, m=m, anchors=k, **options)
    x = torch.randn(1, n, 128)
    with torch.no_grad():
        mech(x)
        with ElementPasses() as passes:
            mech(x)
    assert passes.total == pytest.approx(mech.flops(1, n).elementwise, rel=0.1)
    plans = 2 if options.get("readout") == "asymmetric" else 1
    assert passes.by_op["exp"] == plans * heads * n * (m + k) + heads * k * k  # kernel, embedding, κ(Z, Z)


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


# ---- the fused C Sinkhorn (set_sinkhorn.c) against the PyTorch loop -----------------------

WHY_NOT_FUSED = set_module.native_reason("cpu", torch.float32)
needs_fused = pytest.mark.skipif(WHY_NOT_FUSED is not None, reason=f"fused Sinkhorn: {WHY_NOT_FUSED}")


@needs_fused
@pytest.mark.parametrize("rows_first", [True, False], ids=["rows-first", "columns-first"])
@pytest.mark.parametrize("n, iters, per_row, per_column",
                         [(1, 1, False, False), (7, 10, False, False), (301, 3, True, False),
                          (4097, 10, True, False), (9, 10, True, True), (302, 3, False, True)])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_fused_iterations_are_the_pytorch_iterates(rows_first, n, iters, per_row, per_column, threads):
    torch.manual_seed(n)
    b, m = 3, 5
    kernel = torch.rand(b, n, m, dtype=torch.float64) + 0.01
    a: torch.Tensor | float = 1.0 / n
    col: torch.Tensor | float = 1.0 / m
    y0 = torch.ones(b, 1, m if rows_first else n, dtype=torch.float64)  # row vectors (b, 1, ·)
    if per_row:  # padding rows with marginal 0, as a mask gives
        real = torch.rand(b, 1, n) > 0.3
        real[..., 0] = True
        a = (real / real.sum(-1, keepdim=True)).double()
        if not rows_first:
            y0 = (a > 0).double()
    if per_column:  # each plan uses its first 2, 4 or 5 references, as m_cap gives under padding
        used = torch.arange(m)[None, None, :] < torch.tensor([2, 4, 5])[:, None, None]
        col = (used / used.sum(-1, keepdim=True)).double()
        if rows_first:
            y0 = (col > 0).double()
    alpha, beta = (a, col) if rows_first else (col, a)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        fused = set_module._native_iterations(kernel, rows_first, alpha, beta, y0, iters)
    finally:
        torch.set_num_threads(before)
    plain = set_module._scaling_iterations(kernel if rows_first else kernel.mT, alpha, beta, y0, iters, 0.0)
    for name, got, want in zip(("x", "y", "Ay", "Aᵀx"), fused, plain, strict=True):
        assert len(got) == len(want), name
        for t, (g, w) in enumerate(zip(got, want, strict=True)):
            torch.testing.assert_close(g, w, rtol=1e-12, atol=0, msg=f"{name}[{t}]")


@needs_fused
@pytest.mark.parametrize("options", [{}, {"order": "columns-then-rows"},
                                     {"prior": "plan", "renormalise": True},
                                     {"readout": "asymmetric"}, {"positional": "none"},
                                     {"embedding_norm": "keep"}])
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_fused_and_pytorch_sinkhorn_give_the_same_outputs_and_gradients(options, dtype, tol):
    torch.manual_seed(0)
    fused = build_mechanism("set", 32, 4, m=16, anchors=8, sinkhorn="fused", **options).to(dtype)
    plain = build_mechanism("set", 32, 4, m=16, anchors=8, sinkhorn="torch", **options).to(dtype)
    plain.load_state_dict(fused.state_dict())
    x = torch.randn(3, 203, 32, dtype=dtype)
    mask = torch.ones(3, 203, dtype=torch.bool)
    mask[1, 150:] = False
    for kwargs in ({}, {"mask": mask}):
        xf, xp = x.clone().requires_grad_(), x.clone().requires_grad_()
        yf, yp = fused(xf, **kwargs), plain(xp, **kwargs)
        torch.testing.assert_close(yf, yp, rtol=tol, atol=tol * yp.abs().max().item())
        yf.square().sum().backward()
        yp.square().sum().backward()
        torch.testing.assert_close(xf.grad, xp.grad, rtol=tol, atol=tol * xp.grad.abs().max().item())
        with torch.no_grad():
            without_grad = fused(x, **kwargs)
        torch.testing.assert_close(without_grad, yp.detach(), rtol=tol, atol=tol * yp.abs().max().item())


@needs_fused
@pytest.mark.parametrize("options", [{}, {"order": "columns-then-rows"}, {"readout": "asymmetric"}])
def test_fused_and_pytorch_sinkhorn_agree_where_sequences_use_fewer_references(options):
    """Padded sequences of 40, 23 and 9 tokens with m = 64: per-sequence column marginals in C."""
    torch.manual_seed(0)
    fused = build_mechanism("set", 32, 4, sinkhorn="fused", **options).double()
    plain = build_mechanism("set", 32, 4, sinkhorn="torch", **options).double()
    plain.load_state_dict(fused.state_dict())
    x, mask = padded(torch.randn(3, 40, 32, dtype=torch.float64), [40, 23, 9])
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            torch.testing.assert_close(fused(x, mask=mask), plain(x, mask=mask), rtol=1e-12, atol=1e-12)


def test_fused_sinkhorn_that_cannot_run_is_a_clear_error_and_auto_falls_back(monkeypatch):
    monkeypatch.setattr(set_module, "native_reason", lambda device, dtype: "no C compiler found (set CC)")
    x = torch.randn(1, 20, 32)
    with pytest.raises(ValueError, match="sinkhorn='fused' cannot run here: no C compiler.*'torch'"):
        build_mechanism("set", 32, 4, sinkhorn="fused")(x)
    auto, plain = build_mechanism("set", 32, 4), build_mechanism("set", 32, 4, sinkhorn="torch")
    plain.load_state_dict(auto.state_dict())
    torch.testing.assert_close(auto(x), plain(x))
    assert "not fused: no C compiler" in set_module.SeTAttention.backend("cpu")


@needs_fused
def test_the_fused_path_is_taken_by_default_on_the_cpu(monkeypatch):
    calls = []
    real = set_module._native_iterations
    monkeypatch.setattr(set_module, "_native_iterations", lambda *a: calls.append(1) or real(*a))
    m = build_mechanism("set", 32, 4)
    with torch.no_grad():
        m(torch.randn(1, 20, 32))
    m(torch.randn(1, 20, 32)).sum().backward()
    assert len(calls) == 2
    assert "fused C passes" in set_module.SeTAttention.backend("cpu")


def test_torch_compile_traces_the_pytorch_loop_and_matches_eager(monkeypatch):
    """While torch.compile traces, the C kernel is left out (a graph takes PyTorch operations only):
    the compiled call never reaches it, not even eagerly at a graph break."""
    torch.manual_seed(0)
    m = build_mechanism("set", 32, 4, m=16, anchors=8)
    x = torch.randn(1, 40, 32)
    with torch.no_grad():
        expected = m(x)
        monkeypatch.setattr(set_module, "_native_iterations",
                            lambda *a: pytest.fail("the C kernel ran inside torch.compile"))
        torch.testing.assert_close(torch.compile(m)(x), expected)


def test_fused_stands_aside_while_tracing_and_needs_tol_0():
    """Under a FLOP counter (a dispatch mode) even sinkhorn='fused' runs PyTorch's loop, which the
    counter sees; an early stop cannot be fused."""
    from torch.utils.flop_counter import FlopCounterMode

    m = build_mechanism("set", 32, 4, m=16, anchors=8, sinkhorn="fused")
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        m(torch.randn(2, 50, 32))
    assert counter.get_total_flops() == m.flops(2, 50).matmul
    with pytest.raises(OptionError, match="set.sinkhorn=fused runs every iteration.*tol=0"):
        build_mechanism("set", 32, 4, sinkhorn="fused", tol=1e-3)
    with pytest.raises(OptionError, match="set.sinkhorn=fused needs backward=recompute"):
        build_mechanism("set", 32, 4, sinkhorn="fused", backward="unroll")
