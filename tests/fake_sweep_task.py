"""A fake task for the tests of the accuracy sweep's launchers and tuning: no training, its scores
a known function of mechanism, n and learning rate, so that every table can be checked exactly.

    softmax                 lr 1e-3: validation 95, test 94    lr 3e-3: validation 90, test 99
    linear, n < 32          validation 95, test 95 at either
    linear, n >= 32         lr 1e-3: validation 50, test 60    lr 3e-3: validation 92, test 90

(the task's own learning rate is 1e-3): untuned, linear breaks at 32; tuned by validation it does
not, and softmax keeps 1e-3 although its test accuracy is higher at 3e-3. Each row records the
cores the run may use (``cpus``) and ``CUDA_VISIBLE_DEVICES`` (``gpu``).

On demand it misbehaves: ``--sleep-at N`` sleeps ``$FAKE_SLEEP_S`` seconds (300 unless set) at
n >= N, after writing its pid to ``--marker DIR``/<mechanism>-n<N>; ``--die-marker DIR`` kills the
process that started its fork server (a Ray worker, under ``--launcher ray``) on its first seed + 1
tries, counted in that folder. Loaded with ``--load`` (never imported); ``fake_plain`` is the same
task without a validation split.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from attnbench import Task, register_task
from attnbench.results.tables import append_row

OWN_LR = 1e-3


def scores(mechanism: str, n: int, lr: float) -> tuple[float, float]:
    """(validation accuracy, test accuracy) of a run."""
    low = abs(lr - OWN_LR) < 1e-12
    if mechanism == "linear" and n >= 32:
        return (50.0, 60.0) if low else (92.0, 90.0)
    if mechanism == "linear":
        return 95.0, 95.0
    return (95.0, 94.0) if low else (90.0, 99.0)


def grandparent(pid: int) -> int:
    """The parent of ``pid``'s parent (/proc)."""
    parent = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    return int(Path(f"/proc/{parent}/stat").read_text().rsplit(")", 1)[1].split()[1])


@register_task
class FakeTuned(Task):
    name, summary = "fake_tuned", "a fake task with a validation split (launcher and tuning tests)"
    validation_split = True
    sweep_presets = {device: {"seq": [16, 32], "mechanisms": ["softmax", "linear"], "seeds": [0], "args": []}
                     for device in ("cpu", "cuda")}

    @classmethod
    def add_arguments(cls, parser):
        for flag, kind in (("--seq-len", int), ("--seed", int), ("--lr", float), ("--weight-decay", float),
                           ("--threads", int), ("--time-budget", float), ("--results", Path), ("--out", Path),
                           ("--sleep-at", int), ("--marker", Path), ("--die-marker", Path)):
            parser.add_argument(flag, type=kind)
        parser.add_argument("--device", default="cpu")

    def run(self, args):
        if args.die_marker is not None:
            tries = args.die_marker / f"{args.mechanism}-n{args.seq_len}-seed{args.seed}"
            count = len(tries.read_text().splitlines()) + 1 if tries.exists() else 1
            tries.write_text("try\n" * count)
            if count <= args.seed + 1:
                os.kill(grandparent(os.getpid()), signal.SIGKILL)  # the worker that runs this point
                time.sleep(60)  # until this process follows it (attnbench.measure.worker.exit_with)
        if args.sleep_at is not None and args.seq_len >= args.sleep_at:
            (args.marker / f"{args.mechanism}-n{args.seq_len}").write_text(str(os.getpid()))
            time.sleep(float(os.environ.get("FAKE_SLEEP_S", "300")))
        lr = args.lr if args.lr is not None else OWN_LR
        val, test = scores(args.mechanism, args.seq_len, lr)
        args.out.mkdir(parents=True, exist_ok=True)
        row = {"task": self.name, "mechanism": args.mechanism, "seq_len": args.seq_len, "seed": args.seed,
               "accuracy": test, "best_accuracy": test,
               "val_accuracy": val if self.validation_split else None,
               "chance": 10.0, "steps": 1, "step_ms": 1.0 if args.mechanism == "linear" else 2.0,
               "peak_mem_mib": 1.0, "cpus": ",".join(map(str, sorted(os.sched_getaffinity(0)))),
               "gpu": os.environ.get("CUDA_VISIBLE_DEVICES", ""), "status": "ok"}
        append_row(args.results, row, list(row))
        return 0


@register_task
class FakePlain(FakeTuned):
    name, summary = "fake_plain", "the fake task without a validation split"
    validation_split = False
