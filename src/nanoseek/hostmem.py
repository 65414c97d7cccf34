"""Host memory: keep freed blocks for reuse instead of handing them back to the kernel, and put
large tensors on huge pages.

PyTorch's CPU tensors come from the C library's malloc. glibc serves a request above its mmap
threshold (at most 32 MB) with a fresh mapping and unmaps it at free, so a large tensor made again
at every step, such as the 8 x 256 x 8192 fp32 logits of a training step (67 MB), is page-faulted
in again each time. On the reference config at one thread that made the LM head's forward product
take 80 ms instead of 54, and the whole compiled training step 0.945 s instead of 0.894
(docs/training.md). `keep_freed_memory` tells glibc to take every block from its heap and never to
trim it, so later steps reuse earlier steps' pages: the process keeps its peak footprint,
which a training run or a server reaches again at every step anyway. The nanoseek CLI calls it at
start (through `tune_host_memory`); NANOSEEK_KEEP_FREED_MEMORY=0 turns it off. Other C libraries
(musl, macOS) are left alone.

`huge_pages_for_large_tensors` asks PyTorch's CPU allocator to align tensors of 2 MB and more to
2 MB and advise the kernel to back them with transparent huge pages (PyTorch's
THP_MEM_ALLOC_ENABLE; Linux only, where THP is in "madvise" or "always" mode). A decode step
streams every weight it reads from memory: with 4 KB pages, each 4 KB of a 49 MB fp32 model costs
a TLB miss. On an AMD EPYC (Zen 4, 32 MB L3), two threads, the reference config's compiled decode
step loaded from its AOTInductor package ran 16 requests at 2,532-2,829 tok/s and one at 617-620
without, 3,196 and 996 with (docs/engine.md). PyTorch reads the variable once, at its first
allocation, so it must be set before any tensor is made: the CLI does it first thing for the
commands that decode (serve, chat, generate); an explicit THP_MEM_ALLOC_ENABLE=0 in the environment
is left as it is. Not for training: `benchmarks/train_step.py` (whose transformers variants make
multi-GB tensors) grew to 24 GB and was killed by the kernel with huge pages on, and ran to its end
without (likely 2 MB-aligned blocks of changing sizes fragmenting the heap that freed memory is kept
on).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
_M_MMAP_MAX = -4
_applied: bool | None = None


def tune_host_memory(huge_pages: bool) -> None:
    """This module's settings: freed memory kept, and for a process that decodes (huge_pages),
    large tensors on huge pages."""
    if huge_pages:
        huge_pages_for_large_tensors()
    keep_freed_memory()


def huge_pages_for_large_tensors() -> bool:
    """PyTorch's CPU tensors of 2 MB and more on transparent huge pages, unless the environment
    says otherwise. Returns whether it is asked for (it takes effect only if no tensor was made
    before). Linux only."""
    if not sys.platform.startswith("linux"):
        return False
    return os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1") == "1"


def huge_pages_on() -> bool:
    """Whether this process asks PyTorch for huge pages (THP_MEM_ALLOC_ENABLE=1)."""
    return os.environ.get("THP_MEM_ALLOC_ENABLE") == "1"


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory (no mmap'd blocks, no trimming). Returns whether it
    is in effect; idempotent; a no-op off glibc or with NANOSEEK_KEEP_FREED_MEMORY=0."""
    global _applied
    if _applied is None:
        _applied = _apply()
    return _applied


def _apply() -> bool:
    if os.environ.get("NANOSEEK_KEEP_FREED_MEMORY", "1") == "0" or not sys.platform.startswith(
        "linux"
    ):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # every block from the heap (glibc still maps a request a thread's arena cannot hold), and
    # freed memory at the heap's top kept up to 2 GB
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
