"""Keeping freed heap memory for the next training step of a policy on the CPU (glibc's malloc).

Why: glibc hands the top of its heap back to the kernel (``brk`` shrinks) whenever a ``free``
leaves more than its *trim threshold* free there. By default that threshold follows the largest
block it has lately freed from ``mmap`` (twice its size; a few MiB in a trainer process). A
training step's backward frees the step's activations in one sweep, the heap shrinks, and the next
step's forward gets fresh pages from the kernel, each one a minor page fault and a zeroed page.
Measured on issue 13's benchmark (``benchmarks/vs_trl.py``, 200 steps of 64 x 10 tokens): 1,400
to 1,900 minor faults per optimizer step and 0.8 to 1.3 s of kernel time in a 12 to 14 s loop; with
the thresholds below, 80 faults per step and the loop 5% faster (5 interleaved pairs).

What: ``mallopt`` pins both thresholds at the ceiling glibc's own rule would reach (the mmap
threshold at 32 MiB, ``DEFAULT_MMAP_THRESHOLD_MAX`` on 64-bit; the trim threshold at twice that),
so blocks under 32 MiB come from the heap and up to 64 MiB of freed heap stays for reuse. Cost: each
malloc arena may keep up to 64 MiB that it used to return, and setting a threshold switches glibc's
dynamic adjustment off for the rest of the process. It is process-wide and cannot be read back, so
it is applied once and left in place.

Only a policy on the CPU: on a GPU the activations live in the CUDA caching allocator and the
host's heap holds little per step. Other C libraries (musl, macOS) are left alone."""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import platform

log = logging.getLogger(__name__)

# <malloc.h>: mallopt parameter numbers
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 1024 * 1024  # DEFAULT_MMAP_THRESHOLD_MAX on 64-bit: where glibc's own rule stops
TRIM_THRESHOLD = 2 * MMAP_THRESHOLD  # glibc keeps this relation when it raises the mmap threshold

_applied = False


def retain_freed_heap() -> bool:
    """Set glibc's mmap and trim thresholds as above, once per process. True when they are set
    (now or before), False where the C library is not glibc or refuses."""
    global _applied
    if _applied:
        return True
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # the mmap threshold first: setting either one ends glibc's dynamic adjustment of both
    if mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) != 1 or mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) != 1:
        log.warning("mallopt refused the heap thresholds; freed heap memory is returned to the OS after each step")
        return False
    _applied = True
    log.debug("glibc heap: mmap threshold %d, trim threshold %d", MMAP_THRESHOLD, TRIM_THRESHOLD)
    return True
