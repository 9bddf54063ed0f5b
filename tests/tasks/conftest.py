"""What the task tests share: a command line's one-line error, and mechanisms with a causal form."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from attnbench.cli import main


@pytest.fixture
def cli_error(capsys) -> Callable[[list[str]], str]:
    """``cli_error(argv)``: run the CLI, expect exit status 2 and no traceback, return the one line
    that says what is wrong."""

    def run(argv: list[str]) -> str:
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err, err
        return err.strip().splitlines()[-1]

    return run


CAUSAL = Path(__file__).resolve().parents[1] / "causal_mechanisms.py"  # loaded, never imported


@pytest.fixture
def causal_mechanisms() -> Iterator[str]:
    """The test plug-ins with a causal form (``causal_softmax``, ``leaky_causal``), registered for one
    test; yields the file's path, for a sweep's ``--load``."""
    from attnbench import registry

    registry.load_module(str(CAUSAL))
    yield str(CAUSAL)
    registry.MECHANISMS.unregister_module(CAUSAL.stem)
