"""Keep freed host memory for reuse: on a CPU, glibc's default turns every large tensor into page faults.

glibc serves an allocation above its mmap threshold (at most 32 MB) with a fresh `mmap` and returns it to the
kernel on free, so a tensor of that size allocated every step is faulted in page by page, zeroed by the
kernel, every step. A training step on the CPU allocates several: the word-embedding gradient alone is
47 MB for MiniLM (30,522 x 384 floats) and 94 MB for DistilBERT. Measured by `python -m ablations.benchmark
--cpu-settings` (results/cpu_settings.json: 2-core Xeon, MiniLM, batch 16, full fine-tune, each setting in a
process of its own): 18,580 -> 58 minor page faults a step, and the system CPU time a step spends on them
33.9 -> 0.4 ms (medians of 5 rounds); a step's wall time moved less: 0.97x the default's (rounds 0.76-1.05x).

`reuse_freed_memory()` tells glibc (`mallopt`) to serve large blocks from its heap and not to trim it, as
`MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=...` would at start-up; the process's peak memory is unchanged
(what is freed is reused, not returned). No effect where the C library is not glibc, or where another
allocator (jemalloc, tcmalloc via LD_PRELOAD) serves `malloc`. ABLATIONS_KEEP_GLIBC_MALLOC=1 turns it off.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # <malloc.h>
_done: bool | None = None


def reuse_freed_memory() -> bool:
    """Apply the setting once per process; True when glibc took it."""
    global _done
    if _done is None:
        _done = False
        if sys.platform.startswith("linux") and os.environ.get("ABLATIONS_KEEP_GLIBC_MALLOC", "") in ("", "0"):
            try:
                libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
                mallopt = libc.mallopt
            except (OSError, AttributeError):  # musl and others have no mallopt
                return False
            mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
            _done = bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
    return _done
