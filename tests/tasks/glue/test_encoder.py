"""The text encoder under GLUE's tokenizers: padding never changes the logits, MiniLM's weights load."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tasks.common.text_encoder import build_encoder, init_from_minilm, minilm_folder
from tasks.glue import data
from tests.tasks.glue.tiny import needs_minilm

# ---- the encoder -------------------------------------------------------------------------------


@pytest.mark.parametrize("mechanism", ["softmax", "set", "linear", "nystromformer"])
def test_padding_does_not_change_the_encoders_logits(mechanism):
    model = build_encoder("tiny", mechanism, 100, 3, 64).eval()
    short, long = torch.randint(5, 100, (1, 7)), torch.randint(5, 100, (1, 40))
    ids = torch.zeros(2, 40, dtype=torch.long)
    ids[0, :7], ids[1] = short, long
    mask = torch.zeros(2, 40, dtype=torch.bool)
    mask[0, :7], mask[1] = True, True
    segments = torch.zeros_like(ids)
    segments[0, 4:7] = 1  # a pair: segment ids must be padded consistently too
    with torch.no_grad():
        both = model(ids, segments, mask)
        alone = model(short, segments[:1, :7], mask[:1, :7])
        unpadded = model(long, segments[1:], mask[1:])
    torch.testing.assert_close(both[0], alone[0], atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(both[1], unpadded[0], atol=2e-4, rtol=1e-4)
    assert not torch.allclose(both[0], both[1])


@needs_minilm
def test_minilm_weights_load_into_the_encoder_with_the_mechanisms_attention():
    """With softmax attention the loaded encoder is all-MiniLM-L6-v2 itself: its mean-pooled features
    put a paraphrase close and an unrelated sentence far (a wrong mapping of any weight breaks this)."""
    from safetensors.torch import load_file

    folder = minilm_folder()
    tok = data.load_tokenizer(folder / "tokenizer.json")
    sentences = ["A man is playing a guitar.", "A person plays the guitar.", "The stock market fell sharply."]
    split = data.EncodedSplit(data.Examples(Path("x"), sentences, None, [0, 0, 0]), tok, 32)
    ids, segments, mask, _, _ = data.Collate(data.pad_id(tok), False)([split[i] for i in range(3)])
    model = build_encoder("minilm", "softmax", tok.get_vocab_size(), 2, 32).eval()
    assert init_from_minilm(model, folder) == "minilm (attention projections from BERT's)"
    with torch.no_grad():
        x = model.features(ids, segments, mask)
    pooled = torch.nn.functional.normalize(x.sum(1) / mask.sum(1, keepdim=True), dim=-1)
    similarity = pooled @ pooled.T
    assert similarity[0, 1] > 0.75 and abs(similarity[0, 2]) < 0.2
    set_model = build_encoder("minilm", "set", tok.get_vocab_size(), 2, 32)
    init_from_minilm(set_model, folder)
    w = load_file(str(folder / "model.safetensors"))
    u_v = torch.cat([w[f"encoder.layer.5.attention.self.{p}.weight"] for p in ("key", "value")])
    assert torch.equal(set_model.layers[5].mixer.in_proj.weight, u_v)
