"""Keep freed memory in the process for reuse during CPU training.

glibc's malloc hands large blocks back to the operating system when they are freed, so every training
step's big tensors (activations, their gradients, the bfloat16 copies of the weights) arrive as fresh
pages that the kernel must zero on first touch: thousands of page faults per step. Raising malloc's
thresholds makes freed blocks stay in the heap and get reused, which made a shapes-recipe step ~7% faster
here (benchmarks/train_allocator.py). The cost is that the process keeps its peak memory until it exits.
"""

from __future__ import annotations

import ctypes
import os
import sys

_M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_MAX = 32 * 1024 * 1024  # glibc's upper limit for this setting on 64-bit systems
_TRIM_THRESHOLD = 1 << 30

DISABLE_VARIABLE = "MASKRCNN_KEEP_FREED_MEMORY"  # set to 0 to leave malloc as it is


def keep_freed_memory() -> bool:
    """Tell glibc to serve blocks up to 32 MiB from the heap and to keep up to 1 GiB of freed memory.
    Returns whether the settings were applied (False off Linux/glibc, or when disabled by the variable)."""
    if os.environ.get(DISABLE_VARIABLE, "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)) and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))
