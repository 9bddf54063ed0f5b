"""The machine probe: two fixed calibration kernels that say how fast this machine is right now.

A sweep times them before it starts and between its timing rounds, with the sweep's device,
dtype and thread count, so every row carries the machine's rate measured in the same run:

- ``matmul``: a square ``MATMUL_SIZE`` matrix product in the sweep's dtype, compute-bound,
  2·s³ FLOPs (FLOPs, not MACs) -> GFLOP/s;
- ``copy``: a copy between two ``COPY_MIB`` buffers, memory-bound, counted as the bytes read
  plus the bytes written -> GB/s (10⁹ bytes). Three warm-up copies first, so that a reading does
  not depend on what the workers between readings left in the caches; on CPUs with a large
  last-level cache it is then cache bandwidth, and the floor computed from it a lower bound.

Each reading takes the median of five calls per kernel (about 25 ms in all on this project's
2-core CPU), so one lucky or unlucky call does not move it. ``MachineState`` keeps the readings
of a sweep and says how much slower than the sweep's best a new reading is: a burst of load
shows up as a slow-down.
"""

from __future__ import annotations

import dataclasses
import math
import os
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

MATMUL_SIZE = {"cpu": 512, "cuda": 4096}
COPY_MIB = {"cpu": 32, "cuda": 1024}
REFERENCE_QUANTILE = 0.9  # the machine's best rate so far, robust to one lucky reading


@dataclasses.dataclass(frozen=True)
class Reading:
    """One probe reading: the matmul rate (GFLOP/s) and the copy bandwidth (GB/s)."""

    gflops: float
    gbs: float


def _median_seconds(fn: Callable[[], object], sync: Callable[[], None], min_calls: int,
                    min_seconds: float, warmup: int = 1) -> float:
    """Median wall time of ``fn`` over at least ``min_calls`` calls and ``min_seconds``, after ``warmup``."""
    for _ in range(warmup):
        fn()
    sync()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_calls or (time.perf_counter() - start < min_seconds and len(times) < 50):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


class Probe:
    """The two calibration kernels, their buffers allocated once; ``read()`` times them."""

    def __init__(self, device: str = "cpu", dtype: torch.dtype = torch.float32, threads: int = 1,
                 min_seconds: float = 0.005) -> None:
        self.device = torch.device(device)
        kind = self.device.type
        self.threads = threads
        self.min_seconds = min_seconds
        size = MATMUL_SIZE.get(kind, 512)
        self.a = torch.randn(size, size, device=self.device, dtype=dtype)
        self.b = torch.randn(size, size, device=self.device, dtype=dtype)
        self.c = torch.empty(size, size, device=self.device, dtype=dtype)
        self.matmul_flops = 2 * size**3
        elements = COPY_MIB.get(kind, 64) * 2**20 // 4
        self.src = torch.randn(elements, device=self.device, dtype=torch.float32)
        self.dst = torch.empty_like(self.src)
        self.copy_bytes = 2 * elements * 4  # read + write

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def read(self) -> Reading:
        """Time both kernels now (with the sweep's thread count) and return their rates."""
        torch.set_num_threads(self.threads)
        mm = _median_seconds(lambda: torch.mm(self.a, self.b, out=self.c), self._sync, 5, self.min_seconds)
        cp = _median_seconds(lambda: self.dst.copy_(self.src), self._sync, 5, self.min_seconds, warmup=3)
        return Reading(gflops=self.matmul_flops / mm / 1e9, gbs=self.copy_bytes / cp / 1e9)


def slowdown(reference: Reading, reading: Reading) -> float:
    """Reference rate over this rate, for the worse of the two kernels: 1.0 = as fast, 2.0 = half as fast."""
    ratios = [ref / now for ref, now in ((reference.gflops, reading.gflops), (reference.gbs, reading.gbs))
              if now > 0 and math.isfinite(now)]
    return max(ratios) if ratios else math.nan


def median_reading(readings: Sequence[Reading]) -> Reading:
    """Each kernel's median over ``readings`` (what a row records as the machine's rate)."""
    if not readings:
        return Reading(math.nan, math.nan)
    return Reading(statistics.median(r.gflops for r in readings), statistics.median(r.gbs for r in readings))


@dataclasses.dataclass
class MachineState:
    """Every probe reading of a sweep; the reference is the machine's best rate seen so far.

    The reference is a high quantile (``REFERENCE_QUANTILE``) of the readings per kernel, not
    their median: load that arrives partway through and stays must still count as a slow-down.
    """

    readings: list[Reading] = dataclasses.field(default_factory=list)

    def add(self, reading: Reading) -> None:
        self.readings.append(reading)

    def reference(self) -> Reading:
        if not self.readings:
            return Reading(math.nan, math.nan)
        q = REFERENCE_QUANTILE
        return Reading(float(np.quantile([r.gflops for r in self.readings], q)),
                       float(np.quantile([r.gbs for r in self.readings], q)))

    def slowdown(self, readings: Sequence[Reading]) -> float:
        """The worst slow-down among ``readings`` against the reference (1.0 = no slow-down)."""
        reference = self.reference()
        values = [slowdown(reference, r) for r in readings]
        values = [v for v in values if math.isfinite(v)]
        return max(values) if values else math.nan

    def range(self) -> tuple[Reading, Reading]:
        """The slowest and the fastest reading per kernel (for the summary)."""
        g = [r.gflops for r in self.readings] or [math.nan]
        b = [r.gbs for r in self.readings] or [math.nan]
        return Reading(min(g), min(b)), Reading(max(g), max(b))


def floor_ms(matmul_flops: float, elementwise_flops: float, itemsize: int, rate: Reading) -> float:
    """The physical floor of one step in ms: its matmul FLOPs at the probe's matmul rate plus its
    elementwise traffic at the probe's bandwidth.

    An eager elementwise op reads and writes its element, so each elementwise FLOP counts
    ``2 * itemsize`` bytes; compute and memory are not assumed to overlap. A fused or compiled
    kernel can beat it (``floor_fraction`` above 1): it keeps elements in registers.
    """
    if not (rate.gflops > 0 and rate.gbs > 0):
        return math.nan
    return (matmul_flops / (rate.gflops * 1e9) + elementwise_flops * 2 * itemsize / (rate.gbs * 1e9)) * 1e3


def idle_cores(seconds: float = 0.5) -> float | None:
    """How many CPU cores sat idle over the next ``seconds`` (from /proc/stat), or None off Linux.

    A sweep with more threads than idle cores measures the scheduler, not the mechanism: every
    multi-threaded step waits at each barrier for the thread that shares a core with the other
    load (seen here: 2 threads beside one busy process ran 12x slower, in bursts).
    """
    def sample() -> tuple[int, int]:
        fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        return fields[3] + fields[4], sum(fields[:8])  # idle + iowait, all but guest time

    try:
        idle0, total0 = sample()
        time.sleep(seconds)
        idle1, total1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    cores = os.cpu_count() or 1
    return cores * (idle1 - idle0) / max(total1 - total0, 1)


def default_threads(available: int) -> tuple[int, str]:
    """Threads for a CPU sweep: torch's default, less the cores busy when the sweep starts; and
    a note saying so when it is less (empty otherwise)."""
    idle = idle_cores()
    if idle is None:
        return available, ""
    threads = max(1, min(available, math.floor(idle + 0.3)))
    if threads == available:
        return threads, ""
    return threads, (f"{available - threads} of {available} cores busy when the sweep started: timing with "
                     f"{threads} thread{'s' if threads > 1 else ''} (--threads N overrides)")
