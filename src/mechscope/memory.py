"""Giving memory back between the steps of a long run.

glibc keeps freed heap pages for reuse instead of returning them to the system, so after a step
that allocated and freed a few hundred MB the process stays that large, and the next step's
allocations land on top of pages that fragmentation keeps from being reused. `release()` hands
the free pages back (glibc's malloc_trim; elsewhere it does nothing).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.lru_cache(maxsize=1)
def _trim():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc (musl, macOS, Windows)
        return None


def release() -> None:
    """Return the heap's free pages to the system, where the C library can."""
    trim = _trim()
    if trim is not None:
        trim(0)
