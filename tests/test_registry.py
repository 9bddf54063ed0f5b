"""The registry: building by name, option validation and plug-ins through entry points."""

from __future__ import annotations

import dataclasses
import json
import re
import textwrap
from importlib import metadata

import pytest
import torch

from attnbench import (
    OptionError,
    UnknownMechanismError,
    build_mechanism,
    mechanism_names,
    registry,
    task_names,
)
from attnbench.cli import main
from attnbench.registry import NOT_INSTALLED, Registry, UnknownNameError
from attnbench.task import TASKS, UnknownTaskError

PLUGIN = textwrap.dedent('''
    """A third-party mechanism: mean-pooled global mixing, registered from outside attnbench."""
    import dataclasses
    import torch
    from torch import nn
    from attnbench import Flops, Mechanism, register_mechanism
    from attnbench.mechanism import require

    @dataclasses.dataclass(frozen=True)
    class ToyOptions:
        gain: float = 1.0
        def __post_init__(self):
            require(self.gain > 0, f"toy.gain must be > 0, got {self.gain}")

    @register_mechanism
    class ToyMixer(Mechanism):
        name = "toy"
        summary = "mean pooling (a plug-in)"
        Options = ToyOptions
        complexity = "linear"
        def __init__(self, dim, num_heads, options=None):
            super().__init__(dim, num_heads, options)
            self.proj = nn.Linear(dim, dim)
        def mix(self, x, grid):
            return x + self.options.gain * self.proj(x.mean(1, keepdim=True))
        def flops(self, batch, n, grid=None):
            return Flops(matmul=2 * batch * self.dim * self.dim)
''')


def fake_entry_points(monkeypatch, fakes: dict[str, list[metadata.EntryPoint]]) -> None:
    """The installed entry points (attnbench's own built-ins among them) plus ``fakes``, per group."""
    installed = metadata.entry_points  # importlib.metadata's own: torch and triton look theirs up too

    def entry_points(**select):
        found = installed(**select)
        return [*found, *fakes.get(select["group"], [])] if "group" in select else found

    monkeypatch.setattr(registry.metadata, "entry_points", entry_points)


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    """Install a plug-in module and fake its entry point, then forget it afterwards."""
    (tmp_path / "toy_attnbench_plugin.py").write_text(PLUGIN)
    (tmp_path / "broken_attnbench_plugin.py").write_text("raise ImportError('needs libfoo')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    group = registry.ENTRY_POINT_GROUP
    fake_entry_points(monkeypatch, {group: [metadata.EntryPoint("toy", "toy_attnbench_plugin", group),
                                            metadata.EntryPoint("broken", "broken_attnbench_plugin", group)]})
    with pytest.warns(UserWarning, match="broken"):
        registry.MECHANISMS.reload()
    yield
    registry.MECHANISMS.unregister("toy")
    registry.MECHANISMS.forget_loaded()  # found again without the fakes next time


def test_plugin_mechanism_appears_everywhere(plugin, capsys):
    assert "toy" in mechanism_names()
    m = build_mechanism("toy", 16, 2, gain="2.5")  # strings convert, as from the CLI
    assert m.options.gain == 2.5
    assert m(torch.randn(2, 5, 16)).shape == (2, 5, 16)
    with pytest.raises(OptionError, match="toy.gain must be > 0"):
        build_mechanism("toy", 16, 2, gain=-1.0)
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "toy" in out and "mean pooling (a plug-in)" in out
    assert "broken" in out and "plug-in failed to load: ImportError: needs libfoo" in out


def test_unknown_mechanism_lists_valid_choices():
    expected = "unknown mechanism 'nope'; valid choices: .*sdpa.*softmax"
    with pytest.raises(UnknownMechanismError, match=expected):
        build_mechanism("nope", 16, 2)


def test_options_are_typed_and_validated():
    m = build_mechanism("softmax", 16, 2, qkv_bias="false")
    assert m.options.qkv_bias is False and m.qkv.bias is None
    with pytest.raises(OptionError, match="not a valid bool"):
        build_mechanism("softmax", 16, 2, qkv_bias="maybe")
    with pytest.raises(OptionError, match="unknown option.*valid options: qkv_bias"):
        build_mechanism("softmax", 16, 2, heads=3)
    assert dataclasses.is_dataclass(registry.get_mechanism("softmax").Options)


def test_registering_a_second_class_under_a_taken_name_fails():
    class Impostor:
        name = "softmax"

    with pytest.raises(ValueError, match="registered twice"):
        registry.register_mechanism(Impostor)


def test_the_built_in_mechanisms_come_through_the_entry_point_group_alone():
    """Plug-ins all the way down: each built-in module is an entry point, as a plug-in is."""
    points = {ep.value for ep in metadata.entry_points(group=registry.ENTRY_POINT_GROUP)}
    assert {"mechanisms.softmax", "mechanisms.set", "mechanisms.xformers_mea"} <= points
    assert all(registry.get_mechanism(n).__module__ in points for n in ("softmax", "set", "swin", "nat"))


# ---- tasks: the same door --------------------------------------------------------------------------

TASK_PLUGIN = textwrap.dedent('''
    """A third-party task: a mechanism learns to tell which half of the tokens is louder."""
    import torch
    from torch import nn
    from attnbench import build_mechanism, register_task
    from tasks.common.harness import Data, TrainingTask

    @register_task
    class Louder(TrainingTask):
        name, summary, metrics = "louder", "which half of the tokens is louder (a plug-in)", ("accuracy",)
        presets = {"embedded": dict(epochs=1, batch_size=16, lr=3e-3)}

        def load_data(self):
            x = torch.randn(256, 8, 4, generator=torch.Generator().manual_seed(1))
            y = (x[:, :4].abs().sum((1, 2)) > x[:, 4:].abs().sum((1, 2))).long()
            pairs = torch.utils.data.TensorDataset(x, y)
            return Data("noise", train=pairs, val=pairs)

        def build_model(self):
            mixer = build_mechanism(self.mechanism, 4, 1, **self.options)
            return nn.Sequential(mixer, nn.Flatten(), nn.Linear(32, 2))

        def loss(self, net, batch):
            x, y = batch
            return nn.functional.cross_entropy(net(x), y), len(y)

        def evaluate(self, model):
            x, y = self.to_device(next(iter(self.val_loader)))
            hits, n = self.reduce((model(x).argmax(1) == y).sum().item(), len(y))
            return {"accuracy": 100 * hits / n, "items": n}
''')


@pytest.fixture
def task_plugin(tmp_path, monkeypatch):
    """A third-party task module and a broken one, found through faked ``attnbench.task`` entry points."""
    (tmp_path / "louder_attnbench_task.py").write_text(TASK_PLUGIN)
    (tmp_path / "broken_attnbench_task.py").write_text("raise ImportError('needs libbar')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    group = TASKS.group
    fake_entry_points(monkeypatch, {group: [
        metadata.EntryPoint("louder", "louder_attnbench_task", group),
        metadata.EntryPoint("broken-task", "broken_attnbench_task", group)]})
    with pytest.warns(UserWarning, match="broken-task"):
        TASKS.reload()
    yield
    TASKS.unregister("louder")
    TASKS.forget_loaded()


def test_plugin_task_appears_in_list_and_runs(task_plugin, tmp_path, capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "which half of the tokens is louder (a plug-in)" in out
    assert "broken-task" in out and "plug-in failed to load: ImportError: needs libbar" in out
    for task in ("imagenet", "coco", "ade20k", "glue"):  # the built-ins came through the same group
        assert any(line.startswith(task + " ") for line in out.splitlines())
    argv = ["run", "--task", "louder", "--mechanism", "linear", "--max-steps", "3", "--out",
            str(tmp_path / "run"), "--results", str(tmp_path / "louder.csv")]
    assert main(argv) == 0
    import pandas as pd

    row = pd.read_csv(tmp_path / "louder.csv").iloc[0]
    assert (row["task"], row["mechanism"], row["limited"], row["max_steps"]) == ("louder", "linear", True, 3)
    assert 0 <= row["accuracy"] <= 100 and "louder | linear" in capsys.readouterr().out



# ---- the Registry class on its own -------------------------------------------------------------


class UnknownWidgetError(UnknownNameError):
    pass


class FakeEntryPoint:
    """What ``Registry.load`` reads of an entry point: its name, its value, and ``load()``."""

    def __init__(self, name: str, load) -> None:
        self.name, self.value, self.load = name, f"widgets.{name}", load


def widget(name: str, module: str = "widgets.one") -> type:
    return type(f"Widget_{name}", (), {"name": name, "__module__": module})


@pytest.fixture
def widgets(monkeypatch):
    """A registry of its own kind and group, whose group holds one good and one broken entry point."""
    widgets = Registry("widget", "attnbench.test-widgets", UnknownWidgetError)
    good = widget("good", "widgets.good")

    def broken():
        raise ImportError("needs libwidget")

    points = [FakeEntryPoint("good", lambda: widgets.register(good)), FakeEntryPoint("broken", broken)]
    asked = []

    def entry_points(**select):
        asked.append(select["group"])
        return points if select["group"] == widgets.group else []

    monkeypatch.setattr(registry.metadata, "entry_points", entry_points)
    widgets.asked = asked  # the groups looked up, in order
    return widgets


def test_the_group_is_loaded_once_and_a_broken_plug_in_is_recorded_with_its_reason(widgets):
    warning = r"plug-in 'broken' \(widgets.broken\) failed to load: needs libwidget"
    with pytest.warns(UserWarning, match=warning):
        assert widgets.names() == ["good"]
    assert widgets.broken() == {"broken": "ImportError: needs libwidget"}
    assert widgets.get("good").name == "good" and "good" in widgets and "broken" not in widgets
    assert widgets.asked == ["attnbench.test-widgets"]  # once, whatever was asked after
    with pytest.warns(UserWarning, match="broken"):
        widgets.reload()
    assert widgets.asked == ["attnbench.test-widgets"] * 2
    assert widgets.broken() == {"broken": "ImportError: needs libwidget"}


def test_an_unknown_name_is_one_line_listing_the_valid_ones(widgets):
    with pytest.warns(UserWarning, match="broken"):
        widgets.register(widget("other"))
        with pytest.raises(UnknownWidgetError) as caught:
            widgets.get("nope")
    assert str(caught.value) == "unknown widget 'nope'; valid choices: good, other"
    assert isinstance(caught.value, KeyError) and "\n" not in str(caught.value)
    empty = Registry("widget", "attnbench.no-such-group")
    with pytest.raises(UnknownNameError, match=f"unknown widget 'x'; valid choices: {NOT_INSTALLED[:20]}"):
        empty.get("x")


def test_a_name_registered_twice_from_two_places_is_an_error_and_the_same_class_again_is_not():
    widgets = Registry("widget", "attnbench.no-such-group")
    first = widgets.register(widget("a", "widgets.one"))
    assert widgets.register(widget("a", "widgets.one")) is not first  # the same file loaded again
    with pytest.raises(ValueError, match="widget 'a' is registered twice: widgets.one and widgets.two"):
        widgets.register(widget("a", "widgets.two"))
    with pytest.raises(TypeError, match="needs a class attribute `name`"):
        widgets.register(type("Nameless", (), {}))


def test_unregister_by_name_and_by_module():
    widgets = Registry("widget", "attnbench.no-such-group")
    for name, module in (("a", "widgets.one"), ("b", "widgets.one"), ("c", "widgets.two")):
        widgets.register(widget(name, module))
    widgets.unregister_module("widgets.one")
    assert widgets.names() == ["c"]
    widgets.unregister("c", "never-there")
    assert widgets.names() == []


def test_mechanisms_and_tasks_are_two_registries_of_one_class():
    assert isinstance(registry.MECHANISMS, Registry) and isinstance(TASKS, Registry)
    assert (registry.MECHANISMS.group, TASKS.group) == ("attnbench.mechanisms", "attnbench.tasks")
    with pytest.raises(UnknownTaskError, match="unknown task 'nope'; valid choices: .*imagenet"):
        TASKS.get("nope")
    with pytest.raises(UnknownMechanismError, match="unknown mechanism 'nope'; valid choices: .*softmax"):
        registry.MECHANISMS.get("nope")


# ---- --load on every command that builds a mechanism or a task ---------------------------------


@pytest.fixture
def load_files(tmp_path):
    """The toy mechanism and the louder task as plain ``.py`` files, for ``--load`` (no entry points)."""
    (tmp_path / "toy_mechanism.py").write_text(PLUGIN)
    (tmp_path / "louder_task.py").write_text(TASK_PLUGIN)
    yield tmp_path
    registry.MECHANISMS.unregister("toy")
    TASKS.unregister("louder")


def test_list_load_shows_the_plug_in_mechanism(load_files, capsys):
    assert "toy" not in mechanism_names()
    assert main(["list", "--load", str(load_files / "toy_mechanism.py")]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("toy "))
    assert "mean pooling (a plug-in)" in line and " yes " in line
    assert main(["list", "--mechanism", "toy", "--load", str(load_files / "toy_mechanism.py")]) == 0
    assert "gain = 1.0" in capsys.readouterr().out


def test_models_load_builds_the_task_model_with_the_plug_in_mechanism(load_files, capsys):
    argv = ["models", "--load", str(load_files / "toy_mechanism.py"), "--mechanism", "toy", "--size", "micro",
            "--img-size", "32", "--classes", "10"]
    assert main(argv) == 0
    assert re.search(r"^micro\s+toy\s+\d", capsys.readouterr().out, re.M)


def test_run_load_trains_with_a_plug_in_mechanism_on_a_plug_in_task_and_resumes_without_it(
        load_files, monkeypatch, capsys):
    """``run --load``: the task's name and its own options (``--max-steps``) are known to the parser;
    the row names the plug-in mechanism; the run records the file's full path, so ``--resume`` from
    elsewhere finds the plug-ins without ``--load``."""
    monkeypatch.chdir(load_files)
    out = load_files / "run"
    argv = ["run", "--load", "toy_mechanism.py", "--load=louder_task.py", "--task", "louder",
            "--mechanism", "toy", "--opt", "toy.gain=0.5", "--max-steps", "3", "--out", str(out),
            "--results", str(load_files / "l.csv")]
    assert main(argv) == 0
    import pandas as pd

    row = pd.read_csv(load_files / "l.csv").iloc[0]
    assert (row["task"], row["mechanism"], row["max_steps"], row["status"]) == ("louder", "toy", 3, "ok")
    settings = json.loads((out / "meta.json").read_text())["settings"]
    assert settings["load"] == [str(load_files / "toy_mechanism.py"), str(load_files / "louder_task.py")]
    registry.MECHANISMS.unregister("toy")
    TASKS.unregister("louder")
    monkeypatch.chdir(load_files.parent)
    capsys.readouterr()
    assert main(["run", "--resume", str(out)]) == 0  # the record's --load brings the task back
    assert "already finished" in capsys.readouterr().out and "louder" in task_names()


@pytest.mark.parametrize("command", [["list"], ["run", "--task", "imagenet", "--mechanism", "softmax"],
                                     ["models"], ["scale"], ["resolution", "--task", "coco"]])
def test_a_bad_load_is_one_line_on_every_command_that_takes_it(command, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main([*command, "--load", str(tmp_path / "nowhere.py")])
    assert exc.value.code == 2
    missing = tmp_path / "nowhere.py"
    assert capsys.readouterr().err == f"attnbench {command[0]}: error: --load {missing}: no such file\n"
    (tmp_path / "bad.py").write_text("x = 1\nraise RuntimeError('needs a GPU')\n")
    with pytest.raises(SystemExit):
        main([*command, "--load", str(tmp_path / "bad.py")])
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert f"attnbench {command[0]}: error: --load {tmp_path / 'bad.py'}: cannot import it: " \
           f"{tmp_path / 'bad.py'}:2: RuntimeError: needs a GPU" in err


def test_load_takes_a_module_name_too(load_files, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(load_files))
    assert main(["list", "--load", "toy_mechanism"]) == 0
    assert any(ln.startswith("toy ") for ln in capsys.readouterr().out.splitlines())
    with pytest.raises(SystemExit):
        main(["list", "--load", "no_such_module_anywhere"])
    assert "--load no_such_module_anywhere: cannot import it: ModuleNotFoundError" in capsys.readouterr().err
