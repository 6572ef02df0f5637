"""Robust aggregation of an asynchronous version: plan ``robust``, ``robust_beta``, ``robust_zeroing``.

Instead of the weighted mean of the version's updates, the next version applies a
coordinate-wise statistic of them: ``trimmed_mean`` (per coordinate, sort the k values, drop
the ``floor(robust_beta * k)`` smallest and as many largest, average the rest) or ``median``.
Both are unweighted: every accepted update counts once, whatever its example count or
staleness discount (those weights still weight the reported training metrics). Before that,
``robust_zeroing`` = m drops every update whose L2 norm exceeds m times the median norm of
the version's updates (at least half of them always stay); with ``robust`` = ``none`` the
survivors' weighted mean is used.

Memory: the statistics need every update of the version, which the write-ahead log already
holds (``PendingVersion.keep_log`` stops checkpoints from deleting it). The aggregate is
computed block by block over coordinates: for each block of B coordinates, the k updates'
values are read with ``os.pread`` straight from the WAL segments into one float32 (k, B)
buffer (f16 and int8 updates are decoded to float32 per block), and a Numba kernel writes the
block's statistic. RAM is O(d + k * B): the float64 result plus one block buffer
(``block_bytes``, 8 MiB by default). The log is the durable state, so a restart after
``kill -9`` computes the same version from the same records.
"""

from __future__ import annotations

import json
import logging
import math
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
from numpy.typing import NDArray

from fededge.aggregator import kernels
from fededge.aggregator.metrics import AggregatorMetrics
from fededge.aggregator.pending import PendingVersion, server_step_tensors
from fededge.aggregator.wal import record_spans
from fededge.errors import StorageError
from fededge.native import robust as _rk
from fededge.protocol import Plan
from fededge.protocol.encoding import SCALE_SUFFIX, blocks
from fededge.protocol.messages import Weights

log = logging.getLogger(__name__)

BLOCK_BYTES = 8 << 20  # the (k, B) float32 buffer of one block
_F32 = np.dtype(np.float32)
_WIRE: dict[str, np.dtype[Any]] = {
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "I8": np.dtype("i1"),
}
OptState = tuple[NDArray[np.float64], NDArray[np.float64]]


def enabled(plan: Plan) -> bool:
    """Whether the plan's versions are aggregated here rather than from the running sum."""
    return plan.robust != "none" or plan.robust_zeroing is not None


# -- checked kernels ------------------------------------------------------------------------
def _check_block(x: object, out: object) -> tuple[NDArray[np.float32], NDArray[np.float64]]:
    if not isinstance(x, np.ndarray) or x.dtype != _F32 or x.ndim != 2:
        raise ValueError("x: expected a float32 numpy array of shape (k, B)")
    if not x.flags.c_contiguous:
        raise ValueError("x: not C-contiguous; pass np.ascontiguousarray(x)")
    if x.shape[0] < 1:
        raise ValueError("x: needs at least one row (update)")
    if not isinstance(out, np.ndarray) or out.dtype != np.float64 or out.shape != x.shape[1:]:
        raise ValueError(f"out: expected float64 of shape ({x.shape[1]},)")
    if not out.flags.c_contiguous or not out.flags.writeable:
        raise ValueError("out: must be C-contiguous and writable")
    return x, out


def trimmed_mean(
    x: NDArray[np.float32], beta: float, out: NDArray[np.float64], *, parallel: bool = False
) -> int:
    """Per column of x (k, B): the mean after trimming floor(beta * k) values at each end.

    Returns the number trimmed at each end. ``beta`` in [0, 0.5), so at least one value stays.
    ``parallel`` splits the columns over Numba's thread pool (bitwise the same result).
    """
    _check_block(x, out)
    if not (isinstance(beta, float | int) and 0.0 <= beta < 0.5):
        raise ValueError(f"beta: must be in [0, 0.5), got {beta!r}")
    trim = math.floor(float(beta) * int(x.shape[0]))
    if parallel:
        _rk.trimmed_mean_cols_parallel(x, trim, out)
    else:
        _rk.trimmed_mean_cols(x, trim, out)
    return trim


def median(x: NDArray[np.float32], out: NDArray[np.float64], *, parallel: bool = False) -> None:
    """Per column of x (k, B): the median (mean of the two middle values for even k)."""
    _check_block(x, out)
    if parallel:
        _rk.median_cols_parallel(x, out)
    else:
        _rk.median_cols(x, out)


def weighted_mean(x: NDArray[np.float32], w: NDArray[np.float64], out: NDArray[np.float64]) -> None:
    """Per column of x (k, B): sum_i w[i] x[i, j] / sum_i w[i]; weights finite, > 0 in total."""
    _check_block(x, out)
    if w.dtype != np.float64 or w.shape != (x.shape[0],) or not w.flags.c_contiguous:
        raise ValueError(f"w: expected float64 of shape ({x.shape[0]},)")
    if not (np.isfinite(w).all() and (w >= 0).all() and w.sum() > 0):
        raise ValueError("w: weights must be finite, >= 0 and not all 0")
    _rk.weighted_mean_cols(x, w, out)


# -- the logged updates -----------------------------------------------------------------------
@dataclass(frozen=True)
class Logged:
    """Where one logged update's tensors lie in its WAL segment, and its weight and norm."""

    path: Path
    tensors: dict[str, tuple[np.dtype[Any], int]]  # name -> (wire dtype, file offset of data)
    encoding: str
    block: int
    weight: float
    norm: float


def logged_updates(pending: PendingVersion) -> list[Logged]:
    """Every update in the pending version's WAL segments, in log order (payloads unread)."""
    out: list[Logged] = []
    pending.settle_checkpoints()  # a checkpoint landing now would delete a segment we list
    for _, path in pending.store.segments(pending.base.version):
        with path.open("rb") as f:
            for header, off, plen in record_spans(path):
                try:
                    out.append(_logged(f, path, header, off, plen))
                except (KeyError, ValueError, TypeError, AttributeError, struct.error) as e:
                    # Records were validated before they were logged: this is a damaged disk.
                    raise StorageError(f"WAL {path}: record at {off} is unreadable: {e!r}") from e
    return out


def _logged(f: Any, path: Path, header: dict[str, Any], off: int, plen: int) -> Logged:
    f.seek(off)
    (hlen,) = struct.unpack("<Q", f.read(8))
    if hlen > plen - 8:
        raise ValueError("bad safetensors header length")
    h = json.loads(f.read(hlen))
    meta = h.pop("__metadata__", {})
    data = off + 8 + hlen
    enc = meta.get("encoding", "f32")
    return Logged(
        path=path,
        tensors={n: (_WIRE[i["dtype"]], data + int(i["data_offsets"][0])) for n, i in h.items()},
        encoding=enc,
        block=int(meta.get("block", "0")) if enc == "int8" else 0,
        weight=float(header["weight"]),
        norm=float(header["norm"]),
    )


class _Reader:
    """Reads coordinates of logged updates into float32 rows with ``os.pread``."""

    def __init__(self) -> None:
        self._fds: dict[Path, int] = {}

    def __enter__(self) -> _Reader:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def _read(self, path: Path, buf: NDArray[Any], offset: int) -> None:
        fd = self._fds.get(path)
        if fd is None:
            fd = self._fds[path] = os.open(path, os.O_RDONLY)
        view = buf.view(np.uint8).data
        got = 0
        while got < len(view):
            n = os.preadv(fd, [view[got:]], offset + got)
            if n <= 0:
                raise StorageError(f"WAL {path}: short read at byte {offset + got}")
            got += n

    def row(self, u: Logged, name: str, size: int, start: int, row: NDArray[np.float32]) -> None:
        """Coordinates [start, start + len(row)) of tensor ``name`` (``size`` values) of ``u``."""
        n = row.shape[0]
        dtype, off = u.tensors[name]
        if u.encoding == "f32":
            self._read(u.path, row, off + 4 * start)
        elif u.encoding == "f16":
            h = np.empty(n, dtype=dtype)
            self._read(u.path, h, off + 2 * start)
            row[:] = h
        else:
            q = np.empty(n, dtype=np.int8)
            self._read(u.path, q, off + start)
            b, _ = blocks(size, u.block)
            s0, s1 = start // b, (start + n - 1) // b
            sc = np.empty(s1 - s0 + 1, dtype=np.float32)
            self._read(u.path, sc, u.tensors[name + SCALE_SUFFIX][1] + 4 * s0)
            np.multiply(sc[np.arange(start, start + n) // b - s0], q, out=row)


@dataclass(frozen=True)
class Robust:
    """The robust aggregate of a version: the delta to apply and what went into it."""

    delta: NDArray[np.float64]
    used: int
    zeroed: int
    trimmed: int  # per end and coordinate (trimmed_mean)


def aggregate(
    pending: PendingVersion,
    plan: Plan,
    *,
    block_bytes: int = BLOCK_BYTES,
    progress: Callable[[], object] = lambda: None,
    parallel: bool = False,
) -> Robust | None:
    """The plan's robust statistic of the pending version's updates, read from its WAL.

    None if the log does not hold every update of the version (the plan turned robust after
    some were checkpointed): the caller then uses the weighted mean, and says so.
    ``progress`` is called after every block (the driver's watchdog ping: a large model with
    many updates takes seconds to minutes here).
    """
    logged = logged_updates(pending)
    if len(logged) != pending.sums.count:
        log.warning(
            "robust aggregation of version %d: the log holds %d of its %d updates (the plan "
            "turned robust mid-version); this version uses the weighted mean",
            pending.base.version + 1, len(logged), pending.sums.count,
        )  # fmt: skip
        return None
    keep = logged
    if plan.robust_zeroing is not None and logged:
        limit = plan.robust_zeroing * float(np.median([u.norm for u in logged]))
        keep = [u for u in logged if u.norm <= limit]
    k = len(keep)
    if k == 0:
        return None
    width = max(1, block_bytes // (4 * k))
    buf = np.empty(k * min(width, max(pending.layout.size, 1)), dtype=np.float32)
    w = np.array([u.weight for u in keep], dtype=np.float64)
    out = np.empty(pending.layout.size, dtype=np.float64)
    trim = 0
    with _Reader() as reader:
        for name, sl in pending.layout.slices():
            size = sl.stop - sl.start
            for b0 in range(0, size, width):
                n = min(width, size - b0)
                x = buf[: k * n].reshape(k, n)
                for i, u in enumerate(keep):
                    reader.row(u, name, size, b0, x[i])
                dst = out[sl.start + b0 : sl.start + b0 + n]
                if plan.robust == "trimmed_mean":
                    trim = trimmed_mean(x, plan.robust_beta, dst, parallel=parallel)
                elif plan.robust == "median":
                    median(x, dst, parallel=parallel)
                else:
                    weighted_mean(x, w, dst)
                progress()
    return Robust(out, used=k, zeroed=len(logged) - k, trimmed=trim)


def next_weights(
    pending: PendingVersion, plan: Plan, delta: NDArray[np.float64], state: OptState | None
) -> tuple[Weights, OptState | None]:
    """``delta`` (the robust aggregate) through the server optimizer: (weights, new state).

    ``state`` is the optimizer's (m, v); only read when ``server_optimizer`` is not ``sgd``.
    """
    if plan.server_optimizer != "sgd":
        if state is None:
            raise ValueError(f"server_optimizer {plan.server_optimizer!r} needs its state (m, v)")
        m, v = state
        weights, m2, v2 = server_step_tensors(
            pending.base.weights, pending.layout, delta, 1.0, plan, m, v
        )
        return weights, (m2, v2)
    out: Weights = {}
    for (name, sl), shape in zip(pending.layout.slices(), pending.layout.shapes, strict=True):
        base = np.ascontiguousarray(pending.base.weights[name], dtype=np.float32).reshape(-1)
        new = kernels.finalize(base, delta[sl], 1.0, plan.server_learning_rate)
        out[name] = new.reshape(shape)
    return out, None


def finalize(
    pending: PendingVersion,
    plan: Plan,
    optimizer_state: Callable[[int], OptState],
    metrics: AggregatorMetrics,
    progress: Callable[[], object] = lambda: None,
    *,
    parallel: bool = False,
) -> tuple[Weights, OptState | None] | None:
    """The next version's (weights, optimizer state) under a robust plan; None: use the mean
    (the plan is not robust, or the log lacks updates of this version)."""
    if (
        not enabled(plan)
        or (r := aggregate(pending, plan, progress=progress, parallel=parallel)) is None
    ):
        return None
    metrics.zeroed.inc(r.zeroed)
    log.info("version %d: %s over %d updates (%d zeroed, %d trimmed at each end)",
             pending.base.version + 1, plan.robust, r.used, r.zeroed, r.trimmed)  # fmt: skip
    state = optimizer_state(pending.layout.size) if plan.server_optimizer != "sgd" else None
    return next_weights(pending, plan, r.delta, state)


def warmup(*, parallel: bool = False) -> None:
    """Compile (or load from cache) the robust kernels (``parallel``: the threaded ones too)."""
    x = np.ones((3, 4), dtype=np.float32)
    out = np.empty(4)
    for par in (False, True) if parallel else (False,):
        trimmed_mean(x, 0.2, out, parallel=par)
        median(x, out, parallel=par)
    weighted_mean(x, np.ones(3), out)
