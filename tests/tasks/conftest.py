"""What the task tests share: a command line's one-line error."""

from __future__ import annotations

from collections.abc import Callable

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
