"""Causal attention: no mechanism lets the future in, and each causal form is the math it claims.

The leak test runs on every registered mechanism with a causal form, built-in or plug-in, so a
new one is covered the moment it is registered; the planted leaks in ``faulty_mechanisms.py``
show that it fails where it should. Mechanisms without a causal form must refuse with their reason.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from attnbench import Flops, Mechanism, OptionError, build_mechanism, get_mechanism, registry
from attnbench.mechanism import count_flops, merge_heads
from mechanisms.sdpa import causal_block_pairs, cpu_flash_blocks
from tests.conftest import mechanism_params

FAULTY = str(Path(__file__).with_name("faulty_mechanisms.py"))  # loaded with --load, never imported
DIM, HEADS, N = 32, 4, 20
F64 = torch.float64
CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU: torch sees none on this machine")


def build(name: str, dtype: torch.dtype = F64, **options) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_mechanism(name, DIM, HEADS, **options).to(dtype).eval()


def exact_dtype(name: str) -> tuple[torch.dtype, float]:
    """float64 and 1e-10 where the mechanism runs it, else float32 and 1e-5."""
    return (F64, 1e-10) if F64 in get_mechanism(name).dtypes else (torch.float32, 1e-5)


def padding_mask(n: int = N) -> torch.Tensor:
    """(4, n): right padding of lengths 5 and 12, an unpadded row, and one with holes."""
    mask = torch.zeros(4, n, dtype=torch.bool)
    for row, length in enumerate((5, 12, n)):
        mask[row, :length] = True
    mask[3, [0, 2, 3, 7, 8, 11, 13, n - 1]] = True
    return mask


def find_leak(m: torch.nn.Module, dtype: torch.dtype, tol: float,
              mask: torch.Tensor | None = None) -> str | None:
    """Where ``m``'s causal form lets a later token reach an earlier output, in words; None when
    changing the tokens after t leaves every output at positions <= t within ``tol`` and the
    gradient of those outputs with respect to the later tokens is exactly zero."""
    device = next(m.parameters()).device
    batch = 2 if mask is None else len(mask)
    mask = None if mask is None else mask.to(device)
    x = torch.randn(batch, N, DIM, dtype=dtype, device=device)
    for t in (0, 6, N - 2):
        later = x.clone()
        later[:, t + 1:] = 3 * torch.randn_like(later[:, t + 1:])
        y, y_later = m(x, mask=mask, causal=True), m(later, mask=mask, causal=True)
        moved = (y[:, :t + 1] - y_later[:, :t + 1]).abs().max().item()
        if not moved <= tol:
            return f"changing the tokens after position {t} moved the outputs at <= {t} by {moved:.3g}"
        x_grad = x.clone().requires_grad_()
        early = m(x_grad, mask=mask, causal=True)[:, :t + 1]
        (early * torch.randn_like(early)).sum().backward()
        reach = x_grad.grad[:, t + 1:].abs().max().item()
        if reach != 0:
            return f"the outputs at <= {t} have a gradient of up to {reach:.3g} w.r.t. the tokens after it"
    return None


def causal_only(name: str) -> None:
    problem = get_mechanism(name).causal_problem()
    if problem is not None:
        pytest.skip(f"{name} has no causal form ({problem})")


# ---- every causal form: no leak, the padding contract ----------------------------------------

@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "padded"])
@pytest.mark.parametrize("name", mechanism_params())
def test_no_later_token_reaches_an_earlier_output(name, padded):
    causal_only(name)
    dtype, tol = exact_dtype(name)
    m = build(name, dtype)
    assert find_leak(m, dtype, tol, padding_mask() if padded else None) is None


@pytest.mark.parametrize("name", mechanism_params())
def test_causal_with_padding_runs_each_sequence_alone(name):
    """With a mask, the causal output at real tokens is the causal form on those tokens alone."""
    causal_only(name)
    dtype, tol = exact_dtype(name)
    m = build(name, dtype)
    mask = padding_mask()
    x = torch.randn(len(mask), N, DIM, dtype=dtype)
    y = m(x, mask=mask, causal=True)
    assert (y[~mask] == 0).all()
    for row in range(len(x)):
        alone = m(x[row, mask[row]][None], causal=True)[0]
        torch.testing.assert_close(y[row, mask[row]], alone, rtol=tol, atol=tol)


@pytest.mark.parametrize("name", mechanism_params())
def test_causal_flops_match_the_flop_counter(name):
    causal_only(name)
    if not get_mechanism(name).flops_countable:
        pytest.skip(f"{name} runs custom kernels that FlopCounterMode cannot see")
    m = build(name, torch.float32)
    for n in (12, 70):  # one chunk, and several with a remainder (linear, performer: 64 per chunk)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            m(torch.randn(2, n, DIM), causal=True)
        assert count_flops(m, 2, n, causal=True).matmul == counter.get_total_flops(), n


@pytest.mark.parametrize("name", mechanism_params())
def test_mechanisms_without_a_causal_form_refuse_with_their_reason(name):
    problem = get_mechanism(name).causal_problem()
    if problem is None:
        pytest.skip(f"{name} has a causal form")
    assert problem.strip() and "\n" not in problem
    m = build(name, torch.float32)
    x = torch.randn(2, N, DIM)
    for mask in (None, padding_mask()[:2]):
        with pytest.raises(OptionError, match=re.escape(f"{name}: causal=True is not supported: {problem}")):
            m(x, mask=mask, causal=True)
    with pytest.raises(OptionError, match=re.escape(problem)):
        count_flops(m, 2, N, causal=True)


def test_the_builtin_refusals_are_the_mechanisms_without_a_sound_causal_form():
    refusing = {n for n in ("nystromformer", "sinkformer", "set") if get_mechanism(n).causal_problem()}
    assert refusing == {"nystromformer", "sinkformer", "set"}
    causal = ("softmax", "sdpa", "xformers", "linear", "performer", "nat", "swin")
    assert all(get_mechanism(n).causal_problem() is None for n in causal)


def test_causal_is_for_sequences():
    m = build("softmax")
    with pytest.raises(ValueError, match="causal attention is defined on 1-D sequences"):
        m(torch.randn(2, 20, DIM, dtype=F64), (4, 5), causal=True)


# ---- the leak test fails where it should ----------------------------------------------------

@pytest.fixture
def faulty():
    registry.load_module(FAULTY)
    yield FAULTY
    registry.MECHANISMS.unregister_module("faulty_mechanisms")


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "padded"])
def test_the_leak_test_catches_a_planted_leak(faulty, padded):
    mask = padding_mask() if padded else None
    leak = find_leak(build("faulty_leak"), F64, 1e-10, mask)
    assert leak is not None and "moved the outputs at <= 0" in leak
    # values untouched, only the gradient reaches the next token: the gradient check sees it
    leak = find_leak(build("faulty_gradient_leak"), F64, 1e-10, mask)
    assert leak is not None and "gradient" in leak and "<= 0" in leak


def test_the_planted_leaks_are_otherwise_sound_causal_means(faulty):
    """What the planted mechanisms leak is the one next token; without it they pass."""
    m = build("faulty_gradient_leak")
    x = torch.randn(2, N, DIM, dtype=F64)
    expected = m.proj(x.cumsum(1) / torch.arange(1, N + 1, dtype=F64)[:, None])
    torch.testing.assert_close(m(x, causal=True), expected)


# ---- which declaration decides ----------------------------------------------------------------

def test_the_nearer_declaration_decides_causal_support():
    softmax = get_mechanism("softmax")

    class Refuses(softmax):
        no_causal_reason = "a reason of its own"

    class CausalAgain(Refuses):
        def mix_causal(self, x):
            return x

    class Plain(Mechanism):
        pass

    assert softmax.causal_problem() is None
    assert Refuses.causal_problem() == "a reason of its own"
    assert CausalAgain.causal_problem() is None
    assert Plain.causal_problem() == Mechanism.no_causal_reason


def test_a_plugin_flops_without_causal_still_counts_the_plain_forward():
    """A plug-in written before causal: its flops(batch, n, grid) serves non-causal runs; its
    causal count is undeclared (None), not its non-causal one passed off."""

    class Old(Mechanism):
        name = "old_plugin"
        complexity = "linear"

        def mix_causal(self, x):
            return x

        def flops(self, batch, n, grid=None):
            return Flops(matmul=2 * batch * n)

    m = Old(8, 2)
    assert count_flops(m, 3, 5) == Flops(matmul=30)
    assert count_flops(m, 3, 5, causal=True) is None


# ---- each causal form against a dense reference of its math -----------------------------------

PREFIX_FORMS = [("softmax", {}), ("sdpa", {}), ("linear", {}), ("linear", {"chunk": 1}),
                ("linear", {"chunk": 3}), ("linear", {"chunk": 7, "eps": 0.0}), ("performer", {}),
                ("performer", {"chunk": 1}), ("performer", {"chunk": 3}), ("performer", {"chunk": 8})]


def grads(fn, x: torch.Tensor, module: torch.nn.Module, weight: torch.Tensor) -> list[torch.Tensor]:
    """Gradients of (fn(x) * weight).sum() w.r.t. x and every parameter."""
    x = x.clone().requires_grad_()
    module.zero_grad(set_to_none=True)
    (fn(x) * weight).sum().backward()
    return [x.grad, *(p.grad for p in module.parameters())]


@pytest.mark.parametrize("name, options", PREFIX_FORMS, ids=[f"{n}{o}" for n, o in PREFIX_FORMS])
def test_causal_form_attends_each_prefix_as_the_plain_form_does(name, options):
    """softmax, sdpa, linear, performer: the output at t is the non-causal attention of query t
    over keys 0..t (for performer, its key stabiliser over those keys too): values and gradients."""
    m = build(name, **options)
    x = torch.randn(2, 13, DIM, dtype=F64)
    x[:, 9] *= 8  # a large key late in the sequence: its stabiliser must not reach earlier outputs

    def reference(x: torch.Tensor) -> torch.Tensor:
        q, k, v = m.qkv_heads(x)
        rows = [m.attend(q[:, :, t:t + 1], k[:, :, :t + 1], v[:, :, :t + 1]) for t in range(x.shape[1])]
        return m.proj(merge_heads(torch.cat(rows, dim=2)))

    torch.testing.assert_close(m(x, causal=True), reference(x), rtol=1e-10, atol=1e-10)
    weight = torch.randn(2, 13, DIM, dtype=F64)
    for got, want in zip(grads(lambda x: m(x, causal=True), x, m, weight), grads(reference, x, m, weight),
                         strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("chunk", [1, 4, 64])
def test_linear_causal_equals_its_dense_masked_weights(chunk):
    m = build("linear", chunk=chunk)
    q, k, v = (torch.randn(2, HEADS, 11, DIM // HEADS, dtype=F64) for _ in range(3))
    dense = m.weights(q, k, causal=True) @ v  # the (N, N) matrix, the future zeroed
    torch.testing.assert_close(m.attend_causal(q, k, v), dense, rtol=1e-10, atol=1e-10)


def test_performer_causal_output_at_t_is_the_plain_performer_on_the_prefix():
    """The module-level statement of the same: nothing of the future, not even its stabiliser."""
    m = build("performer", chunk=4)
    x = torch.randn(1, 10, DIM, dtype=F64)
    x[:, -1] *= 20
    y = m(x, causal=True)
    for t in range(10):
        torch.testing.assert_close(y[:, t], m(x[:, :t + 1])[:, t], rtol=1e-10, atol=1e-10)


class LargestTensor(TorchDispatchMode):
    """Records the most elements any op's output holds (the peak intermediate, in elements)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("name, options", [("linear", {"chunk": 16}),
                                           ("performer", {"chunk": 16, "features": 16})])
def test_chunked_causal_forms_never_hold_an_n_by_n_tensor(name, options):
    """Forward and backward at N = 1024: no tensor comes near one head's N × N scores."""
    m = build_mechanism(name, DIM, HEADS, **options)
    x = torch.randn(1, 1024, DIM, requires_grad=True)
    with LargestTensor() as seen:
        m(x, causal=True).sum().backward()
    assert seen.largest <= 1024 * 1024 // 8, seen.largest


def test_chunk_sizes_are_validated():
    for name in ("linear", "performer"):
        with pytest.raises(OptionError, match=rf"{name}.chunk=0 must be an int in \[1, 4096\]"):
            build_mechanism(name, DIM, HEADS, chunk=0)


def masked_softmax(q, k, v, allowed, bias=None):
    """softmax(q kᵀ/√d + bias) v on (B, H, N, d) with key j allowed for query i where allowed[i, j]."""
    scores = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5
    if bias is not None:
        scores = scores + bias
    return torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1) @ v


@pytest.mark.parametrize("n, kernel, dilation", [(20, 5, 1), (20, 3, 3), (20, 7, 2), (6, 7, 1), (9, 3, 4)])
def test_nat_causal_equals_dense_masked_neighbourhoods(n, kernel, dilation):
    """Query i sees the keys i, i - δ, …, i - (k - 1)·δ (δ, k as clamped to n), in natten (no
    autograd) and in the masked path (autograd on the CPU), values and gradients."""
    m = build("nat", kernel=kernel, dilation=dilation)
    _, (k_eff,), (d_eff,) = m.layout(None, n)
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    allowed = (i >= j) & ((i - j) % d_eff == 0) & ((i - j) < d_eff * k_eff)

    def reference(x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        q, k, v = m.qkv(x).view(b, n, 3, HEADS, DIM // HEADS).permute(2, 0, 3, 1, 4)
        return m.proj(merge_heads(masked_softmax(q, k, v, allowed)))

    x = torch.randn(2, n, DIM, dtype=F64)
    with torch.no_grad():  # natten's own causal kernel (float32 inside)
        torch.testing.assert_close(m(x, causal=True), reference(x), rtol=1e-5, atol=1e-5)
    weight = torch.randn_like(x)
    for got, want in zip(grads(lambda x: m(x, causal=True), x, m, weight), grads(reference, x, m, weight),
                         strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)
    assert m.flops(1, n, causal=True).matmul == 8 * n * DIM**2 + 4 * int(allowed.sum()) * DIM


@pytest.mark.parametrize("n, window, shift", [(12, 4, False), (13, 4, False), (13, 4, True), (16, 5, True),
                                              (3, 7, True)])
def test_swin_causal_equals_causal_windows_of_the_sequence(n, window, shift):
    """Sequence windows start at s + m·w (s = ⌊w/2⌋ when shifted and n > w, else 0; the first
    one shorter): each token sees itself and its window's earlier tokens, biased by i − j."""
    m = build("swin", window=window, shift=shift)
    s = window // 2 if shift and n > window else 0
    pos = torch.arange(n)
    segment = torch.div(pos - s, window, rounding_mode="floor")  # -1 for the first part when shifted
    allowed = (segment[:, None] == segment[None, :]) & (pos[:, None] >= pos[None, :])
    span = 2 * window - 1
    rel = (pos[:, None] - pos[None, :] + window - 1).clamp(0, span - 1)  # column offset, same row
    bias = m.bias_table[(window - 1) * span + rel].permute(2, 0, 1)  # (H, N, N)

    def reference(x: torch.Tensor) -> torch.Tensor:
        q, k, v = _heads(m, x)
        return m.proj(merge_heads(masked_softmax(q, k, v, allowed, bias)))

    x = torch.randn(2, n, DIM, dtype=F64)
    torch.testing.assert_close(m(x, causal=True), reference(x), rtol=1e-10, atol=1e-10)
    weight = torch.randn_like(x)
    for got, want in zip(grads(lambda x: m(x, causal=True), x, m, weight), grads(reference, x, m, weight),
                         strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


def _heads(m: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v of (B, H, N, d) from a mechanism's fused qkv projection."""
    b, n, _ = x.shape
    return m.qkv(x).view(b, n, 3, HEADS, DIM // HEADS).permute(2, 0, 3, 1, 4).unbind(0)


# ---- FLOPs as performed -----------------------------------------------------------------------

def test_causal_block_pairs_counts_the_blocks_a_kernel_visits():
    for n_q, n_k, bq, bk in [(13, 13, 1, 1), (13, 13, 4, 4), (100, 100, 32, 512), (70, 90, 8, 16),
                             (90, 70, 16, 8)]:
        visited = 0
        for i in range(n_q):
            block_end = min(n_q, (i // bq + 1) * bq)  # the last query of i's block
            visited += min(n_k, -(-block_end // bk) * bk)
        assert causal_block_pairs(n_q, n_k, bq, bk) == visited
    assert causal_block_pairs(13, 13) == 13 * 14 // 2
    assert causal_block_pairs(300, 300, *cpu_flash_blocks(300)) == 300 * 300  # one key block: no skip


def test_sdpa_counts_the_half_its_kernel_skips_and_the_whole_where_it_does_not():
    m = build("sdpa", torch.float32)
    n = 1100  # CPU flash: query blocks of 256, key blocks of 512: some blocks skipped
    pairs = causal_block_pairs(n, n, 256, 512)
    assert n * (n + 1) // 2 < pairs < n * n
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        m(torch.randn(1, n, DIM), causal=True)
    assert m.flops(1, n, causal=True).matmul == 8 * n * DIM**2 + 4 * pairs * DIM == counter.get_total_flops()
    with sdpa_kernel([SDPBackend.MATH]):  # the math path computes every score and masks
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            m(torch.randn(1, n, DIM), causal=True)
        full = 8 * n * DIM**2 + 4 * n * n * DIM
        assert m.flops(1, n, causal=True).matmul == full == counter.get_total_flops()


def test_dense_and_windowed_causal_forms_count_what_they_compute():
    """softmax and swin compute every score and mask: causal costs what non-causal does."""
    for name in ("softmax", "swin"):
        m = build(name, torch.float32)
        assert m.flops(2, 50, causal=True) == m.flops(2, 50)


# ---- CUDA ---------------------------------------------------------------------------------------

@needs_cuda
@pytest.mark.parametrize("name", ["sdpa", "xformers"])
def test_fused_causal_kernels_equal_the_dense_reference_on_cuda(name):
    reason = get_mechanism(name).unavailable_reason("cuda")
    if reason:
        pytest.skip(f"{name}: {reason}")
    m = build(name, torch.float32).cuda()
    reference = build("softmax", torch.float32).cuda()
    reference.load_state_dict(m.state_dict())
    x = torch.randn(2, 77, DIM, device="cuda")
    torch.testing.assert_close(m(x, causal=True), reference(x, causal=True), rtol=2e-3, atol=2e-3)
    assert find_leak(m, torch.float32, 1e-6) is None
    assert m.flops(1, 77, causal=True).matmul == 8 * 77 * DIM**2 + 4 * (77 * 78 // 2) * DIM
