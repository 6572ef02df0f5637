"""Numba fast Walsh-Hadamard transform for rotated updates (fededge/protocol/rotation.py).

O(n log n) in place, the same butterflies in the same order as the numpy reference
(``fededge.protocol.rotation.fwht``), so both give bitwise the same result. No validation here
(see ``fededge.aggregator.rotated``).
"""

from __future__ import annotations

import math

import numpy as np

from ._jit import njit


@njit(cache=True, nogil=True)
def fwht_inplace(x: np.ndarray) -> None:
    """Unnormalised Walsh-Hadamard transform of float64 x (length a power of two), in place."""
    n = x.shape[0]
    h = 1
    while h < n:
        for i in range(0, n, 2 * h):
            a = x[i : i + h]  # slices from 0: LLVM vectorises the butterflies
            b = x[i + h : i + 2 * h]
            for j in range(h):
                u = a[j]
                v = b[j]
                a[j] = u + v
                b[j] = u - v
        h *= 2


@njit(cache=True, nogil=True)
def hadamard_blocks(y: np.ndarray, offsets: np.ndarray, sizes: np.ndarray) -> None:
    """y[block] = H_n y[block] / sqrt(n) for each (offset, n) block, in place."""
    for k in range(offsets.shape[0]):
        off = offsets[k]
        n = sizes[k]
        blk = y[off : off + n]
        fwht_inplace(blk)
        f = 1.0 / math.sqrt(np.float64(n))
        for j in range(n):
            blk[j] *= f


@njit(cache=True, nogil=True)
def apply_signs(y: np.ndarray, signs: np.ndarray) -> None:
    """y *= signs (int8 +-1), in place."""
    for i in range(y.shape[0]):
        y[i] *= np.float64(signs[i])
