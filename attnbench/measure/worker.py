"""Measure one configuration in a process of its own (the sweep's, or the resolution probe's).

Each configuration is forked from a fork server that has imported torch and the mechanisms but
run no tensor op, so a child starts in milliseconds instead of seconds (and forking is safe even
when the parent has run tensor ops: a fork of live thread pools can hang). A process of its own
gives a clean memory peak, and an out-of-memory, a crash or a hang in the child cannot take the
sweep down: the parent records it and goes on.

Two shapes: ``run_isolated`` runs one function in a child and reads its result from a pipe
(no answer means it died). ``Session`` keeps a child alive across requests, so the sweep builds
a configuration once and then times it in rounds alternating with the other mechanisms at the
same n (``Configuration``), and keeps the machine probe in a child of its own (``ProbeHandler``).
No child outlives the process that started it, however that one ends (``exit_with``), and
nothing is written to a temporary folder.
"""

from __future__ import annotations

import ctypes
import functools
import math
import multiprocessing
import multiprocessing.forkserver
import multiprocessing.resource_tracker
import multiprocessing.util
import os
import resource
import select
import shutil
import signal
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from attnbench import get_mechanism, mechanism_names
from attnbench.measure.probe import Probe
from attnbench.measure.timing import (
    cpu_peak_mib,
    cuda_peak_mib,
    is_out_of_memory,
    make_step,
    time_call,
    time_round,
)
from attnbench.mechanism import count_flops
from attnbench.registry import load_module

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters

if "forkserver" in multiprocessing.get_all_start_methods():
    _CONTEXT = multiprocessing.get_context("forkserver")
    # the task harnesses too (torchvision and the like): the resolution probe builds their models
    _CONTEXT.set_forkserver_preload(["attnbench.measure.worker", "attnbench.measure.timing",
                                     "attnbench.measure.probe", "attnbench.plugins"])
else:
    _CONTEXT = multiprocessing.get_context("spawn")

Measure = Callable[[dict[str, Any]], dict[str, Any]]


def _start_fork_server() -> None:
    """Start the fork server (once) with Ctrl-C blocked, as multiprocessing starts its resource
    tracker: the server ignores Ctrl-C only after its imports, and a Ctrl-C in those seconds would
    print their traceback. Its children unblock it (``session_main``)."""
    if _CONTEXT.get_start_method() != "forkserver":
        return
    multiprocessing.resource_tracker.ensure_running()  # first: starting, it unblocks Ctrl-C again
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        multiprocessing.forkserver.ensure_running()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


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


def steady_malloc() -> None:
    """glibc, for the timing pass: the allocator of a long-running training process.

    glibc's mmap threshold adapts to the sizes freed so far, so a fresh process may map and
    fault in every buffer on every call while a warmed-up one reuses its heap: the same
    mechanism then times 2x apart from run to run. Fixing the threshold at glibc's ceiling
    (32 MiB) and never trimming is the state a training loop settles in, in every worker alike.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, 32 * 2**20)
        libc.mallopt(_M_TRIM_THRESHOLD, 2**30)
    except (OSError, AttributeError):
        pass


def cap_address_space(limit_mib: float) -> None:
    """Make allocations beyond ``limit_mib`` more than now fail with an error, not the OOM killer."""
    vm_kib = next(int(line.split()[1]) for line in Path("/proc/self/status").read_text().splitlines()
                  if line.startswith("VmSize:"))
    cap = vm_kib * 1024 + int(limit_mib * 2**20)
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))


STALL_ENV = "ATTNBENCH_STALL"


def injected_stall(config: dict[str, Any]) -> float:
    """Fault injection for tests: seconds to add to every call in this configuration's odd rounds.

    ``ATTNBENCH_STALL="fake_linear@2048=0.01,softmax@512=0.2"`` in the sweep's environment
    stalls those configurations, so that a test can check that the sweep sees the disturbed
    rounds and flags the row. The sweep passes it in ``config["stall"]``: a worker forked from
    the fork server has the server's environment, not the sweep's.
    """
    for item in filter(None, config.get("stall", "").split(",")):
        target, _, seconds = item.partition("=")
        if target.strip() == f"{config['mechanism']}@{config['n']}":
            return float(seconds)
    return 0.0


class Measured:
    """In the child: a configuration built once, answering the sweep's requests: ``setup`` (what
    the row records of it, or a failure status), ``round`` (one timing round: per-run times in ms)
    and ``memory`` (the peak of one step, last, because it fixes the allocator). A kind of
    configuration supplies ``time_round`` and, where a step needs preparing, ``memory_step``."""

    setup: dict[str, Any]
    device: Any
    step: Callable[[], None]

    def __call__(self, request: dict[str, Any]) -> dict[str, Any]:
        if request["op"] == "setup" or self.setup["status"] != "ok":
            return self.setup
        if request["op"] == "round":
            return {"status": "ok", "times_ms": self.time_round(request)}
        if request["op"] == "memory":
            return {"status": "ok", "peak_mem_mib": self.peak_memory()}
        raise ValueError(f"unknown request {request['op']!r}")

    def time_round(self, request: dict[str, Any]) -> list[float]:
        raise NotImplementedError

    def failed(self, exc: Exception, status: str = "error") -> None:
        """``setup`` becomes the failure ``exc``: out of memory, else ``status``."""
        self.setup.update(status="oom" if is_out_of_memory(exc) else status,
                          message=f"{type(exc).__name__}: {exc}"[:500])

    def memory_step(self) -> Callable[[], None]:
        """The step whose peak memory is measured."""
        return self.step

    def peak_memory(self) -> float:
        step = self.memory_step()
        fix_malloc()
        if self.device.type == "cuda":
            return cuda_peak_mib(step, self.device, warm=True)
        return cpu_peak_mib(step, warm=True)


class Configuration(Measured):
    """In the child: one sweep configuration built and warmed up once, then answering requests.

    ``setup`` (backend, FLOPs, parameters, the first call's time, or a failure status),
    ``round`` (one timing round: per-run times in ms) and ``memory`` (the peak of one step,
    last, because it fixes the allocator). Under ``compile`` the first call compiles: its time
    is recorded apart, and a failure there is ``compile-error``.
    """

    def __init__(self, config: dict[str, Any]) -> None:
        import torch
        from torch.utils import benchmark

        steady_malloc()
        torch.manual_seed(config.get("seed", 0))
        torch.set_num_threads(config["threads"])
        self.device = torch.device(config["device"])
        self.threads = config["threads"]
        self.stall_s = injected_stall(config)
        dtype = getattr(torch, config["dtype"])
        module, grid, self.setup = _build(config, self.device, dtype)
        if config.get("compile"):
            torch._inductor.config.compile_threads = 1  # compile here, not in a pool of processes
            module = torch.compile(module, dynamic=False)
        dim = config["heads"] * config["head_dim"]
        x = torch.randn(config["batch"], config["n"], dim, device=self.device, dtype=dtype)
        self.step = make_step(module, x, grid, config["mode"], bool(config.get("causal")))
        self.timer = benchmark.Timer(stmt="step()", globals={"step": self.step}, num_threads=self.threads)
        if self.device.type == "cpu" and config.get("memory_limit_mib"):
            cap_address_space(config["memory_limit_mib"])
        self._warm_up(bool(config.get("compile")))
        self._release_cache()

    def _warm_up(self, compiled: bool) -> None:
        """First call (the compilation, under compile), then one warm call to plan the rounds."""
        try:
            first_s = time_call(self.step, self.device)
        except Exception as exc:
            self.failed(exc, "compile-error" if compiled else "error")
            return
        # the first call also paid for lazy initialisation (or compilation), which matters
        # unless the step is slow anyway
        self.step_s = first_s if first_s > 1.0 and not compiled else time_call(self.step, self.device)
        self.setup.update(first_call_s=first_s, step_s=self.step_s)

    def _release_cache(self) -> None:
        """CUDA: hand cached blocks back, so this idle worker does not crowd out the one timed next."""
        import torch

        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def time_round(self, request: dict[str, Any]) -> list[float]:
        from torch.utils import benchmark

        step, timer = self.step, self.timer
        if self.stall_s and request.get("index", 0) % 2 == 1:  # fault injection (tests only)
            def step() -> None:
                self.step()
                time.sleep(self.stall_s)
            timer = benchmark.Timer(stmt="step()", globals={"step": step}, num_threads=self.threads)
        times = time_round(timer, step, self.device, self.step_s, request["seconds"], request["min_runs"])
        self._release_cache()
        return times


def _build(config: dict[str, Any], device: Any, dtype: Any
           ) -> tuple[Any, tuple[int, int] | None, dict[str, Any]]:
    """The mechanism's module on ``device``, its token grid, and what the row records of it."""
    if config["mechanism"] not in mechanism_names():  # a spawned child: load the plug-ins again
        for spec in config.get("load", []):
            load_module(spec)
    cls = get_mechanism(config["mechanism"])
    grid = tuple(config["grid"]) if config.get("grid") else None
    module = cls(config["heads"] * config["head_dim"], config["heads"],
                 cls.make_options(**config.get("options", {}))).to(device=device, dtype=dtype)
    causal = bool(config.get("causal"))
    cost = count_flops(module, config["batch"], config["n"], grid, causal)
    factor = 3 if config["mode"] == "fwd+bwd" else 1  # convention: backward ≈ 2 × forward
    uncounted = f"FLOPs not counted: {cls.name}.flops takes no `causal`, so its causal count is unknown"
    setup = {"status": "ok", "message": "" if cost else uncounted,
             "backend": cls.backend(config["device"], dtype),
             "flops": cost.total * factor if cost else math.nan,
             "flops_matmul": cost.matmul * factor if cost else math.nan,
             "params": sum(p.numel() for p in module.parameters()), "compiled": bool(config.get("compile"))}
    return module, grid, setup


class ProbeHandler:
    """In the child: the machine probe (``attnbench.measure.probe``), answering ``read`` requests."""

    def __init__(self, config: dict[str, Any]) -> None:
        import torch

        self.probe = Probe(config["device"], getattr(torch, config["dtype"]), config["threads"])

    def __call__(self, request: dict[str, Any]) -> dict[str, Any]:
        reading = self.probe.read()
        return {"status": "ok", "gflops": reading.gflops, "gbs": reading.gbs}


def _death(exitcode: int | None) -> dict[str, Any]:
    """The status of a child that died without answering."""
    if exitcode == -signal.SIGKILL:
        return {"status": "oom", "message": "worker killed by SIGKILL (likely out of memory)"}
    return {"status": "error", "message": f"worker died with exit code {exitcode}"}


class Session:
    """A child process of its own, kept alive across requests: ``handler_cls(config)`` built once
    in the child, then each ``request`` answered by ``handler(message)``.

    ``spent`` adds up the seconds its requests took; together they may take ``budget`` seconds.
    A time-out, a crash or an out-of-memory becomes a status, never an exception. The child
    never outlives this process (``exit_with``) and ignores Ctrl-C, which is this process's to
    handle: a child stopped by Ctrl-C would read as a failed configuration.
    """

    def __init__(self, handler_cls: Callable[[dict[str, Any]], Callable], config: dict[str, Any],
                 log_path: Path | None = None, budget: float = float("inf")) -> None:
        self.conn, child_conn = _CONTEXT.Pipe()
        log = str(log_path) if log_path else None
        _start_fork_server()
        parent = (os.getpid(), multiprocessing.util.get_temp_dir())
        self.process = _CONTEXT.Process(target=session_main, daemon=True,
                                        args=(handler_cls, config, child_conn, log, parent))
        self.process.start()
        child_conn.close()  # the child's end lives in the child only: its death is an EOF here
        self.budget = budget
        self.spent = 0.0
        self.busy = False  # a request sent and not answered: the child is working on it

    def request(self, message: dict[str, Any], timeout: float = float("inf")) -> dict[str, Any]:
        """Send ``message`` and wait for the answer, at most ``timeout`` s and what is left of the budget."""
        start = time.monotonic()
        wait = max(0.0, min(timeout, self.budget - self.spent))
        try:
            if not self.submit(message):
                return self.collect()
            if not self.conn.poll(wait if wait < float("inf") else None):
                limit = f"the budget of {self.budget:g} s" if wait < timeout else f"{timeout:g} s"
                return self.time_out(limit)
            return self.collect()
        finally:
            self.spent += time.monotonic() - start

    def submit(self, message: dict[str, Any]) -> bool:
        """Send ``message`` without waiting: the answer is ``collect()``'s once ``conn`` is readable
        (``multiprocessing.connection.wait``: several sessions at once). False: the child is gone."""
        self.busy = True
        try:
            self.conn.send(message)
        except OSError:
            return False
        return True

    def collect(self) -> dict[str, Any]:
        """The answer to the request ``submit`` sent, or the status of a child that died without one."""
        try:
            answer = self.conn.recv()
        except (EOFError, OSError):
            self.process.join(5)
            return _death(self.process.exitcode)
        self.busy = False
        return answer

    def time_out(self, limit: str) -> dict[str, Any]:
        """Kill the child that did not answer within ``limit`` (words): its status."""
        self.kill()
        return {"status": "timeout", "message": f"exceeded {limit}"}

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join()

    def close(self) -> None:
        """Ask an idle child to exit (kill it if it does not within a few seconds); kill a busy
        one at once (a request cut short, by Ctrl-C say, is not waited for)."""
        if not self.busy:
            try:
                self.conn.send({"op": "close"})
            except OSError:
                pass
            self.process.join(5)
        self.kill()
        self.conn.close()


def exit_with(pid: int, leftover: str) -> None:
    """End this process as soon as process ``pid`` ends, however it ends (SIGKILL included),
    removing ``leftover`` first: ``pid``'s multiprocessing folder (``/tmp/pymp-*``, the fork
    server's socket), which a killed process cannot remove itself.

    A worker's parent is the fork server, not the sweep, and the fork server lives for as long
    as any worker holds its pipe: Linux's parent-death signal would never fire. So a thread
    waits on a pidfd of the sweep instead. With the sweep and its workers gone, the fork server
    and multiprocessing's resource tracker see their pipes close and end by themselves. Where
    there are no pidfds (not Linux) this does nothing.
    """
    def leave() -> None:
        shutil.rmtree(leftover, ignore_errors=True)
        os._exit(1)

    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:  # gone before this child got here
        leave()
    except (AttributeError, OSError):
        return

    def wait() -> None:
        select.select([fd], [], [])  # readable once the process has ended
        leave()

    threading.Thread(target=wait, name=f"exit-with-{pid}", daemon=True).start()


def session_main(handler_cls: Callable[[dict[str, Any]], Callable], config: dict[str, Any], conn: Any,
                 log_path: str | None = None, parent: tuple[int, str] | None = None) -> None:
    """Entry point of a session's child: build the handler, then answer requests until ``close``
    (or until the parent is gone).

    An exception becomes a status (``oom`` or ``error`` with its message) and ends the child.
    """
    if parent is not None:  # (pid, its multiprocessing folder)
        exit_with(*parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent's to handle
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})  # as the fork server started (ignored now)
    _redirect_output(log_path)
    handler = None
    while True:
        try:
            request = conn.recv()
        except EOFError:  # the parent closed its end without a word
            return
        if request["op"] == "close":
            return
        try:
            handler = handler or handler_cls(config)
            conn.send(handler(request))
        except Exception as exc:
            traceback.print_exc()
            status = "oom" if is_out_of_memory(exc) else "error"
            conn.send({"status": status, "message": f"{type(exc).__name__}: {exc}"[:500]})
            return


def _redirect_output(log_path: str | None) -> None:
    """Whatever libraries print goes to ``log_path`` (the run's worker.log), not the terminal."""
    if log_path:
        log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(log, 1)
        os.dup2(log, 2)


class _Call:
    """In the child: ``measure_fn(config)``, once, for ``run_isolated``."""

    def __init__(self, measure_fn: Measure, config: dict[str, Any]) -> None:
        self.measure_fn, self.config = measure_fn, config

    def __call__(self, request: dict[str, Any]) -> dict[str, Any]:
        return self.measure_fn(self.config)


def start_isolated(measure_fn: Measure, config: dict[str, Any], log_path: Path | None = None) -> Session:
    """``run_isolated`` without waiting: the child started and asked, its answer ``collect()``'s once
    its ``conn`` is readable. Several at once (``attnbench.sweeps.launchers``): the caller keeps the time
    limit (``time_out``) and closes the session."""
    session = Session(functools.partial(_Call, measure_fn), config, log_path)
    session.submit({"op": "run"})
    return session


def run_isolated(measure_fn: Measure, config: dict[str, Any], budget: float,
                 log_path: Path | None = None) -> dict[str, Any]:
    """``measure_fn(config)`` (a module-level function) in a child process, within ``budget``
    seconds: its result, or a status (timeout, oom, error) with a message. Never raises.

    The result comes back through the session's pipe: nothing is written to disk, so a killed
    parent leaves no temporary file behind."""
    session = Session(functools.partial(_Call, measure_fn), config, log_path, budget)
    try:
        return session.request({"op": "run"})
    finally:
        session.close()
