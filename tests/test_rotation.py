"""Randomized Hadamard rotation of updates (issue 13): kernel, spec, and the aggregator's folds."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_aggregator_core import Harness

from fededge.aggregator.effects import NewVersion
from fededge.aggregator.rotated import Rotation
from fededge.native import hadamard
from fededge.protocol import Plan, Update
from fededge.protocol import rotation as R
from fededge.protocol.encoding import decode_delta, encode_delta


def _hadamard_matrix(n: int) -> np.ndarray:
    """Sylvester's H_n from its definition, H[r, c] = (-1)^popcount(r & c)."""
    r = np.arange(n)
    pop = np.vectorize(lambda v: bin(int(v)).count("1"))(r[:, None] & r[None, :])
    return np.where(pop % 2 == 0, 1.0, -1.0)


@pytest.mark.parametrize("n", [1, 2, 4, 8, 64, 256])
def test_numba_fwht_is_the_hadamard_matrix_product(n: int) -> None:
    x = np.random.default_rng(n).normal(size=n)
    y = x.copy()
    hadamard.fwht_inplace(y)
    np.testing.assert_allclose(y, _hadamard_matrix(n) @ x, rtol=1e-12, atol=1e-12)
    z = x.copy()
    R.fwht(z)  # the numpy reference the devices use: the same butterflies, bitwise
    np.testing.assert_array_equal(z, y)


def test_chunks_are_the_binary_digits_of_the_padded_size() -> None:
    assert R.padded_size(1) == 64 and R.padded_size(64) == 64 and R.padded_size(65) == 128
    assert [n for _, n in R.chunks(1_000_000)] == [
        524288, 262144, 131072, 65536, 16384, 512, 64
    ]  # fmt: skip
    assert R.chunks(192) == [(0, 128), (128, 64)]


@settings(max_examples=40, deadline=None)
@given(d=st.integers(1, 3000), version=st.integers(0, 1 << 40), scale=st.floats(1e-6, 1e3))
def test_rotation_is_orthonormal_and_invertible(d: int, version: int, scale: float) -> None:
    x = np.random.default_rng(d).normal(scale=scale, size=d)
    s = R.seed("task", 1, version)
    rot = Rotation(s, d)
    y = rot.rotate(x)
    assert y.shape == (R.padded_size(d),)
    np.testing.assert_array_equal(y, R.rotate(x, s))  # Numba == numpy reference, bitwise
    nx = float(np.linalg.norm(x))
    assert abs(float(np.linalg.norm(y)) - nx) <= 1e-13 * nx
    back = rot.unrotate(y)
    np.testing.assert_array_equal(back, R.unrotate(y, s, d))
    np.testing.assert_allclose(back, x, rtol=0, atol=1e-13 * nx)


def test_rotation_differs_per_version_and_spreads_a_spike() -> None:
    d = 4096
    x = np.zeros(d)
    x[17] = 1.0
    y3 = R.rotate(x, R.seed("t", 0, 3))
    assert not np.array_equal(R.signs(R.seed("t", 0, 3), d), R.signs(R.seed("t", 0, 4), d))
    x2 = np.random.default_rng(0).normal(size=d)
    assert not np.array_equal(R.rotate(x2, R.seed("t", 0, 3)), R.rotate(x2, R.seed("t", 0, 4)))
    # A spike becomes +-1/sqrt(d) everywhere: the max shrinks by sqrt(d), what int8 likes.
    np.testing.assert_allclose(np.abs(y3), 1 / math.sqrt(d), rtol=1e-12)


def test_rotated_delta_never_exceeds_the_deltas_norm() -> None:
    rng = np.random.default_rng(0)
    for i in range(50):
        delta = {"w": rng.normal(size=(7, 11)).astype(np.float32),
                 "b": rng.normal(size=5).astype(np.float32)}  # fmt: skip
        y = R.rotate_delta(delta, R.seed("t", 0, i))[R.ROTATED]
        assert y.dtype == np.float32 and y.shape == (128,)
        x = R.flatten(delta)
        assert float(np.linalg.norm(y.astype(np.float64))) <= float(np.linalg.norm(x))


# The test vector of docs/protocol.md ("Rotated updates").
VECTOR_SEED = "4856ee82516a80c0014752a0d2d846deb73f94b26c89b0860c2d274f9533b1ae"
VECTOR_SIGNS = [1, -1, 1, 1, 1, -1, -1, -1, -1, 1, -1, -1, -1, -1, 1, -1]
VECTOR_Y = [1.375, 0.875, -0.375, 1.125, 0.125, -0.375, -1.625, -0.125]


def test_rotation_vector() -> None:
    s = R.seed("t", 0, 3)
    assert s.hex() == VECTOR_SEED
    assert R.signs(s, 64)[:16].tolist() == VECTOR_SIGNS
    y = R.rotate(np.array([1.0, 2.0, 3.0, 4.0, 5.0]), s)
    assert y.shape == (64,) and y[:8].tolist() == VECTOR_Y


# -- the aggregator: folds in the rotated domain, unrotates once ------------------------------


def _delta(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "b": rng.normal(scale=0.1, size=3).astype(np.float32),
        "w": rng.normal(scale=0.1, size=(2, 4)).astype(np.float32),
    }


def _rotated(h: Harness, uid: str, device: str, x: dict[str, np.ndarray], enc: str,
             base: int = 0, rotation: str = "hadamard") -> tuple[bytes, np.ndarray]:  # fmt: skip
    """The payload and the delta it carries, decoded and unrotated (what the sum must hold)."""
    s = R.seed("t1", 0, base)
    t = R.rotate_delta(x, s) if rotation == "hadamard" else x
    enc_t = encode_delta(t, enc, 0, np.random.default_rng(len(uid)))
    p = h.payload(uid, device=device, base=base, delta=enc_t, encoding=enc, block=0,
                  rotation=rotation)  # fmt: skip
    dec = decode_delta(enc_t, enc, 0)
    flat = R.unrotate(dec[R.ROTATED], s, 11) if rotation == "hadamard" else R.flatten(dec)
    return p, flat


def _weights(nv: NewVersion) -> np.ndarray:
    return R.flatten(nv.model.weights)


@pytest.mark.parametrize("enc", ["f32", "f16", "int8"])
def test_core_folds_rotated_updates_and_unrotates_at_finalize(tmp_path: Any, enc: str) -> None:
    plan = Plan(min_updates_per_version=3, update_encoding=enc, update_rotation="hadamard")
    h = Harness(tmp_path, plan)
    sent = [_rotated(h, f"u{i}", f"d{i}", _delta(i), enc) for i in range(3)]
    effects = h.batch(*[(f"d{i}", p) for i, (p, _) in enumerate(sent)])
    (nv,) = [e for e in effects if isinstance(e, NewVersion)]
    ref = np.mean([flat for _, flat in sent], axis=0)
    np.testing.assert_allclose(_weights(nv), ref.astype(np.float32), rtol=1e-6, atol=1e-7)


def test_stale_and_unrotated_updates_are_converted_into_the_versions_rotation(
    tmp_path: Any,
) -> None:
    plan = Plan(min_updates_per_version=1, max_staleness=3, update_encoding="int8",
                update_rotation="hadamard")  # fmt: skip
    h = Harness(tmp_path, plan)
    h.core.state.plan = plan.model_copy(update={"min_updates_per_version": 1})
    p0, f0 = _rotated(h, "a", "d0", _delta(0), "int8", base=0)
    (nv1,) = [e for e in h.batch(("d0", p0)) if isinstance(e, NewVersion)]
    np.testing.assert_allclose(_weights(nv1), f0.astype(np.float32), rtol=1e-6, atol=1e-7)
    h.core.state.plan = plan.model_copy(update={"min_updates_per_version": 3})
    # Version 2 is built on 1: one update on 1 (direct), one stale on 0, one unrotated.
    sent = [
        _rotated(h, "b", "d1", _delta(1), "int8", base=1),
        _rotated(h, "c", "d2", _delta(2), "int8", base=0),
        _rotated(h, "e", "d3", _delta(3), "int8", base=1, rotation="none"),
    ]
    effects = h.batch(*[(f"d{i + 1}", p) for i, (p, _) in enumerate(sent)])
    (nv2,) = [e for e in effects if isinstance(e, NewVersion)]
    w = [10.0, 10.0 * 2.0**-0.5, 10.0]  # staleness 1 at exponent 0.5
    ref = sum(wi * f for wi, (_, f) in zip(w, sent, strict=True)) / sum(w)
    np.testing.assert_allclose(
        _weights(nv2), (_weights(nv1) + ref).astype(np.float32), rtol=1e-6, atol=1e-7
    )


def test_rotated_updates_are_validated_on_their_decoded_norm(tmp_path: Any) -> None:
    plan = Plan(min_updates_per_version=100, update_encoding="int8", update_rotation="hadamard")
    h = Harness(tmp_path, plan)
    good = encode_delta(R.rotate_delta(_delta(0), R.seed("t1", 0, 0)), "int8", 0)
    cases = [
        ("big", {**good, "rotated:scale": np.array([100.0], np.float32)}, "norm_too_large"),
        ("short", encode_delta({"rotated": np.zeros(11, np.float32)}, "int8", 0), "wrong_shape"),
        ("names", encode_delta(_delta(0), "int8", 0), "wrong_names"),
    ]
    from test_compression import _receipts

    for i, (uid, t, reason) in enumerate(cases):
        p = h.payload(uid, device=f"x{i}", delta=t, encoding="int8", block=0, rotation="hadamard")
        (r,) = _receipts(h.batch((f"x{i}", p)))
        assert (r.status, r.reason) == ("rejected", reason)


def test_rotated_pending_version_replays_from_the_wal_bit_identically(tmp_path: Any) -> None:
    from test_pending import _base

    from fededge.aggregator.pending import PendingVersion
    from fededge.aggregator.store import Store

    def pending() -> PendingVersion:
        return PendingVersion(Store(tmp_path), _base(), checkpoint_every=100,
                              max_update_bytes=1 << 20, rotated=True)  # fmt: skip

    rng = np.random.default_rng(5)
    p = pending()
    for i in range(7):
        x = {"a": rng.normal(scale=0.01, size=1000).astype(np.float32),
             "b": rng.normal(scale=0.01, size=(2, 5)).astype(np.float32)}  # fmt: skip
        base = 3 if i % 3 else 2  # some stale: converted on a float64 copy
        rot = "none" if i == 4 else "hadamard"
        t = R.rotate_delta(x, R.seed("t", 0, base)) if rot == "hadamard" else x
        u = Update(task="t", device=f"d{i}", update_id=f"u{i}", base_version=base,
                   num_examples=i + 1, delta=encode_delta(t, "int8", 64, rng),
                   encoding="int8", block=64, rotation=rot)  # fmt: skip
        p.stage(u, u.to_bytes(), float(i + 1), 1.0)
        if i % 2:
            p.commit()
    p.commit()
    p.close()
    p.store.close()
    q = pending()
    assert q.recover() == 7
    np.testing.assert_array_equal(q.acc, p.acc)
    assert q.acc.shape == (R.padded_size(1010),)


def test_rotation_plan_fields_are_omitted_at_their_defaults() -> None:
    assert b"rotation" not in Plan().to_bytes() and b"model_encoding" not in Plan().to_bytes()
    p = Plan(update_rotation="hadamard", model_encoding="f16")
    assert b'"update_rotation":"hadamard"' in p.to_bytes()
    assert b'"model_encoding":"f16"' in p.to_bytes()


# -- model versions published as float16 (plan model_encoding) --------------------------------

# docs/protocol.md ("Model versions in float16"): version 1 of task t, w = [0.5, -0.25, 1/3,
# 65504] (1/3 becomes 0.33325195 in float16).
MODEL_F16_VECTOR = (
    "10010000000000007b225f5f6d657461646174615f5f223a7b22656e636f64696e67223a22663136222c2265"
    "78616d706c6573223a2230222c2266656465646765223a2231222c2267726170685f736861323536223a2230"
    "3030303030303030303030303030303030303030303030303030303030303030303030303030303030303030"
    "30303030303030303030303030303030303030222c226b696e64223a226d6f64656c222c227461736b223a22"
    "74222c2274696d65223a22302e30222c2275706461746573223a2230222c2276657273696f6e223a2231227d"
    "2c2277223a7b226474797065223a22463136222c227368617065223a5b345d2c22646174615f6f6666736574"
    "73223a5b302c385d7d7d202020202020003800b45535ff7b"
)


def test_model_f16_vector() -> None:
    from fededge.protocol import ModelVersion

    mv = ModelVersion.from_bytes(bytes.fromhex(MODEL_F16_VECTOR), max_bytes=1 << 16)
    assert mv.encoding == "f16" and mv.weights["w"].dtype == np.float32
    assert mv.weights["w"].tolist() == [0.5, -0.25, 0.333251953125, 65504.0]
    w = {"w": np.array([0.5, -0.25, 1 / 3, 65504.0], np.float32)}
    again = ModelVersion(task="t", version=1, weights=w, graph_sha256="0" * 64, encoding="f16")
    assert again.to_bytes().hex() == MODEL_F16_VECTOR


def test_aggregator_publishes_f16_versions_and_keeps_its_float32_master(tmp_path: Any) -> None:
    from fededge.aggregator.effects import Publish
    from fededge.protocol import ModelVersion

    plan = Plan(min_updates_per_version=1, model_encoding="f16")
    h = Harness(tmp_path, plan)
    x = {"b": np.full(3, 1 / 3, np.float32), "w": np.full((2, 4), 0.1, np.float32)}
    out = h.batch(("d0", h.payload("u0", device="d0", delta=x)))
    assert [e.new for e in out if isinstance(e, NewVersion)] == [1]
    (pub,) = [e for e in out if isinstance(e, Publish) and e.topic == h.topics.model]
    sent = ModelVersion.from_bytes(pub.payload, max_bytes=1 << 20)
    assert sent.encoding == "f16" and sent.version == 1
    master = h.store.load_version(1)  # float32, what the next version builds on
    assert master.encoding == "f32" and master.weights["b"][0] == np.float32(1 / 3)
    assert sent.weights["b"][0] == np.float32(np.float16(1 / 3)) != master.weights["b"][0]
    f32 = dataclasses.replace(master).to_bytes()
    assert len(pub.payload) < len(f32)
    # A version beyond float16's range goes out as float32 rather than as infinities.
    from fededge.aggregator.published import published_model

    big = dataclasses.replace(master, weights={**master.weights, "b": np.full(3, 1e5, np.float32)})
    assert published_model(big.to_bytes(), "f16") == big.to_bytes()


def test_model_init_plan_file_takes_the_new_fields(tmp_path: Any) -> None:
    from safetensors.numpy import save_file

    from fededge.cli.model import load_init_payloads

    save_file({"w": np.zeros(4, np.float32)}, str(tmp_path / "w.safetensors"))
    raw = b'{"v":1,"kind":"plan","update_rotation":"hadamard","model_encoding":"f16"}'
    (tmp_path / "plan.json").write_bytes(raw)
    _, _, plan = load_init_payloads("t", None, tmp_path / "w.safetensors", tmp_path / "plan.json")
    assert (plan.update_rotation, plan.model_encoding) == ("hadamard", "f16")


# -- secure rounds: rotated before fixed-point quantisation, the unmasked sum unrotated -------


@pytest.mark.parametrize("adaptive", [False, True])
def test_secure_round_rotates_inputs_and_unrotates_the_sum(
    broker: Any, tmp_path: Any, adaptive: bool
) -> None:
    """With adaptive clipping the bit rides after the P rotated values, unrotated apart."""
    from aggtools import make_settings, running_aggregator
    from devtools import digits_split, new_task, publish_task, wait_until
    from test_secagg_mqtt import assert_close, error_bound, feed, fleet, sa_plan

    task = new_task()
    plan = sa_plan(cohort_size=6, min_cohort=5, threshold=4, checkin_window=2.0)
    extra: dict[str, Any] = {"target_unclipped_quantile": 0.5} if adaptive else {}
    plan = plan.model_copy(update={"update_rotation": "hadamard", **extra})
    s = make_settings(broker.url, tmp_path / "agg", task=task)
    base = publish_task(s, plan)
    d = sum(int(w.size) for w in base.weights.values())
    parts, _, _ = digits_split(5)
    with running_aggregator(s) as agg, fleet(broker.url, tmp_path, task, {}, 5) as f:
        wait_until(lambda: all(c.version == 0 for c in f.clients.values()), 30, "version 0")
        feed(f, parts)
        wait_until(lambda: agg.version == 1, 30, "version 1")
        assert agg.model is not None and agg.model.updates == 5
        assert (agg.model.clip is not None) == adaptive  # the bit was read and C moved
        inputs = [f.offered[dev][-1] for dev in f.clients]
        # What the devices handed to the round: one rotated vector of P values each.
        assert all(set(r.delta) == {R.ROTATED} for r in inputs)
        assert all(r.delta[R.ROTATED].shape == (R.padded_size(d),) for r in inputs)
        sa = plan.secure_aggregation
        assert sa is not None
        ws = [min(r.num_examples, sa.max_weight) for r in inputs]
        sd = R.seed(task, base.generation, 0)
        rows = [R.unrotate(r.delta[R.ROTATED].astype(np.float64), sd, d) for r in inputs]
        mean = np.average(np.array(rows), axis=0, weights=ws)
        want, off = {}, 0
        for name in sorted(base.weights):
            w0 = base.weights[name].astype(np.float64)
            want[name] = w0 + mean[off : off + w0.size].reshape(w0.shape)
            off += w0.size
        # The fixed-point error, rotated back (orthonormal: the same L2 size, spread out),
        # stays within the per-coordinate bound times sqrt(P) at worst.
        bound = error_bound(5, plan, 5 * 32) * np.sqrt(R.padded_size(d))
        assert_close(agg.model, want, bound)


def test_bad_rotation_and_model_encoding_metadata_are_undecodable() -> None:
    from fededge.errors import ProtocolError
    from fededge.protocol import ModelVersion
    from fededge.protocol.tensors import encode_tensors

    meta = {"fededge": "1", "kind": "update", "task": "t", "device": "d", "update_id": "u",
            "base_version": "0", "num_examples": "1", "rotation": "fourier"}  # fmt: skip
    raw = encode_tensors({"rotated": np.zeros(64, np.float32)}, meta)
    with pytest.raises(ProtocolError, match="rotation"):
        Update.from_bytes(raw, max_bytes=1 << 16)
    mv = {"fededge": "1", "kind": "model", "task": "t", "version": "1", "graph_sha256": "0" * 64}
    with pytest.raises(ProtocolError, match="float16"):  # says f16, carries F32
        ModelVersion.from_bytes(
            encode_tensors({"w": np.zeros(2, np.float32)}, {**mv, "encoding": "f16"}),
            max_bytes=1 << 16,
        )
    with pytest.raises(ProtocolError, match="encoding"):
        ModelVersion.from_bytes(
            encode_tensors({"w": np.zeros(2, np.float16)}, {**mv, "encoding": "bf16"}),
            max_bytes=1 << 16,
        )
    with pytest.raises(ProtocolError, match="float32"):  # F16 tensors without the metadata
        ModelVersion.from_bytes(
            encode_tensors({"w": np.zeros(2, np.float16)}, mv), max_bytes=1 << 16
        )


@pytest.mark.parametrize("before", [True, False])
def test_replay_keeps_the_wals_domain_when_the_plan_changed_rotation(
    tmp_path: Any, before: bool
) -> None:
    """Committed to the WAL in one domain, restarted under a plan that says the other."""
    from test_pending import _base

    from fededge.aggregator.pending import PendingVersion
    from fededge.aggregator.store import Store

    def pending(rotated: bool) -> PendingVersion:
        return PendingVersion(Store(tmp_path), _base(), checkpoint_every=100,
                              max_update_bytes=1 << 20, rotated=rotated)  # fmt: skip

    rng = np.random.default_rng(9)
    p = pending(before)
    for i in range(3):
        x = {"a": rng.normal(scale=0.01, size=1000).astype(np.float32),
             "b": rng.normal(scale=0.01, size=(2, 5)).astype(np.float32)}  # fmt: skip
        t = R.rotate_delta(x, R.seed("t", 0, 3)) if i != 1 else x
        u = Update(task="t", device=f"d{i}", update_id=f"u{i}", base_version=3,
                   num_examples=1, delta=encode_delta(t, "int8", 0, rng), encoding="int8",
                   rotation="hadamard" if i != 1 else "none")  # fmt: skip
        p.stage(u, u.to_bytes(), 1.0, 1.0)
        p.commit()
    p.close()
    p.store.close()
    q = pending(not before)
    assert q.recover() == 3
    assert q.domain.name == ("hadamard" if before else "none")
    np.testing.assert_array_equal(q.acc, p.acc)
