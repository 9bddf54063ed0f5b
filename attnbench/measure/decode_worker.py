"""Measure one decode configuration in a worker process of its own (``scale --mode decode``).

The worker answers the kernel sweep's requests (``setup``, ``round``, ``memory``; see
``attnbench.measure.worker.Configuration``), so the decode sweep shares its isolation, interleaved rounds,
noise handling and resume. Here a configuration is a context length n: a prompt of n tokens is
prefilled once into a cache with room for one more token (its time is the ``prefill_ms`` column),
and then one generated token is timed again and again at that same context, the cache put back
(``DecodeCache.restore``, off the clock) before every step, so that every timed step reads n
cached tokens. A prefill that runs out of memory is recorded as such, and the cache is built
without the prompt's outputs (``prefill(outputs=False)``) so the steps are still timed.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from typing import Any

from attnbench.measure.timing import is_out_of_memory, time_call
from attnbench.measure.worker import (
    Measured,
    _build,
    cap_address_space,
    injected_stall,
    steady_malloc,
)

WARM_PROMPT = 16  # tokens of the prefill that pays for lazy initialisation before the timed one
STEPS_PER_ROUND_MAX = 2000  # a round of very cheap steps stops here, whatever its seconds


class DecodeConfiguration(Measured):
    """In the child: the module, its prefilled cache at context n and the token it generates."""

    def __init__(self, config: dict[str, Any]) -> None:
        import torch

        steady_malloc()
        torch.manual_seed(config.get("seed", 0))
        torch.set_num_threads(config["threads"])
        torch.set_grad_enabled(False)  # inference only, in this process of its own
        self.device = torch.device(config["device"])
        self.stall_s = injected_stall(config)
        dtype = getattr(torch, config["dtype"])
        module, _, self.setup = _build(config, self.device, dtype)
        self.module = module.eval()
        batch, n, dim = config["batch"], config["n"], config["heads"] * config["head_dim"]
        # what one generated token costs is not the forward pass's count: no FLOPs, no floor
        self.setup.update(flops=math.nan, flops_matmul=math.nan, capacity=n + 1)
        self.token = torch.randn(batch, 1, dim, device=self.device, dtype=dtype)
        prompt = torch.randn(batch, n, dim, device=self.device, dtype=dtype)
        if self.device.type == "cpu" and config.get("memory_limit_mib"):
            cap_address_space(config["memory_limit_mib"])
        try:
            self.cache = self._prefill(prompt, n + 1)
        except Exception as exc:
            self.failed(exc)
            return
        del prompt
        self.saved = self.cache.snapshot()
        self.setup.update(cache_bytes=self.cache.nbytes(),
                          cache_bytes_formula=self.module.cache_bytes(batch, n + 1, dtype))
        self._warm_up()

    def _prefill(self, prompt: Any, capacity: int) -> Any:
        """Time the prefill of ``prompt`` (median of 3 calls when one takes under a second, else the
        one) and return its cache; out of memory: a cache built without the prompt's outputs."""
        self.module.prefill(prompt[:, :WARM_PROMPT], WARM_PROMPT + 1)  # lazy initialisation, off the clock
        made: list[Any] = []

        def prefill() -> None:
            made.clear()  # the previous call's cache goes before the next is built
            made.append(self.module.prefill(prompt, capacity)[1])

        try:
            times = [time_call(prefill, self.device)]
            if times[0] < 1.0:
                times += [time_call(prefill, self.device) for _ in range(2)]
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            made.clear()
            self.setup.update(prefill_status="oom", prefill_ms=math.nan,
                              prefill_message=f"{type(exc).__name__}: {exc}"[:300])
            return self.module.prefill(prompt, capacity, outputs=False)[1]
        self.setup.update(prefill_status="ok", prefill_ms=statistics.median(times) * 1e3, prefill_message="")
        return made[0]

    def step(self) -> None:
        """One generated token at context n (the cache restored first: not timed by ``time_round``)."""
        self.module.step(self.token, self.cache)

    def _warm_up(self) -> None:
        """First step (lazy initialisation), then a warm one to plan the rounds."""
        try:
            self.cache.restore(self.saved)
            first_s = time_call(self.step, self.device)
            self.cache.restore(self.saved)
            step_s = time_call(self.step, self.device)
        except Exception as exc:
            self.failed(exc)
            return
        self.setup.update(first_call_s=first_s, step_s=step_s)

    def time_round(self, request: dict[str, Any]) -> list[float]:
        """Per-step times in ms: at least ``min_runs`` steps, more while the round's seconds last (at
        most ``STEPS_PER_ROUND_MAX``), each timed alone from the same restored cache."""
        stall = self.stall_s if request.get("index", 0) % 2 == 1 else 0.0  # fault injection (tests only)

        def step() -> None:
            self.step()
            if stall:
                time.sleep(stall)

        times: list[float] = []
        end = time.perf_counter() + request["seconds"]
        while len(times) < request["min_runs"] or (time.perf_counter() < end
                                                   and len(times) < STEPS_PER_ROUND_MAX):
            self.cache.restore(self.saved)
            times.append(time_call(step, self.device) * 1e3)
        return times

    def memory_step(self) -> Callable[[], None]:
        """One step with the cache put back first: its peak above what is held before it (the cache)."""
        def step() -> None:
            self.cache.restore(self.saved)
            self.step()

        return step
