"""A writer of TensorFlow checkpoints (tensor bundles), written for the tests from the format's
spec (tensor_bundle.proto, LevelDB's table_format.txt), independently of elmojax.formats.tf_checkpoint:
its own CRC-32C (the bitwise definition), protobuf and block encoders. Options make the files
TensorFlow would not write (small blocks, snappy-marked blocks) to test the reader's edges.
"""

from __future__ import annotations

import os

import numpy as np

DATA_TYPES = {np.dtype(np.float32): 1, np.dtype(np.float64): 2, np.dtype(np.int32): 3, np.dtype(np.int64): 9}


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def mask(crc: int) -> int:
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def field(number: int, value) -> bytes:
    if isinstance(value, bytes):
        return varint(number << 3 | 2) + varint(len(value)) + value
    return varint(number << 3) + varint(value)


def fixed32_field(number: int, value: int) -> bytes:
    return varint(number << 3 | 5) + value.to_bytes(4, "little")


def block(entries: list[tuple[bytes, bytes]], restart_interval: int = 16) -> bytes:
    out, restarts, previous = bytearray(), [], b""
    for i, (key, value) in enumerate(entries):
        shared = 0
        if i % restart_interval:
            while shared < min(len(key), len(previous)) and key[shared] == previous[shared]:
                shared += 1
        else:
            restarts.append(len(out))
        out += varint(shared) + varint(len(key) - shared) + varint(len(value)) + key[shared:] + value
        previous = key
    for r in restarts or [0]:
        out += r.to_bytes(4, "little")
    out += len(restarts or [0]).to_bytes(4, "little")
    return bytes(out)


def table(entries: list[tuple[bytes, bytes]], block_size: int = 4096, compression: int = 0) -> bytes:
    """A LevelDB-format table of sorted entries, cut into blocks of about block_size bytes."""
    out = bytearray()
    index = []

    def write(contents: bytes, kind: int = 0) -> bytes:
        handle = varint(len(out)) + varint(len(contents))
        trailer = bytes([kind])
        out.extend(contents + trailer + mask(crc32c(contents + trailer)).to_bytes(4, "little"))
        return handle

    pending: list[tuple[bytes, bytes]] = []
    for entry in entries:
        pending.append(entry)
        if sum(len(k) + len(v) for k, v in pending) >= block_size:
            index.append((pending[-1][0], write(block(pending), compression)))
            pending = []
    if pending:
        index.append((pending[-1][0], write(block(pending), compression)))
    metaindex = write(block([]))
    index_handle = write(block(index, restart_interval=1))
    footer = metaindex + index_handle
    footer += bytes(40 - len(footer)) + (0xDB4775248B80FB57).to_bytes(8, "little")
    return bytes(out + footer)


def write_checkpoint(prefix: str, variables: dict[str, np.ndarray], n_shards: int = 1, block_size: int = 4096,
                     compression: int = 0) -> None:
    """PREFIX.index and PREFIX.data-*: the variables spread over n_shards by name order."""
    names = sorted(variables)
    shards = [bytearray() for _ in range(n_shards)]
    entries = [(b"", field(1, n_shards) + field(3, field(1, 1)))]  # num_shards, version {producer: 1}
    for i, name in enumerate(names):
        value = np.array(variables[name], order="C")  # (ascontiguousarray would make a scalar 1-d)
        shard = i % n_shards
        raw = value.astype(value.dtype.newbyteorder("<")).tobytes()
        shape = b"".join(field(2, field(1, d)) for d in value.shape)
        entry = (field(1, DATA_TYPES[value.dtype]) + field(2, shape) + (field(3, shard) if shard else b"")
                 + (field(4, len(shards[shard])) if shards[shard] else b"") + field(5, len(raw))
                 + fixed32_field(6, mask(crc32c(raw))))
        shards[shard] += raw
        entries.append((name.encode("utf-8"), entry))
    with open(prefix + ".index", "wb") as f:
        f.write(table(entries, block_size, compression))
    for k, data in enumerate(shards):
        with open(f"{prefix}.data-{k:05d}-of-{n_shards:05d}", "wb") as f:
            f.write(bytes(data))


def write_checkpoint_file(directory: str, model_checkpoint_path: str) -> None:
    """TensorFlow's `checkpoint` text file, naming the newest checkpoint."""
    with open(os.path.join(directory, "checkpoint"), "w") as f:
        f.write(f'model_checkpoint_path: "{model_checkpoint_path}"\n'
                f'all_model_checkpoint_paths: "{model_checkpoint_path}"\n')
