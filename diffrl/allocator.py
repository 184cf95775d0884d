"""Keep freed memory in the process instead of handing it back to the OS after every tensor (glibc only).

glibc's ``malloc`` serves blocks above its mmap threshold with a fresh ``mmap`` and unmaps them on ``free``, and
trims the heap's free top back to the OS. A rollout keeps every step's latents alive while the backbone's
activations come and go, so on CPU nearly every large tensor then costs page faults and the kernel's zeroing of
new pages. On the 2-core CI VM that made a rollout step 11–24 % slower than the same backbone forward in a tight
loop (`benchmarks/step_overhead.py` with ``DIFFRL_MALLOC=default``; 1–5 % with these settings). `tune_malloc`
raises the mmap threshold to glibc's maximum (32 MiB on 64-bit) and keeps up to 512 MiB of free heap, through
``mallopt(3)``; the ``MALLOC_*`` environment variables do the same but must be set before the process starts.
A no-op where libc is not glibc (macOS, musl) or when ``DIFFRL_MALLOC=default`` is set.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

M_TRIM_THRESHOLD = -1  # glibc <malloc.h>
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3

SETTINGS = {M_MMAP_THRESHOLD: 32 << 20, M_TRIM_THRESHOLD: 512 << 20, M_TOP_PAD: 64 << 20}


def tune_malloc() -> bool:
    """Apply `SETTINGS` with ``mallopt``; True when glibc took all of them."""
    if os.environ.get("DIFFRL_MALLOC") == "default":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return all(mallopt(param, value) == 1 for param, value in SETTINGS.items())
