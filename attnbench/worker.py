"""Measure one configuration in a process of its own (the sweep's, or the resolution probe's).

Each configuration is forked from a fork server that has imported torch and the mechanisms but
run no tensor op, so a child starts in milliseconds instead of seconds (and forking is safe even
when the parent has run tensor ops: a fork of live thread pools can hang). A process of its own
gives a clean memory peak, and an out-of-memory, a crash or a hang in the child cannot take the
sweep down: the parent records it and goes on. The child writes its result atomically; a
missing result means it died.
"""

from __future__ import annotations

import ctypes
import json
import multiprocessing
import os
import resource
import signal
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters

if "forkserver" in multiprocessing.get_all_start_methods():
    _CONTEXT = multiprocessing.get_context("forkserver")
    # the task harnesses too (torchvision and the like): the resolution probe builds their models
    _CONTEXT.set_forkserver_preload(["attnbench.worker", "attnbench.measure", "mechanisms", "tasks"])
else:
    _CONTEXT = multiprocessing.get_context("spawn")

Measure = Callable[[dict[str, Any]], dict[str, Any]]


def fix_malloc() -> None:
    """glibc: a fixed mmap threshold, and what is free now handed back, so that freed tensors
    return to the system and the resident set tracks live memory (no-op without glibc).

    Only for the memory pass: with it, every buffer is a fresh mapping whose pages fault in,
    which would slow down allocation-heavy mechanisms in the timing pass.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, 65536)
        libc.mallopt(_M_TRIM_THRESHOLD, 0)
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def cap_address_space(limit_mib: float) -> None:
    """Make allocations beyond ``limit_mib`` more than now fail with an error, not the OOM killer."""
    vm_kib = next(int(line.split()[1]) for line in Path("/proc/self/status").read_text().splitlines()
                  if line.startswith("VmSize:"))
    cap = vm_kib * 1024 + int(limit_mib * 2**20)
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))


def measure(config: dict[str, Any]) -> dict[str, Any]:
    import torch

    from attnbench import get_mechanism, mechanism_names
    from attnbench.measure import cpu_peak_mib, cuda_peak_mib, is_out_of_memory, make_step, time_step
    from attnbench.registry import load_module

    if config["mechanism"] not in mechanism_names():  # a spawned child: load the plug-ins again
        for spec in config.get("load", []):
            load_module(spec)
    torch.manual_seed(config.get("seed", 0))
    torch.set_num_threads(config["threads"])
    device = torch.device(config["device"])
    dtype = getattr(torch, config["dtype"])
    cls = get_mechanism(config["mechanism"])
    dim = config["heads"] * config["head_dim"]
    grid = tuple(config["grid"]) if config.get("grid") else None
    module = cls(dim, config["heads"], cls.make_options(**config.get("options", {})))
    module = module.to(device=device, dtype=dtype)
    x = torch.randn(config["batch"], config["n"], dim, device=device, dtype=dtype)
    step = make_step(module, x, grid, config["mode"])
    flops = module.flops(config["batch"], config["n"], grid).total
    if config["mode"] == "fwd+bwd":
        flops *= 3  # convention: backward ≈ 2 × forward
    result: dict[str, Any] = {"backend": cls.backend(config["device"], dtype), "flops": flops,
                              "params": sum(p.numel() for p in module.parameters())}
    if device.type == "cpu" and config.get("memory_limit_mib"):
        cap_address_space(config["memory_limit_mib"])
    try:
        # timing first, with the allocator as users have it (its warm-up also warms the memory
        # pass), then one step for memory alone
        timing = time_step(step, config["threads"], config["min_run_time"])
        fix_malloc()
        if device.type == "cuda":
            result["peak_mem_mib"] = cuda_peak_mib(step, device, warm=True)
        else:
            result["peak_mem_mib"] = cpu_peak_mib(step, warm=True)
    except Exception as exc:  # an OOM is a result; anything else is an error with its message
        status = "oom" if is_out_of_memory(exc) else "error"
        return {**result, "status": status, "message": f"{type(exc).__name__}: {exc}"[:500]}
    gflops = flops / (timing.median_ms * 1e-3) / 1e9 if timing.median_ms > 0 else float("nan")
    return {**result, "status": "ok", "message": "", "time_ms_median": timing.median_ms,
            "time_ms_iqr": timing.iqr_ms, "runs": timing.runs, "gflops": gflops}


def run_isolated(measure_fn: Measure, config: dict[str, Any], budget: float,
                 log_path: Path | None = None) -> dict[str, Any]:
    """``measure_fn(config)`` (a module-level function) in a child process, within ``budget``
    seconds: its result, or a status (timeout, oom, error) with a message. Never raises."""
    with tempfile.TemporaryDirectory(prefix="attnbench-") as tmp:
        result_path = Path(tmp) / "result.json"
        log = str(log_path) if log_path else None
        child = _CONTEXT.Process(target=child_main, args=(config, str(result_path), log, measure_fn),
                                 daemon=True)
        child.start()
        child.join(budget)
        if child.is_alive():
            child.kill()
            child.join()
            return {"status": "timeout", "message": f"exceeded the budget of {budget:g} s"}
        if result_path.exists():
            return json.loads(result_path.read_text())
        if child.exitcode == -signal.SIGKILL:
            return {"status": "oom", "message": "worker killed by SIGKILL (likely out of memory)"}
        return {"status": "error", "message": f"worker died with exit code {child.exitcode}"}


def child_main(config: dict[str, Any], result_path: str, log_path: str | None = None,
               measure_fn: Measure = measure) -> None:
    """Entry point of the child process: measure, then write the result atomically.

    Whatever libraries print goes to ``log_path`` (the run's worker.log), not the terminal.
    """
    if log_path:
        log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(log, 1)
        os.dup2(log, 2)
    try:
        result = measure_fn(config)
    except Exception as exc:
        traceback.print_exc()
        result = {"status": "error", "message": f"{type(exc).__name__}: {exc}"[:500]}
    tmp = result_path + ".tmp"
    Path(tmp).write_text(json.dumps(result))
    os.replace(tmp, result_path)
