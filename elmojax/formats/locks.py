"""The workdir's lock: one trainer at a time (and one dump at a time in a dump's work
directory, elmojax.infer.dump_parts).

A trainer holds WORKDIR/.lock, a JSON file naming its host and process id, from its start to its
end. A second trainer on the same workdir refuses before it trains. A lock left by a process
that no longer runs (killed with -9, say) is taken over with a warning; a lock of another host
cannot be checked, so the message says how to remove it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from typing import Iterator

from elmojax.formats import files

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"
UNREADABLE_GRACE_S = 10  # a lock file this old that holds nothing readable was left by a crash


def _holder(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            holder = json.load(f)
        return holder if isinstance(holder, dict) and isinstance(holder.get("host"), str) and \
            isinstance(holder.get("pid"), int) else None
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def locked(workdir: str, noun: str = "trainer", name: str = LOCK_FILE) -> Iterator[None]:
    """Holds the lock file `name` in the directory `workdir` inside; a ValueError if another live
    process holds it (a `noun`, as the messages call it)."""
    path = os.path.join(workdir, name)
    me = {"host": socket.gethostname(), "pid": os.getpid()}
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
            break
        except FileExistsError:
            holder = _holder(path)
            if holder is None:
                with contextlib.suppress(FileNotFoundError):
                    if time.time() - os.path.getmtime(path) < UNREADABLE_GRACE_S:
                        raise ValueError(f"{workdir}: another {noun} is starting in it ({path})") from None
                log.warning("warning: %s: taking over an unreadable lock file", path)
            elif holder["host"] == me["host"] and not files.process_alive(int(holder["pid"])):
                log.warning("warning: %s: taking over the lock of process %s, which no longer runs", path,
                            holder["pid"])
            else:
                raise ValueError(f"{workdir}: in use by another {noun} (process {holder['pid']} on "
                                 f"{holder['host']}, {path}); if none runs there, remove that file") from None
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(me, f)
    except BaseException as e:
        os.remove(path)
        if isinstance(e, OSError) and e.filename is None:  # a full disk: name the file
            raise OSError(e.errno, e.strerror, path) from None
        raise
    try:
        yield
    finally:
        if _holder(path) == me:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
