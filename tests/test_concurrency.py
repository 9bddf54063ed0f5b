"""Concurrent runs lose nothing: appends from many processes under the table's lock, a reader
that never sees half a table, run folders and temporary files of their own."""

from __future__ import annotations

import multiprocessing
import re
import time
from pathlib import Path

import pandas as pd
import pytest

from attnbench.results import tables as results

WRITERS, ROWS = 4, 50


def _append_many(path: str, writer: int, start: multiprocessing.synchronize.Event) -> None:
    """A writer process: wait for the others, then append ``ROWS`` rows one at a time."""
    start.wait()
    for i in range(ROWS):
        results.append_row(Path(path), {"writer": writer, "i": i, "text": "x" * 200}, ["writer", "i"])


def test_appends_from_many_processes_at_once_lose_no_row_and_readers_never_see_half_a_table(tmp_path):
    table = tmp_path / "local" / "imagenet.csv"
    context = multiprocessing.get_context("spawn")  # a clean interpreter per writer, as separate runs are
    start = context.Event()
    writers = [context.Process(target=_append_many, args=(str(table), w, start)) for w in range(WRITERS)]
    for w in writers:
        w.start()
    start.set()
    seen = 0
    while any(w.is_alive() for w in writers):  # meanwhile, read as a plot or a report would
        if table.exists():
            rows = len(pd.read_csv(table))  # a half-written table would fail to parse or lose rows
            assert rows >= seen
            seen = rows
        time.sleep(0.01)
    assert [w.exitcode for w in writers] == [0] * WRITERS
    written = pd.read_csv(table)
    assert len(written) == WRITERS * ROWS
    assert set(zip(written["writer"], written["i"], strict=True)) == {
        (w, i) for w in range(WRITERS) for i in range(ROWS)}
    assert list(written.columns[:2]) == ["writer", "i"]
    assert sorted(p.name for p in table.parent.iterdir()) == [".imagenet.csv.lock", "imagenet.csv"]


def test_runs_started_in_the_same_second_get_folders_of_their_own():
    from attnbench.sweeps.kernel import default_out_dir  # here: the writer processes above need no torch

    names = [results.new_run_dir("imagenet-set-micro", seed=0).name for _ in range(50)]
    assert len(set(names)) == len(names)
    assert all(re.fullmatch(r"\d{8}-\d{6}-imagenet-set-micro-seed0-[0-9a-f]{8}", n) for n in names)
    assert results.new_run_dir("imagenet-set-micro", seed=1).name.split("-")[-2] == "seed1"
    sweeps = {default_out_dir(results.RESULTS) for _ in range(20)}
    assert len(sweeps) == 20 and all(s.parent == results.RUNS for s in sweeps)


def test_a_replaced_file_is_written_through_a_temporary_file_of_its_own(tmp_path):
    target = tmp_path / "checkpoint.pt"
    target.write_text("old")
    with results.replacing(target) as first, results.replacing(target) as second:
        assert first != second and first.parent == second.parent == tmp_path  # two runs, two files
        first.write_text("one")
        second.write_text("two")
        assert target.read_text() == "old"  # nothing replaced before the block ends
    assert target.read_text() == "one"  # the outer block ended last
    with pytest.raises(RuntimeError), results.replacing(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed while writing")
    assert target.read_text() == "one"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]  # no temporary file left
