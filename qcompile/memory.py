"""Giving freed memory back to the operating system between compile stages.

``compile`` allocates and frees activations of whole calibration batches several times
(outlier statistics, calibration, the kernel check, SQNR). glibc's allocator keeps freed
blocks in its arenas (and raises its mmap threshold after each large free, so later large
tensors come from the arenas too), so without a trim the process's resident memory keeps the
sum of every stage's high-water marks. ``malloc_trim(0)`` returns the free pages; it costs
about a millisecond and is a no-op where the C library has no such call.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def _malloc_trim():
    name = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(name), "malloc_trim") if name else None
    except (OSError, AttributeError):
        return None


def release_freed_memory() -> None:
    """Return memory the allocator holds but nothing uses to the operating system (glibc)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
