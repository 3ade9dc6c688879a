"""Peak resident memory of one stretch of work inside a process that holds other things too.

The benchmarks run two trainers in one process, step by step; each step's figure is the process's
peak during that step alone. Before a step, memory freed earlier is handed back to the system
(glibc ``malloc_trim``: glibc keeps it otherwise, and the step would reuse it unseen) and the
high-water mark is reset (Linux ``/proc/self/clear_refs``); ``ru_maxrss`` after the step is then
that step's peak. The part above the RSS the step started from is its own working memory.
"""

from __future__ import annotations

import contextlib
import ctypes
import resource
from pathlib import Path


def reset_peak_rss() -> bool:
    """Make ru_maxrss the current RSS (Linux: writing 5 to clear_refs resets the high-water mark),
    so that it reads the peak of what follows; False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def start_rss_window() -> float:
    """Hand memory freed by earlier work back to the system, reset the peak; the RSS this window
    starts from."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    reset_peak_rss()
    return peak_rss_mib()


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
