"""Keep freed CPU tensor memory in the process, so each training or inference step reuses it.

PyTorch's CPU tensors come from the C library's `malloc`. glibc serves blocks above its mmap threshold (128 KiB,
raised dynamically to at most 32 MiB) with a fresh `mmap` and returns them to the kernel on `free`. Every
weight cast, gradient and activation of a ViT-B-32 step is larger than that, so each step asks the kernel for
the same ~0.5 GB again and pays a page fault (and the kernel's zeroing) per 4 KiB page: ~128,000 faults and a
quarter of a second of system time per bf16 step of batch 16 (measured, Intel Xeon with AMX, one thread).

The usual cure is to preload jemalloc or tcmalloc (`LD_PRELOAD`), which needs a launcher around Python. glibc's
own `mallopt` gets the same effect from inside the process: with the mmap threshold and the trim threshold
raised, freed blocks stay in the heap and the next step's allocations of the same sizes reuse them (a handful
of faults per step). The cost is that memory freed at the end of a step is not handed back to the system
while the process lives, as with any caching allocator, and that a heap can fragment: the peak resident memory
of the steps measured (README, Benchmarks) did not grow, but a pattern of ever-new block sizes could hold more.

`reuse_freed_memory()` is called by the trainer, `clipforge eval`, `clipforge embed` and the search server.
`CLIPFORGE_KEEP_FREED_MEMORY=0` in the environment turns it off. Where the C library is not glibc (macOS,
musl) it does nothing. Numerics are untouched: only where buffers come from changes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

ENV_SWITCH = "CLIPFORGE_KEEP_FREED_MEMORY"
_M_TRIM_THRESHOLD = -1  # mallopt parameter numbers, from glibc's <malloc.h>
_M_MMAP_THRESHOLD = -3
# Blocks up to 1 GiB come from the heap, and up to 1 GiB of free memory at its top stays there. A glibc that
# refuses an mmap threshold above 32 MiB (its documented maximum on 64-bit systems) gets that maximum instead.
_THRESHOLDS = (1 << 30, 32 << 20)

_state: dict[str, int | None] = {"mmap_threshold": None}


def _libc() -> ctypes.CDLL | None:
    """The process's glibc, or None where the C library is something else."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") else None


def set_thresholds(mmap_threshold: int, trim_threshold: int) -> bool:
    """Set glibc's mmap and trim thresholds (bytes); False where this is not glibc or glibc refuses a value."""
    libc = _libc()
    if libc is None:
        return False
    ok = bool(libc.mallopt(_M_MMAP_THRESHOLD, ctypes.c_int(mmap_threshold)))
    ok = bool(libc.mallopt(_M_TRIM_THRESHOLD, ctypes.c_int(trim_threshold))) and ok
    return ok


def reuse_freed_memory() -> int | None:
    """Keep freed tensor memory in the process (see the module docstring); idempotent.

    Returns the mmap threshold now in force, in bytes, or None when nothing was changed (not glibc, or
    switched off with CLIPFORGE_KEEP_FREED_MEMORY=0)."""
    if _state["mmap_threshold"] is not None:
        return _state["mmap_threshold"]
    if os.environ.get(ENV_SWITCH, "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    for threshold in _THRESHOLDS:
        if set_thresholds(threshold, threshold):
            _state["mmap_threshold"] = threshold
            return threshold
    return None

