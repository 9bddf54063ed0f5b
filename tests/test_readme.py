"""The README's set-up commands are the ones CI runs, so a missing install step shows in CI."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Set up and run", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", section)


def test_readme_has_the_two_setup_commands():
    main_job, tests = readme_commands()
    assert main_job.startswith("bash scripts/setup.sh && ") and "attnbench" in main_job
    assert tests == "bash scripts/setup.sh && python -m pytest"


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert readme_commands()[1] in ci


def test_the_readme_mechanism_example_runs_and_conforms():
    import torch

    from attnbench import build_mechanism, registry

    text = (ROOT / "docs" / "extending.md").read_text()
    section = text.split("## Adding a mechanism", 1)[1]
    code = re.search(r"```python\n(.+?)\n```", section, re.S).group(1)
    import sys
    import types

    module = types.ModuleType("readme_example")  # dataclasses need the module to be importable
    sys.modules[module.__name__] = module
    try:
        exec(compile(code, "docs/extending.md", "exec"), module.__dict__)
        m = build_mechanism("mean", 16, 2, gain="2.0")
        x = torch.randn(3, 5, 16, requires_grad=True)
        y = m(x)
        assert y.shape == x.shape
        y.sum().backward()
        assert all(p.grad is not None for p in m.parameters())
        assert m.flops(3, 5).matmul == 2 * 3 * 16 * 16
    finally:
        registry.MECHANISMS.unregister("mean")
        sys.modules.pop(module.__name__, None)


def test_the_readme_task_example_runs_through_the_harness(tmp_path):
    """The "Adding a task" example, as printed: registered, trained, evaluated, recorded."""
    import sys
    import types

    import pandas as pd

    from attnbench.cli import main
    from attnbench.task import TASKS, task_names

    text = (ROOT / "docs" / "extending.md").read_text()
    section = text.split("## Adding a task", 1)[1]
    code = re.search(r"```python\n(.+?)\n```", section, re.S).group(1)
    module = types.ModuleType("readme_task_example")
    sys.modules[module.__name__] = module
    try:
        exec(compile(code, "docs/extending.md", "exec"), module.__dict__)
        assert "majority" in task_names()
        argv = ["run", "--task", "majority", "--mechanism", "softmax", "--out", str(tmp_path / "run"),
                "--results", str(tmp_path / "majority.csv")]
        assert main(argv) == 0
        row = pd.read_csv(tmp_path / "majority.csv").iloc[0]
        assert (row["task"], row["mechanism"], row["epochs"]) == ("majority", "softmax", 2)
        assert row["status"] == "ok" and row["accuracy"] > 60 and not row["limited"]  # chance: 50 %
        assert (tmp_path / "run" / "checkpoint.pt").is_file() and (tmp_path / "run" / "history.csv").is_file()
    finally:
        TASKS.unregister("majority")
        sys.modules.pop(module.__name__, None)

