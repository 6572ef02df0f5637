"""The aggregator core without a broker: events in, effects out (fededge/aggregator/core.py)."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fededge.aggregator import core as core_module
from fededge.aggregator.core import AggregatorCore
from fededge.aggregator.dedup import DedupMemory
from fededge.aggregator.effects import Ack, Effect, Incoming, NewVersion, Publish
from fededge.aggregator.metrics import AggregatorMetrics
from fededge.aggregator.store import Store, task_root
from fededge.errors import NotReadyError
from fededge.protocol import ModelVersion, Plan, Receipt, Topics, Update, decode_json
from fededge.protocol.tensors import decode_tensors, encode_tensors
from fededge.protocol.vocab import NO_GRAPH, RejectReason
from fededge.settings import Settings, load_settings

TASK = "t1"
WEIGHTS = {"b": np.zeros(3, np.float32), "w": np.zeros((2, 4), np.float32)}
GOOD = {k: np.full(v.shape, 0.1, np.float32) for k, v in WEIGHTS.items()}


def _settings(tmp_path: Path, **agg: Any) -> Settings:
    return load_settings(
        None,
        {
            "task": TASK,
            "state_dir": tmp_path,
            "aggregator": {"metrics": False, "fsync": False, **agg},
        },
    )


class Harness:
    """A core on a fresh state directory, given a plan and version 0 like `model init` does."""

    def __init__(self, tmp_path: Path, plan: Plan, **agg: Any) -> None:
        self.settings = _settings(tmp_path, **agg)
        self.topics = Topics(self.settings.topic_prefix, TASK)
        self.store = Store(task_root(tmp_path, TASK), fsync=False)
        self.metrics = AggregatorMetrics()
        self.core = AggregatorCore(self.settings, self.store, self.metrics)
        self.now = 1000.0
        self.mv0 = ModelVersion(task=TASK, version=0, weights=WEIGHTS, graph_sha256=NO_GRAPH)
        self.control(self.topics.plan, plan.to_bytes())
        self.control(self.topics.model, self.mv0.to_bytes())

    def control(self, topic: str, payload: bytes) -> list[Effect]:
        self.now += 1
        out = self.core.control(Incoming(topic, payload, object()), self.now)
        assert isinstance(out[-1], Ack)  # every control message is acknowledged, last
        return out

    def payload(self, uid: str, *, device: str = "dev1", base: int = 0, **kw: Any) -> bytes:
        fields: dict[str, Any] = {
            "task": TASK,
            "device": device,
            "update_id": uid,
            "base_version": base,
            "num_examples": 10,
            "delta": GOOD,
        }
        return Update(**{**fields, **kw}).to_bytes()

    def batch(self, *msgs: tuple[str, bytes]) -> list[Effect]:
        """One group commit of update messages (device, payload); all effects in order."""
        self.now += 1
        out: list[Effect] = []
        for device, payload in msgs:
            out += self.core.ingest(Incoming(self.topics.update(device), payload, object()))
        return out + self.core.commit(self.now)

    def send(self, uid: str, **kw: Any) -> list[Effect]:
        return self.batch((kw.get("device", "dev1"), self.payload(uid, **kw)))

    def metric(self, name: str, **labels: str) -> float:
        value = self.metrics.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value


def receipts(effects: list[Effect]) -> list[Receipt]:
    return [
        decode_json(e.payload, Receipt)
        for e in effects
        if isinstance(e, Publish) and "/receipts/" in e.topic
    ]


def only_receipt(effects: list[Effect]) -> Receipt:
    (r,) = receipts(effects)
    # The receipt goes out before the acknowledgement, and every message is acknowledged.
    kinds = [type(e).__name__ for e in effects]
    assert kinds.index("Publish") < kinds.index("Ack"), kinds
    return r


def test_accept_then_duplicate(tmp_path: Path) -> None:
    h = Harness(tmp_path, Plan(min_updates_per_version=3))
    r = only_receipt(h.send("u1"))
    assert (r.status, r.version, r.pending) == ("accepted", 0, 1)
    r = only_receipt(h.send("u1"))
    assert r.status == "duplicate"
    # Another device may use the same id: ids count per device.
    assert only_receipt(h.send("u1", device="dev2")).status == "accepted"
    assert h.metric("fededge_updates_accepted_total") == 2
    assert h.metric("fededge_updates_duplicate_total") == 1
    assert h.core.state.pending is not None and h.core.state.pending.sums.count == 2


def test_receipts_are_the_receipt_models_bytes(tmp_path: Path) -> None:
    # The core writes accepted and duplicate receipts without the Receipt model (ingest speed):
    # the bytes must be exactly the model's, pending or not.
    h = Harness(tmp_path, Plan(min_updates_per_version=3))
    for out, status, pending in ((h.send("u1"), "accepted", 1), (h.send("u1"), "duplicate", None)):
        (pub,) = [e for e in out if isinstance(e, Publish)]
        assert pub.topic == h.topics.receipt("dev1")
        want = Receipt(task=TASK, device="dev1", update_id="u1", status=status, version=0,
                       pending=pending)  # fmt: skip
        assert pub.payload == want.to_bytes()


def test_second_copy_in_one_batch_is_answered_after_the_commit(tmp_path: Path) -> None:
    h = Harness(tmp_path, Plan(min_updates_per_version=3))
    raw = h.payload("u1")
    out = h.batch(("dev1", raw), ("dev1", raw))
    assert [r.status for r in receipts(out)] == ["accepted", "duplicate"]
    assert sum(isinstance(e, Ack) for e in out) == 2


def _bad_version(payload: bytes) -> bytes:
    p = decode_tensors(payload, max_bytes=1 << 20)
    return encode_tensors(p.tensors, {**p.metadata, "fededge": "2"})


REJECTS: dict[RejectReason, dict[str, Any]] = {
    RejectReason.WRONG_TASK: {"task": "other"},
    RejectReason.WRONG_DEVICE: {"device": "dev9"},  # sent on dev1's topic below
    RejectReason.UNKNOWN_VERSION: {"base": 5},
    RejectReason.BAD_METRICS: {"eval_loss": 1.0, "eval_accuracy": 2.0},
    RejectReason.WRONG_NAMES: {"delta": {"b": GOOD["b"], "x": GOOD["w"]}},
    RejectReason.WRONG_SHAPE: {"delta": {"b": np.zeros(4, np.float32), "w": GOOD["w"]}},
    RejectReason.WRONG_DTYPE: {"delta": {"b": GOOD["b"].astype(np.float64), "w": GOOD["w"]}},
    RejectReason.NON_FINITE: {"delta": {"b": np.array([0, np.nan, 0], np.float32), "w": GOOD["w"]}},
    RejectReason.NORM_TOO_LARGE: {"delta": {k: v * 100 for k, v in GOOD.items()}},
}


@pytest.mark.parametrize("reason", list(REJECTS), ids=str)
def test_each_validation_reject_reason(tmp_path: Path, reason: RejectReason) -> None:
    h = Harness(tmp_path, Plan(min_updates_per_version=2, clip_norm=1.0))
    r = only_receipt(h.batch(("dev1", h.payload("u1", **REJECTS[reason]))))
    assert (r.status, r.reason, r.update_id) == ("rejected", reason.value, "u1")
    assert h.metric("fededge_updates_rejected_total", reason=reason.value) == 1
    assert h.core.rejected_total == 1 and h.core.state.pending is not None
    assert h.core.state.pending.sums.count == 0


def test_envelope_reject_reasons(tmp_path: Path) -> None:
    h = Harness(tmp_path, Plan(), max_update_bytes=4096)
    # Payloads that cannot be decoded cannot be named: no receipt, but counted and acknowledged.
    for raw, reason in (
        (_bad_version(h.payload("u1")), RejectReason.UNSUPPORTED_VERSION),
        (b"junk", RejectReason.MALFORMED),
        (b"\0" * 5000, RejectReason.OVERSIZE),
    ):
        out = h.batch(("dev1", raw))
        assert receipts(out) == [] and isinstance(out[-1], Ack)
        assert h.metric("fededge_updates_rejected_total", reason=reason.value) == 1


def test_secure_aggregation_plan_rejects_plain_updates(tmp_path: Path) -> None:
    plan = Plan.model_validate({"secure_aggregation": {}})
    h = Harness(tmp_path, plan)
    assert only_receipt(h.send("u1")).reason == RejectReason.SECURE_AGGREGATION


def test_version_completes_and_is_announced(tmp_path: Path) -> None:
    h = Harness(tmp_path, Plan(min_updates_per_version=2, max_updates_per_device=2))
    only_receipt(h.send("u1"))
    out = h.send("u2")
    assert receipts(out)[0].pending == 1  # the version the update goes into
    model = next(e for e in out if isinstance(e, Publish) and e.topic == h.topics.model)
    assert model.retain
    new = [e for e in out if isinstance(e, NewVersion)]
    assert [(e.old, e.new) for e in new] == [(0, 1)] and out[-1] == new[0]
    mv1 = ModelVersion.from_bytes(model.payload, max_bytes=1 << 20)
    np.testing.assert_allclose(mv1.weights["w"], 0.1, rtol=1e-6)
    assert mv1.time == h.now  # the core's clock is the one passed in
    info = h.store.version_info(1)
    assert info["update_keys"] == ["dev1/u1", "dev1/u2"]
    assert h.core.state.model is not None and h.core.state.model.version == 1
    assert h.metric("fededge_model_version") == 1
    # A resend of an update folded into version 1 is still a duplicate.
    assert only_receipt(h.send("u1")).status == "duplicate"


def test_stale_update_rejected(tmp_path: Path) -> None:
    h = Harness(tmp_path, Plan(min_updates_per_version=1, max_staleness=0))
    only_receipt(h.send("u1"))  # version 1
    r = only_receipt(h.send("u2", base=0))
    assert (r.status, r.reason) == ("rejected", RejectReason.STALE)


def test_plan_change_completes_the_version(tmp_path: Path) -> None:
    h = Harness(tmp_path, Plan(min_updates_per_version=3))
    h.send("u1")
    h.send("u2", device="dev2")
    out = h.control(h.topics.plan, Plan(min_updates_per_version=2).to_bytes())
    assert any(isinstance(e, NewVersion) and e.new == 1 for e in out)
    assert h.core.state.plan.min_updates_per_version == 2
    assert h.store.read_blob("plan.json") == Plan(min_updates_per_version=2).to_bytes()


def test_invalid_plan_is_replaced_by_ours(tmp_path: Path) -> None:
    h = Harness(tmp_path, Plan(min_updates_per_version=3))
    out = h.control(h.topics.plan, b'{"kind": "plan", "epochs": -1}')
    assert out[0] == Publish(h.topics.plan, Plan(min_updates_per_version=3).to_bytes(), retain=True)
    assert h.metric("fededge_control_messages_rejected_total") == 1


def test_foreign_model_is_replaced_and_our_echo_is_not(tmp_path: Path) -> None:
    h = Harness(tmp_path, Plan())
    ours = h.store.read_version_bytes(0)
    assert h.control(h.topics.model, ours)[:-1] == []  # our own publication coming back
    foreign = ModelVersion(task=TASK, version=7, weights=WEIGHTS, graph_sha256=NO_GRAPH)
    out = h.control(h.topics.model, foreign.to_bytes())
    assert out[0] == Publish(h.topics.model, ours, retain=True)
    assert h.core.state.model is not None and h.core.state.model.version == 0
    # A cleared retained model is put back too.
    assert h.control(h.topics.model, b"")[0] == Publish(h.topics.model, ours, retain=True)


def test_internal_error_sends_the_documented_receipt(tmp_path: Path, monkeypatch) -> None:
    h = Harness(tmp_path, Plan())

    def bug(*_a: Any, **_k: Any) -> Any:
        raise KeyError("a bug")

    monkeypatch.setattr(core_module, "check_update", bug)
    msg = Incoming(h.topics.update("dev1"), h.payload("u1"), object())
    with pytest.raises(KeyError):  # the driver's guard catches it and asks the core:
        h.core.ingest(msg)
    out = h.core.internal_error(msg)
    r = only_receipt(out)
    assert (r.status, r.reason, r.update_id) == ("rejected", "internal_error", "u1")
    assert out[-1] == Ack(msg.handle)
    assert h.metric("fededge_updates_rejected_total", reason="internal_error") == 1
    assert h.metric("fededge_internal_errors_total") == 1
    # An update that cannot be named gets no receipt, only the acknowledgement.
    junk = Incoming(h.topics.update("dev1"), b"junk", object())
    assert h.core.internal_error(junk) == [Ack(junk.handle)]


def test_no_model_yet_is_not_ready(tmp_path: Path) -> None:
    s = _settings(tmp_path)
    core = AggregatorCore(s, Store(task_root(tmp_path, TASK), fsync=False), AggregatorMetrics())
    with pytest.raises(NotReadyError):
        core.ingest(Incoming(Topics(s.topic_prefix, TASK).update("d"), b"x", None))


def test_dedup_memory_forgets_whole_versions_and_raises_the_floor() -> None:
    m = DedupMemory(cap=3)
    m.add_version(1, ["a", "b"])
    m.add_version(2, ["c", "d"])  # 4 keys > 3: version 1 goes, and with it the window
    assert m.floor == 2 and "a" not in m and "c" in m and "d" in m
    m.add_version(3, ["e", "f", "g", "h"])  # more than the cap alone: kept whole
    assert m.floor == 3 and all(k in m for k in "efgh") and "c" not in m
    m.keep_from(4)
    assert len(m) == 0


def test_capped_dedup_memory_never_counts_a_resend_twice(tmp_path: Path) -> None:
    # 60 updates per version, 100 ids remembered, staleness 5: the old count-capped memory
    # forgot 20 ids of version 1 while updates based on version 0 were still accepted.
    plan = Plan(min_updates_per_version=60, max_staleness=5, max_updates_per_device=60)
    h = Harness(tmp_path, plan, recent_update_ids=100)
    for i in range(60):
        h.send(f"a{i}")
    for i in range(60):
        h.send(f"b{i}", base=1)
    assert h.core.state.model is not None and h.core.state.model.version == 2
    assert h.core.state.dedup.floor == 2  # version 1's ids went, and with them the window
    for uid in ("a0", "a59"):
        r = only_receipt(h.send(uid, base=0))
        assert (r.status, r.reason) == ("rejected", RejectReason.STALE)
    assert only_receipt(h.send("b0", base=1)).status == "duplicate"  # version 2: remembered
    assert h.core.accepted_total == 120
    # A restart rebuilds the same window from versions/*.json.
    h.store.close()
    store = Store(task_root(tmp_path, TASK), fsync=False)
    core = AggregatorCore(h.settings, store, AggregatorMetrics())
    core.state.restore(h.now)
    assert core.state.dedup.floor == 2 and "dev1/b59" in core.state.dedup


def test_every_id_inside_the_window_is_remembered(tmp_path: Path) -> None:
    # Below the cap, the window is every version kept: each id folded into versions 1..4 is
    # answered "duplicate", whatever base version the resend names.
    plan = Plan(min_updates_per_version=2, max_staleness=3, max_updates_per_device=2)
    h = Harness(tmp_path, plan, versions_kept=10)
    ids = [uuid.uuid4().hex[:8] for _ in range(8)]
    for uid in ids:
        h.send(uid)
    assert h.core.state.model is not None and h.core.state.model.version == 4
    assert h.core.state.dedup.floor == 0
    for uid in ids:
        assert only_receipt(h.send(uid, base=0)).status == "duplicate"


def test_versions_leaving_the_store_take_the_window_with_them(tmp_path: Path) -> None:
    h = Harness(tmp_path, Plan(min_updates_per_version=1, max_staleness=10), versions_kept=2)
    for base, uid in enumerate(("u1", "u2", "u3")):
        h.send(uid, base=base)
    assert h.store.version_numbers() == [2, 3] and h.core.state.dedup.floor == 2
    assert only_receipt(h.send("u1", base=1)).reason == RejectReason.STALE
    assert only_receipt(h.send("u2", base=2)).status == "duplicate"


def test_status_on_the_timer_and_after_a_clock_step(tmp_path: Path) -> None:
    h = Harness(tmp_path, Plan(), status_interval=10.0)
    (first,) = h.core.tick(100.0)
    assert isinstance(first, Publish) and first.topic == h.topics.aggregator_status
    assert first.retain
    assert h.core.tick(105.0) == []
    assert len(h.core.tick(111.0)) == 1
    assert len(h.core.tick(50.0)) == 1  # the wall clock stepped back: publish, do not stall
    status = h.core.status("online", 50.0)
    assert (status.version, status.pending_updates, status.time) == (0, 0, 50.0)


def test_graph_of_another_task_is_refused(tmp_path: Path) -> None:
    from fededge.protocol import Graph

    h = Harness(tmp_path, Plan())
    out = h.control(h.topics.graph, Graph(task="other", tflite=b"x", spec={}).to_bytes())
    assert out[:-1] == [] and h.core.state.graph is None
    assert h.metric("fededge_control_messages_rejected_total") == 1


# -- pipelined group commit (the fsync of one group overlaps the next batch) -------------------
def _ingest(h: Harness, *msgs: tuple[str, bytes]) -> list[Effect]:
    out: list[Effect] = []
    for device, payload in msgs:
        out += h.core.ingest(Incoming(h.topics.update(device), payload, object()))
    return out


def test_pipelined_group_is_answered_only_once_durable(tmp_path: Path) -> None:
    h = Harness(tmp_path, Plan(min_updates_per_version=10, max_updates_per_device=10))
    assert _ingest(h, ("dev1", h.payload("u1")), ("dev2", h.payload("u2", device="dev2"))) == []
    # In flight: written, its fsync running; no receipt, no PUBACK yet, nothing folded.
    assert h.core.commit(h.now, pipeline=True) == []
    assert h.core.in_flight and h.core.accepted_total == 0
    pending = h.core.state.pending
    assert pending is not None and pending.sums.count == 0
    # The next batch is validated meanwhile; its commit answers the first group.
    _ingest(h, ("dev3", h.payload("u3", device="dev3")))
    out = h.core.commit(h.now, pipeline=True)
    assert [r.update_id for r in receipts(out)] == ["u1", "u2"]
    assert sum(isinstance(e, Ack) for e in out) == 2
    assert [r.update_id for r in receipts(h.core.flush(h.now))] == ["u3"]
    assert not h.core.in_flight and h.core.accepted_total == 3 and pending.sums.count == 3
    assert h.core.flush(h.now) == []


def test_copy_of_an_update_in_flight_waits_for_its_fsync(tmp_path: Path) -> None:
    h = Harness(tmp_path, Plan(min_updates_per_version=10, max_updates_per_device=10))
    raw = h.payload("u1")
    _ingest(h, ("dev1", raw))
    h.core.commit(h.now, pipeline=True)
    # A second copy while the first is in flight: a duplicate (not a second accept, not
    # counted against the quota), answered after the first copy's accepted receipt.
    assert _ingest(h, ("dev1", raw), ("dev1", h.payload("u2"))) == []
    out = h.core.commit(h.now, pipeline=True)
    assert [(r.update_id, r.status) for r in receipts(out)] == [
        ("u1", "accepted"),
        ("u1", "duplicate"),
    ]
    assert [r.status for r in receipts(h.core.flush(h.now))] == ["accepted"]
    assert h.core.accepted_total == 2


def test_group_completing_the_version_is_not_pipelined(tmp_path: Path) -> None:
    h = Harness(tmp_path, Plan(min_updates_per_version=2, max_updates_per_device=10))
    _ingest(h, ("dev1", h.payload("u1")), ("dev1", h.payload("u2")))
    out = h.core.commit(h.now, pipeline=True)
    assert [r.status for r in receipts(out)] == ["accepted", "accepted"]
    assert not h.core.in_flight and h.core.state.model is not None
    assert h.core.state.model.version == 1


def test_pipelined_group_written_but_not_finished_is_recovered(tmp_path: Path) -> None:
    """kill -9 during the background fsync: the group was never acknowledged; its records
    are replayed (the devices' resends are then duplicates), never half-applied."""
    h = Harness(tmp_path, Plan(min_updates_per_version=10, max_updates_per_device=10))
    _ingest(h, ("dev1", h.payload("u1")), ("dev2", h.payload("u2", device="dev2")))
    h.core.commit(h.now, pipeline=True)
    pending = h.core.state.pending
    assert pending is not None
    pending.close()  # the process ends here (close waits for the fsync, as the OS would)
    h.store.close()
    h2 = AggregatorCore(h.settings, Store(task_root(tmp_path, TASK), fsync=False),
                        AggregatorMetrics())  # fmt: skip
    h2.state.restore(h.now)
    assert h2.state.pending is not None and h2.state.pending.sums.count == 2


def test_prepared_updates_are_decided_and_folded_as_unprepared(tmp_path: Path) -> None:
    # The service parses and measures large updates on the network thread
    # (codec.prepare_update, Incoming.prepared): every receipt, reason and the accumulator,
    # bit for bit, must be those of the core doing it all itself.
    from fededge.aggregator.codec import prepare_update

    plan = Plan(min_updates_per_version=100, clip_norm=1.0, max_updates_per_device=100)
    plain, ahead = Harness(tmp_path / "plain", plan), Harness(tmp_path / "ahead", plan)
    rng = np.random.default_rng(7)

    def delta() -> dict[str, np.ndarray]:
        return {k: (rng.standard_normal(v.shape) * 0.1).astype(np.float32)
                for k, v in WEIGHTS.items()}  # fmt: skip

    payloads = [plain.payload(f"u{i}", delta=delta()) for i in range(6)]
    payloads += [plain.payload(f"r{i}", **kw) for i, kw in enumerate(REJECTS.values())]
    payloads += [payloads[0], b"junk"]  # a duplicate, and one that does not parse
    outs: dict[bool, list[Effect]] = {False: [], True: []}
    for h, prepared in ((plain, False), (ahead, True)):
        for group in (payloads[:4], payloads[4:]):
            for raw in group:
                pre = prepare_update(raw) if prepared else None
                msg = Incoming(h.topics.update("dev1"), raw, object(), 1, pre)
                outs[prepared] += h.core.ingest(msg)
            h.now += 1
            outs[prepared] += h.core.commit(h.now)
    assert prepare_update(b"junk") is None and prepare_update(payloads[0]) is not None
    got = [(r.update_id, r.status, r.reason) for r in receipts(outs[True])]
    assert got == [(r.update_id, r.status, r.reason) for r in receipts(outs[False])]
    assert sorted({s for _, s, _ in got}) == ["accepted", "duplicate", "rejected"]
    assert plain.core.state.pending is not None and ahead.core.state.pending is not None
    assert plain.core.state.pending.sums.count == ahead.core.state.pending.sums.count == 6
    assert plain.core.state.pending.acc.tobytes() == ahead.core.state.pending.acc.tobytes()
