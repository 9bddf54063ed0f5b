"""Nothing outlives its command: a sweep killed with SIGKILL leaves no process and no temporary
folder behind; Ctrl-C (SIGINT) or SIGTERM ends ``scale`` and ``run`` with one line saying what
was kept and the command that resumes, exit status 130 (143 for SIGTERM), never a traceback;
a reader that goes away (``attnbench list | head -1``) ends a command quietly, status 141.

Each test runs the real command in a process group of its own and waits on what it prints or
writes, never on the clock; the time-outs only keep a broken build from hanging the suite.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

from attnbench.interrupt import Interrupted, command_with, interrupts

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="reads /proc; pidfds are Linux's")

# `sleepy_from_32` measures at once at n = 16 and, at n >= 32, writes its pid to $SLEEPY_MARKER and
# sleeps: a sweep over 16,32 is then mid-configuration, in a worker, for as long as a test needs.
# SLEEPY_S=0 in the environment lets a resumed sweep finish.
FAULTY = str(Path(__file__).with_name("faulty_mechanisms.py"))
WAIT_S = 240  # for a line or a file, before a test gives up: a loaded CI machine is slow, never this slow


class Command:
    """``python -m attnbench ARGS`` in a process group of its own, its stderr collected as it comes."""

    def __init__(self, args: list[str], env: dict[str, str], cwd: Path) -> None:
        self.process = subprocess.Popen([sys.executable, "-m", "attnbench", *args], cwd=cwd, env=env,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                        start_new_session=True)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.process.stderr:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, condition, what: str) -> None:
        end = time.monotonic() + WAIT_S
        while not condition():
            assert self.process.poll() is None, f"ended ({self.process.returncode}) before {what}:\n" + \
                "\n".join(self.lines[-30:])
            assert time.monotonic() < end, f"no {what} after {WAIT_S} s:\n" + "\n".join(self.lines[-30:])
            time.sleep(0.05)

    def finish(self) -> tuple[int, list[str]]:
        """Exit status and stderr once the command ended (and every holder of its stderr, its
        fork server too, closed it)."""
        status = self.process.wait(WAIT_S)
        self.reader.join(WAIT_S)
        return status, self.lines


def group(pgid: int) -> set[int]:
    """The live processes of a process group (its descendants, wherever they were reparented); a
    zombie is dead, only not yet reaped by whoever adopted it."""
    pids = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            state, _, group_id = (entry / "stat").read_text().rsplit(")", 1)[1].split()[:3]
        except (OSError, ValueError):
            continue
        if int(group_id) == pgid and state != "Z":
            pids.add(int(entry.name))
    return pids


def interrupted_line(command: Command, status: int) -> str:
    """The one line an interrupted command ends with, once it has ended with ``status`` and
    printed no traceback."""
    code, lines = command.finish()
    assert code == status
    assert not any("Traceback" in line for line in lines), "\n".join(lines)
    said = [line for line in lines if ": interrupted (" in line]
    assert len(said) == 1 and said[0] == lines[-1], "\n".join(lines[-30:])
    return said[0]


def wait_until_gone(pgid: int) -> set[int]:
    end = time.monotonic() + WAIT_S
    while (left := group(pgid)) and time.monotonic() < end:
        time.sleep(0.05)
    return left


@pytest.fixture
def sweep(tmp_path):
    """A ``scale`` sweep of the sleepy mechanism over n = 16, 32, with a private temporary folder;
    started by ``sweep()``, which returns it once its worker sleeps at n = 32."""
    marker, tmp = tmp_path / "asleep", tmp_path / "tmp"
    tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(tmp), "OMP_NUM_THREADS": "1", "SLEEPY_MARKER": str(marker)}
    out = tmp_path / "sweep"
    args = ["scale", "--load", FAULTY, "--mechanism", "sleepy_from_32", "--seq", "16,32", "--heads", "2",
            "--head-dim", "8", "--threads", "1", "--min-time", "0.01", "--rounds", "1", "--retries", "0",
            "--budget", "600", "--out", str(out)]

    def start(asleep: bool = True) -> Command:
        command = Command(args, env, tmp_path)
        command.out, command.tmp, command.env = out, tmp, env
        if asleep:
            command.wait_for(marker.exists, "worker asleep at n=32")
            command.worker = int(marker.read_text())
        return command

    return start


def test_a_killed_sweep_leaves_no_process_and_no_temporary_folder(sweep):
    command = sweep()
    pgid = command.process.pid
    assert command.worker in group(pgid)  # the worker, the fork server, the resource tracker, the probe
    assert len(group(pgid)) >= 4
    command.process.kill()
    command.process.wait()
    assert wait_until_gone(pgid) == set(), "processes of the killed sweep still alive"  # the worker too
    left = [p.name for p in command.tmp.iterdir() if p.name.startswith(("attnbench-", "pymp-"))]
    assert left == [], f"temporary folders left behind: {left}"
    assert len(pd.read_csv(command.out / "scale.csv")) == 1  # n = 16, measured before the kill


@pytest.mark.parametrize("signum, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)],
                         ids=["ctrl-c", "sigterm"])
def test_an_interrupted_sweep_says_what_it_kept_and_how_to_resume(sweep, signum, status):
    command = sweep()
    pgid = command.process.pid
    if signum == signal.SIGINT:  # Ctrl-C in a terminal signals the whole group: the workers too
        os.killpg(pgid, signum)
    else:  # `kill PID`
        command.process.send_signal(signum)
    said = interrupted_line(command, status)
    kept = re.fullmatch(r"attnbench scale: interrupted \((\S+)\); kept 1 of 2 rows in (\S+); "
                        r"finish with: (.+)", said)
    assert kept, said
    assert kept[1] == ("Ctrl-C" if signum == signal.SIGINT else "SIGTERM")
    assert Path(kept[2]) == command.out / "scale.csv"
    assert wait_until_gone(pgid) == set()
    if signum == signal.SIGINT:  # the command it printed finishes the sweep
        resume = shlex.split(kept[3])
        assert resume[0] == "attnbench" and resume[-3:] == ["--out", str(command.out), "--resume"]
        done = subprocess.run([sys.executable, "-m", *resume], env={**command.env, "SLEEPY_S": "0"},
                              capture_output=True, text=True, timeout=WAIT_S)
        assert done.returncode == 0, done.stderr[-3000:]
        table = pd.read_csv(command.out / "scale.csv")
        assert sorted(table["n"]) == [16, 32] and set(table["status"]) == {"ok"}


def test_ctrl_c_while_the_fork_server_starts_prints_no_traceback(sweep):
    """The fork server ignores Ctrl-C only after its imports (seconds): it starts with it blocked."""
    command = sweep(asleep=False)

    def fork_server_started() -> bool:
        for pid in group(command.process.pid):
            try:
                if b"multiprocessing.forkserver" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    return True
            except OSError:
                pass
        return False

    command.wait_for(fork_server_started, "the fork server")
    os.killpg(command.process.pid, signal.SIGINT)  # while it imports torch and the mechanisms
    interrupted_line(command, 130)
    assert wait_until_gone(command.process.pid) == set()


def test_ctrl_c_ends_a_training_run_with_its_checkpoint_and_the_resume_command(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = Command(["run", "--task", "imagenet", "--mechanism", "softmax", "--limit-train", "16",
                       "--batch-size", "16", "--limit-val", "8", "--eval-every", "0", "--epochs", "1000",
                       "--threads", "1", "--out", str(out), "--results", str(tmp_path / "imagenet.csv")],
                      env, tmp_path)
    command.wait_for(lambda: any(line.startswith("epoch 1/1000:") for line in command.lines), "first epoch")
    os.killpg(command.process.pid, signal.SIGINT)  # Ctrl-C in a terminal
    said = interrupted_line(command, 130)
    kept = re.fullmatch(r"attnbench run: interrupted \(Ctrl-C\); kept (\S+) with its checkpoint after epoch "
                        r"(\d+)/1000; resume with: (.+)", said)
    assert kept, said
    assert Path(kept[1]) == out and int(kept[2]) >= 1
    resume = shlex.split(kept[3])
    assert resume[-2:] == ["--resume", str(out)] and "--out" not in resume
    assert resume[1:5] == ["run", "--task", "imagenet", "--mechanism"]
    assert (out / "checkpoint.pt").is_file()
    assert [p.name for p in out.iterdir() if p.name.endswith(".tmp")] == []  # no half-written checkpoint
    assert not (tmp_path / "imagenet.csv").exists()  # no row for a run that did not finish


def test_an_interrupt_that_python_swallows_is_raised_again():
    """Ctrl-C that lands in a fork handler (a data loader starting its workers) or a ``__del__``
    is only printed as "Exception ignored"; inside ``interrupts`` it is raised again after."""
    swallowed = []

    class Finalised:
        def __del__(self):
            try:
                os.kill(os.getpid(), signal.SIGINT)
                for _ in range(1000):
                    time.sleep(0.01)  # the handler runs in here, where Python cannot raise
            finally:
                swallowed.append(True)

    before = signal.getsignal(signal.SIGINT)  # Python's default, or SIG_IGN in a background job
    with pytest.raises(Interrupted) as caught, interrupts():
        Finalised()
        assert swallowed == [True]
        for _ in range(1000):
            time.sleep(0.01)  # ... and again in here
    assert caught.value.signum == signal.SIGINT and caught.value.exit_status == 130
    assert signal.getsignal(signal.SIGINT) is before  # the old handler again


def test_the_resume_command_is_the_command_with_its_output_options_replaced():
    argv = ["attnbench", "scale", "--seq", "16,32", "--out=old dir", "--resume", "--opt", "set.m=4"]
    assert command_with(argv, {"--out": True, "--resume": False}, ["--out", "new dir", "--resume"]) == (
        "attnbench scale --seq 16,32 --opt set.m=4 --out 'new dir' --resume")
    argv = ["attnbench", "run", "--task", "glue", "--out", "x", "--resume", "y", "--seed", "1"]
    assert command_with(argv, {"--out": True, "--resume": True}, ["--resume", "z"]) == (
        "attnbench run --task glue --seed 1 --resume z")


def test_a_reader_that_goes_away_ends_the_command_quietly():
    listing = subprocess.Popen([sys.executable, "-m", "attnbench", "list"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    listing.stdout.close()  # `| head -0`: every write to stdout now fails
    _, err = listing.communicate(timeout=WAIT_S)
    assert listing.returncode == 128 + signal.SIGPIPE
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
