"""Compressed updates (issue 13): the fused dequantise-accumulate kernels."""

from __future__ import annotations

import numpy as np
import pytest

from fededge.aggregator import kernels


def _i8(rng: np.random.Generator, d: int) -> np.ndarray:
    return rng.integers(-127, 128, size=d, dtype=np.int8)


@pytest.mark.parametrize(
    ("d", "block"), [(1000, 1000), (1000, 7), (4097, 256), (1, 1), (5000, 5000), (9000, 4096)]
)
def test_int8_fold_matches_numpy_and_single_folds(d: int, block: int) -> None:
    rng = np.random.default_rng(d + block)
    k = 27  # a pass of 16, one of 8, then 3 one by one
    qs = [_i8(rng, d) for _ in range(k)]
    scales = [rng.random(-(-d // block), dtype=np.float32) for _ in range(k)]
    w = rng.random(k) * 10
    group = np.zeros(d)
    kernels.dequant_accumulate_i8_group(group, qs, scales, block, w)
    single = np.zeros(d)
    for q, s, wj in zip(qs, scales, w, strict=True):
        kernels.dequant_accumulate_i8(single, q, s, block, float(wj))
    # Passes of 16 sum their terms in float32: ~16 * 2^-24 of the sum of |terms|; int8
    # quantisation error is ~1e-2. Passes of 8 and single folds are float64 in row order.
    mag = sum(wj * np.repeat(s.astype(np.float64), block)[:d] * np.abs(q)
              for q, s, wj in zip(qs, scales, w, strict=True))  # fmt: skip
    assert np.all(np.abs(group - single) <= 2e-6 * mag + 1e-300)
    again = np.zeros(d)
    kernels.dequant_accumulate_i8_group(again, qs, scales, block, w)
    np.testing.assert_array_equal(again, group)  # deterministic: WAL replay needs it
    tail = np.zeros(d)  # 8 + 3: float64 in row order, bitwise the single folds
    kernels.dequant_accumulate_i8_group(tail, qs[16:], scales[16:], block, w[16:])
    one = np.zeros(d)
    for q, s, wj in zip(qs[16:], scales[16:], w[16:], strict=True):
        kernels.dequant_accumulate_i8(one, q, s, block, float(wj))
    np.testing.assert_array_equal(tail, one)
    ref = sum(
        wj * np.repeat(s.astype(np.float64), block)[:d] * q
        for q, s, wj in zip(qs, scales, w, strict=True)
    )
    assert np.all(np.abs(group - ref) <= 2e-6 * mag + 1e-12)


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


# -- the encodings (fededge/protocol/encoding.py) and the aggregator's use of them ------------

from typing import Any  # noqa: E402

from test_aggregator_core import GOOD, Harness  # noqa: E402

from fededge.aggregator.effects import NewVersion, Publish  # noqa: E402
from fededge.protocol import Plan, Receipt, Update, decode_json  # noqa: E402
from fededge.protocol.encoding import decode_delta, encode_delta  # noqa: E402


def _delta(seed: int, scale: float = 0.1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "b": rng.normal(scale=scale, size=3).astype(np.float32),
        "w": rng.normal(scale=scale, size=(2, 4)).astype(np.float32),
    }


def _norm(tensors: dict[str, np.ndarray]) -> float:
    return float(
        np.sqrt(sum(float((np.asarray(a, np.float64) ** 2).sum()) for a in tensors.values()))
    )


@pytest.mark.parametrize(("enc", "block"), [("f16", 0), ("int8", 0), ("int8", 3)])
def test_encoding_is_unbiased_and_never_raises_the_norm(enc: str, block: int) -> None:
    rng = np.random.default_rng(7)
    x = _delta(1)
    total = {k: np.zeros(v.shape) for k, v in x.items()}
    runs = 4000 if enc == "int8" else 1
    for _ in range(runs):
        t = encode_delta(x, enc, block, rng)
        dec = decode_delta(t, enc, block)
        assert _norm(dec) <= _norm(x)
        for k in total:
            total[k] += dec[k]
    for k in x:
        # int8: the mean of many encodings converges to x (std of one ~ scale/2 per element).
        tol = 3e-4 if enc == "f16" else 4 * float(np.abs(x[k]).max()) / 127 / np.sqrt(runs)
        # The norm guarantee shrinks the scales by a hair (~1e-3 relative here): a tiny bias
        # toward zero on top of the unbiased rounding.
        np.testing.assert_allclose(total[k] / runs, x[k], rtol=2e-3, atol=tol)


def test_int8_update_is_a_quarter_of_the_bytes() -> None:
    d = {"w": np.random.default_rng(0).normal(size=100_000).astype(np.float32)}
    f32 = Update(task="t", device="d", update_id="u", base_version=0, num_examples=1, delta=d)
    for enc, block, most in (("f16", 0, 0.5), ("int8", 0, 0.25), ("int8", 256, 0.26)):
        u = Update(task="t", device="d", update_id="u", base_version=0, num_examples=1,
                   delta=encode_delta(d, enc, block), encoding=enc, block=block)  # fmt: skip
        assert len(u.to_bytes()) <= most * len(f32.to_bytes()) + 300


def _encoded(h: Harness, uid: str, device: str, x: dict[str, np.ndarray], enc: str,
             block: int, **kw: Any) -> bytes:  # fmt: skip
    t = encode_delta(x, enc, block, np.random.default_rng(abs(hash(uid)) % 1000))
    return h.payload(uid, device=device, delta=t, encoding=enc, block=block, **kw)


@pytest.mark.parametrize(("enc", "block"), [("f16", 0), ("int8", 0), ("int8", 4)])
def test_core_folds_encoded_updates_like_their_decoded_values(
    tmp_path: Any, enc: str, block: int
) -> None:
    plan = Plan.model_validate(
        {"min_updates_per_version": 3, "update_encoding": enc, "update_block": block}
    )
    h = Harness(tmp_path, plan)
    payloads = [_encoded(h, f"u{i}", f"d{i}", _delta(i), enc, block) for i in range(3)]
    effects = h.batch(*[(f"d{i}", p) for i, p in enumerate(payloads)])
    (nv,) = [e for e in effects if isinstance(e, NewVersion)]
    decoded = [
        decode_delta(Update.from_bytes(p, max_bytes=1 << 20).delta, enc, block) for p in payloads
    ]
    for name in ("b", "w"):
        ref = np.sum([10.0 * dec[name] for dec in decoded], axis=0) / 30.0
        np.testing.assert_allclose(
            nv.model.weights[name], ref.astype(np.float32), rtol=1e-6, atol=1e-9
        )


def _receipts(effects: list[Any]) -> list[Receipt]:
    return [decode_json(e.payload, Receipt) for e in effects
            if isinstance(e, Publish) and "/receipts/" in e.topic]  # fmt: skip


def test_malformed_encoded_updates_are_refused_with_a_reason(tmp_path: Any) -> None:
    h = Harness(tmp_path, Plan(min_updates_per_version=100, update_encoding="int8"))
    good = encode_delta(GOOD, "int8", 0)
    cases: list[tuple[str, dict[str, np.ndarray], str, str]] = [
        ("neg", {**good, "w:scale": np.array([-0.1], np.float32)}, "int8", "non_finite"),
        ("nan", {**good, "w:scale": np.array([np.nan], np.float32)}, "int8", "non_finite"),
        ("noscale", {k: v for k, v in good.items() if k != "w:scale"}, "int8", "wrong_names"),
        ("m128", {**good, "w": np.full((2, 4), -128, np.int8)}, "int8", "wrong_dtype"),
        ("nblk", {**good, "w:scale": np.ones(2, np.float32)}, "int8", "wrong_shape"),
        ("f32as8", {**GOOD, "w:scale": np.ones(1, np.float32), "b:scale": np.ones(1, np.float32)},
         "int8", "wrong_dtype"),
        # Decoded, it is far over the clip norm (1.0): the bound holds on decoded values.
        ("big", {**good, "w:scale": np.array([100.0], np.float32)}, "int8", "norm_too_large"),
        ("f16big", {k: np.full(v.shape, 60000, np.float16) for k, v in GOOD.items()}, "f16",
         "norm_too_large"),
        ("f16inf", {k: np.full(v.shape, np.inf, np.float16) for k, v in GOOD.items()}, "f16",
         "non_finite"),
    ]  # fmt: skip
    for i, (uid, t, enc, reason) in enumerate(cases):
        p = h.payload(uid, device=f"x{i}", delta=t, encoding=enc, block=0)
        (r,) = _receipts(h.batch((f"x{i}", p)))
        assert (uid, r.status, r.reason) == (uid, "rejected", reason)
    assert h.core.state.pending is not None and h.core.state.pending.sums.count == 0


def test_encoded_updates_are_recovered_bit_identically(tmp_path: Any) -> None:
    from fededge.aggregator.core import AggregatorCore
    from fededge.aggregator.metrics import AggregatorMetrics
    from fededge.aggregator.store import Store, task_root

    plan = Plan(min_updates_per_version=100, update_encoding="int8", update_block=3)
    h = Harness(tmp_path, plan, checkpoint_every=1000)
    # Mixed encodings in one group and across groups (a plan change while updates travel).
    for i in range(11):
        enc = ("int8", "f16", "f32")[i % 3]
        h.batch((f"d{i}", _encoded(h, f"u{i}", f"d{i}", _delta(i), enc, 3 if enc == "int8" else 0)))
    before = h.core.state.pending.acc.copy()  # type: ignore[union-attr]
    h.store.close()
    store = Store(task_root(tmp_path, "t1"), fsync=False)
    core = AggregatorCore(h.settings, store, AggregatorMetrics())
    core.state.restore(h.now)  # (a model this small is checkpointed on every commit)
    np.testing.assert_array_equal(core.state.pending.acc, before)  # type: ignore[union-attr]


@pytest.mark.parametrize("groups", [[1, 1, 1, 1], [2, 2, 1]])
def test_encoded_updates_replay_from_the_wal_bit_identically(
    tmp_path: Any, groups: list[int]
) -> None:
    """Mixed encodings through the WAL (groups smaller than the accumulator): bitwise again."""
    from test_pending import _base, _pending

    from fededge.aggregator.store import Store

    rng = np.random.default_rng(len(groups))
    p = _pending(Store(tmp_path), every=100)
    i = 0
    for size in groups:
        for _ in range(size):
            x = {"a": rng.normal(scale=0.01, size=1000).astype(np.float32),
                 "b": rng.normal(scale=0.01, size=(2, 5)).astype(np.float32)}  # fmt: skip
            enc, block = (("int8", 0), ("f16", 0), ("int8", 64))[i % 3]
            u = Update(task="t", device=f"d{i}", update_id=f"u{i}", base_version=3,
                       num_examples=i + 1, delta=encode_delta(x, enc, block, rng),
                       encoding=enc, block=block)  # fmt: skip
            p.stage(u, u.to_bytes(), float(i + 1), 1.0)
            i += 1
        p.commit()
    p.close()
    p.store.close()
    assert _base().version == 3
    q = _pending(Store(tmp_path), every=100)
    assert q.recover() == sum(groups)
    np.testing.assert_array_equal(q.acc, p.acc)


# The test vectors of docs/protocol.md ("Update encodings"): exact bytes and decoded values.
F16_VECTOR = (
    "c8000000000000007b225f5f6d657461646174615f5f223a7b22626173655f76657273696f6e223a2230222c"
    "22646576696365223a2264222c22656e636f64696e67223a22663136222c2266656465646765223a2231222c"
    "226b696e64223a22757064617465222c226e756d5f6578616d706c6573223a2231222c227461736b223a2274"
    "222c227570646174655f6964223a227531227d2c2277223a7b226474797065223a22463136222c2273686170"
    "65223a5b345d2c22646174615f6f666673657473223a5b302c385d7d7d202020003800b400300000"
)
INT8_VECTOR = (
    "10010000000000007b225f5f6d657461646174615f5f223a7b22626173655f76657273696f6e223a2230222c"
    "22626c6f636b223a2232222c22646576696365223a2264222c22656e636f64696e67223a22696e7438222c22"
    "66656465646765223a2231222c226b696e64223a22757064617465222c226e756d5f6578616d706c6573223a"
    "2231222c227461736b223a2274222c227570646174655f6964223a227531227d2c2277223a7b226474797065"
    "223a224938222c227368617065223a5b345d2c22646174615f6f666673657473223a5b302c345d7d2c22773a"
    "7363616c65223a7b226474797065223a22463332222c227368617065223a5b325d2c22646174615f6f666673"
    "657473223a5b342c31325d7d7d2020207fc07f005ed0803b5ed0803a"
)


def test_protocol_vectors() -> None:
    f16 = Update.from_bytes(bytes.fromhex(F16_VECTOR), max_bytes=1 << 16)
    assert (f16.encoding, f16.block) == ("f16", 0)
    assert decode_delta(f16.delta, "f16")["w"].tolist() == [0.5, -0.25, 0.125, 0.0]
    i8 = Update.from_bytes(bytes.fromhex(INT8_VECTOR), max_bytes=1 << 16)
    assert (i8.encoding, i8.block) == ("int8", 2)
    assert i8.delta["w"].tolist() == [127, -64, 127, 0]
    s = np.array([0.003931089304387569, 0.0009827723260968924], np.float32)
    np.testing.assert_array_equal(i8.delta["w:scale"], s)
    expect = [127 * float(s[0]), -64 * float(s[0]), 127 * float(s[1]), 0.0]
    assert decode_delta(i8.delta, "int8", 2)["w"].tolist() == expect
    again = Update(task="t", device="d", update_id="u1", base_version=0, num_examples=1,
                   delta={"w": np.array([127, -64, 127, 0], np.int8), "w:scale": s},
                   encoding="int8", block=2)  # fmt: skip
    assert again.to_bytes().hex() == INT8_VECTOR


def test_int8_passes_of_16_replay_from_the_wal_bit_identically(tmp_path: Any) -> None:
    """A group of >= 16 int8 updates (>= 16 d bytes) always outweighs the float64 accumulator
    (8 d bytes), so it is folded and checkpointed, never replayed from the WAL: the float32
    partial sums of its passes of 16 are recovered as they were, bit for bit."""
    from test_pending import _pending

    from fededge.aggregator.store import Store

    rng = np.random.default_rng(3)
    p = _pending(Store(tmp_path), every=100)
    for g, size in enumerate((20, 17)):
        for i in range(size):
            x = {"a": rng.normal(scale=0.01, size=1000).astype(np.float32),
                 "b": rng.normal(scale=0.01, size=(2, 5)).astype(np.float32)}  # fmt: skip
            u = Update(task="t", device=f"d{g}-{i}", update_id=f"u{g}-{i}", base_version=3,
                       num_examples=i + 1, delta=encode_delta(x, "int8", 0, rng),
                       encoding="int8", block=0)  # fmt: skip
            p.stage(u, u.to_bytes(), float(i + 1), 1.0)
        p.commit()
    p.close()
    p.store.close()
    q = _pending(Store(tmp_path), every=100)
    assert q.recover() == 0  # both groups went to checkpoints
    np.testing.assert_array_equal(q.acc, p.acc)
