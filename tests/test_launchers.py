"""Accuracy sweeps that fan out: ``--jobs N`` on this machine (each point on cores of its own),
``--launcher ray`` (on a Ray started for the sweep, or at ``--address`` on one this test starts) and
``--launcher slurm`` through submitit's local executor. A tiny real MQAR sweep, tuned over two
learning rates, writes the serial sweep's table (timing columns aside) and folder whichever runs
it; a point whose Ray worker dies is tried once more, then recorded; Ctrl-C ends every running point
with the resume line, and the resumed sweep finishes; mistakes are one line."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from attnbench import registry
from attnbench.cli import main
from attnbench.sweeps.accuracy import RUN_KEY
from attnbench.sweeps.base import SweepError
from attnbench.sweeps.launchers import Slot, local_slots, usable_cores
from attnbench.sweeps.points import pin
from attnbench.task import TASKS
from tests.test_interrupt import WAIT_S, Command, interrupted_line, wait_until_gone

FAKE = str(Path(__file__).with_name("fake_sweep_task.py"))  # loaded with --load, never imported
CORES = len(usable_cores())
two_cores = pytest.mark.skipif(CORES < 2, reason="two points at once need two cores")
# MQAR cut to a few seconds a point: 4 steps on 32 sequences of 32 tokens, 16 to test and validate on
TINY = ["--", "--max-steps", "4", "--warmup-epochs", "0", "--limit-train", "32", "--limit-val", "16",
        "--batch-size", "8", "--vocab", "16", "--train-examples", "64", "--test-examples", "16",
        "--val-examples", "16"]
# what a point measured, beside what it was: every column but times, dates and where it ran
SAME = [*RUN_KEY, "status", "selected", "accuracy", "best_accuracy", "val_accuracy", "test_loss", "val_loss",
        "steps", "params", "train_examples", "test_examples", "val_examples", "threads"]


@pytest.fixture
def fake():
    registry.load_module(FAKE)
    yield ["--load", FAKE]
    for name in ("fake_tuned", "fake_plain"):
        TASKS.unregister(name)


@pytest.fixture
def ray_address(monkeypatch):
    """A local Ray (2 CPUs, no dashboard) that this test starts in a process of its own, for the
    sweep to join at ``--address``; stopped with that process. Token authentication on both sides
    (a driver that joins a cluster reads the token only when told to)."""
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    script = ("import sys, ray\n"
              "context = ray.init(num_cpus=2, include_dashboard=False)\n"
              "print(context.address_info['gcs_address'], flush=True)\n"
              "sys.stdin.read()\n"
              "ray.shutdown()\n")
    process = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               text=True)
    address = process.stdout.readline().strip()
    assert address, "the test's Ray did not start"
    yield address
    process.stdin.close()
    process.wait(WAIT_S)


def mqar(tmp_path: Path, name: str, *extra: str) -> Path:
    out = tmp_path / name
    assert main(["scale", "--task", "mqar", "--mechanism", "linear", "--seq", "32", "--seeds", "0",
                 "--threads", "1", "--lr", "1e-3,3e-3", "--memory-limit", "4096", "--out", str(out), *extra,
                 *TINY]) == 0
    return out


def measured(out: Path) -> pd.DataFrame:
    return pd.read_csv(out / "accuracy.csv").sort_values(RUN_KEY)[SAME].reset_index(drop=True)


def contents(out: Path) -> list[str]:
    """Every path in a sweep folder, but submitit's job logs (``slurm/``)."""
    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.relative_to(out).parts[0] != "slurm")


@two_cores
def test_jobs_ray_and_slurm_write_the_serial_sweeps_table_and_folder(tmp_path, capsys):
    serial = mqar(tmp_path, "serial")
    expected = measured(serial)
    assert len(expected) == 2 and set(expected["status"]) == {"ok"} and expected["selected"].sum() == 1
    assert expected["val_accuracy"].between(0, 100).all() and expected["test_loss"].nunique() > 1
    capsys.readouterr()
    fanned = {"jobs": mqar(tmp_path, "jobs", "--jobs", "2")}
    said = capsys.readouterr().err
    assert "(1 thread; local, 2 at once)" in said
    assert re.search(r"running: linear n=32 seed=0 lr=\S+ \(", said)
    fanned["ray"] = mqar(tmp_path, "ray", "--launcher", "ray", "--jobs", "2")  # a Ray started for the sweep
    fanned["slurm"] = mqar(tmp_path, "slurm", "--launcher", "slurm", "--slurm-cluster", "local",
                           "--jobs", "2")
    for name, out in fanned.items():
        pd.testing.assert_frame_equal(measured(out), expected, obj=name)
        assert contents(out) == contents(serial), name
        pd.testing.assert_frame_equal(pd.read_csv(out / "breaking.csv"), pd.read_csv(serial / "breaking.csv"))
    assert any((fanned["slurm"] / "slurm").rglob("*_log.out"))  # submitit's own logs, apart


def test_a_point_whose_ray_worker_dies_is_tried_once_more_then_recorded(fake, tmp_path, ray_address):
    """The fake task kills the Ray worker running it on its first seed + 1 tries: seed 0 once (the
    second try finishes), seed 1 twice (recorded as failed, and the sweep goes on)."""
    tries, out = tmp_path / "tries", tmp_path / "ray"
    tries.mkdir()
    assert main(["scale", "--task", "fake_tuned", *fake, "--mechanism", "softmax", "--seq", "16",
                 "--seeds", "0,1", "--threads", "1", "--memory-limit", "2048", "--launcher", "ray",
                 "--address", ray_address, "--out", str(out), "--", "--die-marker", str(tries)]) == 0
    counted = {p.name: len(p.read_text().splitlines()) for p in tries.iterdir()}
    assert counted == {"softmax-n16-seed0": 2, "softmax-n16-seed1": 2}  # each tried once more, no more
    table = pd.read_csv(out / "accuracy.csv").set_index("seed")
    assert table.loc[0, "status"] == "ok" and table.loc[0, "accuracy"] == 94.0
    assert table.loc[1, "status"] == "error"
    assert "the Ray worker running this point died, and again when tried once more" in table.loc[1, "message"]


@two_cores
def test_ctrl_c_ends_every_running_point_and_resume_finishes_the_sweep(tmp_path):
    asleep, out = tmp_path / "asleep", tmp_path / "sweep"
    asleep.mkdir()
    args = ["scale", "--task", "fake_tuned", "--load", FAKE, "--seq", "16,32", "--threads", "1",
            "--jobs", "2", "--memory-limit", "2048", "--out", str(out), "--", "--sleep-at", "32",
            "--marker", str(asleep)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = Command(args, env, tmp_path)
    command.wait_for(lambda: len(list(asleep.iterdir())) == 2, "both points at n = 32 asleep at once")
    workers = [int(p.read_text()) for p in asleep.iterdir()]
    command.wait_for(lambda: any("running: " in line and line.count("n=32") == 3 for line in command.lines),
                     "a progress line showing both running points")
    os.killpg(command.process.pid, signal.SIGINT)  # Ctrl-C in a terminal
    said = interrupted_line(command, 130)
    kept = re.fullmatch(r"attnbench scale: interrupted \(Ctrl-C\); kept 2 of 4 points in (\S+); "
                        r"finish with: (.+)", said)
    assert kept, said
    assert Path(kept[1]) == out / "accuracy.csv"
    assert wait_until_gone(command.process.pid) == set()
    assert not any(Path(f"/proc/{pid}").exists() for pid in workers)
    resume = shlex.split(kept[2])
    assert resume[-8:-5] == ["--out", str(out), "--resume"] and resume[-5] == "--"  # before the task's
    assert "--jobs" in resume
    done = subprocess.run([sys.executable, "-m", *resume], env={**env, "FAKE_SLEEP_S": "0"}, cwd=tmp_path,
                          capture_output=True, text=True, timeout=WAIT_S)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming: 2 points already" in done.stderr
    table = pd.read_csv(out / "accuracy.csv")
    assert sorted(zip(table["variant"], table["seq_len"], strict=True)) == [
        ("linear", 16), ("linear", 32), ("softmax", 16), ("softmax", 32)] and set(table["status"]) == {"ok"}
    # each point ran on one core of its own: the first two started took one each
    assert set(table["cpus"].astype(str)) == {str(c) for c in usable_cores()[:2]}


def test_slots_share_no_gpu_and_no_core(monkeypatch):
    monkeypatch.setattr("attnbench.sweeps.launchers.usable_cores", lambda: list(range(8)))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert local_slots(2, "cuda", 1) == [Slot((0, 1, 2, 3), "3"), Slot((4, 5, 6, 7), "5")]
    assert local_slots(4, "cpu", 2) == [Slot((0, 1)), Slot((2, 3)), Slot((4, 5)), Slot((6, 7))]
    assert local_slots(1, "cpu", 8) == [Slot()]  # one at a time: as a serial sweep, not pinned
    with pytest.raises(SweepError, match=r"--jobs 3: one GPU per point, and 2 are visible here; valid: "
                                         r"--jobs 1\.\.2"):
        local_slots(3, "cuda", 1)
    with pytest.raises(SweepError, match=r"--jobs 3 x --threads 3 needs 9 cores, and this process may use 8; "
                                         r"valid: --jobs 1\.\.2 at --threads 3"):
        local_slots(3, "cpu", 3)


def test_a_point_runs_on_its_cores_and_gpu_alone():
    """``pin`` as a point's process calls it first: what the process may use afterwards (in a fork
    of this one, which touches nothing but the two settings and its pipe)."""
    before, gpu = usable_cores(), os.environ.get("CUDA_VISIBLE_DEVICES")
    core = before[-1]
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: pin, report, leave without running any of pytest's clean-up
        try:
            pin([core], "7")
            gpu, cores = os.environ["CUDA_VISIBLE_DEVICES"], sorted(os.sched_getaffinity(0))
            os.write(write, f"{gpu} {cores}".encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as answer:
        shown = answer.read().split(" ", 1)
    os.waitpid(pid, 0)
    assert shown == ["7", f"[{core}]"]
    assert (usable_cores(), os.environ.get("CUDA_VISIBLE_DEVICES")) == (before, gpu)  # this one untouched


@pytest.mark.parametrize("argv, message", [
    (["--jobs", str(CORES + 1)], f"--jobs {CORES + 1} x --threads 1 needs {CORES + 1} cores, and this "
                                 f"process may use {CORES}; valid: --jobs 1..{CORES} at --threads 1"),
    (["--jobs", "0"], "argument --jobs: invalid value '0'"),
    (["--address", "127.0.0.1:1"], "--address: for --launcher ray (this sweep's launcher: local)"),
    (["--slurm-partition", "gpu"], "--slurm-partition: for --launcher slurm (this sweep's launcher: local)"),
])
def test_fan_out_mistakes_are_one_line_before_anything_runs(fake, argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["scale", "--task", "fake_tuned", *fake, "--threads", "1", "--out", str(tmp_path / "never"),
              *argv])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and message in err and "Traceback" not in err, err
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize("launcher, module, extra", [("ray", "ray", []),
                                                     ("slurm", "submitit", ["--slurm-cluster", "local"])])
def test_a_launcher_not_installed_names_its_install_command(fake, launcher, module, extra, monkeypatch,
                                                             tmp_path, capsys):
    monkeypatch.setitem(sys.modules, module, None)  # as if not installed: importing it fails
    with pytest.raises(SystemExit):
        main(["scale", "--task", "fake_tuned", *fake, "--threads", "1", "--launcher", launcher, *extra,
              "--out", str(tmp_path)])
    assert (f"--launcher {launcher} needs {module}, which is not installed here: "
            f"pip install 'attnbench[{launcher}]'") in capsys.readouterr().err


def test_the_kernel_sweep_refuses_the_accuracy_sweeps_launcher_flags(capsys):
    with pytest.raises(SystemExit):
        main(["scale", "--jobs", "2"])
    assert "--jobs is for the accuracy sweep: add --task" in capsys.readouterr().err
