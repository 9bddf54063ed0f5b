"""The machine probe: its readings, the sweep's reference and slow-down, and the physical floor."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time

import pytest
import torch

from attnbench.measure.probe import MachineState, Probe, Reading, floor_ms, median_reading, slowdown


@pytest.fixture(autouse=True)
def _keep_threads():
    """The probe sets the thread count it measures with; leave the test process as it was."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_probe_reads_finite_positive_rates_quickly():
    probe = Probe("cpu", torch.float32, threads=1)
    reading = probe.read()
    assert reading.gflops > 0.1 and math.isfinite(reading.gflops)
    assert reading.gbs > 0.1 and math.isfinite(reading.gbs)
    assert torch.get_num_threads() == 1


def test_slowdown_is_the_worse_kernel_against_the_reference():
    assert slowdown(Reading(100, 10), Reading(50, 10)) == pytest.approx(2.0)
    assert slowdown(Reading(100, 10), Reading(100, 4)) == pytest.approx(2.5)
    assert slowdown(Reading(100, 10), Reading(200, 20)) == pytest.approx(0.5)
    assert math.isnan(slowdown(Reading(100, 10), Reading(math.nan, math.nan)))


def test_machine_state_reference_is_the_best_rate_so_far_not_one_lucky_reading():
    state = MachineState()
    for _ in range(9):
        state.add(Reading(100.0, 10.0))
    state.add(Reading(1000.0, 100.0))  # one lucky outlier moves the 90th percentile only a little
    reference = state.reference()
    assert 100 <= reference.gflops < 250 and 10 <= reference.gbs < 25
    assert state.slowdown([Reading(100, 10), Reading(30, 10)]) == pytest.approx(reference.gflops / 30)
    low, high = state.range()
    assert (low.gflops, high.gflops) == (100.0, 1000.0)
    # load that arrives partway through and stays is still a slow-down against the early readings
    for _ in range(10):
        state.add(Reading(50.0, 5.0))
    assert state.slowdown([Reading(50.0, 5.0)]) >= 2.0


def test_median_reading_and_empty_state():
    assert median_reading([Reading(1, 4), Reading(3, 2), Reading(2, 3)]) == Reading(2, 3)
    assert math.isnan(median_reading([]).gflops)
    assert math.isnan(MachineState().slowdown([Reading(1, 1)]))


def test_floor_is_matmul_at_the_matmul_rate_plus_elementwise_traffic_at_the_bandwidth():
    rate = Reading(gflops=100.0, gbs=10.0)
    # 1e9 matmul FLOPs at 100 GFLOP/s = 10 ms; 1e8 elementwise FLOPs x (read + write of 4 bytes)
    # = 8e8 bytes at 10 GB/s = 80 ms
    assert floor_ms(1e9, 1e8, 4, rate) == pytest.approx(90.0)
    assert floor_ms(1e9, 0, 2, rate) == pytest.approx(10.0)
    assert math.isnan(floor_ms(1e9, 1e8, 4, Reading(math.nan, 10.0)))


def test_probe_sees_a_busy_machine():
    """Busy processes on every core make the one-thread probe clearly slower than it was idle."""
    probe = Probe("cpu", torch.float32, threads=1)
    state = MachineState()
    for _ in range(5):
        state.add(probe.read())
    spin = "import time\nend = time.time() + 20\nwhile time.time() < end: pass"
    hogs = [subprocess.Popen([sys.executable, "-c", spin]) for _ in range(3 * (os.cpu_count() or 1))]
    try:
        time.sleep(0.5)  # the interpreters start, then spin
        busy = [probe.read() for _ in range(3)]
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
    assert state.slowdown(busy) > 1.25


def test_default_threads_leave_busy_cores_alone(monkeypatch):
    """A sweep started beside a busy process times with the idle cores only, and says so."""
    from attnbench.measure import probe as probe_module

    monkeypatch.setattr(probe_module, "idle_cores", lambda seconds=0.5: 1.02)
    assert probe_module.default_threads(2) == (1, probe_module.default_threads(2)[1])
    assert "1 of 2 cores busy" in probe_module.default_threads(2)[1]
    monkeypatch.setattr(probe_module, "idle_cores", lambda seconds=0.5: 1.9)
    assert probe_module.default_threads(2) == (2, "")
    monkeypatch.setattr(probe_module, "idle_cores", lambda seconds=0.5: 0.1)
    assert probe_module.default_threads(2)[0] == 1  # never fewer than one
    monkeypatch.setattr(probe_module, "idle_cores", lambda seconds=0.5: None)
    assert probe_module.default_threads(4) == (4, "")


def test_idle_cores_sees_a_busy_process():
    """With one process spinning, at least a whole core less is idle than the machine has."""
    from attnbench.measure.probe import idle_cores

    if idle_cores(0.05) is None:
        pytest.skip("no /proc/stat on this system")
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        idle = idle_cores(0.5)
    finally:
        hog.kill()
        hog.wait()
    assert 0 <= idle <= (os.cpu_count() or 1) - 0.7
