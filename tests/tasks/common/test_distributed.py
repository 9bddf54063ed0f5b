"""Two processes under torchrun with the gloo backend on the CPU: DDP, sharded data, rank-0 records."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import torch.distributed as dist

from tests.tasks.imagenet.tiny import make_tiny_imagenet

ROOT = Path(__file__).resolve().parents[3]  # the checkout


def test_two_process_torchrun_trains_and_records_once(tmp_path):
    assert dist.is_gloo_available()
    data = make_tiny_imagenet(tmp_path / "data", train_per_class=8, val_per_class=3)
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}  # attnbench importable from tmp_path
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "attnbench", "run", "--mechanism", "softmax", "--task", "imagenet", "--data", str(data),
           "--size", "micro", "--img-size", "32", "--epochs", "2", "--batch-size", "4", "--workers", "0",
           "--mechanism-init", "random"]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    table = pd.read_csv(tmp_path / "results" / "local" / "imagenet.csv")  # the default, git-ignored
    assert len(table) == 1  # rank 0 alone writes
    row = table.iloc[0]
    assert row["world_size"] == 2 and row["epochs"] == 2 and row["device"] == "cpu"
    assert row["skipped_images"] == 2  # each corrupt file counted once, whichever rank met it
    runs = list((tmp_path / "results" / "runs").iterdir())
    assert len(runs) == 1 and (runs[0] / "checkpoint.pt").is_file()  # one folder, named by rank 0
    assert json.loads((runs[0] / "meta.json").read_text())["world_size"] == 2
    assert done.stdout.count("imagenet | softmax") == 1  # rank-0 logging
