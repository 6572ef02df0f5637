"""Fixed-point kernels of secure aggregation against plain numpy references, and the encoding."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fededge.errors import ConfigError
from fededge.secagg import quantize as q
from fededge.secagg.quantize import FixedPoint, max_scale, mean_error_bound

SIZES = [0, 1, 7, 1000, 65_536 + 3]
BITS = [8, 16, 31, 32]


# --------------------------------------------------------------------------- naive references
def ref_hash32(x: int) -> int:
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def ref_quantize(x: np.ndarray, factor: float, key: int, start: int, bits: int) -> np.ndarray:
    out = []
    for i, v in enumerate(x.tolist()):
        c = (i + start + (key & 0xFFFFFFFF)) & 0xFFFFFFFF
        u = ref_hash32(ref_hash32(c) ^ (key >> 32)) / 2**32
        r = min(max(float(v) * factor + u, -(2.0**31)), 2.0**31 - 1)
        out.append(math.floor(r) % (1 << bits))
    return np.array(out, dtype=np.uint32)


def ref_dequantize(acc: np.ndarray, bits: int, scale: float) -> np.ndarray:
    v = [a - (1 << bits) if a >= 1 << (bits - 1) else a for a in acc.tolist()]
    return np.array(v, dtype=np.float64) * (1.0 / scale)


@pytest.fixture(params=["numba", "numpy"])
def impl(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run each test with the Numba kernels and with the numpy fallback of Numba-less devices."""
    if request.param == "numpy":
        monkeypatch.setattr(q, "_kernels", None)
        monkeypatch.setattr(q, "_tried", True)  # and warmup() must not load them
    else:
        assert q.load_kernels()
    return str(request.param)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_quantize_matches_reference(impl: str, n: int, bits: int, dtype: type) -> None:
    rng = np.random.default_rng(n + bits)
    x: np.ndarray = (rng.standard_normal(n) * 3).astype(dtype)
    x[: min(n, 3)] = [0.0, -0.5, 2.5][: min(n, 3)]
    key, start = 0xDEADBEEF_12345678, 4_294_967_290  # the counter wraps inside the vector
    out = np.empty(n, dtype=np.uint32)
    q.quantize_into(x, 37.25, key, start, bits, out)
    ref_n = min(n, 500)  # the pure-Python reference is slow; the rest is checked numba vs numpy
    np.testing.assert_array_equal(out[:ref_n], ref_quantize(x[:ref_n], 37.25, key, start, bits))


def test_quantize_numba_equals_numpy_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    assert q.load_kernels()
    x = np.random.default_rng(0).standard_normal(200_003).astype(np.float32)
    a, b = np.empty(x.shape, np.uint32), np.empty(x.shape, np.uint32)
    q.quantize_into(x, 1e6, 99, 5, 32, a)
    monkeypatch.setattr(q, "_kernels", None)
    q.quantize_into(x, 1e6, 99, 5, 32, b)
    np.testing.assert_array_equal(a, b)


def test_quantize_saturates_at_int32() -> None:
    x = np.array([1e300, -1e300, 3e9], dtype=np.float64)
    out = np.empty(3, dtype=np.uint32)
    q.quantize_into(x, 1.0, 1, 0, 32, out)
    assert out.tolist() == [2**31 - 1, 2**31, 2**31 - 1]


def test_stochastic_rounding_is_unbiased(impl: str) -> None:
    # 0.3 rounds up with probability 0.3: the mean of 200k draws is within 5 sigma of it.
    n = 200_000
    out = np.empty(n, dtype=np.uint32)
    q.quantize_into(np.full(n, 0.3), 1.0, 12345, 0, 32, out)
    assert set(np.unique(out).tolist()) == {0, 1}
    assert abs(out.mean() - 0.3) < 5 * math.sqrt(0.21 / n)
    decoded = np.empty(n)
    q.quantize_into(np.full(n, -2.7), 1.0, 777, 0, 32, out)
    q.dequantize_into(out, 32, 1.0, decoded)
    assert set(np.unique(decoded).tolist()) == {-3.0, -2.0}
    assert abs(decoded.mean() + 2.7) < 5 * math.sqrt(0.21 / n)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("bits", BITS)
def test_dequantize_matches_reference(impl: str, n: int, bits: int) -> None:
    acc = np.random.default_rng(n).integers(0, 1 << bits, n, dtype=np.uint64).astype(np.uint32)
    if n >= 2:
        acc[:2] = [(1 << (bits - 1)) - 1, 1 << (bits - 1)]  # the two ends of the signed range
    out = np.empty(n)
    q.dequantize_into(acc, bits, 3.0, out)
    np.testing.assert_array_equal(out, ref_dequantize(acc, bits, 3.0))


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("bits", BITS)
def test_add_sub_mod_match_reference(impl: str, n: int, bits: int) -> None:
    rng = np.random.default_rng(n * bits)
    acc = rng.integers(0, 1 << bits, n, dtype=np.uint64).astype(np.uint32)
    x = rng.integers(0, 1 << 32, n, dtype=np.uint64).astype(np.uint32)  # masks are full words
    start = acc.copy()
    q.add_mod(acc, x, bits)
    expected = (start.astype(np.uint64) + x) % (1 << bits)
    np.testing.assert_array_equal(acc, expected.astype(np.uint32))
    q.sub_mod(acc, x, bits)
    np.testing.assert_array_equal(acc, start)


def test_warmup_runs_every_kernel(impl: str) -> None:
    q.warmup()
    assert q.has_kernels() == (impl == "numba")


def test_sum_squares(impl: str) -> None:
    x = np.arange(10, dtype=np.float32)
    assert q.sum_squares(x) == 285.0
    assert math.isnan(q.sum_squares(np.array([1.0, np.nan])))
    assert math.isinf(q.sum_squares(np.array([1.0, np.inf], dtype=np.float32)))


@pytest.mark.parametrize(
    ("acc", "message"),
    [
        (np.zeros(4, dtype=np.int32), "dtype"),
        (np.zeros((2, 2), dtype=np.uint32), "1-D"),
        (np.zeros(8, dtype=np.uint32)[::2], "C-contiguous"),
        ([0, 1, 2, 3], "numpy array"),
    ],
)
def test_wrappers_reject_bad_arrays(acc: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        q.add_mod(acc, np.zeros(4, dtype=np.uint32), 32)  # type: ignore[arg-type]


def test_wrappers_reject_mismatch_readonly_and_bits() -> None:
    acc, x = np.zeros(4, dtype=np.uint32), np.zeros(5, dtype=np.uint32)
    with pytest.raises(ValueError, match="shape"):
        q.sub_mod(acc, x, 32)
    ro = np.zeros(4, dtype=np.uint32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="writeable"):
        q.add_mod(ro, acc, 32)
    with pytest.raises(ValueError, match="bits"):
        q.add_mod(acc, acc, 33)
    with pytest.raises(ValueError, match="factor"):
        q.quantize_into(np.zeros(4), math.nan, 0, 0, 32, acc)
    with pytest.raises(ValueError, match="scale"):
        q.dequantize_into(acc, 32, 0.0, np.zeros(4))


# ------------------------------------------------------------------------------ the encoding
@pytest.mark.parametrize("bits", [16, 24, 32])
@pytest.mark.parametrize("n", [1, 20, 1000])
def test_worst_case_sum_does_not_wrap(bits: int, n: int) -> None:
    """n updates with every coordinate at +-C and full weight decode exactly, never wrapping."""
    clip = 2.0
    # Every parametrised (bits, n) fits; a new one that does not must fail loudly, not skip.
    assert n * 2 * clip + 2 * n < 2 ** (bits - 1), "parameters outside the no-wrap regime"
    fp = FixedPoint(bits, clip, max_scale(n, clip, bits), max_weight=10.0)
    for sign in (1.0, -1.0):
        delta = np.full(1, sign * clip, dtype=np.float64)  # one coordinate: its norm is C
        acc = np.zeros(2, dtype=np.uint32)
        for i in range(n):
            q.add_mod(acc, fp.encode(delta, 10.0, key=i), bits)
        total, weight = fp.decode(acc)
        assert weight == pytest.approx(10.0 * n, abs=10.0 * n / fp.scale)
        assert total[0] == pytest.approx(sign * clip * 10.0 * n, abs=10.0 * n / fp.scale)


def test_max_scale_refuses_impossible() -> None:
    with pytest.raises(ConfigError):
        max_scale(1000, 1e6, 16)
    assert q.no_wrap(100, 1.0, max_scale(100, 1.0, 32), 32)
    assert not q.no_wrap(100, 1.0, max_scale(100, 1.0, 32) + 1, 32)


def test_encode_clips_weights_and_rejects_bad_input() -> None:
    fp = FixedPoint(32, 1.0, 1e6, max_weight=50.0)
    delta = np.array([3.0, 4.0], dtype=np.float32)  # norm 5, clipped to 1
    enc = fp.encode(delta, 500.0, key=1)  # weight capped at 50
    values, weight = fp.decode(enc)
    assert weight == pytest.approx(50.0, abs=1e-4)
    np.testing.assert_allclose(values, [0.6 * 50, 0.8 * 50], atol=1e-4)
    with pytest.raises(ValueError, match="NaN"):
        fp.encode(np.array([np.nan], dtype=np.float32), 1.0, key=1)
    with pytest.raises(ValueError, match="weight"):
        fp.encode(delta, -1.0, key=1)
    with pytest.raises(ConfigError):
        FixedPoint(32, -1.0, 1.0, 1.0)


def test_mean_error_bound_holds() -> None:
    """The decoded weighted mean of n encodings stays within the documented bound."""
    rng = np.random.default_rng(3)
    n, d, clip, bits = 50, 2000, 1.0, 32
    fp = FixedPoint(bits, clip, max_scale(n, clip, bits), max_weight=100.0)
    acc = np.zeros(d + 1, dtype=np.uint32)
    num, den = np.zeros(d), 0.0
    for i in range(n):
        delta = rng.standard_normal(d).astype(np.float32) * 0.1
        w = float(rng.integers(1, 100))
        q.add_mod(acc, fp.encode(delta, w, key=i), bits)
        x = delta.astype(np.float64)
        num += w * x * min(1.0, clip / float(np.linalg.norm(x)))
        den += w
    total, weight = fp.decode(acc)
    bound = mean_error_bound(n, clip, fp.scale, den / fp.max_weight)
    assert np.abs(total / weight - num / den).max() <= bound
    assert mean_error_bound(n, clip, fp.scale, 0.0) == math.inf
