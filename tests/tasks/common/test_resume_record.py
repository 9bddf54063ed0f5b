"""``attnbench run --resume DIR`` from the run's own record: settings restored, conflicts refused,
a finished run not run twice; and ``scale --resume`` refusing a folder measured otherwise."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from attnbench.cli import main
from attnbench.results.run_record import ROW_IN, SETTINGS
from attnbench.sweeps.base import SweepError
from attnbench.sweeps.kernel import KernelFolder, SweepConfig
from tasks.common.trainer import Trainer
from tests.tasks.common.toy import Toy, toy  # noqa: F401  (the fixture)

# Every kind of setting away from its default: options, recipe, seed, limits, cadence.
SETTINGS_GIVEN = ["--opt", "softmax.qkv_bias=false", "--epochs", "2", "--lr", "0.002", "--seed", "3",
                  "--limit-train", "64", "--eval-every", "2"]


@pytest.fixture
def stopped(toy, tmp_path, monkeypatch) -> tuple[Path, Path]:  # noqa: F811
    """(a finished two-epoch run, a copy of it stopped after epoch 1: its checkpoint and meta.json)."""
    save = Trainer.save

    def keep_each_epoch(self, path, extra):
        save(self, path, extra)
        path.with_name(f"epoch{self.epoch}.pt").write_bytes(path.read_bytes())

    monkeypatch.setattr(Trainer, "save", keep_each_epoch)
    whole = tmp_path / "whole"
    assert main(["run", "--task", Toy.name, "--mechanism", "softmax", *SETTINGS_GIVEN, "--out", str(whole),
                 "--results", str(tmp_path / "toy.csv")]) == 0
    monkeypatch.setattr(Trainer, "save", save)
    run = tmp_path / "stopped"
    run.mkdir()
    (run / "checkpoint.pt").write_bytes((whole / "epoch1.pt").read_bytes())
    meta = json.loads((whole / "meta.json").read_text())
    del meta[ROW_IN]  # not finished yet
    (run / "meta.json").write_text(json.dumps(meta))
    return whole, run


def without_record(run: Path, where: str) -> None:
    """Drop the settings from the run's meta.json or from its checkpoint."""
    if where == "meta.json":
        meta = json.loads((run / "meta.json").read_text())
        del meta[SETTINGS]
        (run / "meta.json").write_text(json.dumps(meta))
    else:
        state = torch.load(run / "checkpoint.pt", weights_only=True)
        del state[SETTINGS]
        torch.save(state, run / "checkpoint.pt")


@pytest.mark.parametrize("record, extra", [
    ("meta.json", []),  # the record in meta.json only, nothing else on the command line
    ("checkpoint.pt", ["--epochs", "2", "--task", Toy.name]),  # in the checkpoint only; equal flags are fine
])
def test_resume_alone_restores_every_setting_and_continues_exactly(stopped, record, extra, tmp_path, capsys):
    whole, run = stopped
    without_record(run, "checkpoint.pt" if record == "meta.json" else "meta.json")
    assert main(["run", "--resume", str(run), *extra]) == 0
    assert f"resuming {run} after epoch 1/2" in capsys.readouterr().err
    table = pd.read_csv(tmp_path / "toy.csv")  # the recorded table: its second row
    assert len(table) == 2
    row = table.iloc[-1]
    assert (row["epochs"], row["seed"], row["options"], row["limit_train"]) == (2, 3, "qkv_bias=false", 64)
    assert row["run_dir"] == str(run) and row["status"] == "ok"
    resumed = torch.load(run / "checkpoint.pt", weights_only=True)
    reference = torch.load(whole / "checkpoint.pt", weights_only=True)
    assert resumed["recipe"] == reference["recipe"] and resumed["recipe"]["lr"] == 0.002
    for key, value in reference["model"].items():  # the same lr, seed, data order and limits
        assert torch.equal(value, resumed["model"][key]), key
    assert [h["steps"] for h in resumed["history"]] == [4, 8]  # --limit-train 64: 4 steps an epoch
    assert resumed["history"][-1]["accuracy"] == reference["history"][-1]["accuracy"]


@pytest.mark.parametrize("extra, message", [
    (["--epochs", "8"], "--epochs 8 given, but the run recorded --epochs 2"),
    (["--mechanism", "linear"], "--mechanism linear given, but the run recorded --mechanism softmax"),
    (["--opt", "softmax.qkv_bias=true"],
     "--opt softmax.qkv_bias=true given, but the run recorded --opt softmax.qkv_bias=false"),
    (["--seed", "0"], "--seed 0 given, but the run recorded --seed 3"),  # 0: argparse's default
    (["--limit-train", "32", "--lr", "0.1"],
     "--lr 0.1 given, but the run recorded --lr 0.002; --limit-train 32 given, but the run recorded "
     "--limit-train 64"),
])
def test_a_flag_that_differs_from_the_record_is_refused_in_one_line(stopped, extra, message, cli_error):
    _, run = stopped
    line = cli_error(["run", "--resume", str(run), *extra])
    assert message in line and line.startswith(f"attnbench run: error: --resume {run}: ")


def test_resuming_a_finished_run_adds_no_second_row(stopped, tmp_path, capsys):
    whole, _ = stopped
    capsys.readouterr()
    assert main(["run", "--resume", str(whole)]) == 0
    out = capsys.readouterr().out.strip()
    assert out == f"attnbench run: {whole} already finished; its row is in {(tmp_path / 'toy.csv').resolve()}"
    assert len(pd.read_csv(tmp_path / "toy.csv")) == 1


def test_a_new_run_into_a_run_folder_without_resume_is_refused_in_one_line(stopped, tmp_path, cli_error):
    """Its history would be appended to the other run's: a finished run's folder, or a stopped one's."""
    whole, run = stopped
    base = ["run", "--task", Toy.name, "--mechanism", "softmax", "--results", str(tmp_path / "toy.csv")]
    line = cli_error([*base, "--out", str(whole)])
    assert line == (f"attnbench run: error: --out {whole} holds a finished run (its row is in "
                    f"{(tmp_path / 'toy.csv').resolve()}); continue it with --resume {whole}, or choose "
                    "another --out")
    line = cli_error([*base, "--out", str(run)])
    assert f"--out {run} holds a run stopped before its end (its checkpoint.pt); continue it with --resume" \
        in line
    assert len(pd.read_csv(tmp_path / "toy.csv")) == 1 and len(pd.read_csv(whole / "history.csv")) == 2


def test_a_run_killed_after_its_last_checkpoint_writes_its_whole_history_on_resume(toy, tmp_path,  # noqa: F811
                                                                                  monkeypatch):
    """Killed between the last epoch's checkpoint and its line in history.csv: --resume trains nothing
    more, and writes the row and every epoch's line."""
    save = Trainer.save

    def killed_after_the_last(self, path, extra):
        save(self, path, extra)
        if self.epoch == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "save", killed_after_the_last)
    run = tmp_path / "run"
    argv = ["run", "--task", Toy.name, "--mechanism", "softmax", "--epochs", "2", "--limit-train", "32",
            "--out", str(run), "--results", str(tmp_path / "toy.csv")]
    assert main(argv) == 130
    assert list(pd.read_csv(run / "history.csv")["epoch"]) == [1]  # the second epoch's line was lost
    monkeypatch.setattr(Trainer, "save", save)
    assert main(["run", "--resume", str(run)]) == 0
    assert len(pd.read_csv(tmp_path / "toy.csv")) == 1
    history = pd.read_csv(run / "history.csv")
    assert list(history["epoch"]) == [1, 2] and list(history["steps"]) == [2, 4]


def test_a_folder_without_a_run_or_without_a_record_is_one_line(tmp_path, cli_error):
    line = cli_error(["run", "--resume", str(tmp_path / "nowhere")])
    assert f"argument --resume: {tmp_path / 'nowhere'}: no such file or folder" in line
    line = cli_error(["run", "--resume", str(tmp_path)])
    assert f"--resume {tmp_path}: no record of a run's settings there (meta.json, checkpoint.pt)" in line


def test_a_checkpoint_without_a_record_still_refuses_another_recipe(stopped, cli_error):
    _, run = stopped
    without_record(run, "meta.json")
    without_record(run, "checkpoint.pt")
    argv = ["run", "--resume", str(run), "--task", Toy.name, "--mechanism", "softmax", "--opt",
            "softmax.qkv_bias=false", "--seed", "3", "--limit-train", "64", "--eval-every", "2"]
    line = cli_error(argv)  # no --lr: the preset's 0.003, not the checkpoint's 0.002
    assert "the checkpoint is of another run (--lr: 0.002 there, 0.003 now" in line


# ---- scale --resume -------------------------------------------------------------------------------


def measured_folder(tmp_path: Path, options: str) -> Path:
    """A sweep folder as `scale` leaves it: meta.json and one row of `set` measured with ``options``."""
    out = tmp_path / "sweep"
    out.mkdir()
    cfg = SweepConfig(mechanisms=["set"], seq=[16], modes=["fwd"], options={"set": json.loads(options)})
    import dataclasses

    (out / "meta.json").write_text(json.dumps({"sweep": dataclasses.asdict(cfg)}))
    pd.DataFrame([{"mechanism": "set", "variant": "set", "n": 16, "mode": "fwd", "options": options}]).to_csv(
        out / "scale.csv", index=False)
    return out


@pytest.mark.parametrize("change, message", [
    (dict(options={"set": {"m": "16"}}), "measured set with --opt set.m=64, this sweep asks for set.m=16"),
    (dict(options={}), "measured set with --opt set.m=64, this sweep asks for none (its defaults)"),
    (dict(modes=["fwd", "fwd+bwd"]), "was measured with --mode fwd, this sweep asks for fwd,fwd+bwd"),
    (dict(dtype="float64"), "was measured with --dtype float32, this sweep asks for float64"),
    (dict(batch=2), "was measured with --batch 1, this sweep asks for 2"),
    (dict(heads=8), "was measured with --heads 4, this sweep asks for 8"),
])
def test_scale_resume_refuses_a_folder_measured_otherwise(change, message, tmp_path):
    out = measured_folder(tmp_path, '{"m": "64"}')
    same = dict(mechanisms=["set"], seq=[16, 32], modes=["fwd"], options={"set": {"m": "64"}})
    cfg = SweepConfig(**{**same, **change})
    with pytest.raises(SweepError, match="--resume: ") as exc:
        KernelFolder(cfg, out).check_resume()
    assert message in str(exc.value)


def test_scale_resume_takes_new_lengths_and_mechanisms_measured_alike(tmp_path):
    out = measured_folder(tmp_path, '{"m": "64"}')
    KernelFolder(SweepConfig(mechanisms=["set", "linear"], seq=[32], modes=["fwd"],
                             options={"set": {"m": "64"}}), out).check_resume()
    KernelFolder(SweepConfig(mechanisms=["linear"], seq=[32], modes=["fwd"]), out).check_resume()
