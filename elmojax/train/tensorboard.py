"""A minimal TensorBoard scalar writer with no TensorFlow dependency.

Event files are TFRecord files of `Event` protocol buffers; scalars need only a few fields, so
they are encoded here by hand (protobuf wire format, CRC32C checksums).
"""

from __future__ import annotations

import math
import os
import socket
import struct
import time

from elmojax.formats import crc32c

def _masked_crc(data: bytes) -> int:
    return crc32c.mask(crc32c.value(data))


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field(number: int, wire_type: int, payload: bytes) -> bytes:
    return _varint((number << 3) | wire_type) + payload


def _bytes_field(number: int, data: bytes) -> bytes:
    return _field(number, 2, _varint(len(data)) + data)


def _float32(value) -> float:
    """value as a float32 can hold it: beyond float32's range, an infinity of its sign (struct
    refuses those values rather than round them)."""
    value = float(value)
    return math.copysign(math.inf, value) if math.isfinite(value) and abs(value) > _FLOAT32_MAX else value


_FLOAT32_MAX = 3.4028234663852886e38


def _event(step: int, wall_time: float, file_version: str = "", scalars: dict | None = None) -> bytes:
    event = _field(1, 1, struct.pack("<d", wall_time)) + _field(2, 0, _varint(step))
    if file_version:
        event += _bytes_field(3, file_version.encode())
    if scalars:
        values = b"".join(
            _bytes_field(1, _bytes_field(1, tag.encode()) + _field(2, 5, struct.pack("<f", _float32(value))))
            for tag, value in scalars.items())
        event += _bytes_field(5, values)
    return event


class SummaryWriter:
    """Appends scalar summaries to an event file in `logdir` (TensorBoard reads it)."""

    def __init__(self, logdir: str):
        os.makedirs(logdir, exist_ok=True)
        name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
        self.path = os.path.join(logdir, name)
        self._file = open(self.path, "ab")
        self._write(_event(0, time.time(), file_version="brain.Event:2"))

    def _write(self, record: bytes) -> None:
        header = struct.pack("<Q", len(record))
        self._file.write(header + struct.pack("<I", _masked_crc(header)) + record
                         + struct.pack("<I", _masked_crc(record)))

    def scalars(self, step: int, values: dict, wall_time: float | None = None) -> None:
        """One event of `values` ({tag: number}) at `step`, at `wall_time` (unix seconds; None: now)."""
        self._write(_event(int(step), time.time() if wall_time is None else wall_time, scalars=values))
        self._file.flush()

    def close(self) -> None:
        self._file.close()
