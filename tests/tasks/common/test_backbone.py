"""The SeTformer backbone: every mechanism slots in, sizes are what they say, FLOPs are measured."""

from __future__ import annotations

import pytest
import torch

from attnbench import Mechanism, get_mechanism
from tasks.common.backbone import SIZES, build_backbone, count_parameters, measure_flops, model_table
from tests.conftest import mechanism_params


@pytest.mark.parametrize("name", mechanism_params())
def test_every_mechanism_trains_in_the_backbone(name):
    model = build_backbone("micro", name, num_classes=10)
    images = torch.randn(2, 3, 32, 32)
    logits = model(images)
    assert logits.shape == (2, 10)
    logits.logsumexp(-1).sum().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname


def test_four_stages_halve_the_grid_and_double_the_channels():
    model = build_backbone("micro", "softmax", num_classes=10)
    maps = model.forward_features(torch.randn(1, 3, 64, 64))
    dim = SIZES["micro"].dim
    assert [tuple(m.shape) for m in maps] == [(1, dim * 2**i, 16 // 2**i, 16 // 2**i) for i in range(4)]
    assert sum(1 for _ in model.mechanisms()) == sum(SIZES["micro"].depths)


def test_mechanisms_get_the_grid_unless_tokens_are_a_sequence():
    seen = []
    for use_grid in (True, False):
        model = build_backbone("micro", "softmax", 10, use_grid=use_grid)
        record = lambda module, args: seen.append(args[1])
        hooks = [m.register_forward_pre_hook(record) for m in model.mechanisms()]
        model(torch.randn(1, 3, 32, 32))
        for h in hooks:
            h.remove()
    blocks = sum(SIZES["micro"].depths)
    assert seen[:blocks] == [(8, 8), (4, 4), (2, 2), (2, 2), (1, 1)]
    assert seen[blocks:] == [None] * blocks


def test_swin_alternates_shifted_windows_within_each_stage_unless_told():
    model = build_backbone("mini", "swin", 10)
    shifts = [[b.mixer.options.shift for b in stage.blocks] for stage in model.stages]
    assert shifts == [[False, True], [False, True], [False, True] * 5, [False, True]]
    fixed = build_backbone("micro", "swin", 10, options={"shift": "false", "window": "4"})
    assert all(not m.options.shift and m.options.window == 4 for m in fixed.mechanisms())


def test_sizes_grow_and_mini_lands_near_the_papers_16m():
    with torch.device("meta"):
        params = {s: count_parameters(build_backbone(s, "set", 1000)) for s in SIZES}
        swin_t = count_parameters(build_backbone("tiny", "swin", 1000))
    assert list(params.values()) == sorted(params.values())
    assert 14e6 < params["mini"] < 18e6  # SeTformer-Mini: 16M in the paper
    assert 27e6 < swin_t < 32e6  # Swin-T: 28M (ours downsamples with 3×3 convolutions)


def test_unknown_size_lists_the_valid_ones():
    with pytest.raises(KeyError, match="valid choices: micro, mini, tiny, small, base"):
        build_backbone("huge", "set", 10)


def test_flops_are_counted_and_the_formula_stands_in_where_the_counter_is_blind():
    softmax = measure_flops(build_backbone("micro", "softmax", 10), 32)
    assert softmax.substituted == 0 and softmax.counted > 0
    nat_cls = get_mechanism("nat")
    if nat_cls.unavailable_reason("cpu"):
        pytest.skip(nat_cls.unavailable_reason("cpu"))
    nat_model = build_backbone("micro", "nat", 10)
    nat = measure_flops(nat_model, 32)
    grids = [(8, 8), (4, 4), (2, 2), (2, 2), (1, 1)]
    pairs = zip(nat_model.mechanisms(), grids, strict=True)
    expected = sum(m.flops(1, h * w, (h, w)).matmul for m, (h, w) in pairs)
    assert nat.substituted == expected
    assert not any("forward" in vars(m) for m in nat_model.mechanisms())  # the stand-ins are gone


def test_model_table_reports_each_pair_and_failures_as_notes(monkeypatch):
    rows = model_table(["micro"], ["softmax", "set"], img_size=64, num_classes=10)
    assert [(r["size"], r["mechanism"]) for r in rows] == [("micro", "softmax"), ("micro", "set")]
    assert all(r["params"] > 0 and r["gflops"] > 0 for r in rows)
    def broken_init(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(Mechanism, "__init__", broken_init)
    (broken,) = model_table(["micro"], ["softmax"], img_size=64)
    assert "boom" in broken["note"] and broken["params"] != broken["params"]  # NaN
