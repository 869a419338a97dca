"""Host memory: keep freed memory for reuse instead of giving it back to the kernel.

XLA:CPU allocates a jitted call's buffers anew on every call. With glibc's default settings,
malloc hands large freed blocks back to the kernel, so the next call page-faults them in again:
in a small model's training step on the 2-core benchmark machine that was 11k page faults and
19 ms of system time in a 50 ms step. A pad of freed memory kept at the top of malloc's heaps
(M_TOP_PAD, 64 MiB) removes those faults; the price is holding those pages once used.

`elmojax.setup()` applies it (elmojax.runtime); it only takes for heaps made afterwards, so it must come before
JAX starts its CPU client (whose threads get their own malloc arenas), that is before the first
array or jax.devices() call. To keep glibc's behaviour, or choose another pad, set
MALLOC_TOP_PAD_ (glibc's own variable, in bytes; its default is 131072) in the environment.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

_M_TOP_PAD = -2  # mallopt's parameter number (malloc.h)
DEFAULT_TOP_PAD_MIB = 64


def keep_freed_memory(top_pad_mib: int = DEFAULT_TOP_PAD_MIB) -> bool:
    """Sets malloc's top pad to `top_pad_mib` MiB, unless MALLOC_TOP_PAD_ is set in the
    environment. Returns whether the setting took: False where the C library is not glibc."""
    if "MALLOC_TOP_PAD_" in os.environ:
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    return bool(mallopt(_M_TOP_PAD, top_pad_mib << 20))
