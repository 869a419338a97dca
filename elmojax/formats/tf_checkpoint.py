"""TensorFlow checkpoints (the tensor bundle format), read without TensorFlow.

A checkpoint `PREFIX` (e.g. `dir/model.ckpt-935588`) is

  PREFIX.index                   a table in LevelDB's format: sorted (key, value) entries in
                                 blocks, each block followed by a 5-byte trailer (compression
                                 type, masked CRC-32C of the block and that byte), an index block
                                 of (last key, block handle), and a 48-byte footer (the
                                 metaindex and index handles as varints, padding, the magic
                                 number 0xdb4775248b80fb57).
  PREFIX.data-0000k-of-0000n     the tensors' raw little-endian bytes.

The entry of key "" is a BundleHeaderProto (num_shards = 1, endianness = 2); every other key
is a variable's name and its value a BundleEntryProto (dtype = 1, shape = 2 as a
TensorShapeProto of dims (size = 1), shard_id = 3, offset = 4, size = 5, crc32c = 6 masked,
slices = 7). The few protobuf fields are decoded here by hand (tensorflow/core/protobuf/
tensor_bundle.proto, tsl/lib/io/table_format.txt).

`TFCheckpoint(path)` lists the variables and reads one by name from a memory map of its shard,
checking its CRC-32C; every table block's checksum is checked when the index is read. A damaged
file gives a CheckpointFormatError naming the file (and the variable), never wrong numbers.
`TFCheckpoint(path).describe()` lists them, a line each.
"""

from __future__ import annotations

import dataclasses
import glob
import mmap
import os
import re
from typing import Iterator

import numpy as np

from elmojax.formats import crc32c

TABLE_MAGIC = 0xDB4775248B80FB57
FOOTER_SIZE = 48
BLOCK_TRAILER_SIZE = 5

# TensorFlow's DataType enum (types.proto): the dtypes read, and names for the others
DTYPES = {1: np.float32, 2: np.float64, 3: np.int32, 4: np.uint8, 5: np.int16, 6: np.int8, 9: np.int64,
          10: np.bool_, 17: np.uint16, 19: np.float16, 22: np.uint32, 23: np.uint64}
OTHER_DTYPES = {7: "string", 8: "complex64", 14: "bfloat16", 18: "complex128", 20: "resource", 21: "variant"}


class CheckpointFormatError(ValueError):
    """A file that is not a readable TensorFlow checkpoint, with the file (and variable) named."""


@dataclasses.dataclass(frozen=True)
class Variable:
    name: str
    dtype_code: int  # TensorFlow's DataType
    shape: tuple[int, ...]
    shard: int
    offset: int
    size: int
    crc32c: int  # masked, as stored
    sliced: bool  # a partitioned variable (its slices are entries of their own)

    @property
    def dtype_name(self) -> str:
        if self.dtype_code in DTYPES:
            return np.dtype(DTYPES[self.dtype_code]).name
        return OTHER_DTYPES.get(self.dtype_code, f"dtype {self.dtype_code}")


# --- protobuf and LevelDB encodings --------------------------------------------------------------

def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise IndexError("varint past the end")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _fields(buf: bytes) -> Iterator[tuple[int, int | bytes]]:
    """(field number, value) of a protobuf message: ints for varint and fixed fields, bytes for
    length-delimited ones."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            value, pos = _varint(buf, pos)
        elif wire_type == 1:
            value, pos = int.from_bytes(buf[pos:pos + 8], "little"), pos + 8
        elif wire_type == 2:
            length, pos = _varint(buf, pos)
            value, pos = bytes(buf[pos:pos + length]), pos + length
        elif wire_type == 5:
            value, pos = int.from_bytes(buf[pos:pos + 4], "little"), pos + 4
        else:
            raise ValueError(f"protobuf wire type {wire_type}")
        if pos > len(buf):
            raise IndexError("field past the end")
        yield number, value


def _block_entries(block: bytes) -> Iterator[tuple[bytes, bytes]]:
    """The (key, value) entries of a table block: each key shares a prefix with the one before
    (shared, unshared and value lengths as varints), then the restart offsets and their count."""
    n_restarts = int.from_bytes(block[-4:], "little")
    end = len(block) - 4 - 4 * n_restarts
    if end < 0:
        raise ValueError("restart array past the block's start")
    pos, key = 0, b""
    while pos < end:
        shared, pos = _varint(block, pos)
        unshared, pos = _varint(block, pos)
        length, pos = _varint(block, pos)
        if shared > len(key) or pos + unshared + length > end:
            raise ValueError("entry past the block's end")
        key = key[:shared] + block[pos:pos + unshared]
        pos += unshared
        yield key, block[pos:pos + length]
        pos += length


def _handle(buf: bytes, pos: int = 0) -> tuple[int, int, int]:
    offset, pos = _varint(buf, pos)
    size, pos = _varint(buf, pos)
    return offset, size, pos


def read_table(path: str) -> list[tuple[bytes, bytes]]:
    """Every (key, value) of a LevelDB-format table file, each block's checksum checked."""
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < FOOTER_SIZE or int.from_bytes(data[-8:], "little") != TABLE_MAGIC:
        raise CheckpointFormatError(f"{path}: not a TensorFlow checkpoint index (no table footer: "
                                    f"truncated, or another kind of file)")

    def block(offset: int, size: int, what: str) -> bytes:
        end = offset + size
        if end + BLOCK_TRAILER_SIZE > len(data) - FOOTER_SIZE:
            raise CheckpointFormatError(f"{path}: {what} runs past the end of the file (truncated?)")
        stored = crc32c.unmask(int.from_bytes(data[end + 1:end + 5], "little"))
        if crc32c.value(data[offset:end + 1]) != stored:
            raise CheckpointFormatError(f"{path}: the checksum of {what} does not match: the file is damaged "
                                        f"(download or copy it again)")
        kind = data[end]
        if kind == 1:
            raise CheckpointFormatError(f"{path}: {what} is snappy-compressed; elmojax reads uncompressed "
                                        f"tables, which is what TensorFlow writes for checkpoints")
        if kind != 0:
            raise CheckpointFormatError(f"{path}: {what} has unknown compression type {kind}")
        return data[offset:end]

    try:
        footer = data[-FOOTER_SIZE:]
        _, _, pos = _handle(footer)  # the metaindex block: empty in checkpoints
        index_offset, index_size, _ = _handle(footer, pos)
        entries = []
        for _, value in _block_entries(block(index_offset, index_size, "the index block")):
            offset, size, _ = _handle(value)
            entries.extend(_block_entries(block(offset, size, f"the block at offset {offset}")))
    except (IndexError, ValueError) as e:
        if isinstance(e, CheckpointFormatError):
            raise
        raise CheckpointFormatError(f"{path}: malformed table ({e})") from None
    return entries


def _header(value: bytes, path: str) -> int:
    fields = dict(_fields(value))
    if fields.get(2, 0) != 0:
        raise CheckpointFormatError(f"{path}: written on a big-endian machine; elmojax reads little-endian checkpoints")
    return int(fields.get(1, 0))


def _entry(name: str, value: bytes, path: str) -> Variable:
    dtype = shard = offset = size = crc = 0
    shape: list[int] = []
    sliced = False
    for number, field in _fields(value):
        if number == 1:
            dtype = field
        elif number == 2:
            for dim_number, dim in _fields(field):
                if dim_number == 2:  # TensorShapeProto.dim
                    shape.append(int(dict(_fields(dim)).get(1, 0)))
                elif dim_number == 3 and dim:  # unknown_rank
                    raise CheckpointFormatError(f"{path}: variable '{name}' has an unknown rank")
        elif number == 3:
            shard = field
        elif number == 4:
            offset = field
        elif number == 5:
            size = field
        elif number == 6:
            crc = field
        elif number == 7:
            sliced = True
    return Variable(name, dtype, tuple(shape), shard, offset, size, crc, sliced)


# --- finding the files -------------------------------------------------------------------------

_SUFFIX = re.compile(r"\.(index|meta|data-\d{5}-of-\d{5})$")


def _checkpoint_file_prefix(directory: str) -> str:
    """The newest checkpoint of a directory's `checkpoint` file (model_checkpoint_path). Paths
    in it may be absolute from the machine that trained: a file of that name in the directory
    is used first."""
    listing = os.path.join(directory, "checkpoint")
    with open(listing, encoding="utf-8") as f:
        text = f.read()
    m = re.search(r'^model_checkpoint_path:\s*"((?:[^"\\]|\\.)*)"', text, re.MULTILINE)
    if m is None:
        raise CheckpointFormatError(f"{listing}: no model_checkpoint_path line")
    written = m.group(1).encode("latin-1", "backslashreplace").decode("unicode_escape")
    candidates = [os.path.join(directory, os.path.basename(written))]
    if not os.path.isabs(written):
        candidates.insert(0, os.path.join(directory, written))
    else:
        candidates.append(written)
    for prefix in candidates:
        if os.path.isfile(prefix + ".index"):
            return prefix
    raise CheckpointFormatError(f"{listing}: names checkpoint '{written}', but there is no "
                                f"{candidates[0]}.index")


def resolve_prefix(path: str) -> str:
    """The checkpoint prefix that `path` means: a prefix, one of its files, or a directory (its
    `checkpoint` file's newest, or its only checkpoint)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "checkpoint")):
            return _checkpoint_file_prefix(path)
        prefixes = sorted(p[:-len(".index")] for p in glob.glob(os.path.join(glob.escape(path), "*.index")))
        if len(prefixes) == 1:
            return prefixes[0]
        if not prefixes:
            raise CheckpointFormatError(f"{path}: no TensorFlow checkpoint in this directory (no *.index file)")
        raise CheckpointFormatError(f"{path}: several checkpoints and no `checkpoint` file saying which is newest; "
                                    f"give one prefix: {', '.join(map(os.path.basename, prefixes))}")
    prefix = _SUFFIX.sub("", path)
    if not os.path.isfile(prefix + ".index"):
        raise CheckpointFormatError(f"{path}: not a TensorFlow checkpoint (no {prefix}.index)")
    return prefix


def is_checkpoint(path: str) -> bool:
    """Whether `path` names a TensorFlow checkpoint (see resolve_prefix)."""
    try:
        resolve_prefix(path)
    except (CheckpointFormatError, OSError):
        return False
    return True


# --- the reader --------------------------------------------------------------------------------

class TFCheckpoint:
    """A TensorFlow checkpoint's variables, read one at a time from memory maps."""

    def __init__(self, path: str):
        self.prefix = resolve_prefix(path)
        self.index_file = self.prefix + ".index"
        entries = read_table(self.index_file)
        if not entries or entries[0][0] != b"":
            raise CheckpointFormatError(f"{self.index_file}: no bundle header (not a tensor bundle)")
        try:
            self.n_shards = _header(entries[0][1], self.index_file)
            self.variables = {}
            for key, value in entries[1:]:
                name = key.decode("utf-8")
                self.variables[name] = _entry(name, value, self.index_file)
        except (IndexError, ValueError, UnicodeDecodeError) as e:
            if isinstance(e, CheckpointFormatError):
                raise
            raise CheckpointFormatError(f"{self.index_file}: malformed entry ({e})") from None
        self._maps: dict[int, mmap.mmap] = {}

    def shard_file(self, shard: int) -> str:
        return f"{self.prefix}.data-{shard:05d}-of-{self.n_shards:05d}"

    def __contains__(self, name: str) -> bool:
        return name in self.variables

    def names(self) -> list[str]:
        return sorted(self.variables)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: v.shape for name, v in sorted(self.variables.items())}

    def describe(self) -> str:
        """One line per variable: name, dtype, shape (for error messages)."""
        return "\n".join(f"  {v.name}  {v.dtype_name}  {list(v.shape)}" for _, v in sorted(self.variables.items()))

    def _map(self, shard: int) -> mmap.mmap:
        if shard not in self._maps:
            path = self.shard_file(shard)
            if not os.path.isfile(path):
                raise CheckpointFormatError(f"{path}: missing (the checkpoint's data shard {shard} of {self.n_shards})")
            with open(path, "rb") as f:
                self._maps[shard] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if os.path.getsize(path) \
                    else b""  # (an empty file cannot be mapped)
        return self._maps[shard]

    def read(self, name: str) -> np.ndarray:
        """The variable's value, checked against its CRC-32C: a read-only view of the memory map."""
        if name not in self.variables:
            raise KeyError(f"{self.prefix}: no variable '{name}'")
        v = self.variables[name]
        if v.sliced:
            raise CheckpointFormatError(f"{self.index_file}: variable '{name}' is partitioned into slices, "
                                        f"which elmojax does not read")
        if v.dtype_code not in DTYPES:
            raise CheckpointFormatError(f"{self.index_file}: variable '{name}' holds {v.dtype_name}, "
                                        f"which elmojax does not read")
        dtype = np.dtype(DTYPES[v.dtype_code]).newbyteorder("<")
        expected = int(np.prod(v.shape, dtype=np.int64)) * dtype.itemsize
        if v.size != expected:
            raise CheckpointFormatError(f"{self.index_file}: variable '{name}' has {v.size} bytes, but "
                                        f"{v.dtype_name} {list(v.shape)} needs {expected}")
        data = self._map(v.shard)
        path = self.shard_file(v.shard)
        if v.offset + v.size > len(data):
            raise CheckpointFormatError(f"{path}: variable '{name}' lies past the end of the file (truncated? "
                                        f"{len(data)} bytes, it needs {v.offset + v.size})")
        array = np.frombuffer(data, np.uint8, count=v.size, offset=v.offset)
        if crc32c.value(array) != crc32c.unmask(v.crc32c):
            raise CheckpointFormatError(f"{path}: the checksum of variable '{name}' does not match: the file is "
                                        f"damaged (download or copy it again)")
        return array.view(dtype).reshape(v.shape)

    def close(self) -> None:
        """Lets go of the memory maps (each closes once no array read from it is left)."""
        self._maps.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

