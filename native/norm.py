"""Numba kernels for the L2 norm of a float32 vector and clipping it to a maximum norm.

Non-finite input is reported through the norm itself, by IEEE rules rather than a flag: squares
of float32 values summed in float64 cannot overflow (each term is below 1.2e77, so it would take
1e231 elements), so the float64 sum is finite exactly when every element is. A NaN anywhere
makes the norm NaN; otherwise an infinity anywhere makes it +inf.
"""

from __future__ import annotations

import math

import numpy as np

from ._jit import njit


# fastmath only as "reassoc": LLVM may reorder the sum into SIMD partial sums (5x faster, the
# pass becomes memory-bound) but may not assume away NaN/Inf ("nnan"/"ninf" stay off). The order
# is fixed by the compiled code, so a norm is reproducible on one machine; across CPUs with other
# vector widths it can differ in the last bits.
@njit(cache=True, nogil=True, fastmath={"reassoc"})
def l2_norm(x: np.ndarray) -> float:
    """sqrt(sum(float64(x)**2)); NaN if any element is NaN, else +inf if any is +-inf."""
    s = 0.0
    for i in range(x.shape[0]):
        v = np.float64(x[i])
        s += v * v
    return math.sqrt(s)


# The same loop holding the GIL, for small vectors: releasing and re-taking the GIL costs more
# than summing a few thousand floats, and in a process with a busy MQTT network thread each
# release hands the GIL over and waits for it back (measured 100 us per 2.4k-element call
# during ingest, 5 us without the release). Same code and flags, so the same result.
@njit(cache=True, fastmath={"reassoc"})
def l2_norm_small(x: np.ndarray) -> float:
    """:func:`l2_norm` without releasing the GIL (for vectors of a few thousand elements)."""
    s = 0.0
    for i in range(x.shape[0]):
        v = np.float64(x[i])
        s += v * v
    return math.sqrt(s)


@njit(cache=True, nogil=True)
def clip_by_norm_inplace(x: np.ndarray, max_norm: float) -> float:
    """Scale x in place so that l2_norm(x) <= max_norm; return the norm before clipping.

    Non-finite x (norm NaN/inf) is left untouched and its norm returned for the caller to act
    on. After a scale the float32 rounding can leave the norm a few ulps above max_norm, which a
    strict bound check downstream would reject, so the kernel re-measures and shrinks again
    (by a factor that grows each time; zero as the last resort) until the bound holds exactly.
    """
    norm = l2_norm(x)
    if not np.isfinite(norm) or norm <= max_norm:
        return norm
    n = x.shape[0]
    current = norm
    shrink = 0.0
    while True:
        scale = (max_norm / current) * (1.0 - shrink)
        if shrink >= 1.0 or not np.isfinite(scale):
            for i in range(n):
                x[i] = np.float32(0.0)
            return norm
        for i in range(n):
            x[i] = np.float32(np.float64(x[i]) * scale)
        current = l2_norm(x)
        if current <= max_norm:
            return norm
        shrink = 2.0**-22 if shrink == 0.0 else shrink * 4.0
