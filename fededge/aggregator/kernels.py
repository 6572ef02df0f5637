"""Checked entry points to the Numba aggregation kernels in ``fededge.native``.

Each function validates dtype, dimensions, shape agreement, C-contiguity, writability and scalar
arguments, raising ``ValueError`` that names the argument and the problem, then runs the kernel.
1-D contiguous slices of a larger array are fine (the aggregator keeps one flat float64
accumulator and folds each tensor into its slice). Importing this module needs Numba (the
``aggregator`` extra) but compiles nothing; call :func:`warmup` at service start.

Non-finite values are reported through norms, never silently: :func:`l2_norm` returns ``nan`` if
any element is NaN, otherwise ``inf`` if any element is +-inf, otherwise a finite float.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

from fededge.native import accumulate as _acc
from fededge.native import hadamard as _had
from fededge.native import norm as _norm
from fededge.native import optim as _opt

__all__ = [
    "OPTIMIZERS",
    "accumulate",
    "accumulate_group",
    "accumulate_many",
    "all_finite",
    "clip_by_norm",
    "dequant_accumulate_f16",
    "dequant_accumulate_i8",
    "dequant_accumulate_i8_group",
    "finalize",
    "i8_norm",
    "l2_norm",
    "mean",
    "server_step",
    "warmup",
]

_F32 = np.dtype(np.float32)
# Vectors at least this long go to the kernels that release the GIL (see native/norm.py).
GIL_FREE_MIN = 1 << 18
_F64 = np.dtype(np.float64)


def _check_array(
    name: str, a: object, dtype: np.dtype[Any], ndim: int, *, writable: bool = False
) -> None:
    """Raise ValueError unless ``a`` is a C-contiguous ndarray of ``dtype`` with ``ndim`` dims."""
    if not isinstance(a, np.ndarray):
        raise ValueError(f"{name}: expected a numpy.ndarray, got {type(a).__name__}")
    if a.dtype != dtype:
        # Also catches non-native byte order ('>f4' != float32 on little-endian hosts).
        raise ValueError(f"{name}: dtype is {a.dtype.str} ({a.dtype}), expected {dtype} (native)")
    if a.ndim != ndim:
        raise ValueError(f"{name}: has {a.ndim} dimensions (shape {a.shape}), expected {ndim}")
    if not a.flags.c_contiguous:
        raise ValueError(
            f"{name}: not C-contiguous (strides {a.strides}); pass np.ascontiguousarray({name})"
        )
    if writable and not a.flags.writeable:
        raise ValueError(f"{name}: array is read-only but is written in place")


def _check_scalar(name: str, value: object, *, allow_zero: bool) -> float:
    """Return ``value`` as a float, or raise ValueError unless it is finite and > 0 (or >= 0)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(
        value, (int, float, np.integer, np.floating)
    ):
        raise ValueError(f"{name}: expected a real number, got {type(value).__name__}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name}: must be finite, got {v}")
    if v < 0.0 or (v == 0.0 and not allow_zero):
        raise ValueError(f"{name}: must be {'>= 0' if allow_zero else '> 0'}, got {v}")
    return v


def _check_same_length(name: str, a: NDArray[Any], ref_name: str, ref: NDArray[Any]) -> None:
    if a.shape[-1] != ref.shape[0]:
        raise ValueError(
            f"{name}: length {a.shape[-1]} (shape {a.shape}) does not match "
            f"{ref_name} length {ref.shape[0]}"
        )


def _check_weight_values(weights: NDArray[np.float64]) -> None:
    bad = np.flatnonzero(~(np.isfinite(weights) & (weights >= 0.0)))
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"weights[{i}]: must be finite and >= 0, got {weights[i]}")


def _weights_ok(weights: NDArray[np.float64]) -> bool:
    """True if every weight is finite and >= 0 (a cheap test for the usual case; False may
    also mean a sum that overflows: ``_check_weight_values`` then decides)."""
    values = weights.tolist()
    # A NaN or an infinity makes the sum non-finite; then min() needs no NaN care.
    return not values or (math.isfinite(sum(values)) and min(values) >= 0.0)


def accumulate(
    acc: NDArray[np.float64],
    update: NDArray[np.float32],
    weight: float,
    *,
    parallel: bool = False,
) -> None:
    """Fold one update into the accumulator in place: ``acc += weight * update`` in float64.

    ``weight`` must be finite and >= 0. ``parallel=True`` splits the pass over Numba's thread
    pool (``NUMBA_NUM_THREADS``); the result is bitwise the same as the serial pass.
    """
    _check_array("acc", acc, _F64, 1, writable=True)
    _check_array("update", update, _F32, 1)
    _check_same_length("update", update, "acc", acc)
    w = _check_scalar("weight", weight, allow_zero=True)
    if parallel:
        _acc.accumulate_parallel(acc, update, w)
    else:
        _acc.accumulate_serial(acc, update, w)


def accumulate_many(
    acc: NDArray[np.float64], updates: NDArray[np.float32], weights: NDArray[np.float64]
) -> None:
    """Fold k buffered updates in one pass: ``acc += sum_j weights[j] * updates[j]``.

    ``updates`` is float32 (k, d) C-contiguous, ``weights`` float64 (k,), all finite and >= 0.
    Reads and writes ``acc`` once per 8 updates; bitwise equal to k calls of :func:`accumulate`.
    """
    _check_array("acc", acc, _F64, 1, writable=True)
    _check_array("updates", updates, _F32, 2)
    _check_array("weights", weights, _F64, 1)
    _check_same_length("updates", updates, "acc", acc)
    if weights.shape[0] != updates.shape[0]:
        raise ValueError(
            f"weights: has {weights.shape[0]} entries but updates has {updates.shape[0]} rows"
        )
    _check_weight_values(weights)
    _acc.accumulate_rows(acc, updates, weights)


def accumulate_group(
    acc: NDArray[np.float64],
    updates: Sequence[NDArray[np.float32]],
    weights: Sequence[float] | NDArray[np.float64],
) -> None:
    """Fold k separate 1-D updates 8 per pass, without copying them into a (k, d) buffer.

    For updates that live in their own buffers (e.g. ``np.frombuffer`` views of received
    payloads). Same result, bitwise, as k calls of :func:`accumulate` in order.
    """
    _check_array("acc", acc, _F64, 1, writable=True)
    try:
        w = np.array(weights, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"weights: not a sequence of real numbers ({exc})") from None
    if w.ndim != 1 or w.shape[0] != len(updates):
        raise ValueError(f"weights: has shape {w.shape} but there are {len(updates)} updates")
    if not _weights_ok(w):
        _check_weight_values(w)
    views = []
    n = acc.shape[0]
    for i, u in enumerate(updates):
        # The checks of _check_array and _check_same_length, which name the problem when
        # one fails (the names are formatted only then: this runs once per update).
        if isinstance(u, np.ndarray) and u.dtype == _F32 and u.ndim == 1 and u.shape[0] == n:
            flags = u.flags
            if flags.c_contiguous:
                # Read-only views: one compiled specialisation whatever mix of buffers comes
                # in (an array that is read-only already, a received payload's, is one).
                if flags.writeable:
                    u = u.view()
                    u.flags.writeable = False
                views.append(u)
                continue
        _check_array(f"updates[{i}]", u, _F32, 1)
        _check_same_length(f"updates[{i}]", u, "acc", acc)
        raise AssertionError("unreachable: the checks above raise")  # pragma: no cover
    # One pass over acc per 8 updates, whatever the group's size (a group of 3 was two passes,
    # 7 three: at 1M parameters each pass is 16 MB of the accumulator's memory traffic).
    for j in range(0, len(views), 8):
        _acc.fold(acc, tuple(views[j : j + 8]), w[j : j + 8])


def finalize(
    base: NDArray[np.float32],
    acc: NDArray[np.float64],
    total_weight: float,
    server_lr: float,
) -> NDArray[np.float32]:
    """Return the next model: ``float32(base + server_lr * acc / total_weight)``, float64 maths.

    ``total_weight`` (sum of the folded weights) and ``server_lr`` must be finite and > 0.
    """
    _check_array("base", base, _F32, 1)
    _check_array("acc", acc, _F64, 1)
    _check_same_length("acc", acc, "base", base)
    tw = _check_scalar("total_weight", total_weight, allow_zero=False)
    lr = _check_scalar("server_lr", server_lr, allow_zero=False)
    out = np.empty(base.shape[0], dtype=np.float32)
    _acc.finalize_into(out, base, acc, tw, lr)
    return out


OPTIMIZERS = {"avgm": _opt.AVGM, "adagrad": _opt.ADAGRAD, "adam": _opt.ADAM, "yogi": _opt.YOGI}
_I8 = np.dtype(np.int8)
_F16 = np.dtype(np.float16)


def server_step(
    base: NDArray[np.float32],
    acc: NDArray[np.float64],
    total_weight: float,
    server_lr: float,
    optimizer: str,
    m: NDArray[np.float64],
    v: NDArray[np.float64],
    *,
    b1: float,
    b2: float,
    eps: float,
) -> tuple[NDArray[np.float32], NDArray[np.float64], NDArray[np.float64]]:
    """A server optimizer step fused with finalize: ``(next weights, new m, new v)``.

    ``optimizer`` is one of :data:`OPTIMIZERS` (``sgd`` is :func:`finalize`); see
    ``fededge.native.optim`` for the update rules. ``m``/``v`` are read, never written: the new
    state is returned in fresh arrays (``v`` is returned unchanged in meaning for ``avgm``).
    """
    kind = OPTIMIZERS.get(optimizer)
    if kind is None:
        raise ValueError(f"optimizer: {optimizer!r} is not one of {sorted(OPTIMIZERS)}")
    _check_array("base", base, _F32, 1)
    for name, a in (("acc", acc), ("m", m), ("v", v)):
        _check_array(name, a, _F64, 1)
        _check_same_length(name, a, "base", base)
    tw = _check_scalar("total_weight", total_weight, allow_zero=False)
    lr = _check_scalar("server_lr", server_lr, allow_zero=False)
    e = _check_scalar("eps", eps, allow_zero=False)
    beta1 = _check_scalar("b1", b1, allow_zero=True)
    beta2 = _check_scalar("b2", b2, allow_zero=True)
    if beta1 >= 1.0 or beta2 >= 1.0:
        raise ValueError(f"b1, b2: must be < 1, got {beta1}, {beta2}")
    out = np.empty(base.shape[0], dtype=np.float32)
    m2 = np.empty_like(m)
    v2 = v.copy() if kind == _opt.AVGM else np.empty_like(v)
    _opt.server_step_into(out, m2, v2, base, acc, m, v, tw, lr, kind, beta1, beta2, e)
    return out, m2, v2


def _check_blocks(q: NDArray[Any], scales: NDArray[np.float32], block: int) -> None:
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise ValueError(f"block: must be an int >= 1, got {block!r}")
    need = -(-q.shape[0] // block)
    if scales.shape[0] != need:
        raise ValueError(
            f"scales: has {scales.shape[0]} entries, {q.shape[0]} values in blocks of {block} "
            f"need {need}"
        )


def dequant_accumulate_i8(
    acc: NDArray[np.float64],
    q: NDArray[np.int8],
    scales: NDArray[np.float32],
    block: int,
    weight: float,
) -> None:
    """Fold an int8-encoded update: ``acc += weight * scales[i // block] * q[i]`` (float64).

    Fused dequantise-accumulate: the int8 values are widened in registers, never copied to a
    float32 array. ``scales`` must be finite and >= 0 (checked).
    """
    _check_array("acc", acc, _F64, 1, writable=True)
    _check_array("q", q, _I8, 1)
    _check_array("scales", scales, _F32, 1)
    _check_same_length("q", q, "acc", acc)
    _check_blocks(q, scales, block)
    w = _check_scalar("weight", weight, allow_zero=True)
    _opt.dequant_accumulate_i8(acc, q, scales, block, w)


def dequant_accumulate_i8_group(
    acc: NDArray[np.float64],
    qs: Sequence[NDArray[np.int8]],
    scales: Sequence[NDArray[np.float32]],
    block: int,
    weights: Sequence[float] | NDArray[np.float64],
) -> None:
    """Fold k int8-encoded updates, 16 (then 8) per pass over ``acc`` (the rest one by one).


    Same arguments as :func:`dequant_accumulate_i8`, one per update. Each pass of 16 sums
    its terms per element in float32, then adds them to ``acc`` (see
    ``fededge.native.optim.fold16_i8``: within ~1e-6 of the float64 single folds, relative to
    the terms); a pass of 8 and the rest add float64 terms in order, bitwise as single folds.
    Deterministic: the same group gives the same bits (WAL replay folds the same groups).
    """
    _check_array("acc", acc, _F64, 1, writable=True)
    w = np.array(weights, dtype=np.float64)
    if w.ndim != 1 or w.shape[0] != len(qs) or len(scales) != len(qs):
        raise ValueError(f"weights/scales: need {len(qs)} of each")
    _check_weight_values(w)
    for i, (q, sc) in enumerate(zip(qs, scales, strict=True)):
        _check_array(f"qs[{i}]", q, _I8, 1)
        _check_array(f"scales[{i}]", sc, _F32, 1)
        _check_same_length(f"qs[{i}]", q, "acc", acc)
        _check_blocks(q, sc, block)
    views = []
    for q in qs:
        view = q.view()
        view.flags.writeable = False
        views.append(view)
    k, j = len(views), 0
    while j + 16 <= k:
        v = views[j : j + 16]
        sc16 = np.stack(scales[j : j + 16])
        _opt.fold16_i8(acc, *v, sc16, block, w[j : j + 16])  # type: ignore[call-arg,arg-type]
        j += 16
    if j + 8 <= k:
        a, b, c, d, e, f, g, h = views[j : j + 8]
        sc8 = np.stack(scales[j : j + 8])
        _opt.fold8_i8(acc, a, b, c, d, e, f, g, h, sc8, block, w[j : j + 8])
        j += 8
    for i in range(j, k):
        _opt.dequant_accumulate_i8(acc, views[i], scales[i], block, float(w[i]))


def dequant_accumulate_f16(acc: NDArray[np.float64], h: NDArray[np.float16], weight: float) -> None:
    """Fold a float16-encoded update: ``acc += weight * float64(h)``."""
    _check_array("acc", acc, _F64, 1, writable=True)
    _check_array("h", h, _F16, 1)
    _check_same_length("h", h, "acc", acc)
    w = _check_scalar("weight", weight, allow_zero=True)
    _opt.dequant_accumulate_f16(acc, h.view(np.uint16), _opt.HALF_TABLE, w)


def i8_norm(q: NDArray[np.int8], scales: NDArray[np.float32], block: int) -> float:
    """L2 norm of the decoded int8 values ``scales[i // block] * q[i]`` (float64 sums)."""
    _check_array("q", q, _I8, 1)
    _check_array("scales", scales, _F32, 1)
    _check_blocks(q, scales, block)
    return math.sqrt(float(_opt.sq_norm_i8(q, scales, block)))


def mean(acc: NDArray[np.float64], total_weight: float) -> NDArray[np.float64]:
    """Return the weighted mean of the folded updates, ``acc / total_weight``, as float64."""
    _check_array("acc", acc, _F64, 1)
    tw = _check_scalar("total_weight", total_weight, allow_zero=False)
    out = np.empty(acc.shape[0], dtype=np.float64)
    _acc.mean_into(out, acc, tw)
    return out


def l2_norm(x: NDArray[np.float32]) -> float:
    """L2 norm of a float32 vector, summed in float64.

    Returns ``nan`` if any element is NaN, otherwise ``inf`` if any element is +-inf, otherwise
    a finite value, so ``math.isfinite(l2_norm(x))`` is the one-pass finiteness check.
    """
    if type(x) is np.ndarray and x.dtype is _F32 and x.ndim == 1:
        # The aggregator's norm of every update: the compiled kernel for exactly this array
        # type, without Numba's dispatch (the checks of _check_array hold for it).
        flags = x.flags
        if flags.c_contiguous and flags.aligned and x.shape[0] < GIL_FREE_MIN:
            entry = _SMALL_NORM.get(flags.writeable)
            if entry is not None:
                return float(entry(x))
            norm = float(_norm.l2_norm_small(x))  # compiles it, if not yet
            _remember_small_norm()
            return norm
    _check_array("x", x, _F32, 1)
    if x.shape[0] < GIL_FREE_MIN:
        return float(_norm.l2_norm_small(x))
    return float(_norm.l2_norm(x))


# l2_norm_small's compiled entry points by writeability of the (C-contiguous, aligned, 1-D
# float32) array: what its dispatcher calls after typing the argument, so the same code.
_SMALL_NORM: dict[bool, Callable[[NDArray[np.float32]], float]] = {}


def _remember_small_norm() -> None:
    overloads = getattr(_norm.l2_norm_small, "overloads", None)  # None under NUMBA_DISABLE_JIT
    if overloads is None:
        return
    from numba import types

    for writeable in (True, False):
        sig = (types.Array(types.float32, 1, "C", readonly=not writeable, aligned=True),)
        compiled = overloads.get(sig)
        if compiled is not None:
            _SMALL_NORM[writeable] = compiled.entry_point


def all_finite(x: NDArray[np.float32]) -> bool:
    """True if no element of x is NaN or +-inf (one pass, via :func:`l2_norm`)."""
    return math.isfinite(l2_norm(x))


def clip_by_norm(x: NDArray[np.float32], max_norm: float) -> float:
    """Scale x in place so ``l2_norm(x) <= max_norm`` holds exactly; return the original norm.

    x within the bound is left untouched. ``max_norm`` must be finite and > 0. Raises
    ``ValueError`` (leaving x unchanged) if x holds NaN or +-inf, since no scale fixes that.
    """
    _check_array("x", x, _F32, 1, writable=True)
    bound = _check_scalar("max_norm", max_norm, allow_zero=False)
    norm = float(_norm.clip_by_norm_inplace(x, bound))
    if not math.isfinite(norm):
        raise ValueError(f"x: contains NaN or Inf (norm {norm}); it cannot be clipped")
    return norm


def warmup(*, parallel: bool = True) -> None:
    """Compile (or load from the Numba cache) every kernel for the array types services use.

    Read-only inputs get their own specialisation (``np.frombuffer`` over a received payload
    is read-only), so both are compiled. ``parallel=False`` skips the threaded kernel.
    """
    acc = np.zeros(9, dtype=np.float64)
    x = np.ones(9, dtype=np.float32)
    xs = np.ones((3, 9), dtype=np.float32)
    w = np.ones(3, dtype=np.float64)
    x_ro = x.copy()
    x_ro.flags.writeable = False
    xs_ro = xs.copy()
    xs_ro.flags.writeable = False
    acc_ro = acc.copy()
    acc_ro.flags.writeable = False
    for update, rows in ((x, xs), (x_ro, xs_ro)):
        accumulate(acc, update, 1.0)
        if parallel:
            accumulate(acc, update, 1.0, parallel=True)
        accumulate_many(acc, rows, w)
        l2_norm(update)  # also remembers l2_norm_small's entry point for this array type
        _norm.l2_norm(update)  # the GIL-free one, for long vectors
        finalize(update, acc, 1.0, 1.0)
        finalize(update, acc_ro, 1.0, 1.0)
    for k in range(1, 9):  # one specialisation per group size up to 8
        accumulate_group(acc, [x] * k, np.ones(k))
    mean(acc, 1.0)
    mean(acc_ro, 1.0)
    clip_by_norm(x, 1.0)
    m = np.zeros(9)
    for opt in OPTIMIZERS:
        server_step(x, acc, 1.0, 1.0, opt, m, m, b1=0.9, b2=0.99, eps=1e-3)
        server_step(x_ro, acc_ro, 1.0, 1.0, opt, m, m, b1=0.9, b2=0.99, eps=1e-3)
    q = np.ones(9, dtype=np.int8)
    sc = np.ones(3, dtype=np.float32)
    q_ro, sc_ro = q.copy(), sc.copy()
    q_ro.flags.writeable = sc_ro.flags.writeable = False
    for qq, ss in ((q, sc), (q_ro, sc_ro)):
        dequant_accumulate_i8(acc, qq, ss, 3, 1.0)
        dequant_accumulate_i8_group(acc, [qq] * 24, [ss] * 24, 3, np.ones(24))  # 16 + 8
        i8_norm(qq, ss, 3)
    h = np.ones(9, dtype=np.float16)
    h_ro = h.copy()
    h_ro.flags.writeable = False
    dequant_accumulate_f16(acc, h, 1.0)
    dequant_accumulate_f16(acc, h_ro, 1.0)
    y = np.ones(64)  # the rotation (fededge/aggregator/rotated.py)
    _had.apply_signs(y, np.ones(64, dtype=np.int8))
    _had.hadamard_blocks(y, np.zeros(1, dtype=np.int64), np.full(1, 64, dtype=np.int64))
