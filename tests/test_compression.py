"""Compressed updates (issue 13): the fused dequantise-accumulate kernels."""

from __future__ import annotations

import numpy as np
import pytest

from fededge.aggregator import kernels


def _i8(rng: np.random.Generator, d: int) -> np.ndarray:
    return rng.integers(-127, 128, size=d, dtype=np.int8)


@pytest.mark.parametrize(("d", "block"), [(1000, 1000), (1000, 7), (4097, 256), (1, 1)])
def test_int8_fold_matches_numpy_and_groups_equal_single_folds(d: int, block: int) -> None:
    rng = np.random.default_rng(d + block)
    k = 19  # 2 passes of 8, then 3 one by one
    qs = [_i8(rng, d) for _ in range(k)]
    scales = [rng.random(-(-d // block), dtype=np.float32) for _ in range(k)]
    w = rng.random(k) * 10
    group = np.zeros(d)
    kernels.dequant_accumulate_i8_group(group, qs, scales, block, w)
    single = np.zeros(d)
    for q, s, wj in zip(qs, scales, w, strict=True):
        kernels.dequant_accumulate_i8(single, q, s, block, float(wj))
    np.testing.assert_array_equal(group, single)
    ref = sum(
        wj * np.repeat(s.astype(np.float64), block)[:d] * q
        for q, s, wj in zip(qs, scales, w, strict=True)
    )
    np.testing.assert_allclose(group, ref, rtol=1e-12, atol=1e-12)


def test_int8_norm_is_the_norm_of_the_decoded_values() -> None:
    rng = np.random.default_rng(3)
    q = _i8(rng, 1001)
    s = rng.random(4, dtype=np.float32)
    decoded = np.repeat(s.astype(np.float64), 256)[:1001] * q
    assert kernels.i8_norm(q, s, 256) == pytest.approx(float(np.linalg.norm(decoded)), rel=1e-12)


def test_f16_fold_is_exact_widening() -> None:
    rng = np.random.default_rng(4)
    h = rng.normal(size=777).astype(np.float16)
    acc = np.ones(777)
    kernels.dequant_accumulate_f16(acc, h, 2.5)
    np.testing.assert_array_equal(acc, 1.0 + 2.5 * h.astype(np.float64))


def test_bad_arguments_are_refused_with_the_argument_named() -> None:
    acc = np.zeros(10)
    q = np.zeros(10, np.int8)
    with pytest.raises(ValueError, match="scales: has 1 entries"):
        kernels.dequant_accumulate_i8(acc, q, np.ones(1, np.float32), 3, 1.0)
    with pytest.raises(ValueError, match="block"):
        kernels.dequant_accumulate_i8(acc, q, np.ones(1, np.float32), 0, 1.0)
    with pytest.raises(ValueError, match="q: dtype"):
        kernels.dequant_accumulate_i8(acc, q.astype(np.uint8), np.ones(1, np.float32), 10, 1.0)
    with pytest.raises(ValueError, match="weight"):
        kernels.dequant_accumulate_i8(acc, q, np.ones(1, np.float32), 10, -1.0)
