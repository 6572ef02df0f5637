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


@njit(cache=True, nogil=True)
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
        for i in range(lo, hi):
            acc[i] += s * np.float64(q[i])


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
