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


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    """Install a plug-in module and fake its entry point, then forget it afterwards."""
    (tmp_path / "toy_attnbench_plugin.py").write_text(PLUGIN)
    (tmp_path / "broken_attnbench_plugin.py").write_text("raise ImportError('needs libfoo')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    points = [metadata.EntryPoint("toy", "toy_attnbench_plugin", registry.ENTRY_POINT_GROUP),
              metadata.EntryPoint("broken", "broken_attnbench_plugin", registry.ENTRY_POINT_GROUP)]
    monkeypatch.setattr(registry.metadata, "entry_points",
                        lambda group: points if group == registry.ENTRY_POINT_GROUP else [])
    with pytest.warns(UserWarning, match="broken"):
        registry.reload_plugins()
    yield
    registry._REGISTRY.pop("toy", None)
    registry._BROKEN_PLUGINS.clear()


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
