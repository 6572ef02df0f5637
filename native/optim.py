"""Numba kernels: server optimizers fused with finalize, and int8 dequantise-accumulate.

Server optimizers (Reddi et al. 2021, "Adaptive Federated Optimization", Algorithm 2, without
bias correction). Per parameter, with the pseudo-gradient ``d = acc / total_weight`` (the
weighted mean delta), the server learning rate ``lr``, ``b1`` (momentum), ``b2`` and ``eps``
(the paper's tau)::

    avgm:    m' = b1*m + d;                                  x' = x + lr*m'
    adagrad: m' = b1*m + (1-b1)*d; v' = v + d*d;             x' = x + lr*m'/(sqrt(v')+eps)
    adam:    m' = b1*m + (1-b1)*d; v' = b2*v + (1-b2)*d*d;   x' = x + lr*m'/(sqrt(v')+eps)
    yogi:    m' = b1*m + (1-b1)*d;
             v' = v - (1-b2)*d*d*sign(v - d*d);              x' = x + lr*m'/(sqrt(v')+eps)

All float64; ``x'`` is rounded to float32 once. The new state goes to separate arrays (``m2``,
``v2``) so the committed state is untouched until the version that uses it is stored.
No validation here (see ``fededge.aggregator.kernels``).
"""

from __future__ import annotations

import math

import numpy as np

from ._jit import njit

AVGM, ADAGRAD, ADAM, YOGI = 1, 2, 3, 4


@njit(cache=True, nogil=True)
def server_step_into(
    out: np.ndarray,
    m2: np.ndarray,
    v2: np.ndarray,
    base: np.ndarray,
    acc: np.ndarray,
    m: np.ndarray,
    v: np.ndarray,
    total_weight: float,
    lr: float,
    kind: int,
    b1: float,
    b2: float,
    eps: float,
) -> None:
    """One fused pass: mean delta, new optimizer state, next float32 weights."""
    tw = np.float64(total_weight)
    for i in range(acc.shape[0]):
        d = acc[i] / tw
        if kind == AVGM:
            mi = b1 * m[i] + d
            m2[i] = mi
            out[i] = np.float32(np.float64(base[i]) + lr * mi)
            continue
        mi = b1 * m[i] + (1.0 - b1) * d
        d2 = d * d
        if kind == ADAGRAD:
            vi = v[i] + d2
        elif kind == ADAM:
            vi = b2 * v[i] + (1.0 - b2) * d2
        else:  # YOGI
            s = v[i] - d2
            sg = 1.0 if s > 0.0 else (-1.0 if s < 0.0 else 0.0)
            vi = v[i] - (1.0 - b2) * d2 * sg
        m2[i] = mi
        v2[i] = vi
        out[i] = np.float32(np.float64(base[i]) + lr * mi / (math.sqrt(vi) + eps))


# fastmath "contract" only: each multiply-add may become one FMA (one rounding, no reordering,
# NaN/Inf semantics kept). Every int8 fold uses it, so any grouping of updates still gives
# bitwise the result of folding them one by one; +18% measured.
@njit(cache=True, nogil=True, fastmath={"contract"})
def dequant_accumulate_i8(
    acc: np.ndarray, q: np.ndarray, scales: np.ndarray, block: int, w: float
) -> None:
    """acc += w * scales[i // block] * float64(q[i]) for int8 q; no float32 copy of q.

    ``block`` is the number of elements sharing one scale (the tensor's size for one scale per
    tensor). Each element is widened and scaled in a register, then added.
    """
    n = acc.shape[0]
    nb = scales.shape[0]
    for b in range(nb):
        s = w * np.float64(scales[b])
        lo = b * block
        hi = min(lo + block, n)
        # Loops over slices from 0: LLVM then knows i >= 0 (no negative-index wraparound
        # check) and vectorises; a range(lo, hi) loop measured 6x slower.
        a = acc[lo:hi]
        x = q[lo:hi]
        for i in range(a.shape[0]):
            a[i] += s * np.float64(x[i])


# Numba has no float16 arrays: a float16 vector comes in as its uint16 bit patterns, decoded
# through a 65536-entry float32 table (exact: every float16 is a float32).
HALF_TABLE = np.arange(65536, dtype=np.uint16).view(np.float16).astype(np.float32)


@njit(cache=True, nogil=True)
def dequant_accumulate_f16(acc: np.ndarray, bits: np.ndarray, table: np.ndarray, w: float) -> None:
    """acc += w * float64(half(bits)) for the uint16 bit patterns of a float16 vector."""
    wf = np.float64(w)
    for i in range(acc.shape[0]):
        acc[i] += wf * np.float64(table[bits[i]])


@njit(cache=True, nogil=True)
def sq_norm_i8(q: np.ndarray, scales: np.ndarray, block: int) -> float:
    """sum((scales[i // block] * q[i])**2) in float64: the squared norm of the decoded values."""
    n = q.shape[0]
    total = 0.0
    for b in range(scales.shape[0]):
        lo = b * block
        hi = min(lo + block, n)
        s = np.int64(0)
        for i in range(lo, hi):
            qi = np.int64(q[i])
            s += qi * qi
        sc = np.float64(scales[b])
        total += sc * sc * np.float64(s)
    return total


# The multi-row folds index the whole arrays with unsigned integers: Numba then emits no
# negative-index wraparound (i >= 0 is known), and LLVM vectorises the loop without the
# per-block cost of 17 slices and their overlap checks (1.3-1.5x faster with a scale per 256
# elements than over slices from 0, and no slower with one per tensor). 16 rows per pass halve
# the accumulator's memory traffic per row (16 + 1 bytes per element per pass against 8 + 1
# bytes for 8 rows): at 1 byte per int8 element the float64 accumulator dominates otherwise.


@njit(cache=True, nogil=True, fastmath={"contract"})
def fold16_i8(
    acc: np.ndarray,
    q0: np.ndarray,
    q1: np.ndarray,
    q2: np.ndarray,
    q3: np.ndarray,
    q4: np.ndarray,
    q5: np.ndarray,
    q6: np.ndarray,
    q7: np.ndarray,
    q8: np.ndarray,
    q9: np.ndarray,
    q10: np.ndarray,
    q11: np.ndarray,
    q12: np.ndarray,
    q13: np.ndarray,
    q14: np.ndarray,
    q15: np.ndarray,
    scales: np.ndarray,
    block: int,
    w: np.ndarray,
) -> None:
    """acc += float64(sum_j float32(w[j] * scales[j, i // block]) * q_j[i]) for 16 int8 rows.

    ``scales`` is float32 (16, blocks). The 16 terms of an element are summed in float32 (in
    row order), then added to the float64 accumulator once: converting int8 to float32 and
    multiply-adding 16 lanes at a time halves the work of float64 terms (measured 2.3x the
    float32 fold's updates/s at d = 1M, against 1.9-2.0x in float64). The pass's rounding
    error is at most ~16 * 2^-24 of the sum of its |terms| (~1e-6; int8's own quantisation
    error is ~1e-2), and the pass is deterministic: the same 16 updates give the same bits,
    which is what WAL replay needs (it folds the same groups).
    """
    n = np.uint64(acc.shape[0])
    ub = np.uint64(block)
    for b in range(scales.shape[1]):
        s0 = np.float32(w[0] * np.float64(scales[0, b]))
        s1 = np.float32(w[1] * np.float64(scales[1, b]))
        s2 = np.float32(w[2] * np.float64(scales[2, b]))
        s3 = np.float32(w[3] * np.float64(scales[3, b]))
        s4 = np.float32(w[4] * np.float64(scales[4, b]))
        s5 = np.float32(w[5] * np.float64(scales[5, b]))
        s6 = np.float32(w[6] * np.float64(scales[6, b]))
        s7 = np.float32(w[7] * np.float64(scales[7, b]))
        s8 = np.float32(w[8] * np.float64(scales[8, b]))
        s9 = np.float32(w[9] * np.float64(scales[9, b]))
        s10 = np.float32(w[10] * np.float64(scales[10, b]))
        s11 = np.float32(w[11] * np.float64(scales[11, b]))
        s12 = np.float32(w[12] * np.float64(scales[12, b]))
        s13 = np.float32(w[13] * np.float64(scales[13, b]))
        s14 = np.float32(w[14] * np.float64(scales[14, b]))
        s15 = np.float32(w[15] * np.float64(scales[15, b]))
        lo = np.uint64(b) * ub
        for i in range(lo, min(lo + ub, n)):  # unsigned: see the comment above
            t = s0 * np.float32(q0[i])
            t += s1 * np.float32(q1[i])
            t += s2 * np.float32(q2[i])
            t += s3 * np.float32(q3[i])
            t += s4 * np.float32(q4[i])
            t += s5 * np.float32(q5[i])
            t += s6 * np.float32(q6[i])
            t += s7 * np.float32(q7[i])
            t += s8 * np.float32(q8[i])
            t += s9 * np.float32(q9[i])
            t += s10 * np.float32(q10[i])
            t += s11 * np.float32(q11[i])
            t += s12 * np.float32(q12[i])
            t += s13 * np.float32(q13[i])
            t += s14 * np.float32(q14[i])
            t += s15 * np.float32(q15[i])
            acc[i] += np.float64(t)


@njit(cache=True, nogil=True, fastmath={"contract"})
def fold8_i8(
    acc: np.ndarray,
    q0: np.ndarray,
    q1: np.ndarray,
    q2: np.ndarray,
    q3: np.ndarray,
    q4: np.ndarray,
    q5: np.ndarray,
    q6: np.ndarray,
    q7: np.ndarray,
    scales: np.ndarray,
    block: int,
    w: np.ndarray,
) -> None:
    """acc += sum_j w[j] * scales[j, i // block] * q_j[i] for 8 int8 vectors, acc read once.

    ``scales`` is float32 (8, blocks). Per block, the 8 factors ``w[j] * scales[j, b]`` are
    computed once; each element is then 8 widen-multiply-adds in a register (rows in order),
    bitwise the result of 8 single folds.
    """
    n = np.uint64(acc.shape[0])
    ub = np.uint64(block)
    for b in range(scales.shape[1]):
        s0 = w[0] * np.float64(scales[0, b])
        s1 = w[1] * np.float64(scales[1, b])
        s2 = w[2] * np.float64(scales[2, b])
        s3 = w[3] * np.float64(scales[3, b])
        s4 = w[4] * np.float64(scales[4, b])
        s5 = w[5] * np.float64(scales[5, b])
        s6 = w[6] * np.float64(scales[6, b])
        s7 = w[7] * np.float64(scales[7, b])
        lo = np.uint64(b) * ub
        for i in range(lo, min(lo + ub, n)):  # unsigned: see the comment above
            s = acc[i]
            s += s0 * np.float64(q0[i])
            s += s1 * np.float64(q1[i])
            s += s2 * np.float64(q2[i])
            s += s3 * np.float64(q3[i])
            s += s4 * np.float64(q4[i])
            s += s5 * np.float64(q5[i])
            s += s6 * np.float64(q6[i])
            s += s7 * np.float64(q7[i])
            acc[i] = s
