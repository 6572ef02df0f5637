"""Trust rules without a broker: signatures, generations, the privacy floor, the device quota,
the weight cap, QoS 0, the implied update limit and the secure-sum check (issue 9)."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from devtools import DIGITS_PLAN, mlp_bundle
from test_aggregator_core import GOOD, TASK, WEIGHTS, Harness, only_receipt, receipts

from fededge.aggregator.core import AggregatorCore
from fededge.aggregator.effects import Ack, Incoming, Publish
from fededge.aggregator.metrics import AggregatorMetrics
from fededge.aggregator.policy import check_secure_sum, weight_cap
from fededge.aggregator.store import Store, task_root
from fededge.device.core import DeviceCore
from fededge.device.effects import Persist
from fededge.device.effects import Publish as DevicePublish
from fededge.device.examples import ExampleStore, StateDb
from fededge.device.metrics import DeviceMetrics
from fededge.device.runtime import ModelRuntime
from fededge.device.training import local_update
from fededge.device.trust import TRUST_FILE, Refused, TrustRules, TrustState, privacy_refusal
from fededge.errors import SecAggError, SignatureError
from fededge.keys import public_text
from fededge.protocol import DeviceStatus, ModelVersion, Plan, Receipt, Topics, decode_json
from fededge.protocol.messages import SecureAggregation
from fededge.protocol.signing import SignedKind, open_message, sign
from fededge.protocol.vocab import NO_GRAPH, RejectReason
from fededge.secagg.quantize import FixedPoint, max_scale
from fededge.settings import PrivacySettings

OWNER = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
AGG = Ed25519PrivateKey.from_private_bytes(bytes(range(1, 33)))
MALLORY = Ed25519PrivateKey.from_private_bytes(bytes(range(2, 34)))


# --- the plan's new fields keep v1 bytes ------------------------------------------------------


def test_new_plan_fields_are_omitted_at_their_defaults() -> None:
    assert b"generation" not in Plan().to_bytes() and b"max_updates" not in Plan().to_bytes()
    p = Plan(generation=3, max_updates_per_device=2, max_weight=64)
    assert p.to_bytes().endswith(b',"generation":3,"max_updates_per_device":2,"max_weight":64}')
    assert decode_json(p.to_bytes(), Plan) == p
    mv = ModelVersion(task=TASK, version=1, weights=WEIGHTS, graph_sha256=NO_GRAPH)
    assert b"generation" not in mv.to_bytes()
    again = ModelVersion.from_bytes(replace(mv, generation=2).to_bytes(), max_bytes=1 << 20)
    assert again.generation == 2
    assert weight_cap(Plan(examples_per_update=20)) == 20
    assert weight_cap(Plan(examples_per_update=20, max_weight=50)) == 50


# --- device: signatures -----------------------------------------------------------------------


def test_trust_rules_refuse_unsigned_foreign_and_forged_messages() -> None:
    rules = TrustRules([OWNER.public_key()], [AGG.public_key()])
    plan = Plan().to_bytes()
    assert rules.open(SignedKind.PLAN, sign(plan, SignedKind.PLAN, OWNER)) == plan
    cases = {
        "unsigned": plan,
        "unknown_key": sign(plan, SignedKind.PLAN, MALLORY),
        # The aggregator's key is not the owner's: it cannot sign plans.
        "unknown_key ": sign(plan, SignedKind.PLAN, AGG),
        # A signature made for another role never verifies as a plan.
        "bad_signature": sign(plan, SignedKind.RECEIPT, OWNER),
        "malformed": b"FESG\x01short",
    }
    for reason, data in cases.items():
        with pytest.raises(SignatureError) as e:
            rules.open(SignedKind.PLAN, data)
        assert e.value.reason == reason.strip()
    # Models: the aggregator's, or the owner's version 0; receipts only the aggregator's.
    model = ModelVersion(task=TASK, version=0, weights=WEIGHTS, graph_sha256=NO_GRAPH).to_bytes()
    for key in (AGG, OWNER):
        assert rules.open(SignedKind.MODEL, sign(model, SignedKind.MODEL, key)) == model
    receipt = b'{"v":1}'
    with pytest.raises(SignatureError):
        rules.open(SignedKind.RECEIPT, sign(receipt, SignedKind.RECEIPT, OWNER))
    # Without keys everything passes (the device warns at start that it trusts the broker).
    assert TrustRules().open(SignedKind.PLAN, plan) == plan
    assert TrustRules().untrusted() == [
        "trust.owner_key (plans and graphs)",
        "trust.aggregator_key (models and receipts)",
    ]
    # A site gateway's key (trust.gateway_key) signs receipts, never models.
    gateway = Ed25519PrivateKey.from_private_bytes(bytes(range(2, 34)))
    behind = TrustRules([OWNER.public_key()], [AGG.public_key()], [gateway.public_key()])
    assert behind.open(SignedKind.RECEIPT, sign(receipt, SignedKind.RECEIPT, gateway)) == receipt
    assert behind.open(SignedKind.RECEIPT, sign(receipt, SignedKind.RECEIPT, AGG)) == receipt
    with pytest.raises(SignatureError):
        behind.open(SignedKind.MODEL, sign(model, SignedKind.MODEL, gateway))
    with pytest.raises(SignatureError):
        rules.open(SignedKind.RECEIPT, sign(receipt, SignedKind.RECEIPT, gateway))
    state = TrustState(4, (4, 17))
    assert TrustState.from_bytes(state.to_bytes()) == state
    for junk in (b"junk", b"[]", b'{"generation": -1, "model": [1]}', b'{"model": ["a", 1]}'):
        assert TrustState.from_bytes(junk) == TrustState()


def test_the_model_floor_survives_a_lost_model_file_and_a_generation_bump(tmp_path: Path) -> None:
    core = _device(tmp_path / "a", PrivacySettings())  # adopted version 0
    cur = core.current
    assert cur is not None
    v57 = replace(cur.model, version=57, generation=1, time=cur.model.time + 1)
    effects = core.on_model(v57, None)
    assert Persist(TRUST_FILE, TrustState(0, (1, 57)).to_bytes()) in effects
    # A device restarted without its model file but with trust.json refuses older versions.
    db = StateDb(tmp_path / "b.sqlite")
    fresh = DeviceCore("d1", Topics("fededge", TASK), db, ExampleStore(db, max_examples=10,
                       max_age=60), DeviceMetrics(), receipt_timeout=60.0,
                       trust=TrustState.from_bytes(TrustState(0, (1, 57)).to_bytes()))  # fmt: skip
    with pytest.raises(Refused) as e:
        fresh.on_model(replace(v57, version=56), None)
    assert e.value.reason == "old_version"
    with pytest.raises(Refused) as e:
        fresh.on_model(replace(v57, version=900, generation=0), None)
    assert e.value.reason == "old_generation"
    # The owner raises the plan generation without re-initialising: the current version (of
    # the lower generation) is still the one a new device and a restarted one take.
    core.on_plan(DIGITS_PLAN.model_copy(update={"generation": 2}), None)
    assert core.generation == 2 and core.on_model(v57, None) == []  # the retained copy again
    other = _device(tmp_path / "c", PrivacySettings())
    other.on_plan(DIGITS_PLAN.model_copy(update={"generation": 2}), None)
    assert [type(e).__name__ for e in other.on_model(v57, None)].count("Adopted") == 1


# --- device: the privacy floor ----------------------------------------------------------------

FLOOR = PrivacySettings(min_noise_multiplier=0.5, max_clip_norm=10.0, min_threshold=3,
                        min_cohort=5)  # fmt: skip


@pytest.mark.parametrize(
    ("plan", "floor", "words"),
    [
        (Plan(clip_norm=2.0, noise_stddev=1.0), FLOOR, None),
        (Plan(clip_norm=2.0, noise_stddev=0.9), FLOOR, "noise multiplier 0.45"),
        (Plan(clip_norm=20.0, noise_stddev=100.0), FLOOR, "clip_norm 20 is above"),
        (Plan(clip_norm=1.0, noise_stddev=1.0),
         FLOOR.model_copy(update={"require_secure_aggregation": True}), "no secure_aggregation"),
        (Plan(clip_norm=1.0, noise_stddev=1.0, secure_aggregation=SecureAggregation(
            cohort_size=3, min_cohort=3, threshold=2)), FLOOR, "threshold 2 is below"),
        (Plan(clip_norm=1.0, noise_stddev=1.0, secure_aggregation=SecureAggregation(
            cohort_size=5, min_cohort=4, threshold=3)), FLOOR, "min_cohort 4 is below"),
        (Plan(), PrivacySettings(), None),  # the default floor refuses nothing
    ],
)  # fmt: skip
def test_privacy_floor_rules(plan: Plan, floor: PrivacySettings, words: str | None) -> None:
    got = privacy_refusal(plan, floor)
    if words is None:
        assert got is None
    else:
        assert got is not None and got.startswith("privacy_floor: ") and words in got, got


def _device(tmp_path: Path, privacy: PrivacySettings = FLOOR) -> DeviceCore:
    tmp_path.mkdir(parents=True, exist_ok=True)
    db = StateDb(tmp_path / "d.sqlite")
    examples = ExampleStore(db, max_examples=10_000, max_age=86_400)
    core = DeviceCore("d1", Topics("fededge", TASK), db, examples, DeviceMetrics(),
                      receipt_timeout=60.0, privacy=privacy)  # fmt: skip
    b = mlp_bundle()
    core.on_graph(b.spec, ModelRuntime.from_bundle(b), None)
    mv = ModelVersion(task=TASK, version=0, weights=dict(b.weights),
                      graph_sha256=b.spec.graph_sha256, time=time.time())  # fmt: skip
    core.on_model(mv, None)
    rng = np.random.default_rng(0)
    core.examples.add(rng.random((16, 64), dtype=np.float32), rng.integers(0, 10, 16))
    return core


def _refused(core: DeviceCore, kind: str, reason: str) -> float:
    labels = {"kind": kind, "reason": reason}
    return core.metrics.registry.get_sample_value("fededge_device_messages_refused_total",
                                                  labels) or 0.0  # fmt: skip


def test_a_plan_below_the_floor_is_neither_trained_nor_sent_and_the_status_says_why(
    tmp_path: Path,
) -> None:
    core = _device(tmp_path)
    weak = DIGITS_PLAN.model_copy(update={"examples_per_update": 8, "noise_stddev": 0.0})
    effects = core.on_plan(weak, b"raw")
    assert core.refused is not None and "noise multiplier 0" in core.refused
    assert not core.trainable() and core.next_job() is None
    assert _refused(core, "plan", "privacy_floor") == 1
    status = core.status(connected=True)
    assert status["refused"] == core.refused
    (pub,) = [e for e in core.tick(1.0, 1000.0, connected=True) if isinstance(e, DevicePublish)]
    msg = decode_json(pub.payload, DeviceStatus)
    assert msg.refused == core.refused and pub.topic.endswith("/devices/d1/status")
    assert not any(type(e).__name__ == "WakeTrainer" for e in effects)
    # The same plan again is not counted twice; a plan above the floor restores training.
    core.on_plan(weak, b"raw")
    assert _refused(core, "plan", "privacy_floor") == 1
    ok = weak.model_copy(update={"noise_stddev": 2.5})  # sigma/C = 0.5
    core.on_plan(ok, b"raw2")
    assert core.refused is None and core.trainable()
    assert decode_json(core.status_publish("online", 1.0).payload, DeviceStatus).refused is None


def test_an_empty_refusal_keeps_the_device_status_bytes() -> None:
    s = DeviceStatus(device="pi-17", state="online")
    assert b"refused" not in s.to_bytes()


def test_the_device_waits_for_the_next_version_once_its_quota_is_made(tmp_path: Path) -> None:
    core = _device(tmp_path, PrivacySettings())
    plan = DIGITS_PLAN.model_copy(update={"examples_per_update": 8, "max_staleness": 1})
    core.on_plan(plan, None)
    job = core.next_job()
    assert job is not None
    lu = local_update(job.current.runtime, job.current.weights, job.batch.x, job.batch.y,
                      epochs=1, batch_size=8, learning_rate=0.1, clip_norm=5.0,
                      noise_stddev=0.0, rng=np.random.default_rng(0))  # fmt: skip
    core.trained(job, lu, 0.01, now=1.0, connected=False)
    # 8 fresh examples wait, but the aggregator takes one update per device per version.
    assert core.examples.fresh_count() == 8 and not core.trainable() and core.next_job() is None
    cur = core.current
    assert cur is not None
    core.on_model(replace(cur.model, version=1, time=cur.model.time + 1), None)
    assert core.trainable()


# --- aggregator: one contribution per device per version, the weight cap, QoS 0 ---------------


def _metric(h: Harness, name: str, **labels: str) -> float:
    return h.metric(name, **labels)


def test_a_replay_under_a_flipped_update_id_is_refused_and_counted_once(tmp_path: Path) -> None:
    h = Harness(tmp_path, Plan(min_updates_per_version=3))
    uid = "0f3a9c"
    assert only_receipt(h.send(uid)).status == "accepted"
    flipped = chr(ord(uid[0]) ^ 1) + uid[1:]  # "1f3a9c": one bit of the id flipped
    r = only_receipt(h.send(flipped))
    assert (r.status, r.reason) == ("rejected", RejectReason.DEVICE_QUOTA)
    assert only_receipt(h.send(uid)).status == "duplicate"  # a resend is still a duplicate
    # Two new ids in one batch: the staged one counts too.
    out = h.batch(("dev2", h.payload("a", device="dev2")), ("dev2", h.payload("b", device="dev2")))
    assert [(r.status, r.reason) for r in receipts(out)] == [
        ("rejected", "device_quota"), ("accepted", None)] or [
        (r.status, r.reason) for r in receipts(out)] == [
        ("accepted", None), ("rejected", "device_quota")]  # fmt: skip
    pending = h.core.state.pending
    assert pending is not None and pending.sums.count == 2
    assert pending.sums.devices == ["dev1", "dev2"]
    assert _metric(h, "fededge_updates_accepted_total") == 2
    assert _metric(h, "fededge_updates_rejected_total", reason="device_quota") == 2


def test_the_quota_is_rebuilt_from_the_wal_after_a_crash(tmp_path: Path) -> None:
    h = Harness(tmp_path, Plan(min_updates_per_version=4), checkpoint_every=2)
    for dev in ("dev1", "dev2", "dev3"):
        assert only_receipt(h.send("u1", device=dev)).status == "accepted"
    # Only the lock is released: the files are what a kill -9 leaves.
    h.store.close()
    h2 = Harness.__new__(Harness)
    h2.__dict__.update(h.__dict__)
    h2.store = Store(task_root(tmp_path, TASK), fsync=False)
    h2.metrics = AggregatorMetrics()
    h2.core = AggregatorCore(h.settings, h2.store, h2.metrics)
    # (A model this small is checkpointed on every commit; the WAL replay path is covered
    # by tests/test_aggregator_durability.py, with a real kill -9.)
    h2.core.state.restore(h.now)
    for dev in ("dev1", "dev3"):
        r = only_receipt(h2.send("u2", device=dev))
        assert (r.status, r.reason) == ("rejected", RejectReason.DEVICE_QUOTA)
    assert only_receipt(h2.send("u1", device="dev4")).status == "accepted"  # completes v1
    assert h2.core.state.model is not None and h2.core.state.model.version == 1


def test_a_weight_is_capped_at_examples_per_update_unless_the_plan_says_otherwise(
    tmp_path: Path,
) -> None:
    h = Harness(tmp_path, Plan(min_updates_per_version=9, examples_per_update=32))
    h.send("u1", num_examples=10_000)  # claims 10,000 examples, weighs 32
    h.send("u1", device="dev2", num_examples=8)
    assert h.core.state.pending is not None
    assert h.core.state.pending.sums.total_weight == 32 + 8
    h2 = Harness(tmp_path / "b", Plan(min_updates_per_version=9, max_weight=100))
    h2.send("u1", num_examples=10_000)
    assert h2.core.state.pending is not None and h2.core.state.pending.sums.total_weight == 100


def test_a_qos0_update_is_dropped_counted_and_not_answered(tmp_path: Path) -> None:
    h = Harness(tmp_path, Plan(min_updates_per_version=3))
    handle = object()
    out = h.core.ingest(Incoming(h.topics.update("dev1"), h.payload("u1"), handle, qos=0))
    assert out == [Ack(handle)] and receipts(out) == []
    assert _metric(h, "fededge_updates_qos0_refused_total") == 1
    assert h.core.commit(h.now) == []
    assert h.core.state.pending is not None and h.core.state.pending.sums.count == 0
    # Its quota is not used: the same update with QoS 1 is accepted.
    assert only_receipt(h.send("u1")).status == "accepted"


def test_max_update_bytes_defaults_to_what_the_model_implies(tmp_path: Path) -> None:
    h = Harness(tmp_path, Plan())
    model_bytes = len(h.store.read_version_bytes(0))
    assert h.core.state.update_limit == 2 * model_bytes + 64 * 1024
    big = {"b": GOOD["b"], "w": GOOD["w"]}
    padded = h.payload("u1", delta=big) + b"\0" * (2 * model_bytes + 64 * 1024)
    out = h.batch(("dev1", padded))
    assert receipts(out) == []  # too large to be read: no id, no receipt, counted
    assert _metric(h, "fededge_updates_rejected_total", reason="oversize") == 1
    # A setting caps it; it never raises it above what the model implies.
    assert Harness(tmp_path / "b", Plan(), max_update_bytes=4096).core.state.update_limit == 4096
    h3 = Harness(tmp_path / "c", Plan(), max_update_bytes=1 << 30)
    assert h3.core.state.update_limit == 2 * model_bytes + 64 * 1024


# --- aggregator: signed plan, graph, models and receipts --------------------------------------


def _signed_harness(tmp_path: Path, plan: Plan, **agg: Any) -> tuple[Harness, bytes]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    key_file = tmp_path / "agg.key"
    from fededge.keys import write_private

    write_private(key_file, AGG)
    h = Harness.__new__(Harness)
    from fededge.settings import load_settings

    h.settings = load_settings(None, {
        "task": TASK, "state_dir": tmp_path,
        "aggregator": {"metrics": False, "fsync": False, "signing_key": key_file, **agg},
        "trust": {"owner_key": public_text(OWNER.public_key())},
    })  # fmt: skip
    h.topics = Topics(h.settings.topic_prefix, TASK)
    h.store = Store(task_root(tmp_path, TASK), fsync=False)
    h.metrics = AggregatorMetrics()
    h.core = AggregatorCore(h.settings, h.store, h.metrics)
    h.now = 1000.0
    h.mv0 = ModelVersion(task=TASK, version=0, weights=WEIGHTS, graph_sha256=NO_GRAPH)
    signed_plan = sign(plan.to_bytes(), SignedKind.PLAN, OWNER)
    h.control(h.topics.plan, signed_plan)
    h.control(h.topics.model, sign(h.mv0.to_bytes(), SignedKind.MODEL, OWNER))
    return h, signed_plan


def test_the_aggregator_takes_only_the_owners_plan_and_puts_it_back_byte_for_byte(
    tmp_path: Path,
) -> None:
    plan = Plan(min_updates_per_version=2, noise_stddev=0.5, generation=2)
    h, signed_plan = _signed_harness(tmp_path, plan)
    assert h.core.state.plan == plan and h.core.state.model is not None
    hostile = Plan(learning_rate=100.0, noise_stddev=0.0, generation=2).to_bytes()
    for data, reason in (
        (hostile, "unsigned"),
        (sign(hostile, SignedKind.PLAN, MALLORY), "unknown_key"),
        (sign(hostile, SignedKind.PLAN, AGG), "unknown_key"),
        # The owner's own older plan, replayed: an older generation.
        (sign(Plan(generation=1).to_bytes(), SignedKind.PLAN, OWNER), "old_generation"),
    ):
        out = h.control(h.topics.plan, data)
        assert out[0] == Publish(h.topics.plan, signed_plan, retain=True), reason
        assert h.metric("fededge_control_messages_untrusted_total", kind="plan",
                        reason=reason) >= 1  # fmt: skip
        assert h.core.state.plan == plan
    assert h.store.read_blob("plan.json") == signed_plan
    # Republished after a restart exactly as the owner signed it.
    assert h.core.state.current()[0] == Publish(h.topics.plan, signed_plan, retain=True)
    # An unsigned model cannot replace ours either: ours is put back.
    foreign = ModelVersion(task=TASK, version=1000, weights=WEIGHTS, graph_sha256=NO_GRAPH)
    out = h.control(h.topics.model, foreign.to_bytes())
    assert isinstance(out[0], Publish) and out[0].topic == h.topics.model
    assert open_message(out[0].payload, SignedKind.MODEL, [AGG.public_key()]).payload == (
        h.store.read_version_bytes(0))  # fmt: skip


def test_versions_and_receipts_are_signed_by_the_aggregator(tmp_path: Path) -> None:
    h, _ = _signed_harness(tmp_path, Plan(min_updates_per_version=1, generation=4))
    out = h.send("u1")
    (r,) = [e for e in out if isinstance(e, Publish) and "/receipts/" in e.topic]
    body = open_message(r.payload, SignedKind.RECEIPT, [AGG.public_key()]).payload
    assert decode_json(body, Receipt).status == "accepted"
    (m,) = [e for e in out if isinstance(e, Publish) and e.topic == h.topics.model]
    mv = ModelVersion.from_bytes(
        open_message(m.payload, SignedKind.MODEL, [AGG.public_key()]).payload, max_bytes=1 << 20
    )
    assert (mv.version, mv.generation) == (1, 4)  # versions carry the plan's generation
    # Our own signed copy coming back (and after a restart) is not "foreign".
    assert h.control(h.topics.model, m.payload)[:-1] == []


def test_an_unsigned_first_model_is_refused_when_the_owner_key_is_set(tmp_path: Path) -> None:
    h, _ = _signed_harness(tmp_path / "x", Plan())
    fresh = AggregatorCore(h.settings, Store(task_root(tmp_path, TASK), fsync=False),
                           AggregatorMetrics())  # fmt: skip
    version_1000 = ModelVersion(task=TASK, version=1000, weights=WEIGHTS, graph_sha256=NO_GRAPH)
    fresh.control(Incoming(h.topics.model, version_1000.to_bytes(), None), 1.0)
    assert fresh.state.model is None


# --- secure rounds: the unmasked sum ----------------------------------------------------------


def _secure_sum(
    updates: list[tuple[np.ndarray, float]], fp: FixedPoint
) -> tuple[np.ndarray, float]:
    acc = np.zeros(updates[0][0].size + 1, np.uint64)
    for i, (delta, weight) in enumerate(updates):
        acc += fp.encode(delta.astype(np.float64), weight, key=i)
    return fp.decode((acc % (1 << fp.bits)).astype(np.uint32))


def test_the_unmasked_secure_sum_is_checked() -> None:
    rng = np.random.default_rng(0)
    n, d, clip, max_weight = 5, 100, 1.0, 32.0
    fp = FixedPoint(32, clip, max_scale(n, clip, 32), max_weight)
    honest = [(rng.normal(size=d) * 10, 32.0) for _ in range(n)]  # clipped by the encoder
    sum_wd, sum_w = _secure_sum(honest, fp)
    kw: dict[str, Any] = {"survivors": n, "clip": clip, "max_weight": max_weight,
                          "scale": fp.scale}  # fmt: skip
    check_secure_sum(sum_wd, sum_w, **kw)  # the extreme honest case: every weight at the cap
    # A device that encoded w~ = 4 instead of at most 1: the total exceeds n.
    with pytest.raises(SecAggError, match="exceeds 5 survivors"):
        check_secure_sum(sum_wd, sum_w + 3 * max_weight, **kw)
    # A device that encoded its delta 50x above the clip norm (at full weight).
    e0 = np.zeros(d)
    e0[0] = 50 * clip * max_weight
    with pytest.raises(SecAggError, match="above the clip norm"):
        check_secure_sum(sum_wd + e0, sum_w, **kw)
    with pytest.raises(SecAggError, match="not positive"):
        check_secure_sum(sum_wd * 0, 0.0, **kw)
