"""glibc malloc settings for training on CPU: keep freed memory for the next step (``train.cpu_malloc: keep``).

PyTorch's CPU tensors come from the C library's ``malloc``. glibc by default returns freed memory to the system
once enough of it sits at the top of the heap (``M_TRIM_THRESHOLD``) and serves large blocks from fresh ``mmap``
regions below a threshold that it moves at run time (``M_MMAP_THRESHOLD``). A training step frees and reallocates
the same activations every step, so both policies make the next step touch fresh pages again, and each first touch
of a 4 KiB page is a page fault: the profiler then charges elementwise ops such as a SwiGLU product twice their
usual time (docs/LOG.md, 2026-12-01). Fixing the mmap threshold at its maximum and raising the trim threshold keeps
freed blocks in the heap for reuse. The peak RSS of a step stays what it was (the heap already grows to it); what
changes is that the process keeps that memory between steps instead of giving part of it back.

This is the same trade-off PyTorch's CPU performance guide makes when it recommends jemalloc or tcmalloc, without
preloading a library. It is process-wide and only touches glibc on Linux; elsewhere it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

from helmlm.config import CPU_MALLOC_POLICIES

_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's largest allowed value on 64-bit; blocks above it still come from mmap
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: the largest value, i.e. keep freed memory up to 2 GiB at the top


def keep_freed_memory() -> bool:
    """Set glibc's mmap threshold to 32 MiB (which also stops glibc from moving it) and its trim threshold to
    2 GiB, for this process. Returns True when both settings took effect, False where there is no glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other C libraries have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def apply_cpu_malloc(policy: str) -> bool:
    """``keep``: :func:`keep_freed_memory`; ``system``: leave the C library's defaults. True if settings changed."""
    if policy not in CPU_MALLOC_POLICIES:
        raise ValueError(f"cpu_malloc must be one of {', '.join(CPU_MALLOC_POLICIES)}, got {policy!r}")
    return keep_freed_memory() if policy == "keep" else False
