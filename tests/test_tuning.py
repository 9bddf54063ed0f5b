"""Tuning the accuracy sweep per point (``--lr``, ``--weight-decay``): every run of the grid kept,
each point's best by validation (never by test) standing for it in the breaking lengths, fronts and
plots, labelled tuned; resume by run; one-line errors. The fake task (``fake_sweep_task.py``) scores
known values, so the choices can be checked exactly."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest

from attnbench import registry
from attnbench.cli import main
from attnbench.sweeps.base import SweepError
from attnbench.sweeps.tuning import label, parse_values, run_suffix, select, tuned_view
from attnbench.task import TASKS

FAKE = str(Path(__file__).with_name("fake_sweep_task.py"))  # loaded with --load, never imported


@pytest.fixture
def fake():
    registry.load_module(FAKE)
    yield ["--load", FAKE]
    for name in ("fake_tuned", "fake_plain"):
        TASKS.unregister(name)


def scale(fake, out: Path, *extra: str) -> pd.DataFrame:
    assert main(["scale", "--task", "fake_tuned", *fake, "--threads", "1", "--memory-limit", "2048",
                 "--out", str(out), *extra]) == 0
    return pd.read_csv(out / "accuracy.csv")


def runs(table: pd.DataFrame) -> dict[tuple[str, int, float], tuple[bool, float, float]]:
    """(variant, n, lr) -> (selected, validation accuracy, test accuracy)."""
    return {(r.variant, r.seq_len, r.lr): (bool(r.selected), r.val_accuracy, r.accuracy)
            for r in table.itertuples()}


# ---- the choice, on tables ------------------------------------------------------------------------

def row(variant, lr, val, status="ok", n=64, seed=0, wd=math.nan):
    return {"variant": variant, "mechanism": variant, "seq_len": n, "seed": seed, "lr": lr,
            "weight_decay": wd, "status": status, "val_accuracy": val,
            "accuracy": 100 - val if status == "ok" else math.nan}


def test_each_point_keeps_its_best_run_by_validation_whatever_the_order_runs_finished():
    table = pd.DataFrame([
        row("a", 3e-3, 80), row("a", 1e-3, 90), row("a", 1e-2, 0, status="diverged"),
        row("b", 1e-3, 70), row("b", 3e-3, 70),  # a tie: the smaller learning rate
        row("c", 1e-3, 0, status="oom"), row("c", 3e-3, 0, status="timeout"),  # nothing finished
        row("d", 1e-3, 40), row("d", 1e-3, 60),  # one run twice: the latest row stands for it
    ])
    chosen = table[select(table)]
    assert sorted(zip(chosen["variant"], chosen["lr"], chosen["val_accuracy"], strict=True)) == [
        ("a", 1e-3, 90), ("b", 1e-3, 70), ("d", 1e-3, 60)]
    distinct = table[table["variant"] != "d"]  # runs finishing in another order: the same choice
    shuffled = distinct.sample(frac=1, random_state=1)
    assert set(shuffled.index[select(shuffled)]) == set(distinct.index[select(distinct)])
    view = tuned_view(table)
    assert list(zip(view["variant"], view["status"], strict=True)) == [
        ("a", "ok"), ("b", "ok"), ("c", "timeout"), ("d", "ok")]  # c: what stopped its latest run
    assert label(table) == "tuned: best of lr 0.001, 0.003, 0.01 by val_accuracy"
    assert label(table[table["lr"] == 1e-3].drop_duplicates(["variant"], keep="last")) == ""


def test_without_a_grid_every_finished_point_stands_for_itself():
    table = pd.DataFrame([row("a", math.nan, math.nan), row("b", math.nan, math.nan, status="oom")])
    assert select(table).tolist() == [True, False] and label(table) == ""
    assert len(tuned_view(table)) == 2


def test_grid_values_parse_and_name_runs():
    assert parse_values("3e-4, 1e-3,3e-4", "--lr", 0, strict=True) == [3e-4, 1e-3]
    assert parse_values("0,0.05", "--weight-decay", 0, strict=False) == [0.0, 0.05]
    assert run_suffix(3e-3, None) == "-lr0.003" and run_suffix(1e-3, 0.0) == "-lr0.001-wd0"
    for text, flag, strict, message in (("1e-3,x", "--lr", True, "expected a comma list of numbers"),
                                        ("0,1e-3", "--lr", True, "must be > 0, got 0"),
                                        ("-1", "--weight-decay", False, "must be >= 0, got -1")):
        with pytest.raises(SweepError, match=message):
            parse_values(text, flag, 0, strict=strict)


# ---- the sweep ----------------------------------------------------------------------------------

def test_a_tuned_sweep_keeps_every_run_and_judges_each_point_by_its_best_on_validation(fake, tmp_path,
                                                                                       capsys):
    untuned = scale(fake, tmp_path / "untuned")
    assert untuned["lr"].isna().all() and untuned["selected"].all()
    breaking = pd.read_csv(tmp_path / "untuned" / "breaking.csv").set_index("variant")
    assert breaking.loc["linear", "breaking"] == 32 and pd.isna(breaking.loc["linear", "tuned"])
    capsys.readouterr()

    out = tmp_path / "tuned"
    table = scale(fake, out, "--lr", "1e-3,3e-3", "--compare", str(tmp_path / "untuned"))
    assert len(table) == 8  # 2 mechanisms x 2 lengths x 2 learning rates, every run kept
    assert runs(table) == {
        ("softmax", 16, 1e-3): (True, 95, 94), ("softmax", 16, 3e-3): (False, 90, 99),  # not by test
        ("softmax", 32, 1e-3): (True, 95, 94), ("softmax", 32, 3e-3): (False, 90, 99),
        ("linear", 16, 1e-3): (True, 95, 95), ("linear", 16, 3e-3): (False, 95, 95),  # a tie: the smaller
        ("linear", 32, 1e-3): (False, 50, 60), ("linear", 32, 3e-3): (True, 92, 90)}
    assert sorted(p.name for p in (out / "points").iterdir())[:2] == ["linear-n16-seed0-lr0.001",
                                                                       "linear-n16-seed0-lr0.003"]
    log = (out / "points" / "linear-n32-seed0-lr0.003" / "log.txt").read_text()
    assert "--lr 0.003 --seq-len 32" in log
    breaking = pd.read_csv(out / "breaking.csv").set_index("variant")
    assert breaking.loc["linear", "breaking"] == "none"  # tuned, it holds up at 32
    assert breaking.loc["linear", "tuned"] == "tuned: best of lr 0.001, 0.003 by val_accuracy"
    said = capsys.readouterr()
    assert "1 seed x 2 runs of the grid = 8 runs on cpu" in said.err
    assert "[8/8] linear n=32 seed=0 lr=0.003: accuracy 90.0" in said.err
    grid = said.out.split("compared with")[0]
    assert "tuned: best of lr 0.001, 0.003 by val_accuracy" in grid
    assert "94.0 (n = 1)" in grid and "90.0 (n = 1)" in grid and "60.0" not in grid and "99.0" not in grid
    compared = pd.read_csv(out / "compare.csv").set_index(["variant", "seq_len"])
    assert compared.loc[("linear", 32), "accuracy_change"] == 30.0  # what tuning changed there
    meta = json.loads((out / "meta.json").read_text())
    assert meta["sweep"]["lrs"] == [1e-3, 3e-3] and meta["sweep"]["weight_decays"] == []

    # resume goes by run: a deleted run is trained again, and the choice follows
    kept = table[~((table["variant"] == "linear") & (table["seq_len"] == 32) & (table["lr"] == 3e-3))]
    kept.to_csv(out / "accuracy.csv", index=False)
    again = scale(fake, out, "--lr", "1e-3,3e-3", "--resume")
    assert "resuming: 7 points already" in capsys.readouterr().err
    assert len(again) == 8 and runs(again) == runs(table)


def test_a_weight_decay_grid_multiplies_the_runs(fake, tmp_path):
    table = scale(fake, tmp_path / "wd", "--mechanism", "softmax", "--seq", "16", "--lr", "1e-3,3e-3",
                  "--weight-decay", "0,0.1")
    assert sorted(zip(table["lr"], table["weight_decay"], strict=True)) == [
        (1e-3, 0.0), (1e-3, 0.1), (3e-3, 0.0), (3e-3, 0.1)]
    assert list(table[table["selected"]][["lr", "weight_decay"]].iloc[0]) == [1e-3, 0.0]  # a tie at 95


@pytest.mark.parametrize("argv, message", [
    (["--task", "fake_plain", "--lr", "1e-3,3e-3"],
     "task 'fake_plain' holds out no validation split, which picks each point's best of --lr/--weight-decay; "
     "tasks with one: fake_tuned"),
    (["--task", "fake_tuned", "--lr", "0.1,zero"], "--lr '0.1,zero': expected a comma list of numbers"),
    (["--task", "fake_tuned", "--", "--lr", "0.1"],
     "the sweep sets --lr for every run; use `attnbench scale --lr`"),
    (["--lr", "1e-3"], "--lr is for the accuracy sweep: add --task"),
])
def test_tuning_mistakes_are_one_line(fake, argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["scale", *fake, "--out", str(tmp_path / "never"), *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err
    assert not (tmp_path / "never").exists()
