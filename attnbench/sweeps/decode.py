"""The decode sweep (``attnbench scale --mode decode``): at each context n, the prefill of an n-token
prompt and the time per generated token, with the cache's bytes.

It is a mode of the kernel sweep and shares its folder, workers, interleaved rounds, resume, fits
and plots (``attnbench.sweeps.kernel``); what is its own is here: the settings it refuses, the
mechanisms that cannot decode, the worker that builds a cache and times one step per token, how
many tokens a row times, its tokens per second, its console line and the cache's exponent in the
fit summary.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pandas as pd

from attnbench.measure.decode_worker import DecodeConfiguration
from attnbench.sweeps.base import SweepError

MODE = "decode"
DECODE_STEPS = 32  # timed generated tokens per row, at least, over its rounds
DEFAULT_SEQ = "1024..131072"  # the long contexts, where a KV cache is what costs
WORKER = DecodeConfiguration  # builds the prompt's cache, then times one generated token a run


def check_settings(layout: str, compile: bool) -> None:
    """The sweep's settings suit decoding (1-D sequences, eager); else a ``SweepError``."""
    if layout != "1d":
        raise SweepError("--mode decode: decoding generates sequences; use --layout 1d")
    if compile:
        raise SweepError("--mode decode runs eager: prefill and step are not compiled; drop --compile")


def unavailable(mechanism: type) -> str | None:
    """Why a registered mechanism class cannot decode, or None."""
    problem = mechanism.decode_problem()
    return None if problem is None else f"incremental decoding is not supported: {problem}"


def tokens_s(batch: int, median_s: float) -> float:
    """Generated tokens per second: each step generates one token for each sequence of the batch."""
    return batch / median_s if median_s > 0 else math.nan


def result_text(row: dict[str, Any]) -> str:
    """A measured row as the console shows it: time and rate per token, prefill, cache."""
    return (f"{row['time_ms_median']:.3g} ms per token (IQR {row['time_ms_iqr']:.2g}), "
            f"{row['tokens_s']:.4g} tokens/s, prefill {row.get('prefill_ms', math.nan):.4g} ms, "
            f"cache {row.get('cache_bytes', math.nan) / 2**20:.4g} MiB")


def cache_exponents(fits: pd.DataFrame, interval: Callable[[float, float], str]) -> list[str] | None:
    """The fit table's cache exponents with their 95 % intervals (``interval(low, high)``), as the
    fit summary shows them; None for a table without them (no decode mode swept)."""
    if "cache_exponent" not in fits.columns:
        return None
    cache = zip(fits["cache_exponent"], fits["cache_ci_low"], fits["cache_ci_high"], strict=True)
    return [f"{e:.2f} {interval(lo, hi)}" if math.isfinite(e) else "-" for e, lo, hi in cache]
