"""CRC-32C (Castagnoli), the checksum TFRecord frames carry, without a compiled dependency.

The standard library has only zlib's CRC-32 (another polynomial), and neither ``crc32c`` nor
``google_crc32c`` is a dependency. A byte-at-a-time loop in Python runs at about 12 MB/s, too slow
for ``vla-ft data check`` over gigabytes of episodes, so long inputs are cut into up to 65536
equal lanes that numpy steps together (one table look-up per lane per byte), and the lanes' CRCs
are then joined pairwise. Joining works because the CRC register is linear over GF(2): feeding
``n`` zero bytes to a register is a fixed 32x32 bit matrix, applied here through four 256-entry
tables. Measured at about 100 MB/s on records of 1-5 MB (one CPU core).
"""

from __future__ import annotations

import numpy as np

POLY = 0x82F63B78  # CRC-32C, bit-reflected
MASK_DELTA = 0xA282EAD8  # TFRecord's masking constant
LANE_BYTES = 64  # at least this many bytes per lane, so numpy's per-step overhead is shared
MAX_LANES = 1 << 16


def _byte_table() -> np.ndarray:
    table = np.arange(256, dtype=np.uint32)
    for _ in range(8):
        table = np.where(table & 1, (table >> 1) ^ np.uint32(POLY), table >> 1).astype(np.uint32)
    return table


TABLE = _byte_table()
_TABLE_LIST = TABLE.tolist()  # Python ints: faster than numpy scalars in the byte loop
_BITS = np.arange(32, dtype=np.uint32)
_BYTES = np.arange(256, dtype=np.uint32)


def _apply_bits(matrix: np.ndarray, x: np.ndarray) -> np.ndarray:
    """The linear map ``matrix`` ((32,): the images of the 32 one-bit registers) applied to ``x``."""
    bits = ((x[..., None] >> _BITS) & 1).astype(bool)
    return np.bitwise_xor.reduce(np.where(bits, matrix, np.uint32(0)), axis=-1)


def _zeros_matrix(n: int) -> np.ndarray:
    """The map a register goes through when ``n`` zero bytes are fed to it (square-and-multiply)."""
    one = np.uint32(1) << _BITS
    step, result = TABLE[one & 0xFF] ^ (one >> 8), one
    while n:
        if n & 1:
            result = _apply_bits(step, result)
        step, n = _apply_bits(step, step), n >> 1
    return result


def _apply(matrix: np.ndarray, x: np.ndarray) -> np.ndarray:
    """``_apply_bits`` for many registers: one look-up per byte of each register."""
    t = [_apply_bits(matrix, _BYTES << np.uint32(8 * k)) for k in range(4)]
    return t[0][x & 0xFF] ^ t[1][(x >> 8) & 0xFF] ^ t[2][(x >> 16) & 0xFF] ^ t[3][x >> 24]


def _lanes_register(data: bytes, lanes: int) -> int:
    """The register after the first ``lanes * (len(data) // lanes)`` bytes, fed as ``lanes`` chunks
    at once; a chunk's register from zero is joined to its predecessors' shifted past it."""
    width = len(data) // lanes
    columns = np.frombuffer(data, np.uint8, count=lanes * width).reshape(lanes, width).T.astype(np.uint32)
    regs = np.zeros(lanes, np.uint32)
    regs[0] = 0xFFFFFFFF  # CRC-32C's initial value, in the first chunk only
    for column in columns:
        regs = TABLE[(regs ^ column) & 0xFF] ^ (regs >> 8)
    shift = _zeros_matrix(width)
    while len(regs) > 1:  # lanes is a power of two
        regs = _apply(shift, regs[0::2]) ^ regs[1::2]
        shift = _apply_bits(shift, shift)
    return int(regs[0])


def crc32c(data: bytes) -> int:
    """CRC-32C of ``data`` (``crc32c(b"123456789") == 0xE3069283``)."""
    lanes = min(MAX_LANES, 1 << ((len(data) // LANE_BYTES).bit_length() - 1)) if len(data) >= LANE_BYTES else 1
    reg, tail = 0xFFFFFFFF, data
    if lanes > 1:
        reg, tail = _lanes_register(data, lanes), memoryview(data)[lanes * (len(data) // lanes) :]
    for byte in tail:
        reg = _TABLE_LIST[(reg ^ byte) & 0xFF] ^ (reg >> 8)
    return reg ^ 0xFFFFFFFF


def masked_crc(data: bytes) -> int:
    """TFRecord's masked CRC-32C: rotated right by 15 bits plus a constant (a CRC of data that holds
    CRCs is then not itself a simple CRC)."""
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + MASK_DELTA) & 0xFFFFFFFF
