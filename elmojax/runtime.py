"""The process-wide settings elmojax's entry points apply, in one call: `elmojax.setup()`.

Importing elmojax changes nothing outside it. The command lines (`elmojax.main`,
`elmojax.dump`), the benchmarks and the launchers call `setup()` first thing; a notebook or
script may call it too, before its first JAX computation:

- malloc keeps freed memory for reuse (elmojax.hostmem; MALLOC_TOP_PAD_ in the environment
  opts out): on CPUs, a third of a small model's training step otherwise goes on page faults;
- JAX's probing of platforms that are not installed (the "Unable to initialize backend 'tpu'"
  lines at every start) is not logged.
"""

from __future__ import annotations

import logging

from elmojax import hostmem

_done = False


def setup() -> None:
    """Applies the settings (once; later calls do nothing). Call it before JAX starts computing:
    the malloc setting takes only for memory arenas made afterwards."""
    global _done
    if _done:
        return
    _done = True
    hostmem.keep_freed_memory()
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
