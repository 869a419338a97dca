"""Host memory: when malloc keeps freed memory for reuse, and when it gives it back to the kernel.

XLA:CPU allocates a jitted call's buffers anew on every call. With glibc's default settings,
malloc hands large freed blocks back to the kernel, so the next call page-faults them in again,
a large share of a small model's training step (benchmarks/RESULTS.md). A pad of freed memory
kept at the top of malloc's heaps (M_TOP_PAD, 64 MiB) removes those faults; the price is holding
those pages once used.

Large models want the opposite: their calls take long enough that faulting pages in again costs
nothing measurable, while the memory kept (several heaps' pads) adds to a peak that is mostly
their weights. `give_back_freed_memory()` (malloc_trim) returns it to the kernel;
`BidirectionalLanguageModel` calls it after each call of a large model (elmojax.infer.bidirectional_lm).

`elmojax.setup()` applies the pad (elmojax.process.runtime); it only takes for heaps made afterwards, so it must come before
JAX starts its CPU client (whose threads get their own malloc arenas), that is before the first
array or jax.devices() call. To keep glibc's behaviour, or choose another pad, set
MALLOC_TOP_PAD_ (glibc's own variable, in bytes; its default is 131072) in the environment.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os

_M_TOP_PAD = -2  # mallopt's parameter number (malloc.h)
DEFAULT_TOP_PAD_MIB = 64


@functools.lru_cache(maxsize=None)
def _libc():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def keep_freed_memory(top_pad_mib: int = DEFAULT_TOP_PAD_MIB) -> bool:
    """Sets malloc's top pad to `top_pad_mib` MiB, unless MALLOC_TOP_PAD_ is set in the
    environment. Returns whether the setting took: False where the C library is not glibc."""
    if "MALLOC_TOP_PAD_" in os.environ:
        return False
    mallopt = getattr(_libc(), "mallopt", None)
    if mallopt is None:
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    return bool(mallopt(_M_TOP_PAD, top_pad_mib << 20))


def give_back_freed_memory() -> bool:
    """Returns the freed memory malloc keeps (its heaps' free pages) to the kernel. Returns
    whether it could: False where the C library is not glibc."""
    trim = getattr(_libc(), "malloc_trim", None)
    if trim is None:
        return False
    trim.argtypes = (ctypes.c_size_t,)
    trim(0)
    return True
