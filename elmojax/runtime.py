"""The process-wide settings elmojax's entry points apply, in one call: `elmojax.setup()`; and
the multi-controller runtime the command lines share (`initialize_distributed`, `barrier`).

Importing elmojax changes nothing outside it. The command lines (`elmojax.main`,
`elmojax.dump`), the benchmarks and the launchers call `setup()` first thing; a notebook or
script may call it too, before its first JAX computation:

- malloc keeps freed memory for reuse (elmojax.hostmem; MALLOC_TOP_PAD_ in the environment
  opts out): on CPUs, a third of a small model's training step otherwise goes on page faults;
- JAX's probing of platforms that are not installed (the "Unable to initialize backend 'tpu'"
  lines at every start) is not logged.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from typing import Iterator, Optional

import jax

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


def initialize_distributed(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
                           process_id: Optional[int] = None) -> bool:
    """Starts JAX's multi-controller runtime when this is one of several processes: from the
    arguments (the command lines' --coordinator_address, --num_processes, --process_id), or
    from the environment of a SLURM job step with several tasks (or JAX's own variables), which
    jax.distributed detects by itself. Returns whether it did; a lone process starts nothing."""
    explicit = coordinator_address is not None or num_processes is not None
    slurm = int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_STEP_ID" in os.environ
    if not (explicit or slurm or "JAX_COORDINATOR_ADDRESS" in os.environ):
        return False
    # CPU processes exchange collectives through gloo (GPUs use NCCL by themselves).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id)
    return True


# How long a barrier waits for the slowest process (a dump's processes may finish their shares
# hours apart after an uneven restart); a process that dies ends the others sooner, through the
# runtime's heartbeats.
BARRIER_TIMEOUT_SECONDS = 7 * 24 * 3600


def barrier(name: str, timeout_seconds: int = BARRIER_TIMEOUT_SECONDS) -> None:
    """Waits until every process has reached the barrier `name` (nothing to wait for alone).

    It is the coordination service's barrier (as orbax's and JAX's own checkpointing use), not
    a collective over the devices: it needs no device memory and waits as long as it is told.
    """
    if jax.process_count() == 1:
        return
    from jax._src import distributed

    distributed.global_state.client.wait_at_barrier(name, timeout_in_ms=timeout_seconds * 1000)


class Stopped(Exception):
    """SIGTERM or SIGINT stopped a command (see `stop_on_signals`); the message is one line,
    starting "stopped by SIGTERM" (or SIGINT), whatever a command adds to it."""

    @property
    def exit_status(self) -> int:
        """128 + the signal's number, as a shell reports a process it ended (130 SIGINT, 143 SIGTERM)."""
        for sig in (signal.SIGINT, signal.SIGTERM):
            if str(self).startswith(f"stopped by {sig.name}"):
                return 128 + sig
        return 1


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """Inside, SIGTERM and SIGINT raise `Stopped` in the main thread, so that the command's
    `finally` blocks and context managers run (temporary files removed, finished work kept)
    before it exits; outside (or off the main thread) the handlers are as they were."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise Stopped(f"stopped by {signal.Signals(signum).name}")

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
