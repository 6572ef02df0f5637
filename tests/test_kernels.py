"""Each aggregation kernel against a plain numpy reference, plus the wrappers' argument checks.

Tolerances: accumulate, accumulate_many, finalize and mean perform the same IEEE float64
operations in the same order as their references (widen, multiply, add/divide, each rounded once;
no fastmath, so no FMA contraction), hence they are compared for exact equality. l2_norm sums
in an order chosen by the SIMD vectoriser; the reference is the correctly rounded sum (squares of
float32 are exact in float64, ``math.fsum`` is exact), and a recursive sum of d non-negative terms
is within (d - 1) * 2**-53 relative of it, so the norm is checked with rtol = d * 2**-53.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from numpy.typing import NDArray

from fededge.aggregator import kernels as K

SIZES = [0, 1, 7, 8, 9, 1000, 1001, 65537, 1 << 17]
WEIGHTS = [0.0, 5e-324, 1e-30, 1.0, 37.0, 1e15]
EPS64 = 2.0**-53


def rand32(d: int, seed: int = 0, scale: float = 1.0) -> NDArray[np.float32]:
    return (np.random.default_rng(seed).standard_normal(d) * scale).astype(np.float32)


def ref_norm(x: NDArray[np.float32]) -> float:
    """Correctly rounded sum of exact float64 squares, then sqrt."""
    x64 = x.astype(np.float64)
    return math.sqrt(math.fsum((x64 * x64).tolist()))


# --- accumulate -------------------------------------------------------------------------


@pytest.mark.parametrize("d", SIZES)
@pytest.mark.parametrize("w", WEIGHTS)
def test_accumulate_matches_numpy(d: int, w: float) -> None:
    acc = np.random.default_rng(1).standard_normal(d)
    x = rand32(d)
    expected = acc + w * x.astype(np.float64)
    K.accumulate(acc, x, w)
    np.testing.assert_array_equal(acc, expected)


@pytest.mark.parametrize("d", [0, 1, 7, 1001, 1 << 17])
def test_parallel_is_bitwise_serial(d: int) -> None:
    x = rand32(d, seed=3)
    a = np.random.default_rng(4).standard_normal(d)
    b = a.copy()
    K.accumulate(a, x, 0.375)
    K.accumulate(b, x, 0.375, parallel=True)
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("k", range(1, 10))
@pytest.mark.parametrize("d", [0, 1, 7, 1000, 65537])
def test_accumulate_many_matches_numpy_and_serial(k: int, d: int) -> None:
    rng = np.random.default_rng(k * 1000 + d)
    xs = rng.standard_normal((k, d)).astype(np.float32)
    w = rng.uniform(0.0, 50.0, k)
    w[0] = 0.0
    acc0 = rng.standard_normal(d)
    expected = acc0.copy()
    for j in range(k):  # the reference folds rows one by one, in order
        expected = expected + w[j] * xs[j].astype(np.float64)
    serial = acc0.copy()
    for j in range(k):
        K.accumulate(serial, xs[j], float(w[j]))
    acc = acc0.copy()
    K.accumulate_many(acc, xs, w)
    np.testing.assert_array_equal(acc, expected)
    np.testing.assert_array_equal(acc, serial)


# Every group size up to 8 is one pass of its own specialisation; past 8, passes of 8 and a rest.
@pytest.mark.parametrize("k", [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 13, 15, 17])
def test_accumulate_group_matches_serial(k: int) -> None:
    d = 1001
    rng = np.random.default_rng(k)
    # Separate buffers of mixed kinds: writable arrays and read-only payload views.
    xs = [rng.standard_normal(d).astype(np.float32) for _ in range(k)]
    xs = [np.frombuffer(x.tobytes(), np.float32) if i % 2 else x for i, x in enumerate(xs)]
    w = [float(v) for v in rng.uniform(0.0, 9.0, k)]
    expected = np.random.default_rng(99).standard_normal(d)
    acc = expected.copy()
    for x, wi in zip(xs, w, strict=True):
        K.accumulate(expected, x, wi)
    K.accumulate_group(acc, xs, w)
    np.testing.assert_array_equal(acc, expected)
    assert all(x.flags.writeable for i, x in enumerate(xs) if i % 2 == 0)  # inputs untouched


def test_accumulate_many_with_no_rows_is_a_no_op() -> None:
    acc = np.arange(5.0)
    K.accumulate_many(acc, np.empty((0, 5), np.float32), np.empty(0))
    np.testing.assert_array_equal(acc, np.arange(5.0))


def test_slices_of_a_flat_accumulator() -> None:
    # The aggregator keeps one flat float64 buffer and folds each tensor into its slice.
    flat = np.zeros(30)
    a, b = flat[3:10], flat[10:27]
    K.accumulate(a, np.ones(7, np.float32), 2.0)
    K.accumulate_many(b, np.ones((3, 17), np.float32), np.array([1.0, 2.0, 3.0]))
    np.testing.assert_array_equal(flat[:3], 0.0)
    np.testing.assert_array_equal(flat[3:10], 2.0)
    np.testing.assert_array_equal(flat[10:27], 6.0)
    np.testing.assert_array_equal(flat[27:], 0.0)
    out = K.finalize(np.zeros(17, np.float32), flat[10:27], 3.0, 0.5)
    np.testing.assert_array_equal(out, np.float32(1.0))
    rows = np.ones((4, 17), np.float32)[1:3]  # a C-contiguous block of rows
    K.accumulate_many(b, rows, np.array([1.0, 1.0]))
    np.testing.assert_array_equal(flat[10:27], 8.0)


def test_read_only_updates_are_accepted() -> None:
    # np.frombuffer over a received payload is read-only.
    x = np.frombuffer(np.arange(6, dtype=np.float32).tobytes(), dtype=np.float32)
    xs = np.frombuffer(np.ones(12, np.float32).tobytes(), dtype=np.float32).reshape(2, 6)
    acc = np.zeros(6)
    K.accumulate(acc, x, 1.0)
    K.accumulate_many(acc, xs, np.array([1.0, 1.0]))
    np.testing.assert_array_equal(acc, np.arange(6.0) + 2.0)
    assert K.l2_norm(x) == pytest.approx(math.sqrt(55.0), rel=1e-15)


@settings(max_examples=60, deadline=None)
@given(
    data=st.data(),
    k=st.integers(1, 12),
    d=st.integers(0, 40),
)
def test_accumulate_many_equals_sequential_folds(data: st.DataObject, k: int, d: int) -> None:
    """Batching never changes the result: any split of the updates gives the same bits."""
    xs = data.draw(
        hnp.arrays(np.float32, (k, d), elements=st.floats(-1e6, 1e6, width=32)), label="xs"
    )
    w = data.draw(hnp.arrays(np.float64, k, elements=st.floats(0.0, 1e6)), label="w")
    split = data.draw(st.integers(0, k), label="split")
    one = np.zeros(d)
    K.accumulate_many(one, xs, w)
    two = np.zeros(d)
    K.accumulate_many(two, np.ascontiguousarray(xs[:split]), np.ascontiguousarray(w[:split]))
    for j in range(split, k):
        K.accumulate(two, xs[j], float(w[j]))
    np.testing.assert_array_equal(one, two)


# --- finalize and mean --------------------------------------------------------------------


@pytest.mark.parametrize("d", SIZES)
@pytest.mark.parametrize(("tw", "lr"), [(1.0, 1.0), (3.0, 0.5), (1e-300, 1e-10), (1e12, 2.0)])
def test_finalize_matches_numpy(d: int, tw: float, lr: float) -> None:
    base = rand32(d, seed=5)
    acc = np.random.default_rng(6).standard_normal(d) * tw
    expected = (base.astype(np.float64) + lr * acc / tw).astype(np.float32)
    out = K.finalize(base, acc, tw, lr)
    assert out.dtype == np.float32 and out.shape == (d,)
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("d", SIZES)
def test_mean_matches_numpy(d: int) -> None:
    acc = np.random.default_rng(7).standard_normal(d) * 1e3
    out = K.mean(acc, 7.0)
    assert out.dtype == np.float64
    np.testing.assert_array_equal(out, acc / 7.0)


def test_weighted_average_end_to_end() -> None:
    base = np.array([1.0, -2.0, 0.5], np.float32)
    deltas = np.array([[1, 2, 3], [3, 2, 1]], np.float32)
    weights = np.array([10.0, 30.0])
    acc = np.zeros(3)
    K.accumulate_many(acc, deltas, weights)
    # mean delta = (10*[1,2,3] + 30*[3,2,1]) / 40 = [2.5, 2, 1.5]
    np.testing.assert_array_equal(K.mean(acc, 40.0), [2.5, 2.0, 1.5])
    np.testing.assert_array_equal(K.finalize(base, acc, 40.0, 1.0), [3.5, 0.0, 2.0])


# --- l2 norm ------------------------------------------------------------------------------


@pytest.mark.parametrize("d", SIZES)
@pytest.mark.parametrize("scale", [1e-30, 1.0, 1e30])
def test_l2_norm_matches_reference(d: int, scale: float) -> None:
    x = rand32(d, seed=d, scale=scale)
    assert K.l2_norm(x) == pytest.approx(ref_norm(x), rel=max(d, 1) * EPS64, abs=0.0)


def test_l2_norm_of_float32_extremes_does_not_overflow() -> None:
    big = np.full(1000, np.finfo(np.float32).max, np.float32)
    n = K.l2_norm(big)
    assert math.isfinite(n)
    assert n == pytest.approx(float(np.finfo(np.float32).max) * math.sqrt(1000), rel=1e-13)
    tiny = np.full(9, np.finfo(np.float32).smallest_subnormal, np.float32)
    assert K.l2_norm(tiny) == pytest.approx(3 * float(tiny[0]), rel=1e-15)


@pytest.mark.parametrize("d", [1, 7, 1001, 1 << 17])
@pytest.mark.parametrize(
    ("values", "expected"),
    [([np.nan], "nan"), ([np.inf], "inf"), ([-np.inf], "inf"), ([np.inf, np.nan], "nan")],
)
def test_l2_norm_reports_non_finite(d: int, values: list[float], expected: str) -> None:
    rng = np.random.default_rng(d)
    x = rand32(d, seed=2)
    for pos, v in zip(
        rng.choice(d, size=len(values), replace=d < len(values)), values, strict=True
    ):
        x[pos] = v
    n = K.l2_norm(x)
    if expected == "nan":
        assert math.isnan(n)
    else:
        assert n == math.inf
    assert not K.all_finite(x)


def test_all_finite_on_finite_input() -> None:
    assert K.all_finite(rand32(1001))
    assert K.all_finite(np.empty(0, np.float32))


# --- clip by norm -------------------------------------------------------------------------


@pytest.mark.parametrize("d", [1, 7, 1000, 1 << 17])
@pytest.mark.parametrize("max_norm", [1e-3, 1.0, 10.0, 1e6])
def test_clip_by_norm_matches_reference(d: int, max_norm: float) -> None:
    x = rand32(d, seed=11, scale=3.0)
    original = x.copy()
    norm = K.clip_by_norm(x, max_norm)
    assert norm == K.l2_norm(original)
    if norm <= max_norm:
        np.testing.assert_array_equal(x, original)
    else:
        assert K.l2_norm(x) <= max_norm
        # float32 rounding of each element (2**-24) plus at most a 2**-22 extra shrink.
        expected = original.astype(np.float64) * (max_norm / norm)
        np.testing.assert_allclose(x, expected, rtol=1e-6, atol=0.0)


def test_clip_of_zero_vector_and_empty() -> None:
    z = np.zeros(5, np.float32)
    assert K.clip_by_norm(z, 1.0) == 0.0
    np.testing.assert_array_equal(z, 0.0)
    assert K.clip_by_norm(np.empty(0, np.float32), 1.0) == 0.0


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_clip_rejects_non_finite_and_leaves_input(bad: float) -> None:
    x = rand32(100)
    x[42] = bad
    original = x.copy()
    with pytest.raises(ValueError, match=r"x: contains NaN or Inf"):
        K.clip_by_norm(x, 1.0)
    np.testing.assert_array_equal(x, original)


@settings(max_examples=200, deadline=None)
@given(
    x=hnp.arrays(
        np.float32,
        st.integers(1, 64),
        elements=st.floats(width=32, allow_nan=False, allow_infinity=False),
    ),
    max_norm=st.floats(1e-30, 1e30),
)
def test_clip_bound_holds_exactly(x: NDArray[np.float32], max_norm: float) -> None:
    """After clipping, the norm the aggregator will measure never exceeds the bound."""
    original = x.copy()
    norm = K.clip_by_norm(x, max_norm)
    assert norm == K.l2_norm(original)
    assert K.l2_norm(x) <= max_norm
    if norm <= max_norm:
        np.testing.assert_array_equal(x, original)
    else:
        # Scaling never flips a sign, and never grows an element.
        assert np.all(np.abs(x) <= np.abs(original))
        assert np.all((x == 0) | (np.sign(x) == np.sign(original)))


# --- argument checks ----------------------------------------------------------------------


# These return Any on purpose: they feed deliberately mistyped calls that mypy would refuse.
def f32(d: int = 4) -> Any:
    return np.ones(d, np.float32)


def f64(d: int = 4) -> Any:
    return np.zeros(d, np.float64)


def as_any(v: object) -> Any:
    return v


def read_only(a: Any) -> Any:
    a.flags.writeable = False
    return a


BAD_CALLS = [
    ("acc float32", lambda: K.accumulate(f32(), f32(), 1.0), r"acc: dtype is <f4"),
    ("update float64", lambda: K.accumulate(f64(), f64(), 1.0), r"update: dtype is <f8"),
    (
        "update big-endian",
        lambda: K.accumulate(f64(), f32().astype(">f4"), 1.0),
        r"update: dtype is >f4",
    ),
    (
        "update list",
        lambda: K.accumulate(f64(), as_any([1.0] * 4), 1.0),
        r"update: expected a numpy",
    ),
    ("update 2-D", lambda: K.accumulate(f64(), np.ones((2, 2), np.float32), 1.0), r"update: has 2"),
    ("update strided", lambda: K.accumulate(f64(), f32(8)[::2], 1.0), r"update: not C-contig"),
    ("acc strided", lambda: K.accumulate(f64(8)[::2], f32(), 1.0), r"acc: not C-contiguous"),
    ("length mismatch", lambda: K.accumulate(f64(5), f32(4), 1.0), r"update: length 4 .* acc"),
    ("acc read-only", lambda: K.accumulate(read_only(f64()), f32(), 1.0), r"acc: .*read-only"),
    ("weight nan", lambda: K.accumulate(f64(), f32(), math.nan), r"weight: must be finite"),
    ("weight inf", lambda: K.accumulate(f64(), f32(), math.inf), r"weight: must be finite"),
    ("weight negative", lambda: K.accumulate(f64(), f32(), -1.0), r"weight: must be >= 0"),
    ("weight bool", lambda: K.accumulate(f64(), f32(), True), r"weight: expected a real"),
    ("weight str", lambda: K.accumulate(f64(), f32(), as_any("1")), r"weight: expected a real"),
    (
        "rows 1-D",
        lambda: K.accumulate_many(f64(), f32(), np.ones(1)),
        r"updates: has 1 dimensions",
    ),
    (
        "rows transposed",
        lambda: K.accumulate_many(f64(2), np.ones((2, 3), np.float32).T, np.ones(3)),
        r"updates: not C-contiguous",
    ),
    (
        "rows length",
        lambda: K.accumulate_many(f64(5), np.ones((2, 4), np.float32), np.ones(2)),
        r"updates: length 4",
    ),
    (
        "weights count",
        lambda: K.accumulate_many(f64(), np.ones((2, 4), np.float32), np.ones(3)),
        r"weights: has 3 entries but updates has 2 rows",
    ),
    (
        "weights float32",
        lambda: K.accumulate_many(f64(), np.ones((2, 4), np.float32), np.ones(2, np.float32)),
        r"weights: dtype is <f4",
    ),
    (
        "weights nan",
        lambda: K.accumulate_many(f64(), np.ones((2, 4), np.float32), np.array([1.0, np.nan])),
        r"weights\[1\]: must be finite and >= 0, got nan",
    ),
    (
        "weights negative",
        lambda: K.accumulate_many(f64(), np.ones((2, 4), np.float32), np.array([-1.0, 1.0])),
        r"weights\[0\]: must be finite and >= 0",
    ),
    (
        "group length",
        lambda: K.accumulate_group(f64(), [f32(), f32(5)], [1.0, 1.0]),
        r"updates\[1\]: length 5",
    ),
    (
        "group dtype",
        lambda: K.accumulate_group(f64(), [f32(), f64()], [1.0, 1.0]),
        r"updates\[1\]: dtype is <f8",
    ),
    (
        "group weights count",
        lambda: K.accumulate_group(f64(), [f32()], [1.0, 1.0]),
        r"weights: has shape \(2,\) but there are 1 updates",
    ),
    (
        "group weights text",
        lambda: K.accumulate_group(f64(), [f32()], as_any(["x"])),
        r"weights: not a sequence of real numbers",
    ),
    (
        "group weights inf",
        lambda: K.accumulate_group(f64(), [f32()], [math.inf]),
        r"weights\[0\]: must be finite and >= 0, got inf",
    ),
    ("finalize shapes", lambda: K.finalize(f32(3), f64(4), 1.0, 1.0), r"acc: length 4 .* base"),
    ("finalize base f64", lambda: K.finalize(f64(), f64(), 1.0, 1.0), r"base: dtype is <f8"),
    ("finalize tw zero", lambda: K.finalize(f32(), f64(), 0.0, 1.0), r"total_weight: must be > 0"),
    ("finalize lr nan", lambda: K.finalize(f32(), f64(), 1.0, math.nan), r"server_lr: must be fin"),
    ("finalize lr neg", lambda: K.finalize(f32(), f64(), 1.0, -0.1), r"server_lr: must be > 0"),
    ("mean tw inf", lambda: K.mean(f64(), math.inf), r"total_weight: must be finite"),
    ("mean acc f32", lambda: K.mean(f32(), 1.0), r"acc: dtype is <f4"),
    ("norm f64", lambda: K.l2_norm(f64()), r"x: dtype is <f8"),
    ("norm strided", lambda: K.l2_norm(f32(8)[::2]), r"x: not C-contiguous"),
    ("clip zero bound", lambda: K.clip_by_norm(f32(), 0.0), r"max_norm: must be > 0"),
    ("clip read-only", lambda: K.clip_by_norm(read_only(f32()), 1.0), r"x: .*read-only"),
]


@pytest.mark.parametrize(
    ("call", "message"), [c[1:] for c in BAD_CALLS], ids=[c[0] for c in BAD_CALLS]
)
def test_bad_arguments_raise_clear_value_errors(call: object, message: str) -> None:
    assert callable(call)
    with pytest.raises(ValueError, match=message):
        call()


def test_rejected_call_leaves_accumulator_untouched() -> None:
    acc = np.arange(4.0)
    with pytest.raises(ValueError):
        K.accumulate(acc, f32(), math.nan)
    with pytest.raises(ValueError):
        K.accumulate_many(acc, np.ones((2, 4), np.float32), np.array([1.0, -1.0]))
    np.testing.assert_array_equal(acc, np.arange(4.0))


def test_warmup_compiles_everything() -> None:
    from numba.core.dispatcher import Dispatcher

    from fededge.native import accumulate as native_acc
    from fededge.native import norm as native_norm

    K.warmup()
    kernels = [
        f for m in (native_acc, native_norm) for f in vars(m).values() if isinstance(f, Dispatcher)
    ]
    assert kernels, "no Numba kernels found (NUMBA_DISABLE_JIT?)"
    cold = [f.py_func.__name__ for f in kernels if not f.signatures]
    assert not cold, f"warmup() left these kernels uncompiled: {cold}"


@pytest.mark.parametrize("d", [0, 1, 7, 2410, 100_003])
def test_the_gil_holding_norm_equals_the_gil_free_one(d: int) -> None:
    from fededge.native import norm

    x = np.random.default_rng(d).standard_normal(d).astype(np.float32)
    assert norm.l2_norm_small(x) == norm.l2_norm(x)  # same loop and flags: bit for bit


def _unaligned(d: int) -> NDArray[np.float32]:
    buf = bytearray(4 * d + 1)
    x = np.frombuffer(buf, np.float32, d, 1)
    x[:] = rand32(d, seed=5)
    return x


@pytest.mark.parametrize("d", [0, 1, 7, 2410, (1 << 18) - 1, 1 << 18])
def test_l2_norm_without_dispatch_is_the_dispatched_kernel(d: int, monkeypatch) -> None:
    # l2_norm calls l2_norm_small's compiled entry point for the array types the aggregator
    # sees (C-contiguous, aligned, 1-D float32, read-only or not): the same machine code
    # as through Numba's dispatcher, so the same bits, NaN and inf included.
    from fededge.native import norm

    K.warmup(parallel=False)
    assert set(K._SMALL_NORM) == {True, False}
    x = rand32(d, seed=d, scale=1e3)
    if d:
        x[d // 2] = np.float32(3e38)
    cases = [x, np.frombuffer(x.tobytes(), np.float32), x[: d // 2]]
    if d > 3:
        for bad in (np.nan, np.inf, -np.inf):
            y = x.copy()
            y[3] = bad
            cases += [y, np.frombuffer(y.tobytes(), np.float32)]
    dispatched = norm.l2_norm_small if d < K.GIL_FREE_MIN else norm.l2_norm
    want = [float(dispatched(c)).hex() for c in cases]

    def no_dispatch(_x: object) -> float:
        raise AssertionError("dispatched")

    monkeypatch.setattr(norm, "l2_norm_small", no_dispatch)
    if d < K.GIL_FREE_MIN:  # these no longer reach the dispatcher
        assert [K.l2_norm(c).hex() for c in cases] == want
    else:
        assert [K.l2_norm(c).hex() for c in cases[:1]] == want[:1]
    monkeypatch.undo()
    # Anything else goes the checked way: the dispatcher (a type of its own) or the error.
    odd = _unaligned(d)
    assert not odd.flags.aligned or d == 0
    assert K.l2_norm(odd).hex() == float(dispatched(odd)).hex()
    assert K.l2_norm(odd).hex() == K.l2_norm(odd.copy()).hex()

    class Sub(np.ndarray):
        pass

    assert K.l2_norm(x.view(Sub)).hex() == want[0]
    with pytest.raises(ValueError, match="dtype is >f4"):
        K.l2_norm(x.astype(">f4"))
    if d > 1:
        with pytest.raises(ValueError, match="not C-contiguous"):
            K.l2_norm(np.repeat(x, 2)[::2])
    with pytest.raises(ValueError, match="has 2 dimensions"):
        K.l2_norm(x.reshape(1, -1))
