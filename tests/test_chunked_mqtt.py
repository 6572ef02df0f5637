"""Chunked transfer on a real Mosquitto limited to 128 KiB packets (AWS IoT Core's limit).

The demo end to end (graph, models and updates chunked), a 100,000-parameter task whose
400 KB versions and updates cannot pass unchunked, a transfer cut by a reconnect and by an
aggregator restart, and hostile chunk streams: nothing is lost, nothing counted twice.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
import pytest
from aggtools import Sender, init_task, make_settings, running_aggregator
from devtools import (
    DIGITS_PLAN,
    cycle,
    device_settings,
    digits_split,
    mlp_bundle,
    new_task,
    publish_task,
    wait_until,
)

from fededge.demo import DemoConfig, VersionRow, run_demo
from fededge.device.client import Client
from fededge.mqtt import MqttClient, read_retained
from fededge.protocol import ModelVersion, Plan, Topics, Update
from fededge.protocol.chunks import decode_chunk, split
from fededge.protocol.tensors import encode_tensors
from fededge.settings import Settings

pytestmark = pytest.mark.broker
LIMIT = 131_072
N = 100_000  # float32 parameters: 400 KB messages


@pytest.fixture
def small_broker(mosquitto_factory):
    return mosquitto_factory(max_packet_size=LIMIT)


def _settings(url: str, tmp: Path, task: str | None = None) -> Settings:
    s = make_settings(url, tmp, task)
    s.broker.max_message_bytes = LIMIT
    return s


def _sender(settings: Settings, device: str) -> Sender:
    s = Sender(settings, device)
    s.client.subscribe(Topics(settings.topic_prefix, settings.task).model + "/chunks/+")
    return s


def _update(settings: Settings, uid: str, value: float, device: str = "dev1") -> bytes:
    delta = {"w": np.full(N, value / np.sqrt(N), dtype=np.float32)}
    return Update(task=settings.task, device=device, update_id=uid, base_version=0,
                  num_examples=10, delta=delta).to_bytes()  # fmt: skip


@pytest.mark.parametrize(("limit", "secure"), [(LIMIT, False), (8192, False), (8192, True)])
def test_demo_cnn_on_a_128k_broker(small_broker, tmp_path, limit: int, secure: bool) -> None:
    """`fededge demo --model cnn --max-message-bytes LIMIT` on Mosquitto max_packet_size 131072:
    the 175 KB graph (and at 8192 every model and update, or masked input, too) only passes
    in chunks; signed graph, plan and versions are verified after reassembly."""
    task = f"chunk-{uuid.uuid4().hex[:6]}"
    cfg = DemoConfig(devices=4, versions=3, model="cnn", broker=small_broker.url, mqtt_version="5",
                     min_updates_per_version=4, task=task, out_dir=tmp_path,
                     max_message_bytes=limit, secure_aggregation=secure)  # fmt: skip
    seen: list[VersionRow] = []
    held: dict[str, bytes] = {}

    def on_row(row: VersionRow) -> None:
        seen.append(row)
        if row.version == 1:  # what the broker holds while the demo runs
            held.update(read_retained(small_broker.settings(), [f"fededge/{task}/#"], wait=5,
                                      raw=True))  # fmt: skip

    run_demo(cfg, on_row)
    assert [r.version for r in seen] == [0, 1, 2, 3]
    assert seen[-1].accuracy > seen[0].accuracy
    graph_chunks = [t for t in held if t.startswith(f"fededge/{task}/graph/chunks/")]
    assert len(graph_chunks) == -(-175_644 // (limit - 1024)) or len(graph_chunks) >= 2
    model_chunks = [t for t in held if t.startswith(f"fededge/{task}/model/chunks/")]
    assert bool(model_chunks) == (limit == 8192)
    # the run clears what it leaves behind, chunk topics included
    assert read_retained(small_broker.settings(), [f"fededge/{task}/#"], wait=5, raw=True) == {}


def test_large_task_through_a_128k_broker(small_broker, tmp_path) -> None:
    """400 KB versions and updates: chunked both ways, reassembled, folded, read back."""
    settings = _settings(small_broker.url, tmp_path / "agg")
    init_task(settings, {"w": np.zeros(N, np.float32)}, Plan(min_updates_per_version=2))
    topics = Topics(settings.topic_prefix, settings.task)
    raw = read_retained(small_broker.settings(), [topics.all_filter], wait=5, raw=True)
    assert len([t for t in raw if "/model/chunks/" in t]) == 4  # 400 KB / 130 KB
    with running_aggregator(settings) as agg:
        assert agg.version == 0  # adopted from the chunked retained model
        s = _sender(settings, "dev1")
        s2 = _sender(settings, "dev2")
        try:
            s.raw(_update(settings, "u1", 0.5))
            s2.raw(_update(settings, "u2", 0.25, "dev2"), device="dev2")
            assert s.receipt("u1").status == "accepted"
            assert s2.receipt("u2").status == "accepted"
            mv = s.model(1)
            np.testing.assert_allclose(mv.weights["w"], np.full(N, 0.375 / np.sqrt(N)), rtol=1e-5)
        finally:
            s.close()
            s2.close()
        assert agg.accepted_total == 2
    got = read_retained(small_broker.settings(), [topics.model], wait=5, required=[topics.model])
    assert ModelVersion.from_bytes(got[topics.model], max_bytes=1 << 24).version == 1


def test_transfer_cut_by_reconnect_and_by_aggregator_restart(small_broker, tmp_path) -> None:
    """Half an update, then the connection goes; the whole resend completes it exactly once.
    The same across an aggregator restart (its partial is gone: the resend is whole)."""
    settings = _settings(small_broker.url, tmp_path / "agg")
    init_task(settings, {"w": np.zeros(N, np.float32)},
              Plan(min_updates_per_version=5, max_updates_per_device=5))  # fmt: skip
    topics = Topics(settings.topic_prefix, settings.task)

    def half(payload: bytes, device: str) -> None:
        chunks, _ = split(payload, LIMIT)
        c = MqttClient(small_broker.settings(), f"half-{uuid.uuid4().hex[:6]}", persistent=False)
        with c:
            for ch in chunks[: len(chunks) // 2]:
                c.publish(topics.update(device), ch, wait=True, timeout=10)

    p1 = _update(settings, "u1", 0.5)
    with running_aggregator(settings) as agg:
        half(p1, "dev1")
        ra = agg.client.messages.reassembler
        wait_until(lambda: ra.transfers == 1, timeout=20)
        done = ra.completed
        s = _sender(settings, "dev1")  # the device back on a new connection: whole resend
        try:
            s.raw(p1)
            assert s.receipt("u1").status == "accepted"
            assert ra.transfers == 0 and ra.completed == done + 1
            s.receipts.clear()
            s.raw(p1)  # no receipt came (say): the resend is a duplicate, not a second update
            assert s.receipt("u1").status == "duplicate"
            p2 = _update(settings, "u2", 0.25)
            half(p2, "dev1")
            wait_until(lambda: ra.transfers == 1, timeout=20)
        finally:
            s.close()
        assert agg.accepted_total == 1
    with running_aggregator(settings) as agg:  # restarted: the partial transfer is gone
        s = _sender(settings, "dev1")
        try:
            s.raw(p2)
            assert s.receipt("u2").status == "accepted"
        finally:
            s.close()
        assert agg.pending is not None and agg.pending.sums.count == 2


def _forged(good: bytes) -> list[bytes]:
    """Well-formed chunks that claim ``good``'s digest but carry zeros."""
    chunks, _ = split(good, LIMIT)
    out = []
    for raw in chunks:
        c = decode_chunk(raw, max_transfer_bytes=1 << 24)
        meta = {"chunk": str(c.index), "count": str(c.count), "fededge": "1", "kind": "chunk",
                "length": str(c.length), "sha256": c.sha256, "size": str(c.size),
                "transfer": c.transfer}  # fmt: skip
        out.append(encode_tensors({"data": np.zeros(len(c.data), np.uint8)}, meta))
    return out


def test_hostile_chunk_streams_are_refused_and_counted(small_broker, tmp_path) -> None:
    """Junk, an overlapping index, a digest that does not match, a transfer left unfinished:
    refused, counted, logged; the aggregator goes on and takes the honest update once."""
    settings = _settings(small_broker.url, tmp_path / "agg")
    settings.broker.chunk_timeout = 3.0
    init_task(settings, {"w": np.zeros(N, np.float32)}, Plan(min_updates_per_version=5))
    topics = Topics(settings.topic_prefix, settings.task)
    good = _update(settings, "u1", 0.5)
    chunks, _ = split(good, LIMIT)
    with running_aggregator(settings) as agg:
        ra = agg.client.messages.reassembler
        c = MqttClient(small_broker.settings(), f"evil-{uuid.uuid4().hex[:6]}", persistent=False)
        with c:
            for payload in [
                b'\x40\x00\x00\x00\x00\x00\x00\x00{"__metadata__":{"kind":"chunk"}}',  # junk
                chunks[0],
                _forged(good)[0],  # overlap: index 0 again with other bytes
                *_forged(good),  # complete, but the digest does not match
                chunks[1],  # an endless transfer: never finished, expires
            ]:
                c.publish(topics.update("dev1"), payload, wait=True, timeout=10)
        wait_until(lambda: (ra.refused["malformed"], ra.refused["overlap"],
                            ra.refused["digest_mismatch"]) == (1, 1, 1), timeout=20)  # fmt: skip
        wait_until(lambda: ra.refused["expired"] == 1, timeout=30)  # checked on each step
        assert ra.transfers == 0 and ra.reserved_bytes == 0
        s = _sender(settings, "dev1")
        try:
            s.raw(good)
            assert s.receipt("u1").status == "accepted"
        finally:
            s.close()
        assert agg.accepted_total == 1


def test_refusals_are_prometheus_counters(small_broker, tmp_path) -> None:
    from prometheus_client import generate_latest

    settings = _settings(small_broker.url, tmp_path / "agg")
    init_task(settings, {"w": np.zeros(N, np.float32)}, Plan(min_updates_per_version=5))
    topics = Topics(settings.topic_prefix, settings.task)
    with running_aggregator(settings) as agg:
        c = MqttClient(small_broker.settings(), f"evil-{uuid.uuid4().hex[:6]}", persistent=False)
        with c:
            c.publish(topics.update("dev1"), b'{"kind":"chunk"} junk', wait=True, timeout=10)
        ra = agg.client.messages.reassembler
        wait_until(lambda: ra.refused["malformed"] == 1, timeout=20)
        text = generate_latest(agg.metrics.registry).decode()
        assert 'fededge_chunks_refused_total{reason="malformed"} 1.0' in text


def test_retained_versions_replace_each_other_cleanly(small_broker) -> None:
    """3 chunks, then 2, then a message small enough to go whole: a live reader gets each
    whole, the surplus chunk topics are cleared, a late reader gets only the last."""
    settings = small_broker.settings(max_message_bytes=4096)
    topic = f"fededge/r{uuid.uuid4().hex[:6]}/model"
    first, second, third = b"1" * 7000, b"2" * 5000, b"3" * 100
    reader = MqttClient(settings, f"rd-{uuid.uuid4().hex[:6]}", persistent=False)
    pub = MqttClient(settings, f"pub-{uuid.uuid4().hex[:6]}", persistent=False)
    with reader, pub:
        reader.subscribe_all([topic, f"{topic}/chunks/+"], qos=1)
        got = []
        for p in (first, second):
            pub.publish(topic, p, retain=True, wait=True, timeout=10)
            got.append(reader.messages.get(timeout=20).payload)
        assert got == [first, second]
        raw = read_retained(settings, [f"{topic}/#", topic], wait=5, raw=True)
        assert sorted(t.rsplit("/", 1)[-1] for t in raw if "/chunks/" in t) == ["0", "1"]
        assert read_retained(settings, [topic], wait=5, required=[topic]) == {topic: second}
        pub.publish(topic, third, retain=True, wait=True, timeout=10)
        assert reader.messages.get(timeout=20).payload == third
        raw = read_retained(settings, [f"{topic}/#", topic], wait=5, raw=True)
        assert raw == {topic: third}


def test_partial_transfer_survives_a_broker_restart(small_broker, tmp_path) -> None:
    """Half an update, a broker restart (every client reconnects), the other half: the
    aggregator kept its partial transfer across its reconnect and completes it once."""
    settings = _settings(small_broker.url, tmp_path / "agg")
    init_task(settings, {"w": np.zeros(N, np.float32)}, Plan(min_updates_per_version=5))
    topics = Topics(settings.topic_prefix, settings.task)
    chunks, _ = split(_update(settings, "u1", 0.5), LIMIT)

    def send(part: list[bytes]) -> None:
        c = MqttClient(small_broker.settings(), f"dev-{uuid.uuid4().hex[:6]}", persistent=False)
        with c:
            for ch in part:
                c.publish(topics.update("dev1"), ch, wait=True, timeout=10)

    with running_aggregator(settings) as agg:
        ra = agg.client.messages.reassembler
        send(chunks[:2])
        wait_until(lambda: ra.transfers == 1, timeout=20)
        small_broker.restart()
        wait_until(lambda: agg.client.connected, timeout=30)
        s = _sender(settings, "dev1")
        try:
            send(chunks[2:])
            assert s.receipt("u1").status == "accepted"
        finally:
            s.close()
        assert agg.accepted_total == 1 and ra.transfers == 0


def test_device_update_with_chunks_dropped_is_resent_and_counted_once(
    mosquitto_factory, tmp_path
) -> None:
    """A real device: its chunked update reaches the offline aggregator's session only in part
    (the broker's queue holds 2 messages and drops the rest, as Mosquitto does silently); the
    outbox keeps the update until the receipt and resends it whole; it is folded once."""
    m = mosquitto_factory(max_packet_size=LIMIT, max_queued_messages=2)
    task = new_task()
    agg_settings = make_settings(m.url, tmp_path / "agg", task=task)
    plan = DIGITS_PLAN.model_copy(
        update={"min_updates_per_version": 1, "examples_per_update": 8, "max_message_bytes": 4096}
    )
    publish_task(agg_settings, plan)
    with running_aggregator(agg_settings) as agg:  # its persistent session now exists
        assert agg.version == 0
    (part,), _, _ = digits_split(1)
    c = Client(device_settings(m.url, tmp_path / "dev", task, "rc", receipt_timeout=2.0),
               bundle=mlp_bundle())  # fmt: skip
    c.start()
    try:
        assert c.wait_for_version(0, 20)  # graph and version 0 came in chunks
        c.fit(*cycle(part, 0, 8))
        wait_until(lambda: c.status()["updates_sent"] == 1, 20, "an update")
        (uid,) = c.outbox.ids()
        assert m.wait_log("Outgoing messages are being dropped", timeout=30)
        with running_aggregator(agg_settings) as agg:
            wait_until(lambda: agg.version == 1, 60, "version 1")
            assert c.wait_idle(20)
            assert agg.accepted_total == 1
            assert agg.model is not None and (agg.model.updates, agg.model.examples) == (1, 8)
        assert c.status()["outbox"] == 0
        # the first send was cut by the broker: only a resend could complete the transfer
        publishes = c.metrics.registry.get_sample_value("fededge_device_update_publishes_total")
        assert publishes is not None and publishes >= 2
    finally:
        c.close()
    assert uid
