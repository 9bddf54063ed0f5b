"""Where an accuracy sweep's points run (``attnbench scale --task T --launcher …``).

A launcher takes the points to run and the sweep's ``PointJob`` (``attnbench.sweeps.accuracy``), and
hands back ``(point, row)`` as each point finishes; the sweep appends each row to its one table
under the table's lock and reports it, whatever the launcher. Every launcher runs a point the same
way, ``PointJob``: ``attnbench run`` in a process of its own under the point's time and memory
limits, so the rows are the same wherever the points ran.

- ``local`` (default): on this machine, ``--jobs N`` points at once, each on a GPU of its own
  (``CUDA_VISIBLE_DEVICES``) or on a share of the CPU cores of its own (``sched_setaffinity``, as
  many torch threads as cores), never shared; N = 1 runs them one after another.
- ``ray``: each point a Ray task asking for its resources (CPUs: the point's threads; one GPU on
  CUDA; memory where ``--memory-limit`` is given), on a Ray started for the sweep on this machine
  (``--jobs`` points at once) or on the running cluster at ``--address``. A point whose worker dies
  is tried once more (Ray's ``max_retries=1``), then recorded as failed with what Ray said.
- ``slurm``: each point a Slurm job submitted through submitit (``--slurm-partition``,
  ``--slurm-time``, ``--slurm-gpus``), its row collected as the job finishes; submitit's own job
  logs go to ``out/slurm/``. ``--slurm-cluster local`` runs the same jobs on this machine
  (submitit's local executor), to try a sweep before a cluster.

Ray and submitit are optional (``pip install 'attnbench[ray]'``, ``'attnbench[slurm]'``). Remote
points write their folders under the sweep's ``--out`` as local ones do: on a cluster, ``--out`` must
be on a file system that every node sees.
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import importlib
import math
import multiprocessing.connection
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

from attnbench import registry
from attnbench.measure.worker import Session
from attnbench.sweeps.base import SweepError
from attnbench.sweeps.points import Point, PointJob, Prepared, Progress

LAUNCHERS = ("local", "ray", "slurm")
POLL_S = 0.5  # how often the slurm launcher asks whether a job has finished
Finished = Iterator[tuple["Point", dict[str, Any]]]


class Launcher(Protocol):
    """Runs a sweep's points; ``width``: how many at once (for the ETA)."""

    name: str
    width: int

    def run(self, todo: Sequence[Point], job: PointJob, progress: Progress) -> Finished:
        """(point, row) of every point of ``todo`` as it finishes; ``progress.started`` as each starts.
        Closing the iterator (the sweep's Ctrl-C) ends whatever still runs."""
        ...


def require(module: str, extra: str) -> ModuleType:
    """The optional package a launcher needs, or a one-line error naming its install command."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise SweepError(f"--launcher {extra} needs {module}, which is not installed here: "
                         f"pip install 'attnbench[{extra}]'") from None


def usable_cores() -> list[int]:
    """The CPU cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as ``CUDA_VISIBLE_DEVICES`` names them (indices or UUIDs)."""
    given = os.environ.get("CUDA_VISIBLE_DEVICES")
    if given is not None:
        return [g.strip() for g in given.split(",") if g.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def remote_point(job: PointJob, point: Point) -> dict[str, Any]:
    """A point in a Ray worker or a Slurm job: the sweep's plug-ins loaded there too, then the point."""
    for spec in job.cfg.load:
        registry.load_module(spec)
    return job(point)


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:300]


# ---- local: --jobs N on this machine ---------------------------------------------------------


@dataclasses.dataclass(frozen=True, order=True)
class Slot:
    """What one of the points running at once uses alone: cores (None: any) and a GPU (None: any)."""

    cpus: tuple[int, ...] | None = None
    gpu: str | None = None


def local_slots(jobs: int, device: str, threads: int) -> list[Slot]:
    """``jobs`` slots that share no GPU and no core: on CUDA a visible GPU each (and an equal share
    of the cores), on the CPU ``threads`` cores each. One job: no pinning, as a serial sweep."""
    if jobs < 1:
        raise SweepError(f"--jobs must be >= 1, got {jobs}")
    if jobs == 1:
        return [Slot()]
    cores = usable_cores()
    if device == "cuda":
        gpus = visible_gpus()
        if jobs > len(gpus):
            raise SweepError(f"--jobs {jobs}: one GPU per point, and {len(gpus)} are visible here; valid: "
                             f"--jobs 1..{max(1, len(gpus))}")
        share = len(cores) // jobs
        return [Slot(tuple(cores[i * share:(i + 1) * share]) or None, gpus[i]) for i in range(jobs)]
    if jobs * threads > len(cores):
        raise SweepError(f"--jobs {jobs} x --threads {threads} needs {jobs * threads} cores, and this "
                         f"process may use {len(cores)}; valid: --jobs 1..{max(1, len(cores) // threads)} "
                         f"at --threads {threads}")
    return [Slot(tuple(cores[i * threads:(i + 1) * threads])) for i in range(jobs)]


@dataclasses.dataclass
class _Running:
    prepared: Prepared
    slot: Slot
    session: Session
    deadline: float


class LocalLauncher:
    """Points on this machine, one per slot at a time (``local_slots``), each in a process of its own
    started from the fork server; the sweep waits on all of them at once."""

    name = "local"

    def __init__(self, slots: Sequence[Slot] = (Slot(),)) -> None:
        self.slots = sorted(slots)

    @property
    def width(self) -> int:
        return len(self.slots)

    def run(self, todo: Sequence[Point], job: PointJob, progress: Progress) -> Finished:
        queue, free = collections.deque(todo), list(self.slots)
        running: list[_Running] = []
        try:
            while queue or running:
                while queue and free:
                    point = queue.popleft()
                    prepared = job.prepare(point)
                    if isinstance(prepared, dict):  # cannot run here: its row at once
                        yield point, prepared
                        continue
                    slot = free.pop(0)
                    progress.started(point)
                    session = job.start(prepared, slot.cpus, slot.gpu)
                    running.append(_Running(prepared, slot, session, time.monotonic() + job.cfg.limit_s))
                if not running:
                    continue
                wait = max(0.0, min(r.deadline for r in running) - time.monotonic())
                ready = set(multiprocessing.connection.wait([r.session.conn for r in running], wait))
                for r in [r for r in running if r.session.conn in ready or time.monotonic() >= r.deadline]:
                    if r.session.conn in ready:
                        answer = r.session.collect()
                    else:
                        answer = r.session.time_out(f"{job.cfg.limit_s:g} s")
                    r.session.close()
                    running.remove(r)
                    bisect.insort(free, r.slot)
                    yield r.prepared.point, job.conclude(r.prepared, answer)
        finally:  # Ctrl-C, or the sweep stopped: no point outlives it
            for r in running:
                r.session.close()
                job.discard(r.prepared)


# ---- ray ------------------------------------------------------------------------------------


class RayLauncher:
    """Each point a Ray task with its resources, on a Ray started here or the cluster at ``address``."""

    name = "ray"

    def __init__(self, address: str | None, jobs: int | None, threads: int, device: str,
                 memory_mib: float | None = None) -> None:
        self.ray = require("ray", "ray")
        if jobs is not None and jobs < 1:
            raise SweepError(f"--jobs must be >= 1, got {jobs}")
        self.address, self.jobs, self.threads, self.device = address, jobs, threads, device
        self.gpus = 1 if device == "cuda" else 0
        self.memory = int(memory_mib * 2**20) if memory_mib else None
        self.width = jobs or 1

    def _connect(self) -> bool:
        """Join the cluster at ``address``, or start one here (as many CPUs as ``jobs`` points need);
        where this process is connected already (a sweep started from a script), that Ray. Whether
        this sweep connected, and so disconnects at its end."""
        ray = self.ray
        if ray.is_initialized():
            return False
        quiet = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
        if self.address:
            try:
                ray.init(address=self.address, log_to_driver=False, configure_logging=False)
            except ConnectionError as exc:
                raise SweepError(f"--address {self.address}: no Ray cluster there, or not one this process "
                                 f"may join ({_first_line(exc)}; a cluster with token authentication needs "
                                 f"RAY_AUTH_MODE=token here too)") from None
            return True
        resources: dict[str, Any] = {}
        if self.jobs is not None:
            resources["num_cpus"] = self.jobs * self.threads
            if self.gpus:
                resources["num_gpus"] = self.jobs
        if self.device != "cuda":
            resources["num_gpus"] = 0
        ray.init(address="local", **resources, **quiet)
        return True

    def _check_fits(self) -> None:
        """Refuse a point no node can hold (Ray would wait for it for ever), in one line."""
        need = {"CPU": self.threads, "GPU": self.gpus, "memory": self.memory or 0}
        nodes = [n.get("Resources", {}) for n in self.ray.nodes() if n.get("Alive")]
        if not any(all(node.get(k, 0) >= v for k, v in need.items() if v) for node in nodes):
            asked = ", ".join(f"{v:g} {k}" for k, v in need.items() if v)
            biggest = ", ".join(f"{k} {max((n.get(k, 0) for n in nodes), default=0):g}"
                                for k in need if need[k])
            raise SweepError(f"--launcher ray: no node of the cluster has what a point asks for ({asked}; "
                             f"the largest has {biggest}); lower --threads or --memory-limit")
        if self.jobs is None:
            total = self.ray.cluster_resources()
            fits = [total.get(k, 0) // v for k, v in need.items() if v]
            self.width = max(1, int(min(fits)))

    def run(self, todo: Sequence[Point], job: PointJob, progress: Progress) -> Finished:
        ray = self.ray
        connected = self._connect()
        pending: dict[Any, Point] = {}
        try:
            self._check_fits()
            options: dict[str, Any] = {"num_cpus": self.threads, "num_gpus": self.gpus, "max_retries": 1,
                                       "retry_exceptions": False}
            if self.memory:
                options["memory"] = self.memory
            task = ray.remote(remote_point).options(**options)
            shipped = ray.put(job)
            queue = collections.deque(todo)
            while queue or pending:
                while queue and len(pending) < self.width:
                    point = queue.popleft()
                    pending[task.remote(shipped, point)] = point
                    progress.started(point)
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
                for ref in ready:
                    point = pending.pop(ref)
                    try:
                        row = ray.get(ref)
                    except ray.exceptions.RayError as exc:
                        row = job.failed(point, *self._failure(exc))
                    yield point, row
        finally:
            for ref in pending:
                ray.cancel(ref, force=True)
            if connected:
                ray.shutdown()  # the Ray started here stops; a cluster at --address is left running

    def _failure(self, exc: BaseException) -> tuple[str, str]:
        """(status, message) of a point Ray could not finish."""
        errors = self.ray.exceptions
        if isinstance(exc, errors.OutOfMemoryError):
            return "oom", f"Ray's memory monitor killed the worker: {_first_line(exc)}"
        if isinstance(exc, (errors.WorkerCrashedError, errors.NodeDiedError, errors.ActorDiedError)):
            return "error", f"the Ray worker running this point died, and again when tried once more: " \
                            f"{_first_line(exc)}"
        return "error", f"Ray: {_first_line(exc)}"


# ---- slurm ----------------------------------------------------------------------------------


@dataclasses.dataclass
class SlurmOptions:
    """What each point's Slurm job asks for."""

    partition: str | None = None
    time_min: int | None = None  # None: the point's time limit and 5 minutes
    gpus: int | None = None  # None: one on CUDA, none on the CPU
    cluster: str = "slurm"  # "local": submitit's local executor, jobs as processes on this machine


class SlurmLauncher:
    """Each point a job submitted through submitit; ``jobs``: at most so many queued or running."""

    name = "slurm"

    def __init__(self, folder: Path, options: SlurmOptions, jobs: int | None, threads: int, device: str,
                 memory_mib: float | None = None) -> None:
        self.submitit = require("submitit", "slurm")
        if options.cluster == "slurm" and shutil.which("sbatch") is None:
            raise SweepError("--launcher slurm: no Slurm here (sbatch is not on PATH); --slurm-cluster local "
                             "runs the same jobs on this machine")
        if jobs is not None and jobs < 1:
            raise SweepError(f"--jobs must be >= 1, got {jobs}")
        self.folder, self.options, self.jobs = folder, options, jobs
        self.threads, self.device, self.memory_mib = threads, device, memory_mib
        self.width = jobs or 1

    def executor(self, limit_s: float) -> Any:
        """submitit's executor, its parameters set: one task on one node, the point's threads and GPUs."""
        opts = self.options
        executor = self.submitit.AutoExecutor(folder=self.folder / "%j", cluster=opts.cluster)
        params: dict[str, Any] = {
            "name": "attnbench-point", "nodes": 1, "tasks_per_node": 1, "cpus_per_task": self.threads,
            "gpus_per_node": opts.gpus if opts.gpus is not None else (1 if self.device == "cuda" else 0),
            "timeout_min": opts.time_min or math.ceil(limit_s / 60) + 5}
        if self.memory_mib:
            params["mem_gb"] = math.ceil(self.memory_mib / 1024)
        if opts.partition:
            params["slurm_partition"] = opts.partition
        executor.update_parameters(**params)
        return executor

    def run(self, todo: Sequence[Point], job: PointJob, progress: Progress) -> Finished:
        executor = self.executor(job.cfg.limit_s)
        queue = collections.deque(todo)
        pending: dict[Any, Point] = {}
        width = self.jobs or len(todo)
        try:
            while queue or pending:
                while queue and len(pending) < width:
                    point = queue.popleft()
                    pending[executor.submit(remote_point, job, point)] = point
                    progress.started(point)
                done = [j for j in pending if j.done()]
                if not done:
                    time.sleep(POLL_S)
                for submitted in done:
                    point = pending.pop(submitted)
                    try:
                        row = submitted.result()
                    except Exception as exc:  # the job failed, was cancelled or timed out on the cluster
                        row = job.failed(point, "error", f"Slurm job {submitted.job_id}: {_first_line(exc)}")
                    yield point, row
        finally:
            for submitted in pending:
                submitted.cancel(check=False)


def make_launcher(kind: str, *, jobs: int | None, device: str, threads: int, out: Path,
                  address: str | None = None, memory_mib: float | None = None,
                  slurm: SlurmOptions | None = None) -> Launcher:
    """The launcher ``--launcher kind`` names, its options checked now (before any point runs)."""
    if kind == "local":
        return LocalLauncher(local_slots(jobs or 1, device, threads))
    if kind == "ray":
        return RayLauncher(address, jobs, threads, device, memory_mib)
    if kind == "slurm":
        return SlurmLauncher(out / "slurm", slurm or SlurmOptions(), jobs, threads, device, memory_mib)
    raise SweepError(f"--launcher {kind!r}: valid choices: {', '.join(LAUNCHERS)}")
