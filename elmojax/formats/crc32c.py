"""CRC-32C (Castagnoli), the checksum of TensorFlow's checkpoints, in NumPy.

Python's zlib has only CRC-32 (another polynomial). A byte-at-a-time loop in Python would take
minutes over the released ELMo checkpoint's 4 GB, so large inputs are cut into many lanes of
equal length whose registers advance together, one NumPy operation per byte position for all
lanes, and are then joined: the CRC register is linear over GF(2), so the register after A then B
is the register after A, advanced over len(B) zero bytes (a 32 x 32 bit matrix, `_zeros`), XOR
the register after B alone. `_bytewise` is the plain definition, which tests compare with.
"""

from __future__ import annotations

import functools

import numpy as np

_POLYNOMIAL = 0x82F63B78  # reflected


def _table() -> np.ndarray:
    table = np.arange(256, dtype=np.uint32)
    for _ in range(8):
        table = np.where(table & 1, (table >> 1) ^ np.uint32(_POLYNOMIAL), table >> 1).astype(np.uint32)
    return table


_TABLE = _table()
_TABLE_LIST = [int(x) for x in _TABLE]
_LANE = 1024           # bytes per lane
_MAX_LANES = 1 << 14   # lanes advanced together (a 16 MiB block)


def _bytewise(register: int, data) -> int:
    """The register after feeding `data`, a byte at a time (no initial value, no final xor)."""
    table = _TABLE_LIST
    for byte in bytes(data):
        register = table[(register ^ byte) & 0xFF] ^ (register >> 8)
    return register


def _apply(operator: np.ndarray, register):
    """A linear map of registers (the images of the 32 bits) applied to a register or an array of them."""
    register = np.asarray(register, np.uint32)
    out = np.zeros_like(register)
    for bit in range(32):
        out ^= operator[bit] * ((register >> np.uint32(bit)) & np.uint32(1))
    return out


@functools.lru_cache(maxsize=64)
def _zeros(n: int) -> np.ndarray:
    """The map that advances a register over n zero bytes."""
    if n == 1:
        basis = np.uint32(1) << np.arange(32, dtype=np.uint32)
        return _TABLE[basis & np.uint32(0xFF)] ^ (basis >> np.uint32(8))
    half = _zeros(n // 2)
    twice = _apply(half, half)
    return _apply(_zeros(1), twice) if n % 2 else twice


def _lanes(block: np.ndarray, n_lanes: int) -> int:
    """The register after feeding `block` (uint8, n_lanes * _LANE bytes; n_lanes a power of 2)."""
    columns = np.ascontiguousarray(block.reshape(n_lanes, _LANE).T)
    registers = np.zeros(n_lanes, np.uint32)
    for column in columns:
        registers = _TABLE[(registers ^ column) & np.uint32(0xFF)] ^ (registers >> np.uint32(8))
    length = _LANE
    while len(registers) > 1:  # join neighbours: (A, B) -> A advanced over len(B), xor B
        registers = _apply(_zeros(length), registers[0::2]) ^ registers[1::2]
        length *= 2
    return int(registers[0])


def _raw(register: int, data: np.ndarray) -> int:
    pos, n = 0, len(data)
    while n - pos >= 2 * _LANE:
        n_lanes = min(_MAX_LANES, 1 << ((n - pos) // _LANE).bit_length() - 1)
        size = n_lanes * _LANE
        register = int(_apply(_zeros(size), register)) ^ _lanes(data[pos:pos + size], n_lanes)
        pos += size
    return _bytewise(register, data[pos:])


def value(data) -> int:
    """CRC-32C of bytes, a memoryview or a uint8 array (the standard one: crc32c(b"123456789") is 0xE3069283)."""
    array = np.frombuffer(data, np.uint8) if not isinstance(data, np.ndarray) else data.reshape(-1).view(np.uint8)
    return _raw(0xFFFFFFFF, array) ^ 0xFFFFFFFF


def mask(crc: int) -> int:
    """The checksum as TensorFlow and LevelDB store it (crc32c::Mask): rotated, plus a constant."""
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def unmask(masked: int) -> int:
    """TensorFlow and LevelDB store checksums masked (crc32c::Mask); this undoes it."""
    rotated = (masked - 0xA282EAD8) & 0xFFFFFFFF
    return ((rotated >> 17) | (rotated << 15)) & 0xFFFFFFFF
