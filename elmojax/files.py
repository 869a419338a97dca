"""Small file helpers: UTF-8 text whatever the locale, and atomic writes."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from typing import Iterator


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
def atomic_output(path: str) -> Iterator[str]:
    """Yields a temporary path beside `path`; renames it onto `path` only on success.

    A reader never sees a half-written file: on an exception the temporary file is removed
    and `path` is left as it was.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def write_json(path: str, obj: dict) -> None:
    with atomic_output(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")
