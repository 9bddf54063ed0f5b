"""The registry: building by name, option validation and plug-ins through entry points."""

from __future__ import annotations

import dataclasses
import textwrap
from importlib import metadata

import pytest
import torch

from attnbench import OptionError, UnknownMechanismError, build_mechanism, mechanism_names, registry
from attnbench.cli import main

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
        registry.reload_plugins()
    yield
    registry._REGISTRY.pop("toy", None)
    registry._BROKEN_PLUGINS.clear()
    registry._loaded = False  # found again without the fakes next time


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
    """A third-party task module and a broken one, found through faked ``attnbench.tasks`` entry points."""
    from attnbench import tasks

    (tmp_path / "louder_attnbench_task.py").write_text(TASK_PLUGIN)
    (tmp_path / "broken_attnbench_task.py").write_text("raise ImportError('needs libbar')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    group = tasks.ENTRY_POINT_GROUP
    fake_entry_points(monkeypatch, {group: [
        metadata.EntryPoint("louder", "louder_attnbench_task", group),
        metadata.EntryPoint("broken-task", "broken_attnbench_task", group)]})
    with pytest.warns(UserWarning, match="broken-task"):
        tasks.reload_plugins()
    yield
    tasks._TASKS.pop("louder", None)
    tasks._BROKEN_TASKS.clear()
    tasks._loaded = False


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

