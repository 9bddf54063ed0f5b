"""Measuring one configuration honestly: time with torch.utils.benchmark, memory in its own pass.

Time: ``Timer.blocked_autorange`` (warm-up, fixed thread count, CUDA synchronisation), median
and inter-quartile range over at least a few runs. Memory: on CUDA the peak allocated over a
baseline taken after inputs and weights exist; on the CPU the peak resident set (VmHWM) over
the resident set before the run, after resetting the high-water mark, in a process of its own
(see ``attnbench.measure.worker``). MiB = 2**20 bytes throughout.
"""

from __future__ import annotations

import dataclasses
import gc
import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils import benchmark

MIB = 2**20


@dataclasses.dataclass(frozen=True)
class Timing:
    median_ms: float
    iqr_ms: float
    runs: int


def make_step(module: torch.nn.Module, x: torch.Tensor, grid: tuple[int, int] | None,
              mode: str, causal: bool = False) -> Callable[[], None]:
    """The callable to measure: a forward pass without autograd, or forward and backward;
    ``causal``: of the mechanism's causal form."""
    extra = {"causal": True} if causal else {}  # a plain call stays as it was

    if mode == "fwd":
        def forward() -> None:
            with torch.no_grad():
                module(x, grid, **extra)
        return forward
    if mode == "fwd+bwd":
        x = x.detach().requires_grad_()
        grad = torch.randn_like(x)

        def forward_backward() -> None:
            module.zero_grad(set_to_none=True)
            x.grad = None
            module(x, grid, **extra).backward(grad)
        return forward_backward
    raise ValueError(f"unknown mode {mode!r}; valid choices: fwd, fwd+bwd")


def time_step(step: Callable[[], None], threads: int, min_run_time: float, min_runs: int = 5) -> Timing:
    """Median and IQR of ``step`` in milliseconds, from at least ``min_runs`` timed runs
    (3 for steps slower than a second, so that big configurations fit their budget)."""
    timer = benchmark.Timer(stmt="step()", globals={"step": step}, num_threads=threads)
    first = timer.timeit(1).median  # warm-up, and a first idea of the cost
    if first > 1.0:
        min_runs = min(min_runs, 3)
    budget = max(min_run_time, min_runs * first)
    measurement = timer.blocked_autorange(min_run_time=budget)
    times = [t * 1e3 for t in measurement.times]
    if len(times) < min_runs:  # a slow step: blocked_autorange stopped at one block
        times += [timer.timeit(1).median * 1e3 for _ in range(min_runs - len(times))]
    quartiles = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    return Timing(statistics.median(times), quartiles[2] - quartiles[0], len(times))


def time_call(step: Callable[[], None], device: torch.device) -> float:
    """Seconds of one call of ``step``, CUDA synchronised before and after (as the Timer does).

    For steps long enough to be timed alone: ``Timer.timeit(1)`` would run two more calls to warm up.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def time_round(timer: benchmark.Timer, step: Callable[[], None], device: torch.device, step_s: float,
               seconds: float, min_runs: int) -> list[float]:
    """Per-run times in ms of one timing round of about ``seconds``, at least ``min_runs`` runs.

    Steps short enough to need it are timed in blocks by ``blocked_autorange`` (whose block-size
    estimate also re-warms the caches after whatever ran between rounds); steps that fill the
    round with ``min_runs`` calls are timed call by call. ``step_s``: one warm call's time.
    """
    if step_s * min_runs >= seconds:
        return [time_call(step, device) * 1e3 for _ in range(min_runs)]
    times = [t * 1e3 for t in timer.blocked_autorange(min_run_time=seconds).times]
    while len(times) < min_runs:
        times.append(time_call(step, device) * 1e3)
    return times


def quartiles(values: list[float]) -> tuple[float, float, float]:
    """First quartile, median and third quartile (all three the value itself for one value)."""
    if len(values) == 1:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4)
    return q1, statistics.median(values), q3


def proc_status_mib(field: str) -> float:
    """A memory field of /proc/self/status (VmRSS, VmHWM, …) in MiB; NaN where there is none."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024 / MIB
    except OSError:
        pass
    return math.nan


def reset_cpu_peak() -> bool:
    """Reset this process's resident high-water mark (Linux); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def cpu_peak_mib(step: Callable[[], None], warm: bool = False) -> float:
    """Peak resident memory of one ``step`` above the resident memory before it, in MiB.

    Run in a fresh process with glibc's mmap threshold fixed (the worker does both), so that
    freed buffers return to the system and the resident set tracks live tensors. ``warm``:
    the step already ran here (lazy initialisation is not the mechanism's memory).
    """
    if not warm:
        step()
    gc.collect()
    if not reset_cpu_peak():
        raise RuntimeError("cannot reset the resident high-water mark (/proc/self/clear_refs)")
    before = proc_status_mib("VmRSS")
    step()
    return max(0.0, proc_status_mib("VmHWM") - before)


def cuda_peak_mib(step: Callable[[], None], device: torch.device, warm: bool = False) -> float:
    """Peak CUDA memory allocated by one ``step`` over what was allocated before it, in MiB."""
    if not warm:
        step()
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    baseline = torch.cuda.memory_allocated(device)
    step()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - baseline) / MIB


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether an exception is the allocator running out of memory (CPU or CUDA)."""
    if isinstance(exc, (MemoryError, torch.cuda.OutOfMemoryError)):
        return True
    text = str(exc)
    return any(s in text for s in ("out of memory", "can't allocate memory", "not enough memory",
                                   "Cannot allocate memory"))
