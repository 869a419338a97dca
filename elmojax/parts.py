"""A whole-dataset dump's work directory: the lines in fixed chunks, each written atomically
once done, kept across restarts, shared among processes, merged into the one output file.

  OUT.parts/manifest.json        what the dump is: its kind and settings, and the path, size and
                                 mtime of its input, vocabulary, options and weight files
  OUT.parts/chunk-000012.hdf5    chunk 12, lines [12 C, 13 C) (C: chunk_lines): their datasets
                                 under their final keys (and a stateful dump's carried state)

Chunk k is process k % n's (of n), whatever the processes did before: each writes only its own,
none needs to know what another has done, and a rerun with another number of processes keeps
every finished chunk. A chunk file exists only once complete (written beside, flushed, renamed):
a dump killed at any point leaves finished chunks and at most a temporary file; started again
with the same command, it keeps those and computes the rest. A work directory left by another
command (another input, model, kind or setting) is refused in one line naming what differs.

Each chunk starts from zero state in batches of its own lines, so a chunk's arrays are the same
whichever process computes them and whenever; when all are done, process 0 copies them into
OUT (atomically) in line order and removes the directory. The copy needs the chunks' space
twice over for a moment; in exchange OUT is one ordinary hdf5 file (external links would leave
it pointing into files beside it, to be kept and moved along with it).
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
from typing import Callable, Iterable, Optional

import h5py

from elmojax import files, remote

MANIFEST = "manifest.json"
VERSION = 1
_CHUNK = re.compile(r"chunk-(\d{6,})\.hdf5$")


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
    if chunk_lines < 1:
        raise ValueError(f"chunk_lines must be positive, got {chunk_lines}")
    return [range(start, min(start + chunk_lines, n_lines)) for start in range(0, n_lines, chunk_lines)]


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


class Work:
    """The work directory of a dump into `outfile` with this manifest (a JSON-able dict), over
    `n_lines` lines in chunks of `chunk_lines`: made, or checked against the manifest there."""

    def __init__(self, outfile: str, manifest: dict, n_lines: int, chunk_lines: int):
        if os.path.isdir(outfile):
            raise ValueError(f"{outfile}: a directory; give a file name to write")
        self.outfile, self.directory = outfile, work_dir(outfile)
        self.chunks = chunk_lines_of(n_lines, chunk_lines)
        manifest = json.loads(json.dumps({"version": VERSION, **manifest, "n_lines": n_lines,
                                          "chunk_lines": chunk_lines}))  # as it reads back
        manifest_file = os.path.join(self.directory, MANIFEST)
        os.makedirs(self.directory, exist_ok=True)
        if os.path.exists(manifest_file):
            left = files.read_json(manifest_file)
            if left != manifest:
                then, now = _flat(left), _flat(manifest)
                differ = "; ".join(f"{k}: {then.get(k)!r} then, {now.get(k)!r} now"
                                   for k in sorted(set(then) | set(now)) if then.get(k) != now.get(k))
                raise ValueError(f"{self.directory}: left by another dump ({differ}); rerun that command to finish "
                                 f"it, or remove the directory to start over")
        else:
            if self.done():
                raise ValueError(f"{self.directory}: holds chunks but no {MANIFEST}; remove the directory to "
                                 f"start over")
            files.write_json(manifest_file, manifest)  # every process may: the same contents

    def chunk_file(self, k: int) -> str:
        return os.path.join(self.directory, f"chunk-{k:06d}.hdf5")

    def done(self) -> set[int]:
        """The chunks whose files are there (complete: a chunk file appears only when whole)."""
        found = (_CHUNK.match(name) for name in os.listdir(self.directory))
        return {int(m.group(1)) for m in found if m and int(m.group(1)) < len(self.chunks)}

    def todo(self, process_index: int = 0, process_count: int = 1) -> list[int]:
        """This process's chunks still to compute, in order."""
        done = self.done()
        return [k for k in range(process_index, len(self.chunks), process_count) if k not in done]

    def write(self, k: int, write: Callable[[h5py.File], None]) -> None:
        """Chunk k's file, as write(open hdf5 file) fills it, made durable, then renamed into place."""
        with files.atomic_output(self.chunk_file(k), durable=True) as tmp:
            with h5py.File(tmp, "w") as f:
                write(f)

    def merge(self, keys: Callable[[range], Iterable[str]],
              finish: Optional[Callable[[h5py.File], None]] = None) -> None:
        """Writes outfile from every chunk's datasets named keys(its lines), in order, then
        finish(file) (atomically: a temporary file inside the work directory, renamed onto
        outfile), then removes the work directory."""
        missing = [k for k in range(len(self.chunks)) if k not in self.done()]
        if missing:
            raise ValueError(f"{self.directory}: chunk {missing[0]} (lines {self.chunks[missing[0]].start}.."
                             f"{self.chunks[missing[0]].stop - 1}) is missing ({len(missing)} in all); rerun the "
                             f"dump to compute them")
        with files.atomic_output(self.outfile, temporary_dir=self.directory) as tmp:
            with h5py.File(tmp, "w") as out:
                for k, lines in enumerate(self.chunks):
                    path = self.chunk_file(k)
                    with _open_chunk(path) as chunk:
                        for key in keys(lines):
                            try:
                                data = chunk[key][...]
                            except (KeyError, OSError) as e:
                                raise ValueError(f"{path}: dataset {key!r} cannot be read ({e}); remove the file "
                                                 f"and rerun the dump to compute its lines again") from None
                            out.create_dataset(key, data=data)
                if finish is not None:
                    finish(out)
        shutil.rmtree(self.directory)


def _open_chunk(path: str) -> h5py.File:
    try:
        return h5py.File(path, "r")
    except OSError as e:
        raise ValueError(f"{path}: cannot be read as hdf5 ({e}); remove it and rerun the dump to compute its lines "
                         f"again") from None
