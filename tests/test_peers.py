"""Reference tests for the peer mechanisms: linear, performer, nystromformer, sinkformer, xformers.

Each approximation is compared, with shared weights in float64, against a plain dense reference
of the same math written out here (explicit matrices, loops over samples and heads), then
checked for the property that defines it.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from attnbench import OptionError, build_mechanism, get_mechanism
from mechanisms.nystromformer import iterative_pinv, segment_means
from mechanisms.xformers_mea import FIX, installed_build, release, xformers_problem

F64 = torch.float64
DIM, HEADS = 24, 3


def build(name: str, **options):
    return build_mechanism(name, DIM, HEADS, **options).to(F64)


def multihead_reference(m, x, attend):
    """The module's projections around ``attend(q, k, v, head) -> (N, d)``, looped over samples and heads."""
    b, n, c = x.shape
    d = c // m.num_heads
    q, k, v = (x @ m.qkv.weight.T + m.qkv.bias).split(c, dim=-1)
    out = torch.empty_like(x)
    for i in range(b):
        for h in range(m.num_heads):
            sl = slice(h * d, (h + 1) * d)
            out[i, :, sl] = attend(q[i, :, sl], k[i, :, sl], v[i, :, sl], h)
    return out @ m.proj.weight.T + m.proj.bias


def softmax_rows(scores):
    e = scores.exp()
    return e / e.sum(1, keepdim=True)


def random_qkv(n, d=16, heads=2, scale=1.0):
    """(1, heads, n, d) float64 queries, keys and values."""
    return tuple(scale * torch.randn(1, heads, n, d, dtype=F64) for _ in range(3))


def softmax_attention(q, k, v):
    return torch.softmax(q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5, dim=-1) @ v


# ---- linear ----------------------------------------------------------------------------------
def elu_plus_one(x):
    return torch.where(x > 0, x + 1, x.exp())


@pytest.mark.parametrize("eps", [0.0, 1e-6, 1e-2])
def test_linear_matches_the_reference(eps):
    m = build("linear", eps=eps)
    x = torch.randn(2, 9, DIM, dtype=F64)

    def attend(q, k, v, h):
        out = torch.empty_like(v)
        for i in range(len(q)):
            sims = torch.stack([elu_plus_one(q[i]) @ elu_plus_one(k[j]) for j in range(len(k))])  # (N,)
            out[i] = (sims[:, None] * v).sum(0) / (sims.sum() + eps)
        return out

    torch.testing.assert_close(m(x), multihead_reference(m, x, attend), rtol=1e-10, atol=1e-10)


def test_linear_weights_are_a_row_stochastic_matrix_that_the_output_applies():
    m = build("linear", eps=0.0)
    q, k, v = random_qkv(11, scale=2.0)
    w = m.weights(q, k)
    assert (w >= 0).all()
    torch.testing.assert_close(w.sum(-1), torch.ones(1, 2, 11, dtype=F64), rtol=0, atol=1e-12)
    torch.testing.assert_close(m.attend(q, k, v), w @ v, rtol=1e-10, atol=1e-10)


# ---- performer ---------------------------------------------------------------------------------
@pytest.mark.parametrize("eps", [0.0, 1e-6])
def test_performer_matches_the_reference(eps):
    m = build("performer", features=20, eps=eps)  # 20 = two full blocks of d = 8 and a cut one
    x = torch.randn(2, 9, DIM, dtype=F64)
    omega = m.projection  # (r, d)
    r = omega.shape[0]

    def attend(q, k, v, h):
        def exponent(x):  # ω·x − ‖x‖²/2 for x scaled by d^-1/4, one row per random feature
            x = x * x.shape[-1] ** -0.25
            return omega @ x - x @ x / 2

        e_q = torch.stack([exponent(t) for t in q])  # (N, r)
        e_k = torch.stack([exponent(t) for t in k])
        phi_q = ((e_q - e_q.max(1, keepdim=True).values).exp() + eps) / math.sqrt(r)
        phi_k = ((e_k - e_k.max()).exp() + eps) / math.sqrt(r)
        kernel = phi_q @ phi_k.T  # (N, N) estimated exp(q·k/√d), up to a per-row factor
        return kernel / kernel.sum(1, keepdim=True) @ v

    torch.testing.assert_close(m(x), multihead_reference(m, x, attend), rtol=1e-10, atol=1e-10)


def test_performer_approaches_softmax_attention_as_features_grow():
    torch.manual_seed(0)
    q, k, v = random_qkv(32, scale=0.5)
    exact = softmax_attention(q, k, v)
    errors = {}
    for r in (16, 4096):
        torch.manual_seed(1)
        m = build_mechanism("performer", 32, 2, features=r).to(F64)
        errors[r] = ((m.attend(q, k, v) - exact).norm() / exact.norm()).item()
    # Monte-Carlo error falls like 1/√r (16× here); a wrong feature map converges elsewhere
    # (e.g. without the d^-1/4 scaling the limit is 0.8 away).
    assert errors[4096] < 0.08, errors
    assert errors[4096] < errors[16] / 4, errors


def test_performer_features_are_orthogonal_blocks_with_chi_norms():
    m = build_mechanism("performer", 64, 4, features=4096)  # d = 16: 256 blocks of 16 rows
    omega = m.projection.double()
    for block in omega[:64].split(16):
        gram = block @ block.T
        off_diagonal = gram - torch.diag(torch.diagonal(gram))
        assert off_diagonal.abs().max() < 1e-5
    sq_norms = omega.square().sum(1)  # chi²(16): mean 16, standard deviation √32 per row
    assert abs(sq_norms.mean().item() - 16) < 5 * math.sqrt(32 / 4096)
    assert sq_norms.std().item() == pytest.approx(math.sqrt(32), rel=0.1)


def test_performer_projection_is_seeded_saved_and_redrawn_on_schedule():
    torch.manual_seed(5)
    a = build_mechanism("performer", 16, 2, features=8, redraw_every=2)
    torch.manual_seed(5)
    b = build_mechanism("performer", 16, 2, features=8, redraw_every=2)
    assert torch.equal(a.projection, b.projection)
    assert "projection" in a.state_dict()
    x = torch.randn(1, 5, 16)
    first = a.projection.clone()
    a(x)
    a(x)
    assert torch.equal(a.projection, first)  # two training passes with the first draw
    a(x)
    assert not torch.equal(a.projection, first)  # the third one redraws
    a.eval()
    second = a.projection.clone()
    for _ in range(4):
        a(x)
    assert torch.equal(a.projection, second)  # evaluation never redraws
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(b.eval()(x), a(x), rtol=0, atol=0)
    never = build_mechanism("performer", 16, 2, features=8, redraw_every=0)
    kept = never.projection.clone()
    for _ in range(4):
        never(x)
    assert torch.equal(never.projection, kept)
    never.redraw()
    assert not torch.equal(never.projection, kept)


# ---- nystromformer ---------------------------------------------------------------------------
def nystrom_reference(q, k, v, m, iters):
    """Landmark means, the three softmax kernels and the paper's pseudo-inverse iteration, explicitly."""
    n, d = q.shape
    q, k = q / d**0.25, k / d**0.25
    bounds = [math.ceil(s * n / m) for s in range(m + 1)]  # segment s: tokens bounds[s] .. bounds[s+1]-1
    q_l = torch.stack([q[bounds[s]:bounds[s + 1]].mean(0) for s in range(m)])
    k_l = torch.stack([k[bounds[s]:bounds[s + 1]].mean(0) for s in range(m)])
    f, a, b = softmax_rows(q @ k_l.T), softmax_rows(q_l @ k_l.T), softmax_rows(q_l @ k.T)
    eye = torch.eye(m, dtype=q.dtype)
    z = a.T / (a.abs().sum(0).max() * a.abs().sum(1).max())
    for _ in range(iters):
        az = a @ z
        z = 0.25 * z @ (13 * eye - az @ (15 * eye - az @ (7 * eye - az)))
    return f @ z @ b @ v


@pytest.mark.parametrize("n,landmarks,conv_kernel", [(12, 4, 0), (14, 4, 0), (17, 5, 3), (10, 16, 5)])
def test_nystromformer_matches_the_reference(n, landmarks, conv_kernel):
    m = build("nystromformer", landmarks=landmarks, conv_kernel=conv_kernel)
    x = torch.randn(2, n, DIM, dtype=F64)

    def attend(q, k, v, h):
        if n > landmarks:
            out = nystrom_reference(q, k, v, landmarks, 6)
        else:  # too few tokens for landmarks: exact softmax
            out = softmax_rows(q @ k.T / q.shape[1] ** 0.5) @ v
        for t in range(conv_kernel):  # depthwise conv over the tokens, zero padding
            shift = t - conv_kernel // 2
            for i in range(n):
                if 0 <= i + shift < n:
                    out[i] = out[i] + m.conv.weight[h, 0, t, 0] * v[i + shift]
        return out

    torch.testing.assert_close(m(x), multihead_reference(m, x, attend), rtol=1e-10, atol=1e-10)


def test_nystromformer_is_exact_when_every_token_is_a_landmark():
    torch.manual_seed(0)
    q, k, v = random_qkv(10)
    m = build_mechanism("nystromformer", 32, 2, landmarks=10, pinv_iters=40).to(F64)
    torch.testing.assert_close(m.nystrom(q, k, v), softmax_attention(q, k, v), rtol=1e-9, atol=1e-9)


def test_nystromformer_falls_back_to_softmax_below_the_landmark_count():
    ref = build_mechanism("softmax", DIM, HEADS)
    ny = build_mechanism("nystromformer", DIM, HEADS, landmarks=32)
    ny.load_state_dict(ref.state_dict())
    x = torch.randn(2, 20, DIM)
    torch.testing.assert_close(ny(x), ref(x), rtol=1e-6, atol=1e-6)


def test_nystromformer_pinv_converges_to_the_inverse():
    torch.manual_seed(0)
    q, k, _ = random_qkv(8)
    a = torch.softmax(q @ k.transpose(-2, -1) / 4, dim=-1)
    torch.testing.assert_close(iterative_pinv(a, 30), torch.linalg.inv(a), rtol=1e-8, atol=1e-8)


def test_nystromformer_segments_are_contiguous_non_empty_and_near_equal():
    n, m = 23, 7
    x = torch.arange(n, dtype=F64)[:, None]  # token i carries the value i
    means = segment_means(x, m)[:, 0]
    bounds = [math.ceil(s * n / m) for s in range(m + 1)]
    sizes = [bounds[s + 1] - bounds[s] for s in range(m)]
    assert set(sizes) == {n // m, n // m + 1}
    expected = [(bounds[s] + bounds[s + 1] - 1) / 2 for s in range(m)]
    torch.testing.assert_close(means, torch.tensor(expected, dtype=F64))


# ---- sinkformer ----------------------------------------------------------------------------------
def sinkhorn_reference(q, k, v, iters):
    """exp(QKᵀ/√d) scaled alternately by column and row sums, the last scaling over rows."""
    p = (q @ k.T / q.shape[1] ** 0.5).exp()
    steps = ["rows" if j % 2 == 0 else "columns" for j in range(iters)][::-1]
    for step in steps:
        p = p / (p.sum(1, keepdim=True) if step == "rows" else p.sum(0, keepdim=True))
    return p @ v


@pytest.mark.parametrize("iters", [1, 2, 3, 4, 7])
def test_sinkformer_matches_the_reference(iters):
    m = build("sinkformer", iters=iters)
    x = torch.randn(2, 9, DIM, dtype=F64)
    expected = multihead_reference(m, x, lambda q, k, v, h: sinkhorn_reference(q, k, v, iters))
    torch.testing.assert_close(m(x), expected, rtol=1e-10, atol=1e-10)


def test_sinkformer_with_one_iteration_is_softmax():
    ref = build_mechanism("softmax", DIM, HEADS).double()
    sink = build_mechanism("sinkformer", DIM, HEADS, iters=1).double()
    sink.load_state_dict(ref.state_dict())
    x = torch.randn(2, 13, DIM, dtype=F64)
    torch.testing.assert_close(sink(x), ref(x), rtol=1e-12, atol=1e-12)


def test_sinkformer_tends_to_a_doubly_stochastic_matrix():
    torch.manual_seed(0)
    q, k, _ = random_qkv(10)
    violation = []
    for iters in (1, 3, 5, 9, 21):
        w = build_mechanism("sinkformer", 32, 2, iters=iters).to(F64).weights(q, k)
        torch.testing.assert_close(w.sum(-1), torch.ones(1, 2, 10, dtype=F64), rtol=0, atol=1e-12)
        violation.append((w.sum(-2) - 1).abs().sum().item())
    assert all(violation[i + 1] < violation[i] for i in range(len(violation) - 1)), violation  # monotone
    w = build_mechanism("sinkformer", 32, 2, iters=101).to(F64).weights(q, k)
    assert (w >= 0).all()
    torch.testing.assert_close(w.sum(-2), torch.ones(1, 2, 10, dtype=F64), rtol=0, atol=1e-10)


# ---- all four: FLOP formulas and options beyond the conformance suite's defaults ----------------
@pytest.mark.parametrize("name,options,n", [
    ("linear", {"eps": 0.0}, 13),
    ("performer", {"features": 40}, 13),
    ("nystromformer", {"landmarks": 4}, 16),
    ("nystromformer", {"landmarks": 5, "pinv_iters": 2, "conv_kernel": 3}, 17),
    ("nystromformer", {"landmarks": 16, "conv_kernel": 5}, 12),
    ("sinkformer", {"iters": 4}, 13),
])
def test_flop_formula_matches_the_counter_beyond_the_defaults(name, options, n):
    m = build_mechanism(name, 32, 4, **options)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        m(torch.randn(2, n, 32))
    assert m.flops(2, n).matmul == counter.get_total_flops()


@pytest.mark.parametrize("name,options,message", [
    ("linear", {"eps": -1.0}, r"linear.eps=-1.0 must be a finite number in \[0, 0.01\]"),
    ("performer", {"features": 0}, r"performer.features=0 must be an int in \[1, 16384\]"),
    ("performer", {"features": 10**12}, r"performer.features=1000000000000 must be an int in \[1, 16384\]"),
    ("performer", {"redraw_every": -1}, r"redraw_every=-1 must be an int in \[0, 1000000000\]"),
    ("performer", {"eps": 1.0}, r"performer.eps=1.0 must be a finite number in \[0, 0.01\]"),
    ("nystromformer", {"landmarks": 0}, r"landmarks=0 must be an int in \[1, 4096\]"),
    ("nystromformer", {"pinv_iters": 0}, r"pinv_iters=0 must be an int in \[1, 1000\]"),
    ("nystromformer", {"conv_kernel": 4}, r"conv_kernel=4 must be 0 \(off\) or an odd int >= 1"),
    ("sinkformer", {"iters": 0}, r"sinkformer.iters=0 must be an int in \[1, 1000\]"),
])
def test_out_of_range_options_name_the_valid_range(name, options, message):
    with pytest.raises(OptionError, match=message):
        build_mechanism(name, DIM, HEADS, **options)


def test_options_from_the_command_line_are_converted():
    m = build_mechanism("performer", DIM, HEADS, features="32", redraw_every="0")
    assert m.projection.shape == (32, DIM // HEADS) and m.options.redraw_every == 0


# ---- xformers ----------------------------------------------------------------------------------
XFORMERS = get_mechanism("xformers")
XFORMERS_CUDA_REASON = XFORMERS.unavailable_reason("cuda")


@pytest.mark.skipif(XFORMERS_CUDA_REASON is not None, reason=f"xformers on cuda: {XFORMERS_CUDA_REASON}")
@pytest.mark.parametrize("dtype,tol", [(torch.float16, 5e-3), (torch.bfloat16, 3e-2)])
def test_xformers_equals_softmax_with_shared_weights_on_cuda(dtype, tol):
    ref = build_mechanism("softmax", 64, 4).cuda()
    fused = build_mechanism("xformers", 64, 4).cuda()
    fused.load_state_dict(ref.state_dict())
    x = torch.randn(3, 100, 64, device="cuda")
    expected = ref(x)  # float32 reference
    torch.testing.assert_close(fused.to(dtype)(x.to(dtype)).float(), expected, rtol=tol, atol=tol)
    torch.testing.assert_close(ref.to(dtype)(x.to(dtype)).float(), expected, rtol=tol, atol=tol)
    assert XFORMERS.backend("cuda", dtype).startswith("xformers ")


def test_xformers_refuses_the_cpu_instead_of_falling_back():
    assert "CUDA GPUs only" in XFORMERS.unavailable_reason("cpu")
    assert XFORMERS.backend("cpu").startswith("xformers: unavailable")
    m = build_mechanism("xformers", DIM, HEADS)
    with pytest.raises(RuntimeError, match="xformers: .*CUDA GPUs only"):
        m(torch.randn(2, 5, DIM))


def test_xformers_says_why_its_extension_cannot_load_and_what_fixes_it():
    xformers = pytest.importorskip("xformers")
    problem = xformers_problem()
    if xformers._has_cpp_library:
        assert problem is None
        return
    assert FIX in problem and "\n" not in problem
    assert problem in XFORMERS_CUDA_REASON
    build = installed_build()
    if build.torch and release(build.torch) != release(torch.__version__):  # the installed and required torch
        assert f"built for torch {build.torch}" in problem and f"torch {torch.__version__}" in problem
