"""The validation layer (``attnbench.validate``, the mechanism option ranges): every bad value is
refused before any work, on one line naming the option, the value and what is valid, exit 2; the
examples of issue #18 each get that line."""

from __future__ import annotations

import argparse

import pytest
import torch

from attnbench import OptionError, build_mechanism, get_mechanism
from attnbench.cli import main
from attnbench.validate import (
    Once,
    Parser,
    Range,
    existing_dir,
    float_in,
    int_in,
    nonempty,
    output_dir,
    output_file,
)


def error_line(argv: list[str], capsys) -> str:
    """The one line ``attnbench ARGV`` prints on stderr as it exits with status 2."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


# ---- the type= factories ----------------------------------------------------------------------


def test_ranges_say_their_ends():
    assert Range(1, 64).describe(integer=True) == "an int in [1, 64]"
    assert Range(0, 10, lo_open=True).describe(integer=False) == "a finite number in (0, 10]"
    assert Range(0, 1, hi_open=True).describe(integer=False) == "a finite number in [0, 1)"
    assert Range(lo=0).describe(integer=False) == "a finite number >= 0"
    assert 0 not in Range(0, 1, lo_open=True) and 1 not in Range(0, 1, hi_open=True)
    assert 10**400 not in Range(0, 10) and float("nan") not in Range() and float("inf") not in Range()


@pytest.mark.parametrize("text", ["", " ", "0", "65", "-1", "1.5", "1e3", "nan", "inf", "abc", "1" * 5000])
def test_an_int_outside_its_range_or_not_an_int_is_refused(text):
    with pytest.raises(argparse.ArgumentTypeError, match=r"valid: an int in \[1, 64\]"):
        int_in(1, 64)(text)


@pytest.mark.parametrize("text", ["nan", "inf", "-inf", "1e400", "0", "10.5", "", "x"])
def test_a_float_must_be_finite_and_in_range(text):
    with pytest.raises(argparse.ArgumentTypeError, match=r"valid: a finite number in \(0, 10\]"):
        float_in(0, 10, lo_open=True)(text)


def test_valid_numbers_pass_unchanged():
    assert int_in(1, 64)(" 7 ") == 7 and int_in(0, 2**32 - 1)("4294967295") == 2**32 - 1
    assert float_in(0, 10, lo_open=True)("1e-3") == 1e-3 and float_in(0, 1)("1") == 1.0


def test_paths_of_the_wrong_kind_are_refused(tmp_path):
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    with pytest.raises(argparse.ArgumentTypeError, match="no such folder"):
        existing_dir(str(tmp_path / "missing"))
    with pytest.raises(argparse.ArgumentTypeError, match="is a file; expected a folder"):
        existing_dir(str(a_file))
    with pytest.raises(argparse.ArgumentTypeError, match="an empty path"):
        output_dir("")
    with pytest.raises(argparse.ArgumentTypeError, match="is a file; expected a folder"):
        output_dir(str(a_file))
    with pytest.raises(argparse.ArgumentTypeError, match=r"file.txt is a file, not a folder"):
        output_dir(str(a_file / "below"))
    with pytest.raises(argparse.ArgumentTypeError, match="is a folder; expected a file"):
        output_file(str(tmp_path))
    with pytest.raises(argparse.ArgumentTypeError, match="cannot write in"):
        output_dir("/proc/attnbench-test/out")  # not writable, even by root
    assert output_dir(str(tmp_path / "new" / "run")) == tmp_path / "new" / "run"  # made later, not now
    assert not (tmp_path / "new").exists()
    assert output_file(str(tmp_path / "table.csv")) == tmp_path / "table.csv"


def test_an_empty_value_is_not_read_as_the_default():
    with pytest.raises(argparse.ArgumentTypeError, match="an empty value"):
        nonempty("  ")
    assert nonempty("all") == "all"


def test_the_parser_errs_on_one_line_and_shows_each_range_in_help(capsys):
    parser = Parser(prog="tool")
    parser.add_argument("--n", type=int_in(1, 8), help="how many")
    parser.add_argument("--name", action=Once)
    with pytest.raises(SystemExit) as exc:
        parser.parse_args(["--n", "9"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "tool: error: argument --n: invalid value '9'; valid: an int in [1, 8]" in err
    assert "how many (valid: an int in [1, 8])" in " ".join(parser.format_help().split())
    assert parser.parse_args(["--name", "a", "--name", "a"]).name == "a"
    with pytest.raises(SystemExit):
        parser.parse_args(["--name", "a", "--name", "b"])
    assert "given twice ('a', then 'b')" in capsys.readouterr().err


# ---- mechanism options: one declared range each -----------------------------------------------


@pytest.mark.parametrize("name, options, message", [
    ("set", {"iters": "1000000000000"}, r"set.iters=1000000000000 must be an int in \[1, 10000\]"),
    ("set", {"kernel_sigma": "1e-300"}, r"set.kernel_sigma=1e-300 must be a finite number in \[0.001, 1000"),
    ("set", {"eps": "inf"}, "set.eps=inf must be a finite number"),
    ("set", {"tol": "nan"}, "set.tol=nan must be a finite number"),
    ("performer", {"features": "1000000000000"}, r"performer.features=1000000000000 must be an int in"),
    ("swin", {"window": True}, r"swin.window=True must be an int in \[1, 256\]"),
])
def test_every_mechanism_option_is_checked_against_its_declared_range(name, options, message):
    with pytest.raises(OptionError, match=message):
        build_mechanism(name, 16, 2, **options)


def test_options_made_directly_are_checked_when_the_mechanism_is_built():
    cls = get_mechanism("set")
    with pytest.raises(OptionError, match="set.iters=0 must be an int"):
        cls(16, 2, cls.Options(iters=0))


def test_every_declared_range_is_finite_and_holds_its_default():
    import dataclasses

    from attnbench import mechanism_names

    for name in mechanism_names():
        for f in dataclasses.fields(get_mechanism(name).Options):
            valid = f.metadata.get("range")
            if valid is not None:
                assert valid.lo is not None and valid.hi is not None, (name, f.name)
                assert f.default in valid, (name, f.name)


def test_list_shows_each_option_with_its_range(capsys):
    assert main(["list", "--mechanism", "set"]) == 0
    assert "iters = 10  (an int in [1, 10000])" in capsys.readouterr().out


# ---- the examples of issue #18 ----------------------------------------------------------------

RUN = ["run", "--mechanism", "softmax", "--task", "imagenet"]


@pytest.mark.parametrize("argv, message", [
    (["list", "--device", "gpu"], "argument --device: invalid choice: 'gpu' (choose from"),
    (["run", "--mechanism", "set", "--task", "imagenet", "--task", "glue"],
     "argument --task: given twice ('imagenet', then 'glue'); give it once"),
    (["run", "--mechanism", "set", "--task", "IMAGENET", "--img-size", "32"],
     "argument --task: unknown task 'IMAGENET'; valid choices: ade20k, coco"),  # then others, and
     # any fake task an earlier test registered
    ([*RUN, "--randaugment", "31"], "argument --randaugment: invalid value '31'; valid: an int in [0, 30]"),
    ([*RUN, "--lr", "inf"], "argument --lr: invalid value 'inf'; valid: a finite number in (0, 10]"),
    ([*RUN, "--weight-decay", "1e30"], "argument --weight-decay: invalid value '1e30'"),
    ([*RUN, "--seed", str(10**20)],
     "argument --seed: invalid value '100000000000000000000'; valid: an int in [0, 4294967295]"),
    ([*RUN, "--warmup-epochs", "inf"], "argument --warmup-epochs: invalid value 'inf'"),
    ([*RUN, "--workers", str(10**12)], "argument --workers: invalid value '1000000000000'; valid: an int in"),
    ([*RUN, "--threads", "0"], "argument --threads: invalid value '0'; valid: an int in [1, 1024]"),
    ([*RUN, "--mixup", "nan"], "argument --mixup: invalid value 'nan'"),
    ([*RUN, "--out", ""], "argument --out: an empty path; expected a writable folder"),
    ([*RUN, "--opt", "softmax.qkv_bias=maybe"], "softmax.qkv_bias='maybe' is not a valid bool"),
    (["run", "--mechanism", "set", "--task", "imagenet", "--opt", "set.kernel_sigma=1e-300"],
     "set.kernel_sigma=1e-300 must be a finite number in [0.001, 1000]"),
    (["run", "--mechanism", "set", "--task", "imagenet", "--opt", "set.iters=1000000000000"],
     "set.iters=1000000000000 must be an int in [1, 10000]"),
    (["run", "--mechanism", "set", "--task", "imagenet", "--opt", "set.eps=inf"],
     "set.eps=inf must be a finite"),
    (["run", "--mechanism", "performer", "--task", "imagenet", "--opt", "performer.features=1000000000000"],
     "performer.features=1000000000000 must be an int in [1, 16384]"),
    (["run", "--mechanism", "softmax", "--task", "glue", "--vocab-size", str(10**12)],
     "argument --vocab-size: invalid value '1000000000000'; valid: an int in [100, 262144]"),
    (["run", "--mechanism", "softmax", "--task", "ade20k", "--channels", "0"],
     "argument --channels: invalid value '0'; valid: an int in [1, 4096]"),
    (["scale", "--budget", "nan"], "argument --budget: invalid value 'nan'; valid: a finite number in (0, "),
    (["scale", "--memory-limit", "inf"], "argument --memory-limit: invalid value 'inf'"),
    (["scale", "--out", ""], "argument --out: an empty path"),
    (["scale", "--seq", ""], "argument --seq: an empty value"),
    (["resolution", "--task", "coco", "--start-side", "0"], "argument --start-side: invalid value '0'"),
])
def test_each_example_of_the_issue_is_one_line(argv, message, capsys):
    line = error_line(argv, capsys)
    assert line.startswith(f"attnbench {argv[0]}: error: ") and message in line


def test_version(capsys):
    import attnbench

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and attnbench.__version__ in capsys.readouterr().out


def test_an_output_path_that_is_a_file_or_unwritable_is_refused_before_work(tmp_path, capsys):
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    assert f"argument --out: {a_file}: is a file" in error_line([*RUN, "--out", str(a_file)], capsys)
    assert "argument --results: " in error_line([*RUN, "--results", str(tmp_path)], capsys)
    assert "cannot write in" in error_line(["scale", "--out", "/proc/attnbench-test/out"], capsys)


def test_a_results_table_that_cannot_be_read_is_refused_before_training(tmp_path, capsys):
    table = tmp_path / "imagenet.csv"
    table.write_bytes(b'"unterminated\n\x00\xff')
    line = error_line([*RUN, "--results", str(table)], capsys)
    assert f"--results {table}: not a readable CSV table" in line


def test_backbone_weights_that_are_not_a_checkpoint_are_named_as_such(tmp_path, capsys):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    argv = ["run", "--mechanism", "softmax", "--task", "ade20k", "--backbone-weights", str(garbage)]
    assert f"--backbone-weights {garbage}: not a readable attnbench checkpoint" in error_line(argv, capsys)
    torch.save({"model": {}, "config": {"task": "coco", "mechanism": "softmax", "size": "micro"}}, garbage)
    line = error_line(argv, capsys)
    assert "a checkpoint of task 'coco'" in line and "--resume" not in line


def test_a_plugin_with_a_syntax_error_is_one_line_with_its_file_and_line(tmp_path, capsys):
    plugin = tmp_path / "broken_plugin.py"
    plugin.write_text("import attnbench\n\ndef oops(:\n")
    line = error_line(["scale", "--load", str(plugin), "--seq", "256"], capsys)
    assert f"--load {plugin}: cannot import it: {plugin}:3: SyntaxError" in line
    plugin.write_text("raise RuntimeError('needs a GPU')\n")
    assert f"{plugin}:1: RuntimeError: needs a GPU" in error_line(["scale", "--load", str(plugin)], capsys)


@pytest.mark.parametrize("content", [b"", b"garbage\x00\xff,\n\"open", b"a,b\n1,2\n"])
def test_damaged_sweep_tables_are_one_line_naming_the_file(tmp_path, content, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "scale.csv").write_bytes(content)
    for argv in (["plot", str(run)], ["report", str(run), "--out", str(tmp_path / "r.html")],
                 ["scale", "--seq", "256", "--mechanism", "softmax", "--threads", "1", "--out", str(run),
                  "--resume"],
                 ["scale", "--seq", "256", "--mechanism", "softmax", "--threads", "1", "--out",
                  str(tmp_path / "new"), "--compare", str(run)]):
        line = error_line(argv, capsys)
        assert str(run / "scale.csv") in line or f"--compare {run}" in line, (argv, line)


def test_a_damaged_meta_json_is_one_line_naming_the_file(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "scale.csv").write_text("mechanism,n,mode,status,time_ms_median,peak_mem_mib\n"
                                   "softmax,256,fwd,ok,1,1\n")
    (run / "meta.json").write_text("{not json")
    for argv in (["plot", str(run)],
                 ["scale", "--seq", "256", "--mechanism", "softmax", "--threads", "1", "--out", str(run),
                  "--resume"]):
        assert f"{run / 'meta.json'}: not readable JSON" in error_line(argv, capsys)


# ---- the defects of issue #29 -----------------------------------------------------------------


@pytest.mark.parametrize("argv, message", [
    (["--bogus"], "attnbench: error: unrecognized arguments: --bogus; the following arguments are required"),
    (["run", "--bogus=1", "--task", "imagenet"], "attnbench run: error: unrecognized arguments: --bogus=1;"),
])
def test_an_unknown_option_is_named_before_what_is_missing(argv, message, capsys):
    assert error_line(argv, capsys).startswith(message)


@pytest.mark.parametrize("size", ["nope", "MICRO"])
def test_resolution_refuses_an_unknown_size_before_any_work(size, tmp_path, capsys):
    out = tmp_path / "probe"
    argv = ["resolution", "--task", "coco", "--mechanism", "set", "--size", size, "--out", str(out)]
    line = error_line(argv, capsys)
    assert f"argument --size: unknown size {size!r} of task coco; valid choices: micro, " in line
    assert not out.exists()


SCALE = ["scale", "--seq", "256", "--mechanism", "softmax", "--threads", "1"]
SCALE_TABLE = "mechanism,n,mode,status,time_ms_median,peak_mem_mib\nsoftmax,256,fwd,ok,1,1\n"


@pytest.mark.parametrize("files, argv, message", [
    ({"scale.csv": SCALE_TABLE}, SCALE, "already holds a sweep; pass --resume"),
    ({"scale.csv": SCALE_TABLE, "meta.json": '{"sweep": {"batch": 2}}'}, [*SCALE, "--resume"],
     "was measured with --batch 2, this sweep asks for 1"),
    ({"resolution.csv": "task,mechanism\n"}, SCALE,
     "holds a resolution probe (`attnbench resolution`), not a kernel sweep"),
    ({"scale.csv": SCALE_TABLE}, ["scale", "--task", "mqar", "--mechanism", "softmax", "--seq", "64"],
     "holds a kernel sweep (`attnbench scale`), not an accuracy sweep"),
    ({"meta.json": '{"kind": "scale"}'}, ["scale", "--task", "mqar", "--mechanism", "softmax", "--seq", "64"],
     "holds a scale run, not an accuracy sweep"),
    ({"resolution.csv": "task,mechanism\n"}, ["resolution", "--task", "coco", "--threads", "1"],
     "already holds a probe; choose another --out"),
    ({"resolution.csv": "task,mechanism\n", "meta.json": '{"probe": {"task": "coco", "size": "tiny"}}'},
     ["resolution", "--task", "coco", "--threads", "1", "--resume"], "it was probed with other settings"),
    ({"scale.csv": SCALE_TABLE}, ["resolution", "--task", "coco", "--threads", "1"],
     "holds a kernel sweep (`attnbench scale`), not a resolution probe"),
])
def test_a_foreign_or_inconsistent_out_is_the_error_line_alone(files, argv, message, tmp_path, capsys):
    """No banner before the refusal: the one line printed is the error, and nothing is written."""
    out = tmp_path / "out"
    out.mkdir()
    for name, text in files.items():
        (out / name).write_text(text)
    line = error_line([*argv, "--out", str(out)], capsys)
    assert line.startswith(f"attnbench {argv[0]}: error: ") and message in line, line
    assert sorted(p.name for p in out.iterdir()) == sorted(files)


@pytest.mark.parametrize("name, text, message", [
    ("scale.csv", "mechanism,n,mode,status,time_ms_median,peak_mem_mib\nsoftmax,256,fwd,ok,1,1\n"
                  "softmax,512,fwd,ok,NaN,2\n",
     "scale.csv: row 2: time_ms_median is empty or NaN; expected a finite number in every row of status ok"),
    ("scale.csv", "mechanism,n,mode,status,time_ms_median,peak_mem_mib\nsoftmax,256,fwd,ok,1,1\n"
                  "softmax,,fwd,ok,2,2\n",
     "scale.csv: row 2: n is empty or NaN; expected a finite number in every row"),
    ("resolution.csv", "task,mechanism,size,side,status,step_ms,peak_mem_mib,memory_limit_mib\n"
                       "coco,softmax,micro,,ok,5,10,100\n", "resolution.csv: row 1: side is empty or NaN"),
    ("accuracy.csv", "task,mechanism,variant,seq_len,seed,status,accuracy\nmqar,softmax,softmax,,0,ok,50\n",
     "accuracy.csv: row 1: seq_len is empty or NaN"),
    ("imagenet.csv", "task,mechanism,dataset,status,top1\nimagenet,softmax,mnist5k,ok,90\n",
     "imagenet.csv: not an attnbench table: no column seed"),
])
def test_plot_and_report_on_a_damaged_table_are_one_line_naming_it(name, text, message, tmp_path, capsys):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / name).write_text(text)
    report = ["report", str(folder), "--out", str(tmp_path / "r.html")]
    for argv in (["plot", str(folder)], *([report] if name != "accuracy.csv" else [])):  # the report lists
        line = error_line(argv, capsys)  # an accuracy sweep's table as it is: nothing drawn from it
        assert line.startswith(f"attnbench {argv[0]}: error: {folder}/") and message in line, (argv, line)
