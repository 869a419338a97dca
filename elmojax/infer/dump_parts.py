"""A whole-dataset dump's work directory: the lines in fixed chunks, each written atomically
once done, kept across restarts, shared among processes, merged into the one output file.

  OUT.parts/manifest.json        what the dump is: its kind and settings, and the path, size and
                                 mtime of its input, vocabulary, options and weight files
  OUT.parts/chunk-000012.hdf5    chunk 12, lines [12 C, 13 C) (C: chunk_lines): their datasets
                                 under their final keys (and a stateful dump's carried state)
  OUT.parts/chunk-000012.sum     the chunk file's size and CRC-32, and its datasets' bytes
  OUT.parts/.lock                the dump using the directory (host and process id)

Chunk k is process k % n's (of n), whatever the processes did before: each writes only its own,
none needs to know what another has done, and a rerun with another number of processes keeps
every finished chunk. A chunk file exists only once complete (written beside, flushed, renamed):
a dump killed at any point leaves finished chunks and at most a temporary file (removed by the
next run on that host, or by the merge); started again with the same command, it keeps those and computes the rest. A work
directory left by another command (another input, model, kind or setting) is refused in one
line naming what differs.

Checksums. Each chunk's `.sum` file is written (and flushed) before the chunk file is renamed
into place, so a chunk file without one was not written by this code. It holds a CRC-32 of the
whole file, not of its datasets: a damaged file is caught before HDF5 parses it (damaged hdf5
metadata can crash HDF5 itself), whatever its damage. A run checks every finished chunk's size
at its start (a stat: a truncated or extended chunk is removed with one warning line and
computed again with the rest) and each chunk's CRC as it merges it, reading the file once more
(the merge's own read then comes from the page cache); a damaged chunk is removed with one
warning line, computed again by process 0, and the merge starts over. A stateful dump also
checks the chunk whose state it carries on from before reading it. A work directory written
before chunks had checksums (manifest version 1) resumes and merges as before: its chunks
without a `.sum` are merged unchecked (one line says how many); those this run writes get one.

Full disks and stops. HDF5 never writes to the disk itself: it writes through a file object
(h5py's `fileobj` driver) whose writes cannot fail toward HDF5; the first failing write (a full
disk, a quota, an I/O error) is kept and raised as an OSError once HDF5's call has returned.
(With HDF5 2.0 and h5py 3.16, once a write of HDF5's own fails, releasing each dataset object
fails again on the same write, "Can't decrement id ref count", and File.close, releasing the
file's objects left open, then segfaults: a flood of tracebacks, then exit 139.) For the same reason
SIGINT and SIGTERM wait while HDF5 runs (files.uninterrupted: a Python exception raised inside
the driver would be a failing write) and are delivered as soon as it returns. The error names the chunk or the
output, says which chunks are kept and how to go on; nothing half-written is left.

Each chunk starts from zero state in batches of its own lines, so a chunk's arrays are the same
whichever process computes them and whenever; when all are done, process 0 copies them into
OUT (atomically, flushed to disk) in line order, then removes the directory: the chunks, then
the manifest, then the lock. Before it starts, it checks that OUT's file system has room for
the datasets' bytes. The copy needs the chunks' space twice over for a moment; in exchange OUT
is one ordinary hdf5 file (external links would leave it pointing into files beside it, to be
kept and moved along with it).

One dump at a time: process 0 holds OUT.parts/.lock (elmojax.formats.locks.locked) from before it
reads the directory until it has removed it; another dump into the same OUT is refused naming
that process and host, and a lock whose process no longer runs is taken over with a warning.
The other processes of a multi-process dump take no lock: they start on the directory only
after a barrier that process 0 passes once it holds the lock.
"""

from __future__ import annotations

import contextlib
import errno as errnos
import glob
import json
import logging
import os
import re
import shutil
import zlib
from typing import Callable, Iterable, Iterator, Optional

import h5py
import numpy as np

from elmojax.formats import files, remote
from elmojax.formats import locks
from elmojax.formats.checks import check_int
from elmojax.formats.dicts import flatten

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
VERSION = 2  # 2: chunks have checksum files; 1: they have none (still resumed and merged)
LOCK = locks.LOCK_FILE
_CHUNK = re.compile(r"chunk-(\d{6,})\.hdf5$")
_BLOCK = 1 << 24


def work_dir(outfile: str) -> str:
    return outfile + ".parts"


def fingerprint(path: str) -> dict:
    """What identifies a file for a rerun: its absolute path, size and mtime (a directory or a
    checkpoint prefix: those of its files); a URL as it is."""
    if remote.is_url(path):
        return {"url": path}
    if os.path.isfile(path):
        stat = os.stat(path)
        return {"path": os.path.abspath(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    found = sorted(glob.glob(os.path.join(path, "*")) if os.path.isdir(path) else glob.glob(glob.escape(path) + ".*"))
    return {"path": os.path.abspath(path),
            "files": [[os.path.basename(f), os.stat(f).st_size, os.stat(f).st_mtime_ns] for f in found
                      if os.path.isfile(f)]}


def chunk_lines_of(n_lines: int, chunk_lines: int) -> list[range]:
    """The chunks' line ranges (indices from 0)."""
    chunk_lines = check_int("chunk_lines", chunk_lines, 1, wrong_type=ValueError)
    return [range(start, min(start + chunk_lines, n_lines)) for start in range(0, n_lines, chunk_lines)]


# --- signals wait while HDF5 runs --------------------------------------------------------------

class _Gate:
    """A context in which SIGINT and SIGTERM wait (files.uninterrupted) from `hold()` on until it
    is left: what follows a finished write (its flush, rename and clean-up) runs to its end."""

    def __enter__(self) -> "_Gate":
        self.held: Optional[contextlib.AbstractContextManager] = None
        return self

    def hold(self) -> None:
        if self.held is None:
            self.held = files.uninterrupted()
            self.held.__enter__()

    def __exit__(self, *exc) -> None:
        if self.held is not None:
            self.held.__exit__(*exc)


# --- hdf5 files written through plain file I/O -------------------------------------------------

class _Disk:
    """A file for h5py's `fileobj` driver whose writes never fail toward HDF5: the first error
    is kept (`error`), and what HDF5 writes from then on is kept in memory, so that its reads
    stay consistent until the writer stops it (one dataset later at most)."""

    def __init__(self, path: str):
        self.fd = os.open(path, os.O_RDWR)
        self.pos = 0
        self.error: Optional[BaseException] = None
        self.kept: list[tuple[int, bytes]] = []

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = offset + (0 if whence == 0 else self.pos if whence == 1 else self._end())
        return self.pos

    def tell(self) -> int:
        return self.pos

    def _end(self) -> int:
        try:
            end = os.fstat(self.fd).st_size
        except BaseException as e:
            self.error, end = self.error or e, 0
        return max([end] + [offset + len(data) for offset, data in self.kept])

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        if self.error is None:
            try:
                done = 0
                while done < len(view):
                    done += os.pwrite(self.fd, view[done:], self.pos + done)
            except BaseException as e:
                self.error = e
        if self.error is not None:
            self.kept.append((self.pos, bytes(view)))
        self.pos += len(view)
        return len(view)

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        try:
            got = os.preadv(self.fd, [view], self.pos)
        except BaseException as e:
            self.error, got = self.error or e, 0
        view[got:] = bytes(len(view) - got)
        for offset, data in self.kept:
            low, high = max(offset, self.pos), min(offset + len(data), self.pos + len(view))
            if low < high:
                view[low - self.pos:high - self.pos] = data[low - offset:high - offset]
        self.pos += len(view)
        return len(view)

    def read(self, size: int = -1) -> bytes:
        buffer = bytearray(max(size, 0))
        self.readinto(buffer)
        return bytes(buffer)

    def truncate(self, size: Optional[int] = None) -> int:
        size = self.pos if size is None else size
        if self.error is None:
            try:
                os.ftruncate(self.fd, size)
            except BaseException as e:
                self.error = e
        return size

    def flush(self) -> None:
        pass  # the writer flushes to disk (fsync) once HDF5 has closed the file


class Hdf5Writer:
    """An hdf5 file written at `path` (an existing, empty temporary file) through _Disk; errors
    name `shown` (the file the user asked for). `bytes`: the bytes of the arrays put (but those
    put with counted=False)."""

    def __init__(self, path: str, shown: str):
        self.shown, self.bytes = shown, 0
        self.disk = _Disk(path)
        try:
            with files.uninterrupted():
                self.file = h5py.File(self.disk, "w")
        except BaseException:
            os.close(self.disk.fd)
            raise
        self._check()

    def _check(self) -> None:
        e = self.disk.error
        if e is not None:
            if isinstance(e, OSError):
                raise WriteFailed(e.errno, e.strerror, self.shown) from None
            raise e

    def put(self, name: str, data, dtype=None, attrs: Optional[dict] = None, counted: bool = True) -> None:
        """Writes the dataset `name` (and its attributes)."""
        data = data if dtype is not None else np.asarray(data)
        try:
            with files.uninterrupted():
                dataset = self.file.create_dataset(name, data=data, dtype=dtype)
                dataset.attrs.update(attrs or {})
                del dataset
        except Exception:
            self._check()  # a failed write is the cause
            raise
        self._check()
        if counted and dtype is None:
            self.bytes += data.nbytes

    def close(self) -> None:
        """Closes the file; the first failed write, if any, as an OSError."""
        if self.disk.fd < 0:
            return
        try:
            with files.uninterrupted():
                self.file.close()
        finally:
            os.close(self.disk.fd)
            self.disk.fd = -1
        self._check()

    def __enter__(self) -> "Hdf5Writer":
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if kind is None:
            self.close()
        else:
            with contextlib.suppress(OSError):
                self.close()


@contextlib.contextmanager
def hdf5_output(path: str, durable: bool = False) -> Iterator[Hdf5Writer]:
    """An hdf5 file written at `path` atomically (files.atomic_output), through plain file I/O:
    a full disk or an I/O error is an OSError naming `path`, and leaves no temporary file."""
    with _Gate() as gate:
        with files.atomic_output(path, durable=durable) as tmp:
            with Hdf5Writer(tmp, path) as out:
                yield out
            gate.hold()


def _checksum(path: str) -> tuple[int, int]:
    """(size, CRC-32) of a file's bytes."""
    crc, size = 0, 0
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            crc, size = zlib.crc32(block, crc), size + len(block)
    return size, crc


def _why(e: OSError) -> str:
    text = e.strerror or str(e)
    return text[:1].lower() + text[1:]


def _advice(e: OSError) -> str:
    return "free space and rerun" if e.errno in (errnos.ENOSPC, errnos.EDQUOT) else "rerun once that is fixed"


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


class WriteFailed(OSError):
    """A dump's file could not be written (a full disk, say): errno and the file as OSError's,
    and a message saying what is kept and what to do; str() is 'FILE: message'."""

    def __str__(self) -> str:
        return f"{self.filename}: {self.strerror}"


class Damaged(Exception):
    """Chunk k's file is not what was written (reason says how)."""

    def __init__(self, k: int, reason: str):
        super().__init__(f"chunk {k}: {reason}")
        self.k, self.reason = k, reason


class Work:
    """The work directory of a dump into `outfile` with this manifest (a JSON-able dict), over
    `n_lines` lines in chunks of `chunk_lines`. `locked()` holds its lock (process 0); `start()`
    makes the directory, or checks it against the manifest there."""

    def __init__(self, outfile: str, manifest: dict, n_lines: int, chunk_lines: int):
        if os.path.isdir(outfile):
            raise ValueError(f"{outfile}: a directory; give a file name to write")
        self.outfile, self.directory = outfile, work_dir(outfile)
        self.chunks = chunk_lines_of(n_lines, chunk_lines)
        self.manifest = json.loads(json.dumps({"version": VERSION, **manifest, "n_lines": n_lines,
                                               "chunk_lines": chunk_lines}))  # as it reads back
        self.legacy = False  # a directory of version 1: chunks without checksums are merged unchecked
        self.merged = False  # whether outfile has been written

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Holds the directory's lock inside (made if need be); a ValueError naming the holder
        if another live dump holds it."""
        try:
            os.makedirs(self.directory, exist_ok=True)
        except OSError as e:
            raise WriteFailed(e.errno, _why(e), self.directory) from None
        with locks.locked(self.directory, noun="dump"):
            yield

    def start(self, owner: bool = True) -> None:
        """Makes the directory and its manifest, or checks those there. The owner (process 0,
        holding the lock) also removes temporary files left by a killed run and finished chunks
        whose size is not their checksum file's (with a warning)."""
        manifest_file = os.path.join(self.directory, MANIFEST)
        os.makedirs(self.directory, exist_ok=True)
        if os.path.exists(manifest_file):
            try:
                left = files.read_json(manifest_file)
            except ValueError as e:
                raise ValueError(f"{e}; remove the directory to start over") from None
            now = self.manifest
            if isinstance(left, dict) and left.get("version") == 1 and {**left, "version": VERSION} == now:
                self.legacy = True
            elif left != now:
                then, now = flatten(left) if isinstance(left, dict) else {"manifest": left}, flatten(now)
                differ = "; ".join(f"{k}: {then.get(k)!r} then, {now.get(k)!r} now"
                                   for k in sorted(set(then) | set(now)) if then.get(k) != now.get(k))
                raise ValueError(f"{self.directory}: left by another dump ({differ}); rerun that command to finish "
                                 f"it, or remove the directory to start over")
        else:
            if self.done():
                raise ValueError(f"{self.directory}: holds chunks but no {MANIFEST}; remove the directory to "
                                 f"start over")
            try:
                files.write_json(manifest_file, self.manifest)  # every process may: the same contents
            except OSError as e:
                raise WriteFailed(e.errno, f"{_why(e)} while writing {MANIFEST}; {_advice(e)}",
                                  self.directory) from None
        if not owner:
            return
        files.remove_leftovers(None, self.directory)  # temporary files of writers killed outright
        for k in sorted(self.done()):
            reason = self._size_problem(k)
            if reason:
                self.discard(k, reason)

    def chunk_file(self, k: int) -> str:
        return os.path.join(self.directory, f"chunk-{k:06d}.hdf5")

    def sum_file(self, k: int) -> str:
        return os.path.join(self.directory, f"chunk-{k:06d}.sum")

    def done(self) -> set[int]:
        """The chunks whose files are there (complete: a chunk file appears only when whole)."""
        found = (_CHUNK.match(name) for name in os.listdir(self.directory))
        return {int(m.group(1)) for m in found if m and int(m.group(1)) < len(self.chunks)}

    def todo(self, process_index: int = 0, process_count: int = 1) -> list[int]:
        """This process's chunks still to compute, in order."""
        done = self.done()
        return [k for k in range(process_index, len(self.chunks), process_count) if k not in done]

    def _sum(self, k: int) -> Optional[dict]:
        """Chunk k's checksum record; None for a legacy chunk; Damaged if missing or unreadable."""
        try:
            with open(self.sum_file(k), "rb") as f:
                record = json.loads(f.read().decode("utf-8"))
            if not (isinstance(record, dict) and all(isinstance(record.get(n), int) for n in ("size", "crc32"))):
                raise ValueError
            return record
        except FileNotFoundError:
            if self.legacy:
                return None
            raise Damaged(k, f"it has no checksum file ({os.path.basename(self.sum_file(k))})") from None
        except (OSError, ValueError):
            raise Damaged(k, f"its checksum file ({os.path.basename(self.sum_file(k))}) cannot be read") from None

    def _size_problem(self, k: int) -> Optional[str]:
        try:
            record = self._sum(k)
            size = os.path.getsize(self.chunk_file(k))
        except Damaged as e:
            return e.reason
        except OSError:
            return None  # gone meanwhile: computed again anyway
        if record is not None and size != record["size"]:
            return f"{size} bytes where {record['size']} were written"
        return None

    def verify(self, k: int) -> None:
        """Damaged unless chunk k's file has the CRC its checksum file records (a legacy chunk: unchecked)."""
        record = self._sum(k)
        if record is None:
            return
        try:
            size, crc = _checksum(self.chunk_file(k))
        except OSError as e:
            raise Damaged(k, f"it cannot be read ({_why(e)})") from None
        if size != record["size"]:
            raise Damaged(k, f"{size} bytes where {record['size']} were written")
        if crc != record["crc32"]:
            raise Damaged(k, "its bytes do not match its checksum")

    def discard(self, k: int, reason: str) -> None:
        """Removes a damaged chunk k (with a warning line), so that it is computed again."""
        log.warning("warning: %s: damaged (%s); removed, its lines %d..%d are computed again", self.chunk_file(k),
                    reason, self.chunks[k].start, self.chunks[k].stop - 1)
        for path in (self.chunk_file(k), self.sum_file(k)):
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)

    def _failed(self, e: OSError, what: str, where: str) -> WriteFailed:
        """An OSError naming `where`: what happened, which chunks are kept, what to do."""
        with contextlib.suppress(OSError):
            n = len(self.done())
            what += f"; the {n} finished chunk{'' if n == 1 else 's'} {'is' if n == 1 else 'are'} kept"
            what += f" in {self.directory}" if where != self.directory else ""
        return WriteFailed(e.errno, f"{what}; {_advice(e)}", where)

    def write(self, k: int, fill: Callable[[Hdf5Writer], None]) -> None:
        """Chunk k's file, as fill(Hdf5Writer) fills it, made durable with its checksum file,
        then renamed into place. A failing disk: an OSError naming the directory and the chunk."""
        try:
            with _Gate() as gate:
                with files.atomic_output(self.chunk_file(k), durable=True) as tmp:
                    with Hdf5Writer(tmp, self.chunk_file(k)) as out:
                        fill(out)
                    size, crc = _checksum(tmp)
                    record = {"size": size, "crc32": crc, "bytes": out.bytes}
                    files.write_bytes({self.sum_file(k): (json.dumps(record) + "\n").encode()})
                    gate.hold()
        except OSError as e:
            raise self._failed(e, f"{_why(e)} while writing chunk {k}", self.directory) from None

    @contextlib.contextmanager
    def reading(self, k: int) -> Iterator[Callable[[str], np.ndarray]]:
        """read(name) -> chunk k's dataset, once its file is checked; Damaged if it fails."""
        self.verify(k)
        try:
            f = h5py.File(self.chunk_file(k), "r")
        except OSError:
            raise Damaged(k, "it cannot be read as hdf5") from None

        def read(name: str) -> np.ndarray:
            try:
                return f[name][...]
            except (KeyError, OSError, ValueError, RuntimeError, TypeError) as e:
                raise Damaged(k, f"its dataset {name!r} cannot be read ({type(e).__name__})") from None

        with f:
            yield read

    def merge(self, keys: Callable[[range], Iterable[str]], finish: Optional[Callable[[Hdf5Writer], None]] = None,
              recompute: Optional[Callable[[int], None]] = None) -> None:
        """Writes outfile from every chunk's datasets named keys(its lines), in order, then
        finish(writer) (atomically: a temporary file inside the work directory, flushed and
        renamed onto outfile), then removes everything in the work directory but the lock (see
        `remove`). A damaged chunk is removed with a warning, then recompute(k) writes it again
        and the merge starts over; without recompute, a ValueError says to rerun the dump."""
        missing = [k for k in range(len(self.chunks)) if k not in self.done()]
        if missing:
            raise ValueError(f"{self.directory}: chunk {missing[0]} (lines {self.chunks[missing[0]].start}.."
                             f"{self.chunks[missing[0]].stop - 1}) is missing ({len(missing)} in all); rerun the "
                             f"dump to compute them")
        self._check_room()
        recomputed: set[int] = set()
        while True:
            try:
                self._merge_once(keys, finish)
                return
            except Damaged as e:
                self.discard(e.k, e.reason)
                if recompute is None or e.k in recomputed:
                    raise ValueError(f"{self.chunk_file(e.k)}: damaged ({e.reason}); removed: rerun the dump to "
                                     f"compute its lines again") from None
                recomputed.add(e.k)
                recompute(e.k)

    def _merge_once(self, keys, finish) -> None:
        unchecked = 0
        try:
            with _Gate() as gate:
                with files.atomic_output(self.outfile, durable=True, temporary_dir=self.directory) as tmp:
                    with Hdf5Writer(tmp, self.outfile) as out:
                        for k, lines in enumerate(self.chunks):
                            unchecked += self.legacy and not os.path.exists(self.sum_file(k))
                            with self.reading(k) as read:
                                for key in keys(lines):
                                    out.put(key, read(key))
                        if finish is not None:
                            finish(out)
                    gate.hold()
                self.merged = True
        except OSError as e:
            raise self._failed(e, f"{_why(e)} while merging the chunks into it", self.outfile) from None
        if unchecked:
            log.info("%s: %d chunk(s) written before chunks had checksums were merged unchecked", self.directory,
                     unchecked)
        self.remove()

    def _check_room(self) -> None:
        need = 0
        for k in range(len(self.chunks)):
            try:
                record = self._sum(k)
                need += record["bytes"] if record and isinstance(record.get("bytes"), int) else \
                    os.path.getsize(self.chunk_file(k))
            except (Damaged, OSError):
                pass  # found by the merge
        free = shutil.disk_usage(self.directory).free
        if free < need:
            raise self._failed(OSError(errnos.ENOSPC, "no room"), f"no room to merge the chunks into it (at least "
                               f"{_size(need)} are needed, {_size(free)} are free)", self.outfile)

    def remove(self) -> None:
        """Removes the chunks, their checksums, the manifest and any temporary file (a killed run
        then leaves a directory that resumes); the lock and the directory are its holder's to
        remove (`remove_directory`)."""
        with files.uninterrupted():
            names = sorted(os.listdir(self.directory), key=lambda n: (n == MANIFEST, n))
            for name in names:
                if name != LOCK:
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(os.path.join(self.directory, name))

    def remove_directory(self) -> None:
        """Removes the (emptied) directory, unless another dump has begun in it meanwhile."""
        with contextlib.suppress(OSError):
            os.rmdir(self.directory)
