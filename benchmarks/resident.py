"""The one memory rule benchmarks share: resident memory of this process (Linux ``/proc``), read
after returning freed memory to the system, and its high-water mark over a stretch of work.

The high-water mark (``VmHWM``) is reset to the current resident size by writing 5 to
``/proc/self/clear_refs``; freed memory the allocator still holds is given back before every
reading (``qcompile.memory.release_freed_memory``), so a figure is what the work keeps or
touches, not what the allocator kept from earlier work.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from qcompile.memory import release_freed_memory


def status_mb(key: str) -> float:
    """A size line of ``/proc/self/status`` (``VmRSS``, ``VmHWM``...) in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(key)


@dataclass
class Resident:
    """MB above the resident size when the window opened: the most at any moment inside it
    (``peak``) and what is still held once it closed (``retained``)."""

    peak: float = 0.0
    retained: float = 0.0


@contextmanager
def resident_window() -> Iterator[Resident]:
    """Measure the work in the ``with`` block: its peak and retained resident memory."""
    gc.collect()
    release_freed_memory()
    base = status_mb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # high-water mark := current
    window = Resident()
    yield window
    window.peak = status_mb("VmHWM") - base
    gc.collect()
    release_freed_memory()
    window.retained = status_mb("VmRSS") - base
