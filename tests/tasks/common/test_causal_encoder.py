"""The shared encoder read left to right (``causal=True``): nothing after t reaches the outputs at
or before t (values and gradients, the short convolution included), padding changes nothing, and a
mechanism without a causal form is refused with its reason when the encoder is built."""

from __future__ import annotations

import pytest
import torch

from attnbench import OptionError, get_mechanism
from tasks.common.sequence import padded
from tasks.common.text_encoder import build_encoder

N, T = 12, 5  # sequence length, the last position whose outputs must not see what follows


def float64_encoder(mechanism: str, causal: bool = True, size: str = "seq-tiny"):
    torch.manual_seed(0)
    return build_encoder(size, mechanism, 40, 40, N, per_token=True, causal=causal).double().eval()


def later_tokens_reach(model, t: int = T) -> tuple[float, float]:
    """(largest change of the outputs at 0..t when the tokens after t change, largest gradient of
    those outputs with respect to the embeddings after t), in float64."""
    ids = torch.randint(2, 40, (2, N))
    other = ids.clone()
    other[:, t + 1:] = torch.randint(2, 40, (2, N - t - 1))
    segments, mask = torch.zeros_like(ids), torch.ones_like(ids, dtype=torch.bool)
    with torch.no_grad():
        change = (model(ids, segments, mask)[:, :t + 1] - model(other, segments, mask)[:, :t + 1]).abs().max()
    inputs = {}

    def keep(module, args, output):  # the embeddings, made a leaf the gradient is taken against
        output = output.detach().requires_grad_(True)
        inputs["x"] = output
        return output

    hook = model.embed_norm.register_forward_hook(keep)
    try:
        model(ids, segments, mask)[:, :t + 1].sum().backward()
    finally:
        hook.remove()
    return float(change), float(inputs["x"].grad[:, t + 1:].abs().max())


def test_a_causal_encoder_lets_nothing_after_t_reach_the_outputs_up_to_t(causal_mechanisms):
    for t in (0, T, N - 2):
        change, grad = later_tokens_reach(float64_encoder("causal_softmax"), t)
        assert change < 1e-10 and grad == 0.0, (t, change, grad)


def test_the_leak_check_fails_on_a_planted_leak_and_on_the_bidirectional_encoder(causal_mechanisms):
    """The check above can fail: a mechanism that lets the next token through, and the same
    encoder built bidirectional (its convolution and attention read both ways)."""
    change, grad = later_tokens_reach(float64_encoder("leaky_causal"))
    assert change > 1e-6 and grad > 1e-9
    change, grad = later_tokens_reach(float64_encoder("causal_softmax", causal=False))
    assert change > 1e-6 and grad > 1e-9


def test_the_causal_convolution_alone_is_causal(causal_mechanisms):
    """With the attention's contribution cut (its output projection zero), what reaches t comes
    through the convolution: the t - 2 … t window, never t + 1."""
    model = float64_encoder("causal_softmax")
    for layer in model.layers:
        torch.nn.init.zeros_(layer.mixer.proj.weight)
        torch.nn.init.zeros_(layer.mixer.proj.bias)
    change, grad = later_tokens_reach(model)
    assert change < 1e-10 and grad == 0.0
    ids = torch.randint(2, 40, (1, N))
    moved = ids.clone()
    moved[0, T - 2] = (ids[0, T - 2] + 1 - 2) % 38 + 2  # a token inside the window of T
    mask = torch.ones_like(ids, dtype=torch.bool)
    with torch.no_grad():
        a, b = model(ids, torch.zeros_like(ids), mask), model(moved, torch.zeros_like(ids), mask)
    assert (a[0, T] - b[0, T]).abs().max() > 1e-6 and (a[0, T + 1] - b[0, T + 1]).abs().max() < 1e-12


def test_padded_sequences_read_causally_as_they_do_alone(causal_mechanisms):
    model = build_encoder("seq-tiny", "causal_softmax", 40, 7, N, per_token=True, causal=True).eval()
    short, full = torch.randint(2, 40, (7,)), torch.randint(2, 40, (N,))
    ids, mask = padded([short.tolist(), full.tolist()], N)
    with torch.no_grad():
        both = model(ids, torch.zeros_like(ids), mask)
        alone = model(short[None], torch.zeros(1, 7, dtype=torch.long), mask[:1, :7])
    torch.testing.assert_close(both[0, :7], alone[0], atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("mechanism", ["set", "nystromformer"])
def test_a_mechanism_without_a_causal_form_is_refused_with_its_reason(mechanism):
    reason = get_mechanism(mechanism).causal_problem()
    assert reason
    with pytest.raises(OptionError) as exc:
        build_encoder("seq-tiny", mechanism, 40, 40, N, per_token=True, causal=True)
    assert str(exc.value) == f"{mechanism}: causal=True is not supported: {reason}"


def test_a_causal_encoder_predicts_per_token(causal_mechanisms):
    with pytest.raises(ValueError, match="a causal encoder predicts per token"):
        build_encoder("seq-tiny", "causal_softmax", 40, 3, N, causal=True)
