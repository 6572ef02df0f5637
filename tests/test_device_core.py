"""The device core without a broker: events in, effects out (fededge/device/core.py).

Real LiteRT runtime, real SQLite state, real SecAgg+ crypto; no MQTT.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from devtools import DIGITS_PLAN, mlp_bundle

from fededge.device.adoption import ModelSlot
from fededge.device.core import DeviceCore
from fededge.device.effects import Adopted, Effect, Persist, Publish, WakeTrainer
from fededge.device.examples import ExampleStore, StateDb
from fededge.device.metrics import DeviceMetrics
from fededge.device.runtime import ModelRuntime
from fededge.device.secagg_client import Participant, ReadyInput
from fededge.device.training import local_update
from fededge.device.trust import TRUST_FILE, Refused, TrustState
from fededge.errors import ProtocolError
from fededge.keys import public_text
from fededge.protocol import Graph, ModelVersion, Plan, Receipt, Topics, Update
from fededge.protocol.messages import SecureAggregation
from fededge.protocol.roster import Roster
from fededge.protocol.vocab import NO_GRAPH
from fededge.secagg import TO_ALL, encode
from fededge.secagg.graph import Stage
from fededge.secagg.messages import decode_payload
from fededge.secagg.server import ServerRound
from fededge.testing.secagg import identity_keys, make_config, roster_of

TASK = "coretask"
PLAN = DIGITS_PLAN.model_copy(update={"examples_per_update": 8, "max_staleness": 1})


def make_core(tmp_path: Path, device: str = "d1") -> DeviceCore:
    db = StateDb(tmp_path / f"{device}.sqlite")
    examples = ExampleStore(db, max_examples=10_000, max_age=86_400)
    return DeviceCore(device, Topics("fededge", TASK), db, examples, DeviceMetrics(),
                      receipt_timeout=60.0)  # fmt: skip


def runtime() -> ModelRuntime:
    return ModelRuntime.from_bundle(mlp_bundle())


def model(version: int, graph: str | None = None, scale: float = 1.0) -> ModelVersion:
    b = mlp_bundle()
    weights = {k: np.asarray(v, np.float32) * scale for k, v in b.weights.items()}
    return ModelVersion(task=TASK, version=version, weights=weights,
                        graph_sha256=graph or b.spec.graph_sha256, time=time.time())  # fmt: skip


def sample(core: DeviceCore, name: str, **labels: str) -> float:
    value = core.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def topics_of(effects: list[Effect]) -> list[str]:
    return [e.topic for e in effects if isinstance(e, Publish)]


def adopted(effects: list[Effect]) -> list[int]:
    return [e.model.version for e in effects if isinstance(e, Adopted)]


def ready_core(tmp_path: Path, plan: Plan = PLAN, version: int = 0) -> DeviceCore:
    core = make_core(tmp_path)
    core.on_graph(mlp_bundle().spec, runtime(), None)
    core.on_plan(plan, None)
    assert adopted(core.on_model(model(version), None)) == [version]
    return core


def add_examples(core: DeviceCore, n: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    core.examples.add(rng.random((n, 64), dtype=np.float32), rng.integers(0, 10, n))


def test_a_model_waits_for_its_graph_then_is_adopted_and_persisted(tmp_path: Path) -> None:
    core = make_core(tmp_path)
    raw = model(3).to_bytes()
    assert core.on_model(model(3), raw) == []  # no graph yet: it waits
    assert core.version is None and core.model.waiting is not None
    b = mlp_bundle()
    graph_raw = Graph(task=TASK, tflite=b.graph, spec=b.spec.to_json()).to_bytes()
    effects = core.on_graph(b.spec, runtime(), graph_raw)
    assert effects[0] == Persist("graph.bin", graph_raw)
    assert adopted(effects) == [3] and core.version == 3 and core.model.waiting is None
    assert any(isinstance(e, Persist) and e.name == "model.bin" for e in effects)
    assert any(isinstance(e, WakeTrainer) for e in effects)
    assert sample(core, "fededge_device_model_version") == 3
    # The same graph again changes nothing; NO_GRAPH means "the task's graph".
    assert core.on_graph(b.spec, runtime(), graph_raw) == []
    assert adopted(core.on_model(model(4, NO_GRAPH), None)) == [4]


def test_a_model_for_another_graph_waits_and_bad_ones_are_refused(tmp_path: Path) -> None:
    core = ready_core(tmp_path)
    assert core.on_model(model(1, "ab" * 32), None) == [] and core.version == 0
    with pytest.raises(ProtocolError) as e:
        core.on_model(model(2, scale=float("nan")), None)
    assert e.value.reason == "non_finite" and core.version == 0
    with pytest.raises(ProtocolError) as e:
        core.on_model(ModelVersion(task="other", version=5, weights={}, graph_sha256=NO_GRAPH,
                                   time=1.0), None)  # fmt: skip
    assert e.value.reason == "wrong_task"
    with pytest.raises(ProtocolError):
        core.is_new_graph("other", "00" * 32)


def test_the_same_version_again_is_ignored_and_going_back_needs_a_new_generation(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    core = ready_core(tmp_path, version=5)
    again = core.current.model if core.current else None
    assert again is not None and core.on_model(again, None) == []
    with pytest.raises(Refused) as e:  # a replayed (or forged, if unsigned) older version
        core.on_model(model(2), None)
    assert e.value.reason == "old_version" and core.version == 5
    # A re-initialisation: the owner's plan raises the generation, version 0 comes with it.
    effects = core.on_plan(PLAN.model_copy(update={"generation": 1}), b"{}")
    assert Persist(TRUST_FILE, TrustState(1, (0, 5)).to_bytes()) in effects
    assert core.generation == 1
    with caplog.at_level(logging.WARNING, "fededge.device.adoption"):
        assert adopted(core.on_model(replace(model(0), generation=1), None)) == [0]
    assert "went back from 5 to 0" in caplog.text and core.version == 0
    # The old generation's versions, however high, and its plan are refused from now on.
    with pytest.raises(Refused) as e:
        core.on_model(model(9), None)
    assert e.value.reason == "old_generation" and core.version == 0
    with pytest.raises(Refused):
        core.on_plan(PLAN, b"{}")


def test_no_training_without_the_owners_plan(tmp_path: Path) -> None:
    core = make_core(tmp_path)
    core.on_graph(mlp_bundle().spec, runtime(), None)
    core.on_model(model(0), None)
    add_examples(core, 8)
    assert not core.trainable() and core.next_job() is None  # built-in defaults only
    assert WakeTrainer() in core.on_plan(PLAN, b"{}")
    assert core.on_plan(PLAN, b"{}") == []  # the same plan again
    assert core.trainable()
    job = core.next_job()
    assert job is not None and core.training and len(job.batch.ids) == 8


def train(core: DeviceCore, connected: bool = True) -> tuple[list[Effect], bool]:
    job = core.next_job()
    assert job is not None
    lu = local_update(job.current.runtime, job.current.weights, job.batch.x, job.batch.y,
                      epochs=1, batch_size=8, learning_rate=0.1, clip_norm=5.0,
                      noise_stddev=0.0, rng=np.random.default_rng(0))  # fmt: skip
    return core.trained(job, lu, 0.01, now=100.0, connected=connected)


def test_an_update_is_stored_with_its_examples_used_then_sent(tmp_path: Path) -> None:
    core = ready_core(tmp_path)
    add_examples(core, 8)
    effects, more = train(core)
    assert more and not core.training
    (uid,) = core.outbox.ids()
    entry = core.outbox.get(uid)
    assert entry is not None and entry.base_version == 0 and entry.attempts == 1
    assert core.examples.fresh_count() == 0
    (pub,) = effects
    assert isinstance(pub, Publish)
    assert pub.topic == core.topics.update("d1")
    assert Update.from_bytes(pub.payload, max_bytes=1 << 24).update_id == uid
    assert core.outbox.was_sent(uid) and sample(core, "fededge_device_updates_sent_total") == 1
    # Sent at t=100: not due again before the receipt timeout, due after it.
    assert [e for e in core.tick(now=120.0, wall=1.0, connected=True)
            if isinstance(e, Publish) and e.topic == pub.topic] == []  # fmt: skip
    resent = core.tick(now=161.0, wall=1.0, connected=True)
    assert [e.payload for e in resent if isinstance(e, Publish) and e.topic == pub.topic] == [
        pub.payload
    ]
    # A reconnect makes every entry due at once.
    core.on_connect()
    assert any(isinstance(e, Publish) and e.topic == pub.topic
               for e in core.tick(now=162.0, wall=1.0, connected=True))  # fmt: skip


def test_offline_training_stores_without_sending(tmp_path: Path) -> None:
    core = ready_core(tmp_path)
    add_examples(core, 8)
    effects, _ = train(core, connected=False)
    assert effects == [] and len(core.outbox) == 1
    assert all(e.topic != core.topics.update("d1")
               for e in core.tick(now=1.0, wall=1.0, connected=False)
               if isinstance(e, Publish))  # fmt: skip


def test_an_update_outrun_by_new_versions_is_discarded(tmp_path: Path) -> None:
    core = ready_core(tmp_path)
    add_examples(core, 8)
    job = core.next_job()
    assert job is not None
    core.on_model(model(2), None)  # max_staleness 1: version 0 fell out of the window
    lu = local_update(job.current.runtime, job.current.weights, job.batch.x, job.batch.y,
                      epochs=1, batch_size=8, learning_rate=0.1, clip_norm=5.0,
                      noise_stddev=0.0, rng=np.random.default_rng(0))  # fmt: skip
    assert core.trained(job, lu, 0.01, now=1.0, connected=True) == ([], True)
    assert len(core.outbox) == 0 and core.examples.fresh_count() == 8  # trains again


def test_stale_entries_are_dropped_on_a_new_version_or_plan(tmp_path: Path) -> None:
    core = ready_core(tmp_path, plan=PLAN.model_copy(update={"max_staleness": 3}))
    core.outbox.put("old", 0, 8, b"x")
    core.outbox.put("newer", 1, 8, b"y")
    core.tick(now=1.0, wall=1.0, connected=True)
    core.on_model(model(3), None)
    core.tick(now=2.0, wall=1.0, connected=True)
    assert core.outbox.ids() == ["old", "newer"]  # 3 - 3 = 0: both in the window
    core.on_model(model(4), None)
    core.tick(now=3.0, wall=1.0, connected=True)
    assert core.outbox.ids() == ["newer"]
    assert sample(core, "fededge_device_updates_dropped_total", reason="stale") == 1
    core.on_plan(PLAN.model_copy(update={"max_staleness": 2}), None)  # a narrower window
    core.tick(now=4.0, wall=1.0, connected=True)
    assert core.outbox.ids() == []
    assert sample(core, "fededge_device_updates_dropped_total", reason="stale") == 2
    assert sample(core, "fededge_device_outbox_depth") == 0


def receipt(uid: str, status: str, reason: str | None = None, device: str = "d1") -> Receipt:
    return Receipt(task=TASK, device=device, update_id=uid, status=status, version=1,
                   reason=reason, detail="test" if reason else None)  # fmt: skip


def test_receipts_settle_the_outbox_and_rejections_are_counted(tmp_path: Path) -> None:
    core = ready_core(tmp_path)
    for uid in ("a", "b", "c"):
        core.outbox.put(uid, 0, 8, b"p")
    core.on_receipt(receipt("a", "accepted"))
    core.on_receipt(receipt("b", "rejected", "bad_shape"))
    core.on_receipt(receipt("c", "accepted", device="d2"))  # not ours: ignored
    core.on_receipt(receipt("zz", "duplicate"))  # no longer here: counted, harmless
    assert core.outbox.ids() == ["c"]
    assert sample(core, "fededge_device_receipts_total", status="accepted") == 1
    assert sample(core, "fededge_device_receipts_total", status="rejected") == 1
    assert sample(core, "fededge_device_receipts_total", status="duplicate") == 1
    assert sample(core, "fededge_device_updates_dropped_total", reason="bad_shape") == 1


def test_status_is_published_when_due_and_offline_in_the_will(tmp_path: Path) -> None:
    core = ready_core(tmp_path)
    topic = core.topics.device_status("d1")
    first = [e for e in core.tick(now=0.0, wall=5.0, connected=True) if isinstance(e, Publish)]
    assert [(e.topic, e.retain) for e in first] == [(topic, True)]
    assert core.tick(now=1.0, wall=5.0, connected=True) == []  # not due
    core.on_receipt(receipt("x", "accepted"))  # anything that changes the status
    assert topics_of(core.tick(now=2.0, wall=5.0, connected=True)) == [topic]
    assert topics_of(core.tick(now=40.0, wall=5.0, connected=True)) == [topic]
    assert b'"offline"' in core.status_publish("offline", 1.0).payload
    assert core.status(connected=False)["version"] == 0


# -- secure aggregation: the masked input's examples are spent before it can leave ----------------
SA_PLAN = PLAN.model_copy(update={
    "clip_norm": 1.0,
    "secure_aggregation": SecureAggregation(cohort_size=5, min_cohort=5, threshold=3),
})  # fmt: skip


def test_masked_input_examples_are_marked_used_before_it_is_published(tmp_path: Path) -> None:
    topics = Topics("fededge", TASK)
    names = ["d0", "d1", "d2", "d3", "d4"]
    dbs = {d: StateDb(tmp_path / f"{d}.sqlite") for d in names}
    parts: dict[str, Participant] = {}
    keys = identity_keys(names)
    roster = Roster(TASK, 1, {d: public_text(k.public_key()) for d, k in keys.items()}).to_bytes()
    for d in names:
        store = ExampleStore(dbs[d], max_examples=100, max_age=86_400)
        store.add(np.zeros((4, 3), np.float32), np.zeros(4, np.int64))
        parts[d] = Participant(d, topics, dbs[d], DeviceMetrics(),
                               version=lambda: 0, plan=lambda: SA_PLAN)  # fmt: skip
        parts[d].configure(keys[d], roster=roster)  # secure rounds need an identity and a roster
        ids = [r[0] for r in dbs[d].query("SELECT id FROM examples")]
        parts[d].offer(ReadyInput(0, {"w": np.full(5, 0.1, np.float32)}, 4, ids))
        checkin = parts[d].tick(now=0.0, wall=1.0, connected=True)
        assert [e.topic for e in checkin if isinstance(e, Publish)] == [topics.checkin(d)]
    config = make_config("r1", names, vector_length=5, threshold=3, neighbours=4, clip=1.0,
                         max_weight=1000.0)  # fmt: skip
    server = ServerRound(config, roster=roster_of(keys))
    lost = "d2"  # its process "crashes" right after deciding to send its masked input
    masked_seen: list[str] = []

    def fresh(d: str) -> int:
        return int(dbs[d].query("SELECT COUNT(*) FROM examples WHERE used = 0")[0][0])

    queue = [(o.to, o.message) for o in server.start(0.0)]
    for _ in range(200):
        if not queue:
            break
        to, msg = queue.pop(0)
        targets = names if to == TO_ALL else [to]
        topic_of = {d: topics.round_broadcast("r1", msg.TYPE) if to == TO_ALL
                    else topics.round_to("r1", d) for d in targets}  # fmt: skip
        for d in targets:
            if d == lost and lost in masked_seen:
                continue  # crashed
            for e in parts[d].on_message(topic_of[d], encode(msg), now=1.0):
                if not isinstance(e, Publish):
                    continue
                where = topics.parse_round(e.topic)
                assert where is not None
                if where.type == "masked":
                    # The effect is not carried out yet, but the spend is committed.
                    assert fresh(d) == 0 and parts[d].masked_sent == 1
                    masked_seen.append(d)
                    if d == lost:
                        continue  # never published
                got = decode_payload(e.payload, masked=where.type == "masked")
                queue += [(o.to, o.message) for o in server.handle(got, 1.0)]
        if not queue and server.stage not in (Stage.DONE, Stage.ABORTED):
            queue += [(o.to, o.message) for o in server.advance(1000.0)]
    assert sorted(masked_seen) == names
    assert server.stage == Stage.DONE and server.survivors == ("d0", "d1", "d3", "d4")
    # After the crash the lost device's examples stay used: they never serve another round.
    dbs[lost].close()
    reopened = StateDb(tmp_path / f"{lost}.sqlite")
    assert reopened.query("SELECT COUNT(*) FROM examples WHERE used = 0")[0][0] == 0
    reopened.close()
    assert not parts["d0"].busy() and parts["d0"].rounds_done == 1


def test_model_slot_keeps_weights_when_the_same_graph_gets_a_new_runtime(tmp_path: Path) -> None:
    slot = ModelSlot(TASK)
    slot.set_graph(mlp_bundle().spec, runtime())
    slot.adopt(model(1), None)
    assert slot.current is not None and slot.current.version == 1
    assert not slot.is_new_graph(TASK, mlp_bundle().spec.graph_sha256)
