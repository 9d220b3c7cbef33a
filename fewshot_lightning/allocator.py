"""How the process's C allocator hands out the memory of CPU tensors.

PyTorch allocates a CPU tensor with the C library's ``malloc``. glibc serves a large block
(above a threshold that starts at 128 KiB and moves up to at most 32 MiB) with a fresh ``mmap``
and gives it back to the kernel when it is freed, and trims the heap's free top back too. A
training step allocates and frees the same large activations every iteration, so every
iteration the kernel maps them again, one page fault per 4 KiB page, and zeroes them: on the
2-core VM of ``docs/benchmarks.md``, 413,350 faults and 1.6 s of system time in a
mini-ImageNet-size second-order MAML iteration of 7.5 s (``benchmarks/cpu_allocator.py``).

:func:`keep_freed_memory` has glibc keep freed memory in its heap for reuse (``mallopt``:
``M_MMAP_THRESHOLD`` 32 MiB, ``M_TRIM_THRESHOLD`` 2 GiB), and with ``all_blocks=True`` serve
every block from the heap (``M_MMAP_MAX`` 0), much as PyTorch's CPU tuning guide gets by loading
jemalloc or tcmalloc. Measured there: 9% to 17% faster MAML steps (``all_blocks``: about 20% on
84x84 images), the peak RSS from 2% below to 7% above glibc's defaults (``all_blocks``: up to
37% above, the heap fragmenting). The tensors themselves are the same. The
``fewshot-lightning`` command applies it to runs on the CPU (``--cpu_allocator keep``, the
default; ``keep_all``; ``system`` leaves glibc as it is); a library user calls it, or not.

It changes the whole process (every library's allocations in it) and cannot be undone from
Python; a block that glibc cannot take from the heap still comes from ``mmap``, so nothing fails
that would not fail anyway. Elsewhere than glibc (macOS, musl, Windows) it does nothing.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import platform
import sys
from typing import Optional

#: ``mallopt`` parameters (glibc's malloc.h).
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4
#: Free memory at the heap's top is given back only beyond this (``mallopt`` takes a C int).
TRIM_THRESHOLD = 2**31 - 1
#: The largest block glibc lets its heap serve while ``mmap`` is allowed (``HEAP_MAX_SIZE / 2`` on
#: 64-bit systems): larger ones are mapped afresh unless ``all_blocks``.
MMAP_THRESHOLD = 32 * 2**20

_applied: Optional[str] = None


def glibc() -> Optional[ctypes.CDLL]:
    """The C library if it is glibc on Linux, else ``None``."""
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def keep_freed_memory(all_blocks: bool = False) -> bool:
    """Keep freed memory in glibc's heap for reuse (see the module's docstring): blocks of up to
    32 MiB served from the heap and never given back below 2 GiB of free heap; larger blocks
    still mapped afresh, unless ``all_blocks``, which serves every block from the heap (faster
    on large images, at more peak memory). Returns whether it is in effect: ``False`` where the
    C library is not glibc. Calling it again with ``all_blocks=True`` extends it to every block;
    nothing undoes it."""
    global _applied
    mode = "all_blocks" if all_blocks else "keep"
    if _applied in (mode, "all_blocks"):
        return True
    libc = glibc()
    if libc is None:
        return False
    done = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    if done and all_blocks:
        done = libc.mallopt(M_MMAP_MAX, 0) == 1
    if done:
        _applied = mode
    return done


def in_effect() -> Optional[str]:
    """``"keep"`` or ``"all_blocks"`` once :func:`keep_freed_memory` is in effect, else ``None``."""
    return _applied
