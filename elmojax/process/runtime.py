"""The process-wide settings elmojax's entry points apply, in one call: `elmojax.setup()`; and
the multi-controller runtime the command lines share (`initialize_distributed`, `barrier`).

Importing elmojax changes nothing outside it. The command lines (`elmojax.main`,
`elmojax.dump`), the benchmarks and the launchers call `setup()` first thing; a notebook or
script may call it too, before its first JAX computation:

- malloc keeps freed memory for reuse (elmojax.process.hostmem; MALLOC_TOP_PAD_ in the environment
  opts out): on CPUs, a third of a small model's training step otherwise goes on page faults;
- JAX's probing of platforms that are not installed (the "Unable to initialize backend 'tpu'"
  lines at every start) is not logged;
- compiled programs are kept on disk and shared by every process on the machine (JAX's
  persistent compilation cache, in compilation_cache_dir(): ~/.cache/elmojax/jax, or
  $ELMOJAX_COMPILATION_CACHE; "off" opts out; it may be removed at any time), so that a rerun,
  resume, evaluation or export of the same model reuses what an earlier process compiled.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import sys
import threading
import time
from typing import Iterator, Optional

import jax

from elmojax.process import hostmem

_done = False

COMPILATION_CACHE_VARIABLE = "ELMOJAX_COMPILATION_CACHE"


def compilation_cache_dir() -> Optional[str]:
    """Where compiled programs are kept: $ELMOJAX_COMPILATION_CACHE, else ~/.cache/elmojax/jax
    (beside the downloads); None where that variable is "off" or JAX_COMPILATION_CACHE_DIR is
    set (JAX then does as that says)."""
    value = os.environ.get(COMPILATION_CACHE_VARIABLE, "")
    if value.lower() in ("off", "0", "false", "no") or os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return None
    return value or os.path.join(os.path.expanduser("~"), ".cache", "elmojax", "jax")


def setup() -> None:
    """Applies the settings (once; later calls do nothing). Call it before JAX starts computing:
    the malloc setting takes only for memory arenas made afterwards."""
    global _done
    if _done:
        return
    _done = True
    hostmem.keep_freed_memory()
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
    cache = compilation_cache_dir()
    if cache is not None:
        try:
            os.makedirs(cache, exist_ok=True)
        except OSError:  # (a read-only home): compile as before
            return
        jax.config.update("jax_compilation_cache_dir", cache)
        if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:  # all of them: what a run
            jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)  # compiles, a rerun finds


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


GRACE_S = 2.0  # a second signal this soon after the first is ignored: the clean-up runs to its end


class _Stops:
    """stop_on_signals' handler: the first SIGINT or SIGTERM raises Stopped; another within
    GRACE_S is ignored (a second Ctrl-C would cut the clean-up short); a Stopped raised where
    Python swallows exceptions (a garbage-collector callback of JAX's, printed as "Exception
    ignored in ...") is sent again from another thread, to be raised once that code has returned
    (from the hook itself, the handler would raise inside the hook)."""

    def __init__(self, hook):
        self.hook, self.first, self.again = hook, None, []

    def __call__(self, signum, frame) -> None:
        now = time.monotonic()
        if self.first is None or now - self.first > GRACE_S:
            self.first = now
            raise Stopped(f"stopped by {signal.Signals(signum).name}")

    def unraisable(self, info) -> None:
        found = re.match(r"stopped by (SIG[A-Z]+)", str(info.exc_value))
        if isinstance(info.exc_value, Stopped) and found and found.group(1) in signal.Signals.__members__:
            self.first = None
            again = threading.Timer(0.01, signal.pthread_kill, (threading.main_thread().ident,
                                                                signal.Signals[found.group(1)]))
            self.again.append(again)
            again.start()
            return
        self.hook(info)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """Inside, SIGTERM and SIGINT raise `Stopped` in the main thread, so that the command's
    `finally` blocks and context managers run (temporary files removed, finished work kept)
    before it exits (see _Stops for a second signal and a swallowed Stopped); outside (or off
    the main thread) the handlers are as they were. Set up JAX's backends (and the
    multi-controller runtime) first: their set-up catches any exception, a Stopped too."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    stops = _Stops(sys.unraisablehook)
    previous = {sig: signal.signal(sig, stops) for sig in (signal.SIGTERM, signal.SIGINT)}
    sys.unraisablehook = stops.unraisable
    try:
        yield
    finally:
        sys.unraisablehook = stops.hook
        for again in stops.again:
            again.cancel()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class LogHandler(logging.StreamHandler):
    """logging's stderr handler for the command lines, except that a Stopped raised while it
    writes (logging would print it as a logging error and go on) stops the command."""

    def handleError(self, record) -> None:
        if isinstance(sys.exc_info()[1], Stopped):
            raise sys.exc_info()[1]
        super().handleError(record)


def exit_command(status: int) -> None:
    """Ends a command with `status`. One stopped by a signal (status > 128), maybe inside a JAX
    compilation, ends at once, its files already cleaned up: Python's own exit could then crash
    in XLA's teardown (a segfault)."""
    if status > 128:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)
