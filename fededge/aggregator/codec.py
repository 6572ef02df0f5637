"""Validating and folding encoded updates (plan ``update_encoding``) without decoding them.

See fededge/protocol/encoding.py for the wire format. Validation works on the decoded values
(the norm bound applies to ``scale * q``, computed by a kernel over the int8 data); folding
uses the fused dequantise-accumulate kernels, so no float32 copy of an update is made.
"""

from __future__ import annotations

from collections.abc import Sequence

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


def tensor_norm(update: Update, name: str, shape: tuple[int, ...]) -> float:
    """The L2 norm of the decoded tensor ``name``; ProtocolError if it is malformed."""
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
        return kernels.l2_norm(flat)
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
