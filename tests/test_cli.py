"""The command line: what a user sees, and clear errors with exit status 2 for mistakes."""

from __future__ import annotations

import subprocess
import sys

import pytest

from attnbench.cli import main


def test_list_shows_the_baselines_as_available(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in ("softmax", "sdpa"):
        line = next(ln for ln in out.splitlines() if ln.startswith(name + " "))
        assert " yes " in line
    for task in ("imagenet", "coco", "ade20k", "glue"):
        line = next(ln for ln in out.splitlines() if ln.startswith(task + " "))
        assert " yes " in line


def test_list_shows_causal_support_and_the_reason_where_there_is_none(capsys):
    assert main(["list"]) == 0
    table = capsys.readouterr().out.split("\n\n")[0].splitlines()[1:]  # the mechanisms' table
    column = table[0].split().index("causal")
    causal = {ln.split()[0]: ln.split()[column] for ln in table[1:] if ln.split()[0] in
              ("softmax", "linear", "swin", "set", "sinkformer", "nystromformer")}
    assert causal == {"softmax": "yes", "linear": "yes", "swin": "yes", "set": "no", "sinkformer": "no",
                      "nystromformer": "no"}
    assert main(["list", "--mechanism", "set"]) == 0
    assert "causal:      no: SeT's transport plan is computed over all tokens" in capsys.readouterr().out
    assert main(["list", "--mechanism", "performer"]) == 0
    assert "causal:      yes" in capsys.readouterr().out


def test_list_shows_decoding_support_and_the_reason_where_there_is_none(capsys):
    assert main(["list"]) == 0
    table = capsys.readouterr().out.split("\n\n")[0].splitlines()[1:]
    column = table[0].split().index("decode")
    decode = {ln.split()[0]: ln.split()[column] for ln in table[1:] if ln.split()[0] in
              ("softmax", "linear", "performer", "nat", "swin", "set", "nystromformer")}
    assert decode == {"softmax": "yes", "linear": "yes", "performer": "yes", "nat": "yes", "swin": "yes",
                      "set": "no", "nystromformer": "no"}
    assert main(["list", "--mechanism", "sinkformer"]) == 0
    assert "decode:      no: no causal form: " in capsys.readouterr().out
    assert main(["list", "--mechanism", "sdpa"]) == 0
    assert "decode:      yes" in capsys.readouterr().out


def test_list_one_mechanism_shows_its_options(capsys):
    assert main(["list", "--mechanism", "softmax"]) == 0
    out = capsys.readouterr().out
    assert "qkv_bias = True" in out and "quadratic" in out


@pytest.mark.parametrize("argv, message", [
    (["list", "--mechanism", "nope"], "unknown mechanism 'nope'; valid choices: "),
    (["run", "--mechanism", "nope", "--task", "imagenet"], "unknown mechanism 'nope'"),
    (["run", "--mechanism", "softmax", "--task", "nope"],
     "unknown task 'nope'; valid choices: ade20k, coco"),
    (["run", "--mechanism", "softmax", "--task", "imagenet", "--opt", "m=3"],
     "expected MECHANISM.OPTION=VALUE"),
    (["run", "--mechanism", "softmax", "--task", "imagenet", "--opt", "softmax.m=3"], "unknown option"),
])
def test_user_errors_exit_2_with_a_clear_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_unavailable_task_says_why_and_fails(capsys, monkeypatch):
    from attnbench.task import TASKS, Task, register_task

    class Missing(Task):
        name = "needs-a-package"

        @classmethod
        def unavailable_reason(cls) -> str | None:
            return "the package it needs is not installed"

    register_task(Missing)
    try:
        assert main(["run", "--mechanism", "softmax", "--task", "needs-a-package"]) == 1
    finally:
        TASKS.unregister(Missing.name)
    assert "the package it needs is not installed" in capsys.readouterr().err


def test_python_dash_m_entry_point():
    done = subprocess.run([sys.executable, "-m", "attnbench", "--help"], capture_output=True, text=True)
    assert done.returncode == 0
    for command in ("list", "run", "scale", "plot"):
        assert command in done.stdout
