"""Numba kernels of secure aggregation: fixed-point quantisation and arithmetic modulo 2^k.

Pure functions over contiguous 1-D arrays; the checked wrappers are in fededge.secagg.quantize.
Integers go through int64 so Numba never mixes signed and unsigned types (which it turns into
float64); ``mask`` is ``2**bits - 1`` as an int64.
"""

from __future__ import annotations

import numpy as np

from ._jit import njit

# Stochastic rounding draws u from a counter-based hash (Chris Wellons' "lowbias32", applied twice
# with the two key halves), so element i's number depends only on (key, i): no state, any order,
# bit-identical to the numpy fallback, and 32-bit maths that vectorises on AVX2. It is rounding
# noise, not key material: statistical quality is what matters here.
HASH1 = np.uint32(0x7FEB352D)
HASH2 = np.uint32(0x846CA68B)
TWO_POW_M32 = 1.0 / 4294967296.0
INT32_MIN = -2147483648.0
INT32_MAX = 2147483647.0


@njit(inline="always", cache=True)
def _hash32(x: np.uint32) -> np.uint32:
    x = np.uint32(x ^ (x >> np.uint32(16)))
    x = np.uint32(x * HASH1)
    x = np.uint32(x ^ (x >> np.uint32(15)))
    x = np.uint32(x * HASH2)
    return np.uint32(x ^ (x >> np.uint32(16)))


# "reassoc" only: SIMD partial sums, NaN/inf still propagate (as in native/norm.py).
@njit(cache=True, nogil=True, fastmath={"reassoc"})
def sum_squares(x: np.ndarray) -> float:
    """Sum of squares of ``x`` in float64 (NaN/inf propagate, so callers can reject them)."""
    acc = 0.0
    for i in range(x.shape[0]):
        v = np.float64(x[i])
        acc += v * v
    return acc


@njit(cache=True, nogil=True)
def quantize(
    x: np.ndarray,
    factor: float,
    key_lo: np.uint32,
    key_hi: np.uint32,
    start: np.uint32,
    mask: np.uint32,
    out: np.ndarray,
) -> None:
    """out[i] = floor(x[i] * factor + u_i) mod 2^k: unbiased stochastic rounding.

    u_i in [0, 1) comes from (key, start + i); floor(v + u) is v rounded up with probability
    frac(v). Values saturate at the int32 range (callers keep |x * factor| well inside it).
    """
    for i in range(x.shape[0]):
        c = np.uint32(np.uint32(i) + start)
        u = np.float64(_hash32(np.uint32(_hash32(np.uint32(c + key_lo)) ^ key_hi))) * TWO_POW_M32
        v = min(max(np.float64(x[i]) * factor + u, INT32_MIN), INT32_MAX)
        out[i] = np.uint32(np.int32(np.floor(v))) & mask


@njit(cache=True, nogil=True)
def dequantize(acc: np.ndarray, bits: np.int64, inv_scale: float, out: np.ndarray) -> None:
    """out[i] = signed(acc[i] mod 2^k) * inv_scale, the two's-complement reading of a sum."""
    half = np.int64(1) << (bits - 1)
    modulus = np.int64(1) << bits
    for i in range(acc.shape[0]):
        v = np.int64(acc[i])
        if v >= half:
            v -= modulus
        out[i] = np.float64(v) * inv_scale


@njit(cache=True, nogil=True)
def add_mod(acc: np.ndarray, x: np.ndarray, mask: np.int64) -> None:
    """acc = (acc + x) mod 2^k in place: folding a masked input or adding a mask."""
    for i in range(acc.shape[0]):
        acc[i] = np.uint32((np.int64(acc[i]) + np.int64(x[i])) & mask)


@njit(cache=True, nogil=True)
def sub_mod(acc: np.ndarray, x: np.ndarray, mask: np.int64) -> None:
    """acc = (acc - x) mod 2^k in place: removing a mask."""
    for i in range(acc.shape[0]):
        acc[i] = np.uint32((np.int64(acc[i]) - np.int64(x[i])) & mask)
