"""Randomized Hadamard rotation of updates (plan ``update_rotation``; docs/protocol.md).

A device with ``update_rotation = "hadamard"`` sends ``y = H D x`` instead of its delta ``x``:

* ``x``: the clipped, noised delta, every tensor flattened (C order) and concatenated in the
  order of the tensor names sorted by code point (the aggregator's layout), ``d`` values,
  zero-padded to ``P = 64 * ceil(d / 64)``.
* ``D``: diagonal random signs from the public seed of the base version (:func:`seed`,
  :func:`signs`): every party derives them, nothing secret.
* ``H``: block-diagonal normalised Walsh-Hadamard. ``P`` is cut into the powers of two of its
  binary representation, largest first (``P = 1_000_000`` gives blocks of 524288, 262144,
  131072, 65536, 16384, 512 and 64); each block of ``n`` values is multiplied by
  ``H_n / sqrt(n)`` with ``H_n`` Sylvester's ordering, ``H_n[r, c] = (-1)^popcount(r & c)``.

H D is orthonormal: ``||y|| = ||x||`` (up to float rounding, which the device removes by
shrinking ``y`` to the float32 delta's norm), and ``x = D H y`` (H is its own inverse).
Padding costs fewer than 64 values; no block is shorter than 64. ``y`` is then encoded like
any delta (f32, f16, int8), as one tensor named ``rotated`` of shape ``[P]``.
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import NDArray

ROTATIONS = ("none", "hadamard")
ROTATED = "rotated"  # the one tensor of a rotated update
PAD = 64
_DOMAIN = b"fededge-rotation-v1"

if TYPE_CHECKING:
    from fededge.protocol.messages import ModelVersion, Plan


def padded_size(d: int) -> int:
    """P: d rounded up to a multiple of 64."""
    return -(-d // PAD) * PAD


def chunks(p: int) -> list[tuple[int, int]]:
    """(offset, size) of the Hadamard blocks of a padded vector of ``p`` values, largest first."""
    out, off = [], 0
    for bit in range(p.bit_length() - 1, -1, -1):
        n = 1 << bit
        if p & n:
            out.append((off, n))
            off += n
    return out


def seed(task: str, generation: int, version: int) -> bytes:
    """The public rotation seed of updates trained on ``version`` of ``task`` (32 bytes).

    ``SHA-256("fededge-rotation-v1" 0x00 task 0x00 generation 0x00 version)``, the numbers in
    decimal ASCII: a fresh rotation per version, so no coordinate is badly placed every time.
    """
    parts = [_DOMAIN, task.encode(), str(generation).encode(), str(version).encode()]
    return hashlib.sha256(b"\x00".join(parts)).digest()


def signs(seed_bytes: bytes, p: int) -> NDArray[np.int8]:
    """The diagonal of D: element i is -1 where bit i of the sign stream is 1, else +1.

    The sign stream is ``SHA-256(seed || uint64_le(0)) || SHA-256(seed || uint64_le(1)) || ...``
    and bit i is ``(stream[i // 8] >> (i % 8)) & 1``.
    """
    nblocks = -(-p // 256)
    stream = b"".join(
        hashlib.sha256(seed_bytes + struct.pack("<Q", j)).digest() for j in range(nblocks)
    )
    bits = np.unpackbits(np.frombuffer(stream, dtype=np.uint8), bitorder="little")[:p]
    return (1 - 2 * bits.astype(np.int8)).astype(np.int8)


def fwht(x: NDArray[np.float64]) -> None:
    """In place: the unnormalised Walsh-Hadamard transform of x (length a power of two).

    Butterflies ``(a, b) -> (a + b, a - b)`` over strides 1, 2, 4, ...: Sylvester's ordering.
    """
    n = x.shape[0]
    h = 1
    while h < n:
        v = x.reshape(-1, 2, h)
        a = v[:, 0, :].copy()
        v[:, 0, :] += v[:, 1, :]
        v[:, 1, :] = a - v[:, 1, :]
        h *= 2


def rotate(x: NDArray[np.float64], seed_bytes: bytes) -> NDArray[np.float64]:
    """y = H D [x; 0]: the rotation of a flat float64 vector (numpy; devices use this)."""
    p = padded_size(x.shape[0])
    y = np.zeros(p, dtype=np.float64)
    y[: x.shape[0]] = x
    y *= signs(seed_bytes, p)
    for off, n in chunks(p):
        blk = y[off : off + n]
        fwht(blk)
        blk *= 1.0 / math.sqrt(n)
    return y


def unrotate(y: NDArray[np.float64], seed_bytes: bytes, d: int) -> NDArray[np.float64]:
    """x = (D H y)[:d]: the inverse of :func:`rotate` (numpy reference)."""
    x = np.array(y, dtype=np.float64)
    for off, n in chunks(x.shape[0]):
        blk = x[off : off + n]
        fwht(blk)
        blk *= 1.0 / math.sqrt(n)
    x *= signs(seed_bytes, x.shape[0])
    return x[:d]


def flatten(delta: Mapping[str, NDArray[np.floating]]) -> NDArray[np.float64]:
    """The delta's tensors, flattened and concatenated in sorted-name order, as float64."""
    return np.concatenate(
        [np.asarray(delta[n], dtype=np.float64).reshape(-1) for n in sorted(delta)]
    )


def rotate_delta(
    delta: Mapping[str, NDArray[np.float32]], seed_bytes: bytes
) -> dict[str, NDArray[np.float32]]:
    """``{"rotated": float32 H D x}`` for a float32 delta, its norm at most the delta's.

    The rotation is computed in float64 and rounded once to float32; if that rounding raised
    the norm above the delta's, the vector is shrunk by a few ulps so an honest update stays
    within the aggregator's norm bound.
    """
    x = flatten(delta)
    target = math.sqrt(float(np.dot(x, x)))
    y64 = rotate(x, seed_bytes)
    factor = 1.0
    while True:
        y = (y64 * factor).astype(np.float32)
        y64r = y.astype(np.float64)
        got = math.sqrt(float(np.dot(y64r, y64r)))
        if got <= target or factor == 0.0:
            return {ROTATED: y}
        factor = 0.0 if factor < 1e-3 else factor * (target / got) * (1 - 2.0**-22)


def rotate_for(
    plan: Plan, base: ModelVersion, delta: Mapping[str, NDArray[np.float32]]
) -> Mapping[str, NDArray[np.float32]]:
    """What a device encodes: ``delta`` itself, or its rotation under the base version's seed."""
    if plan.update_rotation == "none":
        return delta
    return rotate_delta(delta, seed(base.task, base.generation, base.version))
