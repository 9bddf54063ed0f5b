"""UperNet on the SeTformer backbone, and the resolution probe's training step."""

from __future__ import annotations

import pytest
import torch

from tasks.ade20k.model import build_segmenter, make_train_step


@pytest.mark.parametrize("mechanism", ["softmax", "set"])
def test_the_segmenter_predicts_every_class_at_input_resolution(mechanism):
    model = build_segmenter("micro", mechanism, 150, channels=16).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 96))
    assert list(out) == ["out"] and out["out"].shape == (2, 150, 64, 96)
    model.train()
    out = model(torch.randn(2, 3, 64, 64))
    assert out["out"].shape == out["aux"].shape == (2, 150, 64, 64)
    assert not any(n.startswith(("backbone.head", "backbone.norm")) for n, _ in model.named_parameters())


def test_every_mechanism_gets_the_grid_of_its_stage():
    model = build_segmenter("micro", "softmax", 150, channels=8).eval()
    grids = []
    hooks = [m.register_forward_pre_hook(lambda mod, args: grids.append(tuple(args[1])))
             for m in model.mechanisms()]  # a block calls mixer(tokens, grid)
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 96))
    for h in hooks:
        h.remove()
    assert grids == [(16, 24), (8, 12), (4, 6), (4, 6), (2, 3)]  # micro: depths 1-1-2-1, strides 4..32


def test_make_train_step_changes_the_weights():
    step = make_train_step("softmax", 64, num_classes=5)
    optimizer = next(c.cell_contents for c in step.__closure__  # the closure holds the optimiser
                     if isinstance(c.cell_contents, torch.optim.Optimizer))
    before = [p.detach().clone() for p in optimizer.param_groups[0]["params"]]
    step()
    after = optimizer.param_groups[0]["params"]
    assert any(not torch.equal(a, b) for a, b in zip(after, before, strict=True))
    with pytest.raises(ValueError, match="side must be >= 32"):
        make_train_step("softmax", 16)
