"""Tables that know their version: old layouts upgrade with the documented defaults, current ones
pass unchanged, newer ones are refused in one line; writers stamp rows and meta.json."""

from __future__ import annotations

import io
import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

from attnbench.results.schema import (
    STEPS,
    VERSION_COLUMN,
    SchemaError,
    current,
    stamp,
    stamped,
    upgrade,
    upgrade_meta,
)
from attnbench.results.tables import ResultsError, append_row, read_table, read_task_table, write_meta
from attnbench.sweeps import accuracy
from attnbench.sweeps import kernel as sweep
from attnbench.sweeps.accuracy import read_points
from attnbench.sweeps.kernel import COLUMNS, read_rounds, read_sweep
from attnbench.sweeps.resolution import ProbeFolder, read_probe

REFERENCE = Path(__file__).resolve().parents[1] / "results" / "reference"

# scale.csv as the first attnbench wrote it (results/reference/scale-cpu-reference has this layout)
FIRST_SCALE = ["mechanism", "n", "mode", "batch", "heads", "head_dim", "dtype", "device", "threads",
               "layout", "options", "backend", "time_ms_median", "time_ms_iqr", "runs", "peak_mem_mib",
               "flops", "gflops", "params", "status", "message"]


def _first_scale_rows() -> pd.DataFrame:
    row = dict.fromkeys(FIRST_SCALE, 1.0) | {"mechanism": "softmax", "mode": "fwd", "status": "ok",
                                             "message": "", "options": "{}"}
    return pd.DataFrame([row, row | {"mechanism": "linear", "n": 2.0}])


def test_every_kind_documents_increasing_steps():
    for kind, steps in STEPS.items():
        versions = [s.version for s in steps]
        assert versions == sorted(set(versions)) and all(v > 1 for v in versions), kind
        assert all(s.why and s.columns for s in steps), kind
        assert current(kind) == (versions[-1] if versions else 1)


def test_an_old_scale_table_upgrades_to_the_current_columns_with_their_defaults():
    table = upgrade(_first_scale_rows(), "scale")
    assert set(COLUMNS) <= set(table.columns)
    assert list(table["variant"]) == ["softmax", "linear"]  # a row without a variant is its mechanism
    assert not table["causal"].any() and not table["compiled"].any()  # neither existed: neither was used
    for column in ("noisy", "time_ms_q1", "kv_heads", "cache_bytes", "prefill_ms", "machine_gflops"):
        assert table[column].isna().all(), column  # not measured then: empty, never a made-up value
    assert (table[VERSION_COLUMN] == current("scale")).all()
    assert list(table["time_ms_median"]) == [1.0, 1.0]  # what the row held stays


def test_an_unversioned_table_of_a_later_layout_keeps_its_values():
    old = _first_scale_rows().assign(causal=[True, False], variant=["softmax[x=1]", math.nan])
    table = upgrade(old, "scale")
    assert list(table["causal"]) == [True, False]
    assert list(table["variant"]) == ["softmax[x=1]", "linear"]


def test_a_current_table_passes_through_unchanged():
    current_rows = upgrade(_first_scale_rows(), "scale").assign(causal=True, kv_heads=1.0, variant="v")
    pd.testing.assert_frame_equal(upgrade(current_rows, "scale"), current_rows)


def test_only_rows_older_than_a_step_take_its_default():
    """A folder resumed by a newer attnbench holds rows of both layouts."""
    old = {"variant": "softmax", "seq_len": 64, "seed": 0, "status": "ok", "mechanism": "softmax"}
    new = old | {"seed": 1, "selected": False, "lr": 0.01, VERSION_COLUMN: current("accuracy")}
    table = upgrade(pd.DataFrame([old, old | {"status": "error"}, new]), "accuracy")
    assert list(table["selected"]) == [False, False, False]  # latest row of seed 0 failed; seed 1 kept
    table = upgrade(pd.DataFrame([old | {"status": "error"}, old, new]), "accuracy")
    assert list(table["selected"]) == [False, True, False]  # one run per point: its latest finished row
    assert list(table["lr"].isna()) == [True, True, False]


def test_a_table_from_a_newer_attnbench_is_refused_in_one_line(tmp_path):
    newer = _first_scale_rows().assign(**{VERSION_COLUMN: current("scale") + 1})
    with pytest.raises(SchemaError) as caught:
        upgrade(newer, "scale", "x/scale.csv")
    message = str(caught.value)
    assert "\n" not in message and "x/scale.csv" in message
    assert f"schema version {current('scale') + 1}" in message and f"at most {current('scale')}" in message
    newer.to_csv(tmp_path / "scale.csv", index=False)
    with pytest.raises(ResultsError, match=r"scale\.csv: schema version .* newer than this attnbench"):
        read_sweep(tmp_path / "scale.csv")
    with pytest.raises(SchemaError, match="no table kind 'scales'; valid kinds: scale, rounds"):
        upgrade(newer, "scales")


def test_rows_written_keep_their_version(tmp_path):
    path = tmp_path / "scale.csv"
    append_row(path, stamped(_first_scale_rows().iloc[0].to_dict(), "scale"), COLUMNS)
    assert list(pd.read_csv(path)[VERSION_COLUMN]) == [current("scale")]  # on disk, not only once read
    table = read_sweep(path)
    assert list(table[VERSION_COLUMN]) == [current("scale")]
    assert pd.isna(table.iloc[0]["variant"])  # a stamped row is taken at its word: nothing filled in
    for kind, reader, name in (("rounds", read_rounds, "rounds.csv"), ("resolution", read_probe, "res.csv")):
        assert VERSION_COLUMN in reader(tmp_path / name).columns, kind  # an absent table: current columns


def test_meta_json_carries_the_version_and_old_settings_upgrade(tmp_path):
    write_meta(tmp_path / "meta.json", stamp({"sweep": {"batch": 1}}, "scale"))
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta[VERSION_COLUMN] == current("scale")
    old = upgrade_meta({"sweep": {"batch": 1}}, "scale")  # from before --causal and --kv-heads
    assert old["sweep"] == {"batch": 1, "causal": False, "kv_heads": None}
    assert upgrade_meta({"sweep": {"causal": True}}, "scale")["sweep"]["causal"] is True
    with pytest.raises(SchemaError, match=r"^meta\.json: schema version 99 of a accuracy table is newer"):
        upgrade_meta({VERSION_COLUMN: 99}, "accuracy")


def test_a_sweep_writes_version_into_every_row_and_its_meta(tmp_path):
    from tests.test_sweep import small_config

    out = tmp_path / "run"
    sweep.run_sweep(small_config(["softmax"], seq=(16,), rounds=1, retries=0), out, resume=False,
                    argv=["test"])
    assert (pd.read_csv(out / "scale.csv")[VERSION_COLUMN] == current("scale")).all()
    assert (pd.read_csv(out / "rounds.csv")[VERSION_COLUMN] == current("rounds")).all()
    assert json.loads((out / "meta.json").read_text())[VERSION_COLUMN] == current("scale")


@pytest.mark.parametrize("folder", [sweep.KernelFolder, accuracy.AccuracyFolder, ProbeFolder],
                         ids=lambda f: f.__name__)
def test_every_sweep_kind_stamps_what_its_folder_writes(folder, tmp_path):
    """The shared sweep-folder base stamps rows and meta.json with the version of the kind's table."""
    written = folder(SimpleNamespace(device="cpu", threads=1), tmp_path)
    written.append([{"mechanism": "softmax", "status": "ok"}])
    assert (pd.read_csv(written.csv)[VERSION_COLUMN] == current(folder.schema)).all()
    written.write_meta({**written.meta(["test"], resume=False), "sweep": {}})
    assert json.loads(written.meta_path.read_text())[VERSION_COLUMN] == current(folder.schema)
    assert written.recorded()[VERSION_COLUMN] == current(folder.schema)


# ---- the committed reference folders, written before versions existed ------------------------


def test_the_oldest_committed_kernel_sweep_reads_fits_and_summarises(tmp_path):
    folder = tmp_path / "scale-cpu-reference"
    shutil.copytree(REFERENCE / "scale-cpu-reference", folder)  # finish writes beside its table
    table = read_sweep(folder / "scale.csv")
    assert VERSION_COLUMN not in pd.read_csv(folder / "scale.csv").columns
    assert set(COLUMNS) <= set(table.columns) and (table["variant"] == table["mechanism"]).all()
    fits = sweep.finish(folder, fit_min_n=1024, log=io.StringIO())
    assert set(fits["mechanism"]) == set(table["mechanism"])
    assert "no noise flags in this table" in sweep.summary(folder, fits)


def test_committed_accuracy_resolution_and_task_tables_read_through_upgrade():
    points = read_points(REFERENCE / "accuracy-listops-cpu" / "accuracy.csv")
    assert {"lr", "weight_decay", "val_accuracy", "selected"} <= set(points.columns)
    assert points["lr"].isna().all() and points["selected"].sum() == (points["status"] == "ok").sum()
    assert "breaking length" in accuracy.summary(REFERENCE / "accuracy-listops-cpu")
    probe = read_probe(REFERENCE / "resolution-coco-cpu" / "resolution.csv")
    assert (probe[VERSION_COLUMN] == current("resolution")).all()
    runs = read_task_table(REFERENCE / "imagenet.csv")  # from before smoke limits
    assert not runs["limited"].any() and runs["max_steps"].isna().all()
    raw = read_table(REFERENCE / "imagenet.csv")
    pd.testing.assert_frame_equal(runs[raw.columns], raw)  # upgrading adds, never alters
