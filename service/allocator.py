"""glibc malloc settings for a process that moves whole disks through small buffers.

The streamOptimized decoder (disks/streamopt.py) allocates and frees a grain's
worth of memory (64 KiB) per grain on several threads. With glibc's defaults each
thread's heap hands its free top back to the kernel as soon as it passes 128 KiB, and
the next grains fault fresh, zeroed pages in again: measured on the 2-core test
machine, 166,000-215,000 page faults and ~0.3 CPU-s in the kernel per 2 GiB decoded.
Keeping 4 MiB of padding at the top of each heap (M_TOP_PAD) brings that down to
about 8,000 faults; memory stays bounded by that padding per heap.

hypervisord calls `keep_heap_padding()` once at start; the benchmarks call it too,
since they stand in for the daemon. On a C library without mallopt it does nothing.
"""
from __future__ import annotations

import ctypes

M_TOP_PAD = -2            # glibc's mallopt parameter number
HEAP_PADDING = 4 << 20


def keep_heap_padding(nbytes: int = HEAP_PADDING) -> bool:
    """Ask glibc to keep `nbytes` free at the top of each heap; False where it cannot."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    return mallopt(M_TOP_PAD, nbytes) == 1
