"""Where a compiled model's time goes, and how long it takes: measured, never assumed.

``profile_ops`` runs the model under torch's profiler and sums self time per operator (the
oneDNN kernels, the native attention, the float glue between them); ``median_ms`` is the latency
the ``bench`` command compares, a median over repeated calls after warm-up calls; ``fastest_ms``
the fastest of them, for probes.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch


def call_times_ms(call: Callable[[], Any], repeats: int, warmup: int) -> list[float]:
    """The wall times of ``repeats`` calls of ``call()`` in milliseconds, after ``warmup`` untimed calls."""
    with torch.no_grad():
        for _ in range(warmup):
            call()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            call()
            times.append((time.perf_counter() - start) * 1e3)
    return times


def median_ms(call: Callable[[], Any], repeats: int = 10, warmup: int = 2) -> float:
    """Median wall time of ``call()`` in milliseconds, after ``warmup`` untimed calls."""
    return statistics.median(call_times_ms(call, repeats, warmup))


def fastest_ms(call: Callable[[], Any], repeats: int = 5, warmup: int = 1) -> float:
    """The fastest of ``repeats`` calls: a one-off stall (a busy core, a VM's pause) can only
    slow a call, so the minimum is what the kernel itself takes (for a yes/no probe, where one
    stall must not flip the answer)."""
    return min(call_times_ms(call, repeats, warmup))


def profile_ops(call: Callable[[], Any], repeats: int = 3, top: int = 15) -> list[dict[str, Any]]:
    """The ``top`` operators by self CPU time per call of ``call()``: op, calls per call, ms."""
    with torch.no_grad():
        call()  # warm-up: weight packing and oneDNN primitive creation are not the model's time
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
            for _ in range(repeats):
                call()
    rows = [{"op": event.key, "calls": event.count // repeats, "ms": round(event.self_cpu_time_total / 1e3 / repeats, 3)}
            for event in profiler.key_averages()]
    rows.sort(key=lambda row: -row["ms"])
    return [row for row in rows if row["ms"] > 0][:top]
