"""Mask R-CNN on the SeTformer backbone, and the resolution probe's training step."""

from __future__ import annotations

import pytest
import torch

from tasks.coco.model import backbone_of, build_detector, make_train_step, synthetic_batch

# ---- the model -----------------------------------------------------------------------------------


@pytest.mark.parametrize("mechanism", ["softmax", "set"])
def test_mask_rcnn_trains_and_predicts_on_the_backbone(mechanism):
    model = build_detector("micro", mechanism, 3, min_size=64, max_size=64, detector="light")
    maps = model.backbone(torch.zeros(1, 3, 64, 64))
    assert list(maps) == ["0", "1", "2", "3", "pool"]
    assert [tuple(m.shape[-2:]) for m in maps.values()] == [(16, 16), (8, 8), (4, 4), (2, 2), (1, 1)]
    images, targets = synthetic_batch(64, 3)
    losses = model.train()(images, targets)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness",
                           "loss_rpn_box_reg"}
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    assert all(p.grad is not None for p in model.parameters())  # none unused: DDP needs every one
    assert backbone_of(model).mechanism == mechanism
    with torch.no_grad():
        outputs = model.eval()(images)
    assert len(outputs) == 2
    for out in outputs:
        n = len(out["scores"])
        assert out["boxes"].shape == (n, 4) and out["labels"].shape == (n,)
        assert out["masks"].shape == (n, 1, 64, 64)


def test_make_train_step_updates_the_weights(monkeypatch):
    optimisers = []

    class Recorded(torch.optim.AdamW):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            optimisers.append(self)

    monkeypatch.setattr(torch.optim, "AdamW", Recorded)
    step = make_train_step("softmax", 64)
    params = [p for g in optimisers[0].param_groups for p in g["params"]]
    before = [p.detach().clone() for p in params]
    step()
    assert optimisers[0].state  # the optimiser took a step
    changed = [not torch.equal(p, b) for p, b in zip(params, before, strict=True)]
    assert sum(changed) > len(changed) // 2
    with pytest.raises(ValueError, match="side must be >= 32"):
        make_train_step("softmax", 16)
