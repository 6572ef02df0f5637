"""Numba kernels that fold float32 updates into a float64 weighted sum and turn it into a model.

Pure functions over contiguous 1-D/2-D arrays; no validation here (see
``fededge.aggregator.kernels``).
All arithmetic is float64: an update is widened before it is weighted, so the accumulator's
rounding error stays ~1e-16 relative per update however many updates are folded.
"""

from __future__ import annotations

import numpy as np

from ._jit import njit, prange

# Every kernel is compiled lazily on first call (no import-time compile) and cached on disk
# (NUMBA_CACHE_DIR in the systemd units); ``fededge.aggregator.kernels.warmup()`` triggers
# compilation.
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


# The fold kernels below add w_j * x_j to each element in row order, in a register (acc + w0*x0,
# then + w1*x1, ...), so any grouping of updates gives bitwise the result of folding them one
# by one with ``accumulate_serial``; only the accumulator's trips to memory change.


@njit(cache=True, nogil=True)
def fold(acc: np.ndarray, xs: tuple[np.ndarray, ...], w: np.ndarray) -> None:
    """acc += sum_j w[j] * xs[j] for a tuple of k float32 vectors (k <= 8), in one pass: acc is
    read and written once. One specialisation per k (the tuple's length is part of its type,
    so the inner loop is unrolled: as fast as a kernel spelled out per k, measured)."""
    for i in range(acc.shape[0]):
        s = acc[i]
        for j in range(len(xs)):
            s += w[j] * np.float64(xs[j][i])
        acc[i] = s


@njit(cache=True, nogil=True)
def accumulate_rows(acc: np.ndarray, xs: np.ndarray, w: np.ndarray) -> None:
    """acc += sum_j w[j] * xs[j] for xs float32[k, d], 8 (then 4, 2, 1) rows per pass.

    Bitwise equal to k calls of ``accumulate_serial``; acc crosses the memory bus once per 8
    rows. (Blocking acc into L2-sized chunks to cross once per call measured no faster here.)
    """
    k = xs.shape[0]
    j = 0
    while j + 8 <= k:
        rows8 = (xs[j], xs[j + 1], xs[j + 2], xs[j + 3], xs[j + 4], xs[j + 5], xs[j + 6], xs[j + 7])
        fold(acc, rows8, w[j : j + 8])
        j += 8
    if j + 4 <= k:
        fold(acc, (xs[j], xs[j + 1], xs[j + 2], xs[j + 3]), w[j : j + 4])
        j += 4
    if j + 2 <= k:
        fold(acc, (xs[j], xs[j + 1]), w[j : j + 2])
        j += 2
    if j < k:
        fold(acc, (xs[j],), w[j : j + 1])


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
