"""The accuracy sweep (``attnbench scale --task``): option variants, breaking lengths, the Pareto
front, points trained in processes of their own (failures as rows), resume, compare and plots.

A fake task stands in for training: its accuracy is a known function of mechanism, n and seed
(softmax 100 %, linear 100 % below n = 32 and 60 + seed from there), so the tables can be checked
exactly. Nothing here asserts a time.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import shutil
import textwrap
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
import pytest

from attnbench import OptionError, registry
from attnbench.cli import main
from attnbench.options import parse_mechanism_options, split_label, variants
from attnbench.plots.accuracy import accuracy_against_n, frontier, pareto_front
from attnbench.plots.style import layout_problems
from attnbench.sweeps.accuracy import breaking_lengths
from attnbench.sweeps.kernel import SweepConfig, finish, run_sweep
from attnbench.task import ACCURACY, TASKS, SweepScore, task_names

FAULTY = str(Path(__file__).with_name("faulty_mechanisms.py"))  # loaded with --load, never imported
FAKE = textwrap.dedent('''
    """A fake sequence task, for the accuracy sweep's tests."""
    from pathlib import Path
    import torch
    from attnbench import Task, build_mechanism, register_task
    from attnbench.results.tables import append_row

    @register_task
    class FakeRecall(Task):
        name, summary = "fake_recall", "a fake sequence task (tests)"
        sweep_presets = {device: {"seq": [16, 32], "mechanisms": ["softmax", "linear"], "seeds": [0, 1],
                                  "args": ["--steps", "3"]} for device in ("cpu", "cuda")}

        @classmethod
        def add_arguments(cls, parser):
            for flag, kind in (("--seq-len", int), ("--seed", int), ("--steps", int), ("--threads", int),
                               ("--time-budget", float), ("--results", Path), ("--out", Path),
                               ("--resume", Path)):
                parser.add_argument(flag, type=kind)
            parser.add_argument("--device", default="cpu")

        def run(self, args):
            options = args.mechanism_options.get(args.mechanism, {})
            mixer = build_mechanism(args.mechanism, 8, 2, **options)
            with torch.no_grad():
                mixer(torch.randn(1, args.seq_len, 8))
            broken = args.mechanism == "linear" and args.seq_len >= 32
            accuracy = 60.0 + args.seed if broken else 100.0
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "checkpoint.pt").write_text("weights")
            cost = 4 if args.mechanism == "softmax" else 1
            row = {"task": self.name, "mechanism": args.mechanism,
                   "options": ";".join(f"{k}={v}" for k, v in sorted(options.items())),
                   "seq_len": args.seq_len, "seed": args.seed, "accuracy": accuracy,
                   "best_accuracy": accuracy + 0.5, "chance": 25.0, "steps": args.steps,
                   "step_ms": 0.1 * cost * args.seq_len, "peak_mem_mib": 2.0 * cost * args.seq_len,
                   "params": sum(p.numel() for p in mixer.parameters()), "time_budget": args.time_budget,
                   "status": "ok"}
            append_row(args.results, row, list(row))
            print("fake_recall: done")
            return 0
''')


@pytest.fixture
def fake(tmp_path):
    """``--load`` arguments for the fake task and the faulty mechanisms, loaded here and (through
    --load) in every point's process."""
    path = tmp_path / "fake_sweep_task.py"
    path.write_text(FAKE)
    registry.load_module(str(path))
    registry.load_module(FAULTY)
    yield ["--load", str(path), "--load", FAULTY]
    TASKS.unregister("fake_recall")
    registry.MECHANISMS.unregister_module("faulty_mechanisms")


# ---- variants ---------------------------------------------------------------------------------

def test_swept_options_become_labelled_variants():
    options = parse_mechanism_options(["set.m=16,64", "set.iters=5"], axes=True)
    found = variants(["softmax", "set"], options)
    assert [v.label for v in found] == ["softmax", "set[m=16]", "set[m=64]"]  # a single value is no axis
    assert [v.options for v in found] == [{}, {"m": "16", "iters": "5"}, {"m": "64", "iters": "5"}]
    product = variants(["set"], parse_mechanism_options(["set.m=16,64", "set.iters=5,10"], axes=True))
    assert [v.label for v in product] == ["set[m=16,iters=5]", "set[m=16,iters=10]", "set[m=64,iters=5]",
                                          "set[m=64,iters=10]"]
    assert split_label("set[m=16,iters=5]") == ("set", {"m": "16", "iters": "5"})
    assert split_label("softmax") == ("softmax", {})
    assert parse_mechanism_options(["set.m=32"]) == {"set": {"m": "32"}}  # run: as before


@pytest.mark.parametrize("items, axes, message", [
    (["set.m=16,64"], False, "one value per option here"),
    (["set.m=16,0"], True, "set.m"),  # each value checked alone
    (["set.m=16,"], True, "an empty value"),
])
def test_bad_option_axes_are_refused(items, axes, message):
    with pytest.raises(OptionError, match=message):
        parse_mechanism_options(items, axes=axes)


def test_options_of_a_mechanism_not_swept_are_refused():
    with pytest.raises(OptionError, match="set is not among the mechanisms swept"):
        variants(["softmax"], {"set": {"m": "16,64"}})


def test_the_kernel_sweep_measures_each_variant(tmp_path):
    out = tmp_path / "kernel"
    cfg = SweepConfig(mechanisms=["softmax", "set"], seq=[16], modes=["fwd"], heads=2, head_dim=8,
                      options={"set": {"m": "4,8"}}, min_run_time=0.01, rounds=1, retries=0,
                      memory_limit_mib=2048)
    table = run_sweep(cfg, out, resume=False, argv=["test"])
    assert list(table["variant"]) == ["softmax", "set[m=4]", "set[m=8]"]
    assert list(table["mechanism"]) == ["softmax", "set", "set"] and set(table["status"]) == {"ok"}
    assert [json.loads(o) for o in table["options"]] == [{}, {"m": "4"}, {"m": "8"}]
    fits = finish(out, fit_min_n=0)
    assert set(fits["mechanism"]) == {"softmax", "set[m=4]", "set[m=8]"}  # one series each
    assert (out / "time_fwd.png").stat().st_size > 0


# ---- breaking lengths and the Pareto front ----------------------------------------------------

def rows(variant, n, *accuracies, status="ok", first_seed=0):
    return [{"variant": variant, "mechanism": variant, "seq_len": n, "seed": first_seed + i,
             "accuracy": a if status == "ok" else math.nan, "status": status}
            for i, a in enumerate(accuracies)]


def synthetic():
    return pd.DataFrame([
        *rows("softmax", 64, 99, 98), *rows("softmax", 128, 97, 97),
        *rows("softmax", 256, 0, 0, status="oom"),
        *rows("softmax", 512, 90), *rows("softmax", 512, 0, status="timeout", first_seed=1),
        # exactly 10 points below is not more than 10: it breaks at 512 (10.1 below)
        *rows("tie", 64, 88.5, 88.5), *rows("tie", 128, 87, 87), *rows("tie", 512, 79.9),
        # seed 0 at 128 ran twice: the latest run stands for it, and it is one seed, not two
        *rows("early", 64, 80, 81), *rows("early", 128, 10), *rows("early", 128, 97, 97),
        *rows("never", 64, 99), *rows("never", 512, 95),
        *rows("failing", 64, 99), *rows("failing", 128, 0, 0, status="oom"),
        *rows("unjudged", 256, 50),  # only where softmax ran out of memory
    ])


def test_breaking_length_is_the_first_n_more_than_10_points_below_softmax():
    table = breaking_lengths(synthetic()).set_index("variant")
    assert "softmax" not in table.index
    assert table.loc["tie", "breaking"] == "512" and table.loc["tie", "breaking_n"] == 512
    assert table.loc["tie", "gap"] == pytest.approx(10.1) and table.loc["tie", "judged_n"] == "64,128,512"
    assert table.loc["early", "breaking"] == "64" and table.loc["early", "seeds"] == 2
    assert table.loc["early", "baseline_accuracy"] == pytest.approx(98.5)
    assert table.loc["never", "breaking"] == "none" and pd.isna(table.loc["never", "breaking_n"])
    assert table.loc["failing", "breaking"] == "none" and table.loc["failing", "judged_n"] == "64"
    assert table.loc["failing", "failed"] == "n=128 seed=0: oom, n=128 seed=1: oom"
    assert table.loc["unjudged", "breaking"] == "n/a: no softmax"
    assert table.loc["unjudged", "baseline_missing_n"] == "256"


def test_without_softmax_sdpa_is_the_baseline_and_without_either_nothing_is_judged():
    table = synthetic()
    fused = breaking_lengths(table.replace({"variant": {"softmax": "sdpa"}}))
    assert set(fused["baseline"]) == {"sdpa"}
    assert list(fused["breaking"]) == ["512", "64", "none", "none", "n/a: no sdpa"]
    alone = breaking_lengths(table[table["variant"] != "softmax"])
    assert set(alone["breaking"]) == {"n/a: no softmax"}


def test_pareto_front():
    assert pareto_front([1.0, 2.0, 3.0, 4.0], [50.0, 40.0, 70.0, 70.0]) == [0, 2]
    assert pareto_front([3.0, 1.0, math.nan], [90.0, 90.0, 99.0]) == [1]  # a tie in score: the cheaper
    # lower is better (perplexity): the cheapest, then each costlier point only where it scores lower
    assert pareto_front([1.0, 2.0, 3.0, 4.0], [9.0, 12.0, 5.0, 5.0], higher_is_better=False) == [0, 2]


PERPLEXITY = SweepScore("perplexity", "validation perplexity", higher_is_better=False, relative=True,
                        floor="unigram_perplexity", floor_label="unigram", best="best_perplexity", decimals=3)


def perplexities(variant, n, *values, status="ok"):
    return [{"variant": variant, "mechanism": variant, "seq_len": n, "seed": i, "perplexity": v,
             "unigram_perplexity": 30.0, "step_ms": 10.0 * n, "peak_mem_mib": n, "status": status}
            for i, v in enumerate(values)]


def test_a_perplexity_breaks_where_it_rises_more_than_10_percent_above_softmaxs():
    table = pd.DataFrame([
        *perplexities("softmax", 64, 5.0, 5.0), *perplexities("softmax", 128, 4.0),
        *perplexities("close", 64, 5.5), *perplexities("close", 128, 4.4),  # exactly 10 %: not more
        *perplexities("worse", 64, 5.2), *perplexities("worse", 128, 4.5),  # 12.5 % above at 128
        *perplexities("better", 64, 3.0), *perplexities("better", 128, 2.0),  # lower is better: never
    ])
    found = breaking_lengths(table, score=PERPLEXITY).set_index("variant")
    assert found.loc["close", "breaking"] == "none" and found.loc["better", "breaking"] == "none"
    assert found.loc["worse", "breaking"] == "128" and found.loc["worse", "gap"] == pytest.approx(12.5)
    assert found.loc["worse", "perplexity"] == 4.5 and found.loc["worse", "baseline_perplexity"] == 4.0
    assert found.loc["worse", "rule"] == ("the smallest n at which a variant's mean perplexity rises more "
                                          "than 10 % above softmax's at the same n")
    for fig in (accuracy_against_n(table, found.reset_index(), "a test", PERPLEXITY),
                frontier(table, "step_ms", "time per training step (ms)", "a test", PERPLEXITY)):
        assert fig.axes[0].get_yscale() == "log" and fig.axes[0].get_ylabel() == "validation perplexity"
        low, high = fig.axes[0].get_ylim()
        assert low < 2.0 and high > 30.0  # the best point and the unigram line inside
        assert layout_problems(fig) == []
        plt.close(fig)


def test_a_sweep_folder_is_judged_by_the_score_its_meta_recorded(tmp_path):
    from attnbench.sweeps.accuracy import finish as finish_accuracy
    from attnbench.sweeps.accuracy import recorded_score, summary

    table = pd.DataFrame([*perplexities("softmax", 64, 5.0), *perplexities("linear", 64, 6.0)])
    table.to_csv(tmp_path / "accuracy.csv", index=False)
    (tmp_path / "meta.json").write_text(json.dumps({"kind": "accuracy", "task": "not-installed",
                                                    "score": dataclasses.asdict(PERPLEXITY)}))
    assert recorded_score(json.loads((tmp_path / "meta.json").read_text())) == PERPLEXITY
    done = finish_accuracy(tmp_path, log=io.StringIO())
    assert done.breaking.set_index("variant").loc["linear", "breaking"] == "64"  # 20 % above
    text = summary(tmp_path)
    assert "validation perplexity per variant and n" in text and "6.000 vs 5.000" in text
    (tmp_path / "meta.json").write_text(json.dumps({"kind": "accuracy", "task": "not-installed"}))
    assert recorded_score({"task": "not-installed"}) == ACCURACY  # an unknown task: accuracy


# ---- the sweep ----------------------------------------------------------------------------------

def test_accuracy_sweep_end_to_end_with_resume_and_compare(fake, tmp_path, capsys):
    out = tmp_path / "sweep"
    argv = ["scale", "--task", "fake_recall", *fake, "--threads", "1", "--memory-limit", "2048"]
    assert main([*argv, "--out", str(out)]) == 0  # the preset: 2 mechanisms x 2 lengths x 2 seeds
    captured = capsys.readouterr()
    table = pd.read_csv(out / "accuracy.csv")
    assert len(table) == 8 and set(table["status"]) == {"ok"}
    assert set(zip(table["variant"], table["seq_len"], table["seed"], strict=True)) == {
        (m, n, s) for m in ("softmax", "linear") for n in (16, 32) for s in (0, 1)}
    assert (table["steps"] == 3).all()  # the preset's task arguments reached every run
    for column in ("device", "threads", "dtype", "git_commit", "torch", "point_s", "message", "chance"):
        assert column in table.columns
    assert (table["device"] == "cpu").all() and (table["dtype"] == "float32").all()
    breaking = pd.read_csv(out / "breaking.csv").set_index("variant")
    assert breaking.loc["linear", "breaking"] == 32 and breaking.loc["linear", "accuracy"] == 60.5
    assert "[8/8] linear n=32 seed=1: accuracy 61.0" in captured.err and "ETA" in captured.err
    assert "breaking length" in captured.out and "60.5 ± 0.7 (n = 2)" in captured.out
    point = out / "points" / "linear-n32-seed1"
    assert "$ attnbench run --task fake_recall --mechanism linear --steps 3 --seq-len 32 --seed 1" in \
        (point / "log.txt").read_text()
    assert not (point / "checkpoint.pt").exists()  # a point is never resumed
    meta = json.loads((out / "meta.json").read_text())
    assert meta["kind"] == "accuracy" and meta["sweep"]["args"] == ["--steps", "3"]
    for stem in ("accuracy_n", "frontier_time", "frontier_memory"):
        assert (out / f"{stem}.png").stat().st_size > 0 and (out / f"{stem}.svg").exists()

    saved = tmp_path / "saved"
    shutil.copytree(out, saved)
    older = pd.read_csv(saved / "accuracy.csv")
    older.loc[older["variant"] == "linear", "accuracy"] -= 5
    older.to_csv(saved / "accuracy.csv", index=False)

    with pytest.raises(SystemExit, match="2"):  # the folder holds a sweep: --resume, or another --out
        main([*argv, "--out", str(out)])
    for extra, message in (([ "--", "--steps", "5"], "was swept with args="),
                           (["--opt", "linear.eps=1e-3"], "ran linear with options none")):
        with pytest.raises(SystemExit):
            main([*argv, "--out", str(out), "--resume", *extra])
        assert message in capsys.readouterr().err
    assert main([*argv, "--out", str(out), "--resume", "--seeds", "0,1,2", "--mechanism", "softmax",
                 "--compare", str(saved)]) == 0
    captured = capsys.readouterr()
    assert "resuming: 8 points already" in captured.err and "[2/2] softmax n=32 seed=2" in captured.err
    again = pd.read_csv(out / "accuracy.csv")
    assert len(again) == 10
    pd.testing.assert_frame_equal(again.iloc[:8], table)  # kept, not trained again
    assert "accuracy here minus there" in captured.out
    change = pd.read_csv(out / "compare.csv").dropna(subset=["accuracy_change"])
    assert set(change[change["variant"] == "linear"]["accuracy_change"]) == {5.0}
    assert set(change[change["variant"] == "softmax"]["accuracy_change"]) == {0.0}

    assert main(["plot", str(out)]) == 0
    drawn = capsys.readouterr().out
    assert str(out / "accuracy_n.png") in drawn and str(out / "breaking.csv") in drawn


def test_failed_points_are_rows_and_the_sweep_goes_on(fake, tmp_path, capsys):
    out = tmp_path / "faults"
    assert main(["scale", "--task", "fake_recall", *fake, "--mechanism",
                 "softmax,fake_hog,fake_sleepy,xformers,linear", "--opt", "linear.eps=1e-6,1e-3",
                 "--seq", "16", "--seeds", "0", "--budget", "8", "--memory-limit", "1024", "--threads", "1",
                 "--out", str(out)]) == 0
    table = pd.read_csv(out / "accuracy.csv").set_index("variant")
    assert list(table.index) == ["softmax", "fake_hog", "fake_sleepy", "xformers", "linear[eps=1e-6]",
                                 "linear[eps=1e-3]"]
    status = table["status"].to_dict()
    assert status == {"softmax": "ok", "fake_hog": "oom", "fake_sleepy": "timeout", "xformers": "unavailable",
                      "linear[eps=1e-6]": "ok", "linear[eps=1e-3]": "ok"}
    assert "allocate" in table.loc["fake_hog", "message"]
    assert "exceeded" in table.loc["fake_sleepy", "message"]
    assert table.loc["linear[eps=1e-3]", "options"] == "eps=1e-3"
    assert table.loc["linear[eps=1e-3]", "mechanism"] == "linear"
    breaking = pd.read_csv(out / "breaking.csv").set_index("variant")
    assert breaking.loc["fake_hog", "breaking"] == "n/a: no accuracy"
    assert breaking.loc["fake_hog", "failed"] == "n=16 seed=0: oom"
    assert "did not finish" in capsys.readouterr().out
    rows = pd.read_csv(out / "accuracy.csv")
    for fig in (accuracy_against_n(rows, breaking.reset_index(), "a test"),
                frontier(rows, "step_ms", "time per training step (ms)", "a test")):
        assert layout_problems(fig) == []
        plt.close(fig)


@pytest.mark.parametrize("argv, message", [
    (["scale", "--task", "imagenet"], "'imagenet' has no accuracy sweep (no sweep presets); tasks with one:"),
    (["scale", "--task", "nope"], "unknown task 'nope'; valid choices"),
    (["scale", "--seeds", "0,1"], "--seeds is for the accuracy sweep: add --task"),
    (["scale", "--task", "fake_recall", "--heads", "8"], "--heads: for the kernel sweep"),
    (["scale", "--task", "fake_recall", "--seeds", "a"], "--seeds 'a': expected a comma list"),
    (["scale", "--task", "fake_recall", "--", "--seed", "3"], "the sweep sets --seed for every run"),
    (["scale", "--task", "fake_recall", "--mechanism", "linear", "--opt", "softmax.qkv_bias=true"],
     "softmax is not among the mechanisms swept"),
    (["scale", "--task", "fake_recall", "--resume"], "--resume needs --out"),
])
def test_accuracy_sweep_usage_errors(fake, argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main([*argv[:1], *fake, *argv[1:]])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_mqar_end_to_end_in_a_few_steps(tmp_path, capsys):
    """The real thing, cut short: two mechanisms, two tiny lengths, smoke-run limits passed through."""
    assert "mqar" in task_names()  # a built-in entry point: missing means a stale install
    out = tmp_path / "mqar"
    assert main(["scale", "--task", "mqar", "--mechanism", "softmax,linear", "--seq", "64,128",
                 "--seeds", "0", "--threads", "1", "--out", str(out),
                 "--", "--max-steps", "2", "--limit-train", "32", "--limit-val", "16",
                 "--batch-size", "16"]) == 0
    table = pd.read_csv(out / "accuracy.csv")
    assert len(table) == 4 and set(table["status"]) == {"ok"}, table[["variant", "seq_len", "message"]]
    assert table["accuracy"].between(0, 100).all() and (table["chance"] > 0).all()
    assert set(pd.read_csv(out / "breaking.csv")["variant"]) == {"linear"}
    assert "breaking length" in capsys.readouterr().out


def test_variants_keep_their_mechanisms_marker_and_colour_family_and_are_told_apart():
    from attnbench.plots.style import ordered, rank_variants, style

    labels = ["set[m=256]", "set[m=16]", "set[m=64]", "softmax"]
    rank_variants(labels)
    assert ordered(labels) == ["set[m=16]", "set[m=64]", "set[m=256]", "softmax"]  # by value, not text
    styles = [style(label) for label in ordered(labels)[:3]]
    assert styles[0] == style("set")  # the first looks like the mechanism itself
    assert {s.marker for s in styles} == {style("set").marker}
    assert len({(s.colour, s.linestyle) for s in styles}) == 3


def test_damaged_or_foreign_folders_are_one_line_errors(tmp_path, fake, capsys):
    """A damaged meta.json or accuracy.csv on --resume, a kernel sweep's folder as --out, and a
    --compare folder whose table is not an accuracy sweep's: one line each, before any training."""
    def fails(argv, message):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        err = capsys.readouterr().err.strip()
        assert exit_info.value.code == 2 and message in err and "Traceback" not in err, err

    base = ["scale", "--task", "fake_recall", "--mechanism", "softmax", "--seq", "8", *fake]
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "meta.json").write_text("{not json")
    (damaged / "accuracy.csv").write_text("variant,seq_len\nsoftmax,8\n")
    fails([*base, "--out", str(damaged), "--resume"], "not readable JSON")
    (damaged / "meta.json").write_text("{}")
    fails([*base, "--out", str(damaged), "--resume"], "no column seed")
    kernel = tmp_path / "kernel"
    kernel.mkdir()
    (kernel / "meta.json").write_text('{"kind": "scale"}')
    fails([*base, "--out", str(kernel)], "holds a scale run, not an accuracy sweep")
    fails([*base, "--out", str(tmp_path / "new"), "--compare", str(damaged)], "no column seed")
