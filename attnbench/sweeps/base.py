"""What every kind of sweep folder shares, written once: the request's parsing (lengths,
mechanisms), the folder's checks (no other kind of run in it, no sweep unless resumed, a resume
measured as the folder was), its ``meta.json`` (the run's context and every command that
wrote to it), rows appended under the table's lock, and the line an interrupted sweep ends with
(what was kept, and the command that finishes it).

A kind of sweep (``kernel``, ``accuracy``, ``resolution`` beside this module) subclasses
``SweepFolder`` with its table, its columns and what a resume must share, and supplies only what
is its own: what it measures, and its finish, summary and comparison.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import pandas as pd

from attnbench import registry
from attnbench.interrupt import Interrupted, command_with, keeping
from attnbench.results.schema import stamp, stamped, upgrade_meta
from attnbench.results.tables import append_rows, foreign_run, read_meta, read_table, run_context, write_meta

MAX_N = 2**24  # the longest sequence a sweep takes


class SweepError(ValueError):
    """A sweep request that cannot be run as asked (bad range, mismatched resume)."""


def parse_seq(text: str) -> list[int]:
    """``256..16384`` (doubling), ``256,1024,4096`` or ``512`` -> sorted sequence lengths."""
    text = text.strip()
    if m := re.fullmatch(r"(\d+)\s*\.\.\s*(\d+)", text):
        lo, hi = int(m[1]), int(m[2])
        if lo < 1 or hi < lo:
            raise SweepError(f"--seq {text!r}: the range LO..HI needs 1 <= LO <= HI (doubling from LO), "
                             f"e.g. 256..16384")
        values = []
        n = lo
        while n <= hi:
            values.append(n)
            n *= 2
    elif re.fullmatch(r"\d+(\s*,\s*\d+)*", text):
        values = sorted({int(v) for v in text.split(",")})
        if values[0] < 1:
            raise SweepError(f"--seq {text!r}: sequence lengths must be >= 1")
    else:
        raise SweepError(f"--seq {text!r}: expected a doubling range LO..HI (256..16384), a comma list "
                         f"(256,1024,4096) or one length (512)")
    if values[-1] > MAX_N:
        raise SweepError(f"--seq {text!r}: {values[-1]} is beyond the largest supported n ({MAX_N})")
    return values


def parse_mechanisms(text: str) -> list[str]:
    """``all`` = every registered mechanism (unavailable ones are recorded as such)."""
    names = registry.mechanism_names()
    if text.strip() == "all":
        return names
    chosen = [t.strip() for t in text.split(",") if t.strip()]
    if not chosen:
        raise SweepError(f"--mechanism is empty; valid choices: all, {', '.join(names)}")
    for name in chosen:
        registry.get_mechanism(name)  # unknown names raise with the valid choices
    return list(dict.fromkeys(chosen))


def resume_command(argv: Sequence[str], out: Path) -> str:
    """The sweep's command line with ``--out OUT --resume``, before any task arguments after ``--``
    (after them they would be task arguments)."""
    cut = list(argv).index("--") if "--" in argv else len(argv)
    head = command_with(argv[:cut], {"--out": True, "--resume": False}, ["--out", str(out), "--resume"])
    return head + (f" {shlex.join(argv[cut:])}" if cut < len(argv) else "")


class SweepFolder:
    """One sweep's folder: ``table`` (its rows, ``columns`` first) and ``meta.json``.

    A kind sets the class attributes and, where a resume must match more than the table's
    presence, ``check_resume``; ``cfg`` is the kind's settings (a dataclass with ``validate``)."""

    table: ClassVar[str]  # the file that says which kind of run a folder holds: scale.csv, …
    columns: ClassVar[list[str]]
    schema: ClassVar[str]  # its kind of table (results.schema): rows and meta.json carry its version
    kind: ClassVar[str]  # in "OUT holds …, not a kernel sweep"
    already: ClassVar[str] = "{out} already holds a sweep; pass --resume to finish it or choose another --out"
    error: ClassVar[type[Exception]] = SweepError

    def __init__(self, cfg: Any, out: Path) -> None:
        self.cfg, self.out = cfg, out

    @property
    def csv(self) -> Path:
        return self.out / self.table

    @property
    def meta_path(self) -> Path:
        return self.out / "meta.json"

    def foreign(self) -> str | None:
        """What other kind of run the folder holds, or None."""
        return foreign_run(self.out, self.table)

    def check(self, resume: bool) -> None:
        """The sweep may write to its folder: its settings are sound, and the folder holds no other
        kind of run, no sweep unless ``resume``, and on ``resume`` one measured as this one
        measures; else the kind's error, raised before anything is printed or measured."""
        self.cfg.validate()
        foreign = self.foreign()
        if foreign:
            raise self.error(f"{self.out} holds {foreign}, not {self.kind}; choose another --out")
        if self.csv.exists() and not resume:
            raise self.error(self.already.format(out=self.out))
        if resume:
            self.check_resume()

    def check_resume(self) -> None:
        """On ``--resume``: the folder was measured with this sweep's settings (the kind's own)."""

    def read(self, columns: list[str] | None = None) -> pd.DataFrame:
        """The folder's table in the current layout (empty, with ``columns``, where there is none yet)."""
        return read_table(self.csv, columns, kind=self.schema)

    def recorded(self) -> dict[str, Any]:
        """The folder's ``meta.json`` in the current layout (a resume compares its settings)."""
        return upgrade_meta(read_meta(self.meta_path), self.schema, str(self.meta_path))

    def meta(self, argv: list[str], resume: bool, **fields: Any) -> dict[str, Any]:
        """``meta.json``'s content: the run's context, ``fields`` (the settings) and every command
        that wrote to the folder (a resumed run keeps how it was started)."""
        meta = run_context(self.cfg.device, self.cfg.threads, argv)
        meta.update(fields)
        stamp(meta, self.schema)
        earlier = read_meta(self.meta_path).get("commands", []) if resume else []
        meta["commands"] = [*earlier, meta["command"]]
        return meta

    def write_meta(self, meta: dict[str, Any]) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        write_meta(self.meta_path, meta)

    def append(self, rows: Sequence[dict[str, Any]],
               then: Callable[[pd.DataFrame], pd.DataFrame] | None = None) -> pd.DataFrame:
        """Append ``rows``, stamped with their version, to the table under its lock (``then``: a column
        that depends on every row)."""
        return append_rows(self.csv, [stamped(r, self.schema) for r in rows], self.columns, then)

    def append_beside(self, name: str, rows: Sequence[dict[str, Any]], columns: list[str],
                      schema: str) -> pd.DataFrame:
        """Append ``rows`` to another table of the folder (the kernel sweep's ``rounds.csv``), stamped
        as of their kind ``schema``."""
        return append_rows(self.out / name, [stamped(r, schema) for r in rows], columns)

    def interrupted(self, exc: KeyboardInterrupt, argv: Sequence[str], total: int | None = None,
                    unit: str = "rows", note: str = "", verb: str = "finish") -> Interrupted:
        """The exception an interrupted sweep ends with: how many rows it kept, and how to go on."""
        rows = len(read_table(self.csv, self.columns))
        of = f" of {total}" if total is not None else ""
        return keeping(exc, f"kept {rows}{of} {unit} in {self.csv}{note}; {verb} with: "
                            f"{resume_command(argv, self.out)}")

