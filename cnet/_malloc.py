"""Keep large freed blocks in the C heap instead of returning them to the OS.

A training step allocates the same activation and gradient arrays every step.
glibc serves blocks above its mmap threshold (dynamic, at most 32 MB) with a
fresh mmap and unmaps them on free, and trims the heap top above 128 KB, so
every step page-faults (and the kernel zero-fills) its biggest arrays again:
ResNeXt-29 8x16d spends ~25% of a training step in those faults (2 threads,
batch 64: 3545 -> 2718 ms with the blocks kept; bench/RESULTS.md).  Raising
both thresholds lets glibc reuse the freed blocks; the cost is that the heap
keeps its high-water mark (peak RSS within a few % of before).

Applied once at import on glibc, unless CNET_MALLOC_TUNING=0 or the user set
glibc's own MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ / GLIBC_TUNABLES.
"""
import ctypes
import ctypes.util
import os
import platform

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
KEEP_BYTES = 1 << 30

_state = None


def _user_configured():
    env = os.environ
    return ("MALLOC_MMAP_THRESHOLD_" in env or "MALLOC_TRIM_THRESHOLD_" in env
            or "glibc.malloc" in env.get("GLIBC_TUNABLES", ""))


def tune():
    """Apply the thresholds (once); returns a one-line description of the state."""
    global _state
    if _state is not None:
        return _state
    if os.environ.get("CNET_MALLOC_TUNING", "1") == "0":
        _state = "default (CNET_MALLOC_TUNING=0)"
    elif platform.libc_ver()[0] != "glibc":
        _state = "default (not glibc)"
    elif _user_configured():
        _state = "default (the environment sets glibc's malloc thresholds)"
    else:
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            ok = (libc.mallopt(_M_MMAP_THRESHOLD, KEEP_BYTES) == 1
                  and libc.mallopt(_M_TRIM_THRESHOLD, KEEP_BYTES) == 1)
        except (OSError, AttributeError):
            ok = False
        _state = (f"glibc keeps freed blocks up to {KEEP_BYTES >> 20} MB for reuse" if ok
                  else "default (mallopt refused)")
    return _state
