"""glibc malloc settings for training on CPU: keep freed memory for the next step (``train.cpu_malloc: keep``).

PyTorch's CPU tensors come from the C library's ``malloc``. By default glibc serves large blocks (above a threshold
it moves at run time, at most 32 MiB) from fresh ``mmap`` regions that ``free`` unmaps again, and returns the top of
the heap to the system once enough of it is free (``M_TRIM_THRESHOLD``). A training step frees and reallocates the
same activations every step, so the next step touches fresh pages again, and each first touch of a 4 KiB page is a
page fault: 81,000-101,000 per step of the small presets at 8 x 256 tokens, mostly the logits-sized buffers
(docs/LOG.md, 2026-12-01). With ``mmap`` off (``M_MMAP_MAX = 0``) and the trim threshold at 2 GiB, freed blocks stay
in the heap and the next step reuses them: almost no page faults after the first steps and 8-24 % faster steps on
this project's CPU machine. The process keeps that memory between steps instead of giving part of it back; its
peak RSS stays about where it was when the step's large buffers are reused, and grows where blocks of changing
sizes fragment the heap (the full logits without the chunked loss; docs/benchmarks.md) or where long-lived blocks
land among the step's freed ones (the optimizer state, which the trainer therefore creates before the first step:
:func:`helmlm.training.optim.allocate_state`).

This is the trade-off PyTorch's CPU performance guide makes when it recommends jemalloc or tcmalloc, without
preloading a library. It is process-wide and only touches glibc on Linux; elsewhere it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

from helmlm.config import CPU_MALLOC_POLICIES

_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
_M_MMAP_MAX = -4
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: the largest value, i.e. keep freed memory up to 2 GiB at the top


def keep_freed_memory() -> bool:
    """Serve every block from the heap (glibc's ``M_MMAP_MAX = 0``) and keep up to 2 GiB of freed memory at its top
    (``M_TRIM_THRESHOLD``), for this process. True when both settings took effect, False where there is no glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other C libraries have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def apply_cpu_malloc(policy: str) -> bool:
    """``keep``: :func:`keep_freed_memory`; ``system``: leave the C library's defaults. True if settings changed."""
    if policy not in CPU_MALLOC_POLICIES:
        raise ValueError(f"cpu_malloc must be one of {', '.join(CPU_MALLOC_POLICIES)}, got {policy!r}")
    return keep_freed_memory() if policy == "keep" else False
