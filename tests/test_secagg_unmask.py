"""The fused, chunked, threaded mask removal equals the plain one word for word."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fededge.errors import SecAggError
from fededge.secagg import crypto, unmask
from fededge.secagg.graph import Stage
from fededge.testing.secagg import Simulation, make_config


@pytest.fixture(autouse=True, scope="module")
def _small_thread_ranges() -> Iterator[None]:
    # Threads take ranges of a few words here, so every test exercises streams opened mid-way.
    saved, unmask.MIN_THREAD_WORDS = unmask.MIN_THREAD_WORDS, 4
    yield
    unmask.MIN_THREAD_WORDS = saved


def _terms(rng: np.random.Generator, count: int) -> list[unmask.MaskTerm]:
    return [(rng.bytes(32), int(rng.choice([-1, 1]))) for _ in range(count)]


def _both(
    acc: np.ndarray, terms: list[unmask.MaskTerm], bits: int, **kwargs: int
) -> tuple[np.ndarray, np.ndarray]:
    fused, plain = acc.copy(), acc.copy()
    unmask.apply_masks(fused, terms, bits, **kwargs)
    unmask.apply_masks_reference(plain, terms, bits)
    return fused, plain


@pytest.mark.parametrize("bits", [32, 24, 8])
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("n_words", [1, 5, 8192 * 3 + 7, 100_001])
def test_fused_equals_reference(bits: int, threads: int, n_words: int) -> None:
    rng = np.random.default_rng([bits, threads, n_words])
    acc = rng.integers(0, 1 << bits, n_words, dtype=np.uint32)
    fused, plain = _both(acc, _terms(rng, 9), bits, chunk_words=4096, threads=threads)
    np.testing.assert_array_equal(fused, plain)
    assert int(fused.max()) < 1 << bits


def test_default_settings_equal_reference_and_remove_what_was_added() -> None:
    rng = np.random.default_rng(7)
    n_words = 3 * unmask.DEFAULT_CHUNK_WORDS + 13
    acc = rng.integers(0, 1 << 32, n_words, dtype=np.uint32)
    terms = _terms(rng, 12)
    fused, plain = _both(acc, terms, 32)
    np.testing.assert_array_equal(fused, plain)
    unmask.apply_masks(fused, [(seed, -sign) for seed, sign in terms], 32)
    np.testing.assert_array_equal(fused, acc)  # the opposite signs undo the masks exactly


def test_each_mask_is_the_protocol_prg() -> None:
    seed = bytes(range(32))
    for sign in (1, -1):
        acc = np.zeros(10_003, dtype=np.uint32)
        unmask.apply_masks(acc, [(seed, sign)], 32, chunk_words=512, threads=2)
        np.testing.assert_array_equal(
            acc, sign * crypto.expand_mask(seed, 10_003).astype(np.int64) % 2**32
        )


@pytest.mark.parametrize(
    "counter", [b"\xff" * 16, b"\xff" * 15 + b"\xf0", b"\x00" * 8 + b"\xff" * 8]
)
def test_ranges_open_streams_past_counter_carries_and_wraps(counter: bytes) -> None:
    # A thread's stream starts at counter block initial + offset, carried over all 128 bits
    # (and wrapping at 2^128) exactly as one AES-CTR stream from the start increments it.
    terms = [(bytes(range(16)) + counter, 1), (bytes(16) + counter, -1)]
    acc = np.zeros(40_000, dtype=np.uint32)
    fused, plain = _both(acc, terms, 32, chunk_words=1024, threads=4)
    np.testing.assert_array_equal(fused, plain)


@settings(max_examples=40, deadline=None)
@given(
    n_words=st.integers(1, 40_000),
    chunk_blocks=st.integers(1, 3000),
    threads=st.integers(1, 4),
    bits=st.integers(8, 32),
    count=st.integers(0, 6),
    seed=st.integers(0, 2**32 - 1),
)
def test_fused_equals_reference_on_any_shape(
    n_words: int, chunk_blocks: int, threads: int, bits: int, count: int, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    acc = rng.integers(0, 1 << bits, n_words, dtype=np.uint32)
    fused, plain = _both(
        acc, _terms(rng, count), bits, chunk_words=4 * chunk_blocks, threads=threads
    )
    np.testing.assert_array_equal(fused, plain)


def test_bad_arguments_are_refused() -> None:
    acc = np.zeros(16, dtype=np.uint32)
    good = [(bytes(32), 1)]
    with pytest.raises(ValueError, match="uint32"):
        unmask.apply_masks(np.zeros(16, dtype=np.int64), good, 32)
    with pytest.raises(ValueError, match="contiguous"):
        unmask.apply_masks(np.zeros(32, dtype=np.uint32)[::2], good, 32)
    with pytest.raises(ValueError, match="bits"):
        unmask.apply_masks(acc, good, 33)
    with pytest.raises(ValueError, match="sign"):
        unmask.apply_masks(acc, [(bytes(32), 0)], 32)
    with pytest.raises(SecAggError, match="seed"):
        unmask.apply_masks(acc, [(bytes(31), 1)], 32)
    with pytest.raises(ValueError, match="chunk_words"):
        unmask.apply_masks(acc, good, 32, chunk_words=6)
    with pytest.raises(ValueError, match="threads"):
        unmask.apply_masks(acc, good, 32, threads=0)
    with pytest.raises(SecAggError, match="seed"):
        unmask.apply_masks_reference(acc, [(b"short", 1)], 32)
    assert not acc.any()  # nothing was touched by a refused call
    assert unmask.default_threads() >= 1


@pytest.mark.parametrize("threads", [1, 3])
def test_a_round_with_dropouts_gives_the_same_sum_on_any_thread_count(threads: int) -> None:
    # 12 devices, 2 drop after sharing keys: the server removes 10 self-masks and the pair
    # masks of the 2 lost devices, on 1 or 3 threads (5,001 words: 3 threads get ranges).
    devices = [f"d{i:02d}" for i in range(12)]
    rng = np.random.default_rng(3)
    inputs = {d: (rng.standard_normal(5000).astype(np.float32) * 0.01, 2.0) for d in devices}
    cfg = make_config("r-threads", devices, 5000, threshold=4, neighbours=6)
    results = []
    for n in (threads, None):
        sim = Simulation(cfg, inputs, {Stage.MASKED: devices[:2]}, unmask_threads=n)
        server = sim.run()
        assert server.stage == Stage.DONE, server.abort_reason
        assert server.result is not None
        results.append(server.result)
    np.testing.assert_array_equal(results[0][0], results[1][0])
    assert results[0][1] == results[1][1]
    expected = sum(2.0 * inputs[d][0].astype(np.float64) for d in devices[2:])
    np.testing.assert_allclose(results[0][0], expected, atol=1e-3)
