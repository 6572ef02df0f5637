"""Numba kernels that fold float32 updates into a float64 weighted sum and turn it into a model.

Pure functions over contiguous 1-D/2-D arrays; no validation here (see ``fededge.kernels``).
All arithmetic is float64: an update is widened before it is weighted, so the accumulator's
rounding error stays ~1e-16 relative per update however many updates are folded.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

# Every kernel is compiled lazily on first call (no import-time compile) and cached on disk
# (NUMBA_CACHE_DIR in the systemd units); ``fededge.kernels.warmup()`` triggers compilation.
# nogil lets a service fold updates on a worker thread while the MQTT loop keeps running.


@njit(cache=True, nogil=True)
def accumulate_serial(acc: np.ndarray, x: np.ndarray, w: float) -> None:
    """acc += w * x on one thread: acc float64[d], x float32[d], one fused pass."""
    wf = np.float64(w)
    for i in range(acc.shape[0]):
        acc[i] += wf * np.float64(x[i])


@njit(cache=True, nogil=True, parallel=True)
def accumulate_parallel(acc: np.ndarray, x: np.ndarray, w: float) -> None:
    """acc += w * x split over Numba's thread pool; bitwise equal to ``accumulate_serial``."""
    wf = np.float64(w)
    for i in prange(acc.shape[0]):
        acc[i] += wf * np.float64(x[i])


@njit(cache=True, nogil=True)
def accumulate_rows(acc: np.ndarray, xs: np.ndarray, w: np.ndarray) -> None:
    """acc += sum_j w[j] * xs[j] for xs float32[k, d], reading and writing acc once per 8 rows.

    Each element's partial sum is added in row order (acc + w0*x0, then + w1*x1, ...) in a
    register, so the result is bitwise equal to k calls of ``accumulate_serial`` while the
    accumulator crosses the memory bus 8x less often (the update stream then dominates).
    """
    k = xs.shape[0]
    d = acc.shape[0]
    j = 0
    while j + 8 <= k:
        x0, x1, x2, x3 = xs[j], xs[j + 1], xs[j + 2], xs[j + 3]
        x4, x5, x6, x7 = xs[j + 4], xs[j + 5], xs[j + 6], xs[j + 7]
        w0, w1, w2, w3 = w[j], w[j + 1], w[j + 2], w[j + 3]
        w4, w5, w6, w7 = w[j + 4], w[j + 5], w[j + 6], w[j + 7]
        for i in range(d):
            s = acc[i]
            s += w0 * np.float64(x0[i])
            s += w1 * np.float64(x1[i])
            s += w2 * np.float64(x2[i])
            s += w3 * np.float64(x3[i])
            s += w4 * np.float64(x4[i])
            s += w5 * np.float64(x5[i])
            s += w6 * np.float64(x6[i])
            s += w7 * np.float64(x7[i])
            acc[i] = s
        j += 8
    if j + 4 <= k:
        x0, x1, x2, x3 = xs[j], xs[j + 1], xs[j + 2], xs[j + 3]
        w0, w1, w2, w3 = w[j], w[j + 1], w[j + 2], w[j + 3]
        for i in range(d):
            s = acc[i]
            s += w0 * np.float64(x0[i])
            s += w1 * np.float64(x1[i])
            s += w2 * np.float64(x2[i])
            s += w3 * np.float64(x3[i])
            acc[i] = s
        j += 4
    if j + 2 <= k:
        x0, x1 = xs[j], xs[j + 1]
        w0, w1 = w[j], w[j + 1]
        for i in range(d):
            s = acc[i]
            s += w0 * np.float64(x0[i])
            s += w1 * np.float64(x1[i])
            acc[i] = s
        j += 2
    if j < k:
        x0 = xs[j]
        w0 = w[j]
        for i in range(d):
            acc[i] += w0 * np.float64(x0[i])


@njit(cache=True, nogil=True)
def finalize_into(
    out: np.ndarray, base: np.ndarray, acc: np.ndarray, total_weight: float, server_lr: float
) -> None:
    """out = float32(base + server_lr * acc / total_weight), computed in float64 per element."""
    tw = np.float64(total_weight)
    lr = np.float64(server_lr)
    for i in range(acc.shape[0]):
        # Same operation order as the numpy reference, so results agree bit for bit.
        out[i] = np.float32(np.float64(base[i]) + lr * acc[i] / tw)


@njit(cache=True, nogil=True)
def mean_into(out: np.ndarray, acc: np.ndarray, total_weight: float) -> None:
    """out = acc / total_weight (float64), the weighted mean of the folded updates."""
    tw = np.float64(total_weight)
    for i in range(acc.shape[0]):
        out[i] = acc[i] / tw
