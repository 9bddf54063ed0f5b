"""``attnbench resolution``: the search for the largest trainable side, on fake tasks whose
memory per step is known, so the right answer is known in advance. No timing is asserted."""

from __future__ import annotations

import textwrap

import pandas as pd
import pytest

from attnbench.cli import main
from attnbench.sweeps.resolution import ProbeConfig, ResolutionError, probe, sides_to_try

# A plug-in task: a step holds side² KiB·4 of live memory (64 MiB at 128 px, 256 MiB at 256 px),
# and raises a plain error at 96 px, so both failure kinds are exercised.
FAKE_TASK = textwrap.dedent('''
    import torch
    from attnbench.task import Task, register_task

    @register_task
    class FakeDense(Task):
        name = "fake-dense"
        train_side = 64

        @classmethod
        def train_step(cls, mechanism, side, size, options, device):
            if side == 96:
                raise ValueError("96 px is not supported by this fake")
            def step():
                buf = torch.ones(side * side * 1024)  # 4 KiB per pixel, every page touched
                float(buf.sum())
            return step, 2
''')


@pytest.fixture()
def fake_task(tmp_path):
    path = tmp_path / "fake_task.py"
    path.write_text(FAKE_TASK)
    from attnbench.registry import load_module

    load_module(str(path))
    return str(path)


def config(load: str, **changes) -> ProbeConfig:
    base = dict(task="fake-dense", mechanisms=["softmax"], size="micro", start=64, max_side=1024,
                granularity=32, memory_limit_mib=300.0, budget=120.0, threads=1, device="cpu", load=[load])
    return ProbeConfig(**{**base, **changes})


def test_search_doubles_then_bisects():
    cfg = ProbeConfig("t", ["softmax"], "micro", 64, 1024, 32, None, 10.0, 1, "cpu")
    assert sides_to_try(cfg, {}) == 64
    assert sides_to_try(cfg, {64: False}) is None  # the training side itself failed
    assert sides_to_try(cfg, {64: True, 128: True}) == 256
    assert sides_to_try(cfg, {64: True, 128: True, 256: True, 512: False}) == 384
    assert sides_to_try(cfg, {256: True, 384: False, 320: False}) == 288
    assert sides_to_try(cfg, {256: True, 288: False}) is None  # within the granularity
    assert sides_to_try(cfg, {512: True, 1024: True}) is None  # reached --max-side
    capped = ProbeConfig("t", ["softmax"], "micro", 96, 1000, 32, None, 10.0, 1, "cpu")
    assert sides_to_try(capped, {96: True, 192: True, 384: True, 768: True}) == 1000


def test_finds_the_largest_side_under_the_memory_limit(fake_task, tmp_path):
    out = tmp_path / "probe"
    table = probe(config(fake_task), out, ["test"])
    assert list(table["side"]) == [64, 128, 256, 512, 384, 320, 288]
    assert list(table["status"]) == ["ok", "ok", "ok", "oom", "oom", "oom", "oom"]
    summary = pd.read_csv(out / "summary.csv")
    row = summary.iloc[0]
    assert row["largest_side"] == 256 and row["first_failed_side"] == 288
    assert row["failure"].startswith("oom")
    assert 12 <= row["train_peak_mem_mib"] <= 24  # 16 MiB of live tensor at 64 px
    assert row["train_img_s"] > 0
    assert (out / "resolution.png").is_file() and (out / "meta.json").is_file()


def test_an_error_stops_the_search_and_keeps_its_message(fake_task, tmp_path):
    table = probe(config(fake_task, start=96, granularity=32, max_side=2000), tmp_path / "p", ["test"])
    assert list(table["status"]) == ["error"]
    assert "96 px is not supported" in table["message"].iloc[0]
    summary = pd.read_csv(tmp_path / "p" / "summary.csv")
    assert pd.isna(summary["largest_side"].iloc[0])


def test_bad_requests_are_clear_errors(fake_task, tmp_path, capsys):
    with pytest.raises(ResolutionError, match="multiple of --granularity"):
        probe(config(fake_task, start=100), tmp_path / "a", ["test"])
    with pytest.raises(ResolutionError, match="below the start side"):
        probe(config(fake_task, max_side=32), tmp_path / "b", ["test"])
    with pytest.raises(SystemExit) as exit_info:
        main(["resolution", "--task", "imagenet"])
    assert exit_info.value.code == 2
    assert "no resolution probe" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["resolution", "--task", "no-such-task"])
    assert "valid choices" in capsys.readouterr().err


@pytest.mark.parametrize("task", ["coco", "ade20k"])
def test_dense_tasks_offer_a_training_step(task):
    from attnbench.task import get_task, resolution_tasks

    assert task in resolution_tasks()
    cls = get_task(task)
    assert cls.train_side % 32 == 0
    step, images = cls.train_step("softmax", 64, "micro", {}, "cpu")
    assert images == 2
    step()  # one forward, backward and optimiser step at 64 px


def test_resume_measures_only_the_sides_not_yet_in_the_table(fake_task, tmp_path, monkeypatch):
    """An interrupted probe keeps its rows; --resume replays the search from them, measuring only
    what is missing, and ends with the table a probe in one go gives."""
    out = tmp_path / "probe"
    full = probe(config(fake_task), out, ["test"])
    csv = out / "resolution.csv"
    kept = pd.read_csv(csv).iloc[:3]  # as if stopped after 64, 128 and 256 px
    kept.to_csv(csv, index=False)
    (out / "summary.csv").unlink()
    measured = []
    import attnbench.sweeps.resolution as resolution

    real = resolution.try_side
    monkeypatch.setattr(resolution, "try_side",
                        lambda cfg, name, side, log: measured.append(side) or real(cfg, name, side, log))
    table = probe(config(fake_task), out, ["test"], resume=True)
    assert measured == [512, 384, 320, 288]
    assert list(table["side"]) == list(full["side"]) and list(table["status"]) == list(full["status"])
    assert pd.read_csv(out / "summary.csv").iloc[0]["largest_side"] == 256


def test_resume_refuses_other_settings_and_needs_out(fake_task, tmp_path, capsys):
    out = tmp_path / "probe"
    probe(config(fake_task, max_side=128), out, ["test"])
    with pytest.raises(ResolutionError, match="already holds a probe.*--resume"):
        probe(config(fake_task, max_side=128), out, ["test"])
    with pytest.raises(ResolutionError, match=r"other settings \(granularity 32, not 64\)"):
        probe(config(fake_task, max_side=128, granularity=64), out, ["test"], resume=True)
    with pytest.raises(SystemExit) as exit_info:
        main(["resolution", "--task", "fake-dense", "--resume"])
    assert exit_info.value.code == 2 and "give --out" in capsys.readouterr().err
