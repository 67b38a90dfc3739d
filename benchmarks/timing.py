"""The timing rules every benchmark and the demo share.

:func:`median_ms`: median of repeated calls after warm-up, in ms (:func:`qcompile.profile.median_ms`,
which the ``qcompile bench`` command uses too); a table's rows are timed one after another.

:func:`interleaved_ms`: the paths a target compares against timed in alternation, one call of
each per round. On a shared machine whose speed drifts (measured on a 2-core VM: the same
ResNet-18 call 15 ms in one minute, 35 ms in the next), rows timed one after another compare
moments as much as code; alternated, every path sees the same moments, and the median of the
per-round ratios cancels the drift that the medians of the times keep.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

from qcompile.profile import median_ms

__all__ = ["Interleaved", "block_ms", "interleaved_ms", "interleaved_samples", "median_ms"]


@dataclass
class Interleaved:
    """Per-path samples (ms) of an alternated timing, round by round."""

    samples: dict[str, list[float]]

    def median(self, name: str) -> float:
        return statistics.median(self.samples[name])

    def ratio(self, name: str, reference: str) -> float:
        """The median over rounds of reference's time / name's time: how many times faster
        ``name`` ran than ``reference`` in the same moments."""
        return statistics.median(r / t for r, t in zip(self.samples[reference], self.samples[name]))


def interleaved_ms(calls: dict[str, Callable[[], object]], rounds: int = 10, block: int = 5,
                   pause_s: float = 0.1) -> Interleaved:
    """Each call timed in turn, round after round: per round and call, a pause, one untimed call,
    then the median of ``block`` timed calls. Not one call each in turn: a runtime's thread pool
    spins for a while after its call (ONNX Runtime's, OpenVINO's, OpenMP's), and on two cores
    that took both from the next runtime (a ResNet-18 batch measured 80 ms after ONNX Runtime's
    call against 17 ms alone); the pause lets the pools go idle, the untimed call warms the caches."""
    return interleaved_samples({name: block_ms(call) for name, call in calls.items()}, rounds, block, pause_s)


def block_ms(call: Callable[[], object]) -> Callable[[int], float]:
    """``sampler(n)`` for a call in this process: one untimed call, then the median ms of n timed
    ones (a round of :func:`interleaved_samples`)."""
    return lambda n: median_ms(call, repeats=n, warmup=1)


def interleaved_samples(samplers: dict[str, Callable[[int], float]], rounds: int = 10, block: int = 5,
                        pause_s: float = 0.1) -> Interleaved:
    """:func:`interleaved_ms` over samplers: ``sampler(block)`` is one round's ms for its path,
    measured wherever the path runs (in this process, or in a process of its own:
    :class:`benchmarks.isolated.IsolatedPath`)."""
    samples: dict[str, list[float]] = {name: [] for name in samplers}
    for _ in range(rounds):
        for name, sampler in samplers.items():
            time.sleep(pause_s)
            samples[name].append(sampler(block))
    return Interleaved(samples)
