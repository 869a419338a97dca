"""Small file helpers: UTF-8 text whatever the locale, and atomic writes.

Reading text. Every text file elmojax reads (corpus shards, vocabularies, prepare's input,
dump inputs, options.json and other JSON) goes through `read_lines`, `read_text` or
`read_json`, with one policy: UTF-8 whatever the locale (a byte sequence that is not is an
error naming the file and line); a UTF-8 byte-order mark at the start is dropped, and Windows
line ends (CRLF) read as plain ones, each said once per file and process in a note
("note: FILE: starts with a UTF-8 byte-order mark; ignored"), so that such a file gives the same
tokens as its plain twin.

Writing files. `atomic_output`, `atomic_outputs`, `write_bytes` and `write_json` write a
temporary file `.NAME.<pid>.<host>-<random>.tmp` beside NAME and rename it onto NAME only when
complete. The temporary file is created as open() creates files (mode 0666 less the umask), so
what lands at NAME has the permissions the user's umask gives. It is removed on any exception
(a SIGTERM or Ctrl-C too, under runtime.stop_on_signals); one left by a process that was killed
outright (kill -9) is removed the next time NAME is written on the same host.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import threading
import zlib
from typing import Iterable, Iterator, Optional

log = logging.getLogger(__name__)

# --- reading text --------------------------------------------------------------------------------

BOM = "\ufeff"
_BOM_BYTES = BOM.encode("utf-8")
_noted: set[tuple[str, str]] = set()
_noted_lock = threading.Lock()


def _note(path: str, what: str) -> None:
    """Logs 'note: PATH: what' the first time this process reads `path` so."""
    key = (os.path.abspath(path), what)
    with _noted_lock:
        if key in _noted:
            return
        _noted.add(key)
    log.warning("note: %s: %s", path, what)


def _note_bom(path: str) -> None:
    _note(path, "starts with a UTF-8 byte-order mark; ignored")


def _note_crlf(path: str) -> None:
    _note(path, "Windows line ends (CRLF); read as plain line ends")


def read_lines(path: str, gzipped: bool = False) -> Iterator[tuple[int, str]]:
    """Yields (1-based line number, line without its line end), decoded as UTF-8.

    The locale's encoding is never used, so a vocabulary or dataset reads the same
    everywhere; a byte sequence that is not UTF-8 is an error naming the file and line. A
    byte-order mark at the start and CRLF line ends are read as the module says. `gzipped`: the
    file is gzip-compressed (one that cannot be read so is a ValueError naming it).
    """
    if not gzipped:
        with open(path, "rb") as f:
            yield from _decoded_lines(f, path)
        return
    try:
        with gzip.open(path, "rb") as f:
            yield from _decoded_lines(f, path)
    except (OSError, EOFError, zlib.error) as e:
        raise ValueError(f"{path}: not a readable gzip file ({e})") from None


def _decoded_lines(lines: Iterable[bytes], path: str) -> Iterator[tuple[int, str]]:
    crlf = False
    for number, raw in enumerate(lines, start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise _not_utf8(path, number, e.reason, e.start, raw if number == 1 else b"") from None
        if number == 1 and line.startswith(BOM):
            _note_bom(path)
            line = line[1:]
        if not crlf and line.endswith("\r\n"):
            crlf = True
            _note_crlf(path)
        yield number, line.rstrip("\r\n")


def _not_utf8(path: str, number: int, reason: str, at: int, start: bytes) -> ValueError:
    """The error for bytes that are not UTF-8 at line `number`, byte `at`; `start`: the file's
    first bytes (a UTF-16 byte-order mark there is said)."""
    hint = ""
    if start[:2] in (b"\xff\xfe", b"\xfe\xff"):
        hint = "; it starts with UTF-16's byte-order mark: save it as UTF-8 (iconv -f UTF-16 -t UTF-8)"
    return ValueError(f"{path}, line {number}: not valid UTF-8 ({reason} at byte {at}){hint}")


def _decode(raw: bytes, path: str) -> str:
    """The UTF-8 text of a whole file's bytes, a byte-order mark dropped (UnicodeDecodeError
    as it comes, its offsets in `raw`)."""
    start = 0
    if raw.startswith(_BOM_BYTES):
        _note_bom(path)
        start = len(_BOM_BYTES)
    try:
        with memoryview(raw) as view:  # no copy of a large file for the mark
            return str(view[start:], "utf-8")
    except UnicodeDecodeError as e:
        e.start += start
        e.end += start
        raise


def read_text(path: str) -> str:
    """A whole text file as read_lines reads it, in one go (for large files read at once):
    UTF-8, a byte-order mark dropped, CRLF line ends made "\\n"."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = _decode(raw, path)
    except UnicodeDecodeError as e:
        number = raw.count(b"\n", 0, e.start) + 1
        at = e.start - (raw.rfind(b"\n", 0, e.start) + 1)
        raise _not_utf8(path, number, e.reason, at, raw) from None
    del raw
    if "\r" in text and "\r\n" in text:  # (one character is found many times faster than two)
        _note_crlf(path)
        text = text.replace("\r\n", "\n")
    return text


def read_json(path: str) -> dict:
    """A JSON file's value (UTF-8, a byte-order mark dropped); a ValueError naming the file if
    it is not JSON."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        return json.loads(_decode(raw, path))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a valid UTF-8 JSON file ({e})") from None


# --- signals --------------------------------------------------------------------------------------

_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@contextlib.contextmanager
def uninterrupted() -> Iterator[None]:
    """Inside, SIGTERM and SIGINT wait when a Python handler would take them (an exception
    raised in the middle: runtime.stop_on_signals' Stopped, Ctrl-C's KeyboardInterrupt): they
    are handled by it as the block ends, so that steps which must not be cut in two (the renames
    of files written together, a temporary file's removal) finish. A signal that Python does
    not handle is left as it is: the default (the process ends, as with kill -9) or a handler
    set outside Python (JAX's preemption service takes SIGTERM so), which must not be replaced.
    Only the main thread runs Python's signal handlers; elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    inside = True
    caught: list[int] = []
    previous = {sig: signal.getsignal(sig) for sig in _SIGNALS}
    previous = {sig: h for sig, h in previous.items() if callable(h)}

    def defer(signum, frame):
        if inside:
            caught.append(signum)
            return
        previous[signum](signum, frame)  # the block has ended, the old handler is not back yet

    for sig in previous:
        signal.signal(sig, defer)
    try:
        yield
    finally:
        inside = False
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for sig in dict.fromkeys(caught):
            signal.raise_signal(sig)


# --- writing files --------------------------------------------------------------------------------

_NAME_MAX = 255  # bytes in a file name (Linux, macOS)
_HOST = hashlib.sha1(socket.gethostname().encode("utf-8", "surrogateescape")).hexdigest()[:8]
_TEMPORARY = re.compile(r"\.(\d+)\.([0-9a-f]{8})-[0-9a-f]{16}\.(tmp|old)$")
_ANY_TEMPORARY = re.compile(r"\..+" + _TEMPORARY.pattern)


def _stem(path: str) -> str:
    """The file name that temporary names beside `path` start with (cut to fit a name's length)."""
    name = os.fsencode(os.path.basename(path))
    return os.fsdecode(name[:_NAME_MAX - 48])


def temporary_path(path: str, directory: Optional[str] = None, suffix: str = ".tmp") -> str:
    """A new name for a temporary file or directory of this process beside `path` (or in
    `directory`): .NAME.<pid>.<host>-<random>.tmp; remove_leftovers knows it by that name."""
    directory = directory or os.path.dirname(os.path.abspath(path))
    name = f".{_stem(path)}.{os.getpid()}.{_HOST}-{secrets.token_hex(8)}{suffix}"
    return os.path.join(directory, name)


def process_alive(pid: int) -> bool:
    """Whether process `pid` runs on this host (someone else's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # someone else's process (PermissionError)
        return True
    return True


def leftovers(path: Optional[str], directory: Optional[str] = None, suffix: str = ".tmp") -> list[tuple[str, int]]:
    """(path, pid) of each temporary file or directory for `path` (temporary_path's names, in
    `directory` or beside `path`; for any file when `path` is None) whose process, on this
    host, no longer runs."""
    directory = directory or os.path.dirname(os.path.abspath(path))
    prefix = "." if path is None else f".{_stem(path)}."
    found = []
    try:
        names = [name for name in os.listdir(directory) if name.startswith(prefix)]
    except OSError:
        return []
    for name in names:
        m = _ANY_TEMPORARY.fullmatch(name) if path is None else _TEMPORARY.fullmatch(name, len(prefix) - 1)
        if m and m.group(3) == suffix[1:] and m.group(2) == _HOST and not process_alive(int(m.group(1))):
            found.append((os.path.join(directory, name), int(m.group(1))))
    return found


def remove_leftovers(path: Optional[str], directory: Optional[str] = None) -> None:
    """Removes the temporary files (or directories) for `path` (any file's in `directory` when
    None) that writers killed outright (kill -9, a crash) left behind on this host; those of
    running processes stay. Nothing here is an error: a leftover that cannot be removed is
    left."""
    for leftover, pid in leftovers(path, directory):
        try:
            if os.path.isdir(leftover) and not os.path.islink(leftover):
                shutil.rmtree(leftover)
            else:
                os.remove(leftover)
        except FileNotFoundError:  # another writer removed it first
            continue
        except OSError:
            continue
        log.info("removed %s, left by process %d, which no longer runs", leftover, pid)


@contextlib.contextmanager
def atomic_output(path: str, durable: bool = False, temporary_dir: Optional[str] = None) -> Iterator[str]:
    """Yields a temporary path beside `path` (or in temporary_dir, on the same file system);
    renames it onto `path` only on success.

    A reader never sees a half-written file: on an exception the temporary file is removed
    and `path` is left as it was. `durable`: the file is flushed to disk before the rename and
    the rename after it, so that what a crash of the machine leaves is whole too. The file
    exists (empty) when yielded, with the umask's permissions, which it keeps when written
    over (open(tmp, "w"), h5py.File(tmp, "w")).
    """
    with _temporary_beside(path, temporary_dir) as tmp:
        yield tmp
        if durable:
            _fsync(tmp)
        os.replace(tmp, path)
        if durable:
            _fsync(os.path.dirname(os.path.abspath(path)), directory=True)


def _fsync(path: str, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _temporary_beside(path: str, directory: Optional[str] = None) -> Iterator[str]:
    """A new empty temporary file in `path`'s directory (or `directory`), removed at the end
    unless renamed; leftovers of dead writers of `path` there are removed first."""
    if os.path.isdir(path):
        raise ValueError(f"{path}: a directory; give a file name to write")
    directory = directory or os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    remove_leftovers(path, directory)
    tmp = temporary_path(path, directory)
    try:
        with uninterrupted():
            # 0o666 less the umask, as open() would: mkstemp's 0600 would reach the output
            try:
                os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY | getattr(os, "O_CLOEXEC", 0), 0o666))
            except OSError as e:  # named by the file the user asked for, not the temporary one
                raise OSError(e.errno, e.strerror, path) from None
        yield tmp
    finally:
        with uninterrupted(), contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


@contextlib.contextmanager
def atomic_outputs(paths: list[str]) -> Iterator[dict[str, str]]:
    """atomic_output for several files written together: yields {path: temporary path}; only
    once all are written are they renamed onto their paths (a SIGTERM or Ctrl-C waits for the
    renames to end). On an exception every temporary file is removed and no path is touched."""
    with contextlib.ExitStack() as stack:
        temporary = {}
        for path in paths:
            temporary[path] = stack.enter_context(_temporary_beside(path))
        yield temporary
        with uninterrupted():
            for path, tmp in temporary.items():
                os.replace(tmp, path)


def write_bytes(contents: dict[str, bytes]) -> None:
    """Writes each {path: bytes} atomically, all or none, flushed to disk before the renames."""
    with atomic_outputs(list(contents)) as temporary:
        for path, data in contents.items():
            try:
                with open(temporary[path], "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
            except OSError as e:  # named by the file the user asked for, not the temporary one
                raise OSError(e.errno, e.strerror, path) from None


def write_json(path: str, obj: dict) -> None:
    with atomic_output(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")
