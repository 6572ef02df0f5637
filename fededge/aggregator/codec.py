"""Validating and folding encoded updates (plan ``update_encoding``) without decoding them.

See fededge/protocol/encoding.py for the wire format. Validation works on the decoded values
(the norm bound applies to ``scale * q``, computed by a kernel over the int8 data); folding
uses the fused dequantise-accumulate kernels, so no float32 copy of an update is made.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from fededge.aggregator import kernels
from fededge.errors import ProtocolError
from fededge.protocol import Update
from fededge.protocol.encoding import SCALE_SUFFIX, blocks
from fededge.protocol.vocab import RejectReason

_DTYPE = {"f32": np.dtype(np.float32), "f16": np.dtype(np.float16), "int8": np.dtype(np.int8)}


def expected_names(names: Sequence[str], encoding: str) -> set[str]:
    """The tensor names an update in ``encoding`` carries for a model with ``names``."""
    if encoding == "int8":
        return {*names, *(n + SCALE_SUFFIX for n in names)}
    return set(names)


@dataclass(frozen=True)
class Prepared:
    """An update parsed, and the L2 norms of its float32 tensors, ahead of the aggregator's
    checks (``prepare_update``)."""

    update: Update
    norms: Mapping[str, float]


def prepare_update(payload: bytes) -> Prepared | None:
    """Parse an update and measure its float32 tensors, as ``ingest`` and ``tensor_norm``
    would (the same parser, the same kernel on the same arrays, so the same values); None if
    it does not parse (``ingest`` parses it again and names what is wrong).

    Run on the MQTT network thread for large payloads (``Inbox.prepare``): right after the
    socket read a 4 MB update is still in the CPU's cache, and its norm takes ~0.25 ms there
    against ~0.9 ms on the main thread later, which is bound by memory at 1M parameters. No
    decision is taken here: the size limit, the plan, dtypes and shapes are all checked by
    ``ingest`` as without it.
    """
    try:
        update = Update.from_bytes(payload, max_bytes=len(payload))  # ingest checks the size
    except ProtocolError:
        return None
    norms = {}
    if update.encoding == "f32":
        for name, arr in update.delta.items():
            if arr.dtype == np.float32:
                norms[name] = kernels.l2_norm(arr if arr.ndim == 1 else arr.reshape(-1))
    return Prepared(update, norms)


def tensor_norm(
    update: Update, name: str, shape: tuple[int, ...], norms: Mapping[str, float] | None = None
) -> float:
    """The L2 norm of the decoded tensor ``name``; ProtocolError if it is malformed.

    ``norms``: ``Prepared.norms`` of this update (the kernel's result for a float32 tensor,
    taken instead of running it again; every check runs as without it)."""
    arr = update.delta[name]
    want = _DTYPE[update.encoding]
    if arr.dtype != want:
        raise ProtocolError(
            f"tensor {name!r} is {arr.dtype}, not {want} (encoding {update.encoding})",
            reason=RejectReason.WRONG_DTYPE,
        )
    if arr.shape != shape:
        raise ProtocolError(
            f"tensor {name!r} has shape {list(arr.shape)}, expected {list(shape)}",
            reason=RejectReason.WRONG_SHAPE,
        )
    flat = arr if arr.ndim == 1 else arr.reshape(-1)
    if update.encoding == "f32":
        known = norms.get(name) if norms else None
        return kernels.l2_norm(flat) if known is None else known
    if update.encoding == "f16":
        return float(np.linalg.norm(flat.astype(np.float64)))  # NaN/Inf propagate
    scales = update.delta[name + SCALE_SUFFIX]
    b, nb = blocks(flat.size, update.block)
    if scales.dtype != np.float32 or scales.shape != (nb,):
        raise ProtocolError(
            f"tensor {name + SCALE_SUFFIX!r} must be float32 of shape [{nb}], "
            f"is {scales.dtype} {list(scales.shape)}",
            reason=RejectReason.WRONG_SHAPE,
        )
    if not (kernels.all_finite(scales) and bool((scales >= 0).all())):
        raise ProtocolError(
            f"tensor {name + SCALE_SUFFIX!r} holds a negative or non-finite scale",
            reason=RejectReason.NON_FINITE,
        )
    if bool((flat == -128).any()):
        raise ProtocolError(f"tensor {name!r} holds -128 (int8 values are in [-127, 127])",
                            reason=RejectReason.WRONG_DTYPE)  # fmt: skip
    return kernels.i8_norm(flat, scales, b)  # type: ignore[arg-type]


def fold(
    acc: NDArray[np.float64],
    name: str,
    group: Sequence[tuple[Update, float]],
    *,
    parallel: bool = False,
) -> None:
    """Fold tensor ``name`` of each (update, weight) into ``acc`` (its slice), in order.

    Consecutive runs of one encoding go through one kernel call (8 or 16 updates per pass).
    The accumulator is a deterministic function of the group, and a WAL replay folds the same
    groups, so it reproduces the accumulator bit for bit. f32 and f16 folds are even
    independent of the grouping (each element adds its terms in the group's order); int8
    passes of 16 sum their terms in float32 first (fededge.native.optim.fold16_i8).
    """
    i = 0
    while i < len(group):
        enc = group[i][0].encoding
        block = group[i][0].block
        j = i
        while j < len(group) and group[j][0].encoding == enc and group[j][0].block == block:
            j += 1
        run = group[i:j]
        if enc == "f32":
            if parallel:
                for u, w in run:
                    kernels.accumulate(acc, u.delta[name].reshape(-1), w, parallel=True)
            else:
                kernels.accumulate_group(acc, _flat(run, name), [w for _, w in run])
        elif enc == "f16":
            for u, w in run:
                kernels.dequant_accumulate_f16(acc, u.delta[name].reshape(-1), w)  # type: ignore[arg-type]
        else:
            size = acc.shape[0]
            kernels.dequant_accumulate_i8_group(
                acc,
                [u.delta[name].reshape(-1) for u, _ in run],  # type: ignore[misc]
                [u.delta[name + SCALE_SUFFIX] for u, _ in run],
                blocks(size, block)[0],
                [w for _, w in run],
            )
        i = j


def _flat(run: Sequence[tuple[Update, float]], name: str) -> list[NDArray[np.float32]]:
    """Tensor ``name`` of each update as a 1-D array (the array itself if it is one)."""
    out = []
    for u, _ in run:
        a = u.delta[name]
        out.append(a if a.ndim == 1 else a.reshape(-1))
    return out
