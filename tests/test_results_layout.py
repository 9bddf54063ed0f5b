"""Results apart from the code, seeds told from repeats, and a README that stands alone.

- What a user's runs write never touches a tracked file: a fresh clone stays clean after the
  README's two commands (the first in its smoke form), and every default output path is ignored.
- ``attnbench.results.aggregate`` groups by the full configuration and counts distinct seeds.
- The docs name no path outside the repository, and the paths the README names exist.
"""

from __future__ import annotations

import math
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from attnbench.results import tables as results
from attnbench.results.aggregate import aggregate, config_columns, format_spread
from attnbench.sweeps.kernel import default_out_dir
from attnbench.task import TASKS, Task, get_task, register_task
from tests.test_readme import readme_commands

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ["--max-steps", "2", "--limit-train", "64", "--limit-val", "8"]  # 64: one batch of the preset


def git(*args: str, cwd: Path) -> str:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout


def tracked_tree() -> list[str]:
    """What a clone of this checkout would hold: tracked files and new ones git does not ignore."""
    listed = git("ls-files", "-z", "--cached", "--others", "--exclude-standard", cwd=ROOT).split("\0")
    return sorted({f for f in listed if f and (ROOT / f).is_file()})


needs_git = pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(),
                               reason="needs git and a git checkout")


# ---- a fresh clone stays clean ------------------------------------------------------------------


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    """The checkout's tree copied into a new repository and committed: a fresh clone."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs git and a git checkout")
    target = tmp_path_factory.mktemp("clone")
    files = tracked_tree()
    for name in files:
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, target / name)
    git("init", "-q", cwd=target)
    git("add", "-A", cwd=target)
    git("-c", "user.name=attnbench", "-c", "user.email=tests@attnbench", "commit", "-q", "-m", "clone",
        cwd=target)
    committed = [f for f in git("ls-files", "-z", cwd=target).split("\0") if f]
    assert committed == files, f"in the tree yet ignored by .gitignore: {sorted(set(files) - set(committed))}"
    return target


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    from tasks.common.cache import cache_root

    env = {**os.environ, "ATTNBENCH_CACHE": str(cache_root()),  # the embedded data, not rebuilt
           "PYTHONPATH": str(cwd), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{shlex.join(cmd)}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done


@needs_git
def test_a_fresh_clone_stays_clean_after_both_readme_commands(clone):
    main_job, tests = (c.split(" && ", 1)[1] for c in readme_commands())  # after the set-up
    reference = (clone / "results" / "reference" / "imagenet.csv").read_bytes()
    first = [sys.executable if w == "python" else w for w in shlex.split(main_job)] + SMOKE
    done = _run(first, clone)
    assert "results/local/imagenet.csv" in done.stdout
    table = pd.read_csv(clone / "results" / "local" / "imagenet.csv")
    assert len(table) == 1 and table["limited"].iloc[0]
    assert len(list((clone / "results" / "runs").glob("*-imagenet-set-*/meta.json"))) == 1
    # plots drawn after a run land beside the user's table, also ignored
    _run([sys.executable, "-m", "attnbench", "plot", "results/local", "--include-limited"], clone)
    assert list((clone / "results" / "local").glob("*.png")), "attnbench plot drew nothing beside the table"
    # the second command in small: pytest writes its cache and byte code
    assert shlex.split(tests)[:3] == ["python", "-m", "pytest"]
    _run([sys.executable, "-m", "pytest", "-q", "tests/test_readme.py::test_ci_runs_the_readme_test_command"],
         clone)
    assert (clone / "results" / "reference" / "imagenet.csv").read_bytes() == reference
    assert git("status", "--porcelain", "--untracked-files=all", cwd=clone) == ""


@needs_git
def test_every_default_output_path_is_ignored_and_the_reference_runs_are_not():
    def ignored(path: Path) -> bool:
        check = subprocess.run(["git", "check-ignore", "-q", "--no-index", str(path)], cwd=ROOT)
        return check.returncode == 0

    defaults = [results.local_table("imagenet"), results.LOCAL / "accuracy_imagenet_mnist5k_48.png",
                results.new_run_dir("imagenet-set-micro") / "checkpoint.pt",
                default_out_dir(results.RESULTS) / "scale.csv",  # attnbench scale
                results.new_run_dir("resolution-coco") / "resolution.csv",  # attnbench resolution
                results.RESULTS / "imagenet.csv"]  # an old default, now nobody's: ignored too
    assert [p for p in defaults if not ignored(p)] == []
    assert all(str(p).startswith("results/") and "reference" not in p.parts for p in defaults)
    assert not ignored(results.REFERENCE / "imagenet.csv") and not ignored(results.RESULTS / "README.md")
    assert ignored(results.REFERENCE / "some-run" / "checkpoint.pt")  # reference runs: tables, not weights
    assert (ROOT / results.REFERENCE / "imagenet.csv").is_file()


# ---- seeds, not repeats -------------------------------------------------------------------------


def _row(seed: int, top1: float, **changes) -> dict:
    row = dict(task="imagenet", mechanism="set", size="micro", dataset="mnist5k", img_size=48, epochs=8,
               seed=seed, top1=top1, gflops=0.0265, options="", mechanism_init="kmeans (torch)",
               batch_size=64, device="cpu", status="ok", limited=False, max_steps=math.nan,
               limit_train=math.nan, limit_val=math.nan, date=f"2026-11-25T14:0{seed}", wall_s=100.0 + seed)
    return {**row, **changes}


def _table() -> pd.DataFrame:
    rows = [_row(0, 96.0), _row(1, 97.0), _row(2, 98.0),
            _row(0, 99.0, date="2026-11-26T09:00:00"),  # seed 0 again: a repeat, the latest stands
            _row(3, 10.0, limited=True, max_steps=2, limit_train=16, limit_val=8, epochs=1),  # a smoke run
            _row(4, 90.0, epochs=1),  # a quick --epochs 1 check
            _row(5, 80.0, img_size=32),  # another image side
            _row(6, 70.0, options="m=16"),  # another option
            _row(0, 55.0, mechanism="softmax", mechanism_init="random"),
            _row(1, 0.0, status="error")]  # a failed run is no seed
    return pd.DataFrame(rows)


def test_aggregate_counts_seeds_not_repeats_and_keeps_configurations_apart():
    stats = aggregate(_table(), ["top1", "wall_s"])
    assert len(stats) == 6  # full set runs, smoke run, --epochs 1, 32 px, m=16, softmax
    full = stats.iloc[0]  # configurations in order of first appearance
    assert (full["mechanism"], full["epochs"], full["img_size"], full["limited"]) == ("set", 8, 48, False)
    assert (full["n_seeds"], full["n_repeats"], full["seed_list"]) == (3, 1, "0,1,2")
    assert full["top1_mean"] == pytest.approx((99 + 97 + 98) / 3)  # the repeat replaced seed 0's first row
    assert full["top1_std"] == pytest.approx(pd.Series([99.0, 97.0, 98.0]).std())
    assert full["top1_n"] == 3 and full["wall_s_mean"] == pytest.approx(101.0)
    quick = (stats["epochs"] == 1) & ~stats["limited"]
    for where in (stats["limited"], quick, stats["img_size"] == 32, stats["options"] == "m=16"):
        alone = stats[where]
        assert len(alone) == 1 and alone["n_seeds"].iloc[0] == 1 and math.isnan(alone["top1_std"].iloc[0])
    smoke = stats[stats["limited"]].iloc[0]
    assert (smoke["top1_mean"], smoke["max_steps"], smoke["n_repeats"]) == (10.0, 2, 0)
    softmax = stats[stats["mechanism"] == "softmax"].iloc[0]
    assert (softmax["n_seeds"], softmax["top1_mean"]) == (1, 55.0)  # its failed seed 1 is not there


def test_aggregate_round_trips_a_csv_and_matches_rows_from_before_the_limit_columns(tmp_path):
    old = _table().drop(columns=["limited", "max_steps", "limit_train", "limit_val"]).iloc[:3]
    new = pd.DataFrame([_row(7, 91.0, options="")])  # a later run of the same configuration
    path = tmp_path / "imagenet.csv"
    results.write_table(path, pd.concat([old, new], ignore_index=True))
    stats = aggregate(pd.read_csv(path), ["top1"])
    assert len(stats) == 1 and stats["n_seeds"].iloc[0] == 4 and stats["seed_list"].iloc[0] == "0,1,2,7"
    assert bool(stats["limited"].iloc[0]) is False


def test_config_columns_are_the_settings_not_the_measurements():
    table = _table()
    columns = config_columns(table)
    for setting in ("task", "dataset", "mechanism", "size", "epochs", "options", "limited", "max_steps",
                    "limit_train", "limit_val", "img_size", "mechanism_init", "batch_size", "device"):
        assert setting in columns
    for measured in ("seed", "top1", "gflops", "wall_s", "status", "date"):
        assert measured not in columns
    assert "heads" not in config_columns(table.assign(heads=4))  # imagenet declares no such setting
    empty = aggregate(table[table["status"] == "none"], ["top1"])
    assert empty.empty and {"n_seeds", "n_repeats", "top1_mean", "top1_std", "top1_n"} <= set(empty.columns)
    with pytest.raises(ValueError, match="no column 'glue_task'"):
        aggregate(table, ["top1"], [*columns, "glue_task"])


class PluginTask(Task):
    """A third-party task with a setting of its own, declared on the task alone: the engine is untouched."""

    name = "plugin-heads"
    config_columns = ("heads",)


@pytest.fixture
def plugin_task():
    register_task(PluginTask)
    yield PluginTask.name
    TASKS.unregister(PluginTask.name)


def test_a_plugin_task_declares_its_own_configuration_columns(plugin_task):
    table = _table().iloc[:3].assign(task=plugin_task, heads=[4, 4, 8])
    assert config_columns(table)[-1] == "heads"
    stats = aggregate(table, ["top1"])
    assert sorted(stats["n_seeds"]) == [1, 2] and set(stats["heads"]) == {4, 8}  # never seeds of one
    with pytest.warns(UserWarning, match="task 'not-installed' is not installed here"):
        assert "heads" not in config_columns(table.assign(task="not-installed"))  # what no task declares


@pytest.mark.parametrize("name", ["imagenet", "coco", "ade20k", "glue", "mqar", "listops", "seqimage"])
def test_each_built_in_task_declares_settings_its_table_holds(name):
    task = get_task(name)
    assert task.config_columns and [c for c in task.config_columns if c not in task.columns] == []
    table = pd.DataFrame([dict.fromkeys(task.columns)]).assign(task=name)
    assert config_columns(table)[-len(task.config_columns):] == list(task.config_columns)


def test_aggregate_of_the_committed_imagenet_table_backs_the_readme():
    stats = aggregate(pd.read_csv(ROOT / "results" / "reference" / "imagenet.csv"), ["top1", "wall_s"])
    assert set(stats["n_repeats"]) == {0} and stats["n_seeds"].min() >= 1
    assert (stats.groupby("mechanism").size() == 1).all()  # one configuration each
    # the README's expected result of its first command is the aggregate of these rows
    readme = " ".join((ROOT / "README.md").read_text().split())
    set_ = stats[stats["mechanism"] == "set"].iloc[0]
    table = pd.read_csv(ROOT / "results" / "reference" / "imagenet.csv")
    wall = table[table["mechanism"] == "set"]["wall_s"]
    seeds = [int(x) for x in set_["seed_list"].split(",")]
    consecutive = seeds == list(range(seeds[0], seeds[-1] + 1))
    span = f"{seeds[0]}–{seeds[-1]}" if consecutive else ", ".join(map(str, seeds))
    expected = (f"[`results/reference/imagenet.csv`](results/reference/imagenet.csv) (seeds {span}: top-1 "
                f"{set_['top1_mean']:.1f} ± {set_['top1_std']:.1f} %, n = {set_['n_seeds']}; "
                f"{wall.min():.0f}–{wall.max():.0f} s each")
    assert expected in readme


def test_format_spread_always_shows_n():
    assert format_spread(96.8333, 0.1528, 3) == "96.8 ± 0.2 (n = 3)"
    assert format_spread(56.025, math.nan, 1, digits=2) == "56.02 (n = 1)"
    assert format_spread(math.nan, math.nan, 0) == "— (n = 0)"


# ---- the README stands alone --------------------------------------------------------------------

OUTSIDE = re.compile(r"\.\./|(?<![\w.-])shared/")


@needs_git
def test_no_doc_or_docstring_names_a_path_outside_the_repository():
    me = Path(__file__).resolve().relative_to(ROOT).as_posix()
    texts = [f for f in tracked_tree() if f.endswith((".md", ".py", ".toml", ".txt", ".ini", ".sh"))]
    found = [f"{f}:{n}: {line.strip()}" for f in texts if f != me
             for n, line in enumerate((ROOT / f).read_text(errors="replace").splitlines(), 1)
             if OUTSIDE.search(line)]
    assert found == []


def test_the_paths_the_readme_names_exist():
    text = (ROOT / "README.md").read_text()
    named = set(re.findall(r"(?:\]\(|`)((?:docs|results/reference)/[^`)\s…]*[^`)\s…/.,])", text))
    assert {"docs/measuring.md", "docs/set-attention.md", "results/reference/imagenet.csv"} <= named
    assert [p for p in sorted(named) if not (ROOT / p).exists()] == []
