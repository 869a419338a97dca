"""Small file helpers: UTF-8 text whatever the locale, and atomic writes."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from typing import Iterator, Optional


def read_lines(path: str) -> Iterator[tuple[int, str]]:
    """Yields (1-based line number, line without its newline), decoded as UTF-8.

    The locale's encoding is never used, so a vocabulary or dataset reads the same
    everywhere; a byte sequence that is not UTF-8 is an error naming the file and line.
    """
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}, line {number}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
            yield number, line.rstrip("\r\n")


def read_json(path: str) -> dict:
    with open(path, "rb") as f:
        raw = f.read()
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a valid UTF-8 JSON file ({e})") from None


@contextlib.contextmanager
def atomic_output(path: str, durable: bool = False, temporary_dir: Optional[str] = None) -> Iterator[str]:
    """Yields a temporary path beside `path` (or in temporary_dir, on the same file system);
    renames it onto `path` only on success.

    A reader never sees a half-written file: on an exception the temporary file is removed
    and `path` is left as it was. `durable`: the file is flushed to disk before the rename and
    the rename after it, so that what a crash of the machine leaves is whole too.
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
    """A temporary file's path in `path`'s directory (or `directory`), removed at the end unless renamed."""
    if os.path.isdir(path):
        raise ValueError(f"{path}: a directory; give a file name to write")
    directory = directory or os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        yield tmp
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


@contextlib.contextmanager
def atomic_outputs(paths: list[str]) -> Iterator[dict[str, str]]:
    """atomic_output for several files written together: yields {path: temporary path}; only
    once all are written are they renamed onto their paths. On an exception every temporary
    file is removed and no path is touched."""
    with contextlib.ExitStack() as stack:
        temporary = {}
        for path in paths:
            temporary[path] = stack.enter_context(_temporary_beside(path))
        yield temporary
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
