"""Issue 9's attacks against a real Mosquitto, a real aggregator and real device clients.

Each is a hostile broker client (anyone who can publish: another device, an operator
credential, the broker itself): it is refused with a logged reason and a counted metric, and
nothing is adopted, lost or counted twice.
"""

from __future__ import annotations

import logging
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aggtools import Sender, running_aggregator
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from devtools import (
    DIGITS_PLAN,
    broker_overrides,
    call,
    cycle,
    digits_split,
    new_task,
    publish_task,
    wait_until,
)

from fededge.cli import main
from fededge.device.api import ApiServer
from fededge.device.bundle import shipped_bundle_path
from fededge.device.client import Client
from fededge.keys import generate, public_text, write_private
from fededge.mqtt import MqttClient, read_retained
from fededge.protocol import (
    DeviceStatus,
    Graph,
    ModelVersion,
    Plan,
    Receipt,
    Topics,
    Update,
    decode_json,
)
from fededge.protocol.signing import SignedKind, open_message, sign
from fededge.protocol.vocab import NO_GRAPH
from fededge.settings import Settings, load_settings
from fededge.tasks import publish_initial

pytestmark = pytest.mark.broker
MALLORY = Ed25519PrivateKey.generate()


class Keys:
    """The model owner's and the aggregator's keys, as `fededge keys generate` makes them."""

    def __init__(self, tmp: Path) -> None:
        tmp.mkdir(parents=True, exist_ok=True)
        self.owner_file, self.agg_file = tmp / "owner.key", tmp / "aggregator.key"
        self.owner = generate(self.owner_file)
        self.agg = generate(self.agg_file)
        self.owner_pub = public_text(self.owner.public_key())
        self.agg_pub = public_text(self.agg.public_key())


def agg_settings(url: str, state: Path, task: str, keys: Keys, **agg: Any) -> Settings:
    return load_settings(None, {
        "broker": broker_overrides(url), "task": task, "state_dir": state,
        "aggregator": {"metrics": False, "status_interval": 1.0, "signing_key": keys.agg_file,
                       **agg},
        "trust": {"owner_key": keys.owner_pub},
    })  # fmt: skip


def dev_settings(
    url: str, state: Path, task: str, device: str, keys: Keys | None, **extra: Any
) -> Settings:
    trust = {"owner_key": keys.owner_pub, "aggregator_key": keys.agg_pub} if keys else {}
    return load_settings(None, {
        "broker": broker_overrides(url), "task": task, "state_dir": state,
        "device": {"device_id": device, "metrics": False, "seed": 7, "receipt_timeout": 600.0},
        "trust": trust, **extra,
    })  # fmt: skip


def refused(c: Client, kind: str, reason: str) -> float:
    v = c.metrics.registry.get_sample_value(
        "fededge_device_messages_refused_total", {"kind": kind, "reason": reason}
    )
    return v or 0.0


def untrusted(agg: Any, kind: str, reason: str) -> float:
    v = agg.metrics.registry.get_sample_value(
        "fededge_control_messages_untrusted_total", {"kind": kind, "reason": reason}
    )
    return v or 0.0


def publish(s: Settings, topic: str, payload: bytes, *, retain: bool = False) -> None:
    with MqttClient(s.broker, f"mallory-{uuid.uuid4().hex[:8]}", persistent=False) as c:
        c.publish(topic, payload, retain=retain, wait=True, timeout=10)


PLAN = DIGITS_PLAN.model_copy(update={"examples_per_update": 8, "min_updates_per_version": 5})


def test_hostile_plan_forged_model_and_forged_receipt_are_refused(
    broker, tmp_path, caplog: pytest.LogCaptureFixture
) -> None:
    task = new_task()
    keys = Keys(tmp_path / "keys")
    sa = agg_settings(broker.url, tmp_path / "agg", task, keys)
    topics = Topics(sa.topic_prefix, task)
    publish_task(sa, PLAN, sign_key=keys.owner)
    signed_plan = sign(PLAN.to_bytes(), SignedKind.PLAN, keys.owner)
    (part,), x_te, _ = digits_split(1)
    hostile = Plan(learning_rate=100.0, noise_stddev=0.0, examples_per_update=1).to_bytes()
    caplog.set_level(logging.WARNING)
    dev = Client(dev_settings(broker.url, tmp_path / "dev", task, "d1", keys))
    try:
        with running_aggregator(sa) as agg:
            dev.start()
            assert dev.wait_for_version(0, 30)  # the graph and model verified, over MQTT
            wait_until(lambda: dev.plan == PLAN, 20, "the owner's plan")
            # 1. A retained hostile plan (lr 100, no noise), unsigned and signed by another key.
            publish(sa, topics.plan, hostile, retain=True)
            wait_until(lambda: refused(dev, "plan", "unsigned") == 1, 20, "device refuses")
            wait_until(lambda: untrusted(agg, "plan", "unsigned") == 1, 20, "aggregator refuses")
            publish(sa, topics.plan, sign(hostile, SignedKind.PLAN, MALLORY), retain=True)
            wait_until(lambda: refused(dev, "plan", "unknown_key") == 1, 20, "unknown key")
            assert dev.plan == PLAN and agg.plan == PLAN
            # A forged graph: refused by both, and the owner's graph put back.
            signed_graph = read_retained(sa.broker, [topics.graph], wait=5)[topics.graph]
            junk = Graph(task=task, tflite=b"not a model", spec={}).to_bytes()
            publish(sa, topics.graph, junk, retain=True)
            wait_until(lambda: refused(dev, "graph", "unsigned") == 1, 20, "forged graph")
            wait_until(lambda: untrusted(agg, "graph", "unsigned") == 1, 20, "graph, aggregator")
            wait_until(
                lambda: (
                    read_retained(sa.broker, [topics.graph], wait=5).get(topics.graph)
                    == signed_graph
                ),
                20,
                "the signed graph restored",
            )
            # The aggregator put the owner's plan back, byte for byte as it was signed.
            wait_until(
                lambda: (
                    read_retained(sa.broker, [topics.plan], wait=5).get(topics.plan) == signed_plan
                ),
                20,
                "the signed plan restored",
            )
        # 2. The aggregator is down: a retained forged "version 1000" with random weights.
        cur = dev.core.current
        assert cur is not None
        rng = np.random.default_rng(1)
        weights = {k: rng.normal(size=v.shape).astype(np.float32) for k, v in cur.weights.items()}
        forged = ModelVersion(task=task, version=1000, weights=weights,
                              graph_sha256=cur.model.graph_sha256).to_bytes()  # fmt: skip
        publish(sa, topics.model, forged, retain=True)
        wait_until(lambda: refused(dev, "model", "unsigned") == 1, 20, "forged model refused")
        publish(sa, topics.model, sign(forged, SignedKind.MODEL, MALLORY), retain=True)
        wait_until(lambda: refused(dev, "model", "unknown_key") == 1, 20, "foreign key refused")
        # A signature made for another role (the owner's, for a plan) is no model signature.
        publish(sa, topics.model, sign(forged, SignedKind.PLAN, keys.owner), retain=True)
        wait_until(lambda: refused(dev, "model", "bad_signature") == 1, 20, "wrong role")
        _, version = dev.predict_versioned(x_te[:2])
        assert version == 0 and dev.version == 0  # /predict still serves version 0
        # Trained on: version 0 (the update says so), never 1000.
        dev.fit(*cycle(part, 0, 8))
        wait_until(lambda: len(dev.outbox) == 1, 30, "an update in the outbox")
        (uid,) = dev.outbox.ids()
        entry = dev.outbox.get(uid)
        assert entry is not None
        update = Update.from_bytes(entry.payload, max_bytes=1 << 24)
        assert update.base_version == 0
        # 3. A forged "accepted" receipt must not settle the outbox.
        r = Receipt(task=task, device="d1", update_id=update.update_id, status="accepted",
                    version=0, pending=1)  # fmt: skip
        publish(sa, topics.receipt("d1"), r.to_bytes())
        wait_until(lambda: refused(dev, "receipt", "unsigned") == 1, 20, "forged receipt")
        publish(sa, topics.receipt("d1"), sign(r.to_bytes(), SignedKind.RECEIPT, keys.owner))
        wait_until(lambda: refused(dev, "receipt", "unknown_key") == 1, 20, "owner's receipt")
        assert len(dev.outbox) == 1
        assert dev.metrics.registry.get_sample_value(
            "fededge_device_receipts_total", {"status": "accepted"}) is None  # fmt: skip
        # The aggregator back: it refuses the retained hostile messages, restores ours, takes
        # the update from its session and answers with a signed receipt that settles it.
        with running_aggregator(sa) as agg:
            wait_until(lambda: len(dev.outbox) == 0, 60, "the real receipt")
            assert agg.accepted_total == 1 and agg.plan == PLAN and agg.version == 0
        assert dev.version == 0 and dev.plan == PLAN
    finally:
        dev.close()
    text = caplog.text
    for reason in ("unsigned", "unknown_key", "bad_signature"):
        assert f"reason={reason}" in text
    assert "refused receipt message" in text and "refused model message" in text


def test_replays_and_a_chatty_device_cannot_dominate_a_version(broker, tmp_path) -> None:
    task = new_task()
    keys = Keys(tmp_path / "keys")
    sa = agg_settings(broker.url, tmp_path / "agg", task, keys)
    plan = Plan(min_updates_per_version=3, examples_per_update=32, clip_norm=100.0)
    base = ModelVersion(task=task, version=0, weights={"w": np.zeros(4, np.float32)},
                        graph_sha256=NO_GRAPH)  # fmt: skip
    publish_initial(sa, None, base, plan, sign_key=keys.owner)
    deltas = {d: {"w": np.full(4, float(i + 1), np.float32)} for i, d in enumerate("abc")}
    with running_aggregator(sa) as agg:
        a, b, c = Sender(sa, "a"), Sender(sa, "b"), Sender(sa, "c")
        uid = "0f3a9c"
        assert a.receipt(a.update(deltas["a"], n=10_000, uid=uid)).status == "accepted"
        # The same update replayed with one bit of its id flipped, and more from the same
        # device: each refused as device_quota, counted once.
        flipped = chr(ord(uid[0]) ^ 1) + uid[1:]
        r = a.receipt(a.update(deltas["a"], n=10_000, uid=flipped))
        assert (r.status, r.reason) == ("rejected", "device_quota")
        for _ in range(3):
            r = a.receipt(a.update(deltas["a"], n=10_000))
            assert r.reason == "device_quota"
        # QoS 0: dropped, counted, no receipt.
        q0 = Update(task=task, device="b", update_id="qos0", base_version=0, num_examples=8,
                    delta=deltas["b"]).to_bytes()  # fmt: skip
        b.raw(q0, qos=0)
        reg = agg.metrics.registry
        wait_until(lambda: reg.get_sample_value("fededge_updates_qos0_refused_total") == 1, 20,
                   "QoS 0 counted")  # fmt: skip
        assert b.receipt(b.update(deltas["b"], n=8)).status == "accepted"
        assert c.receipt(c.update(deltas["c"], n=32)).status == "accepted"
        v1 = a.model(1)
        assert "qos0" not in b.receipts
        # Signed by the aggregator: a device with its key verifies these.
        open_message(a.raw_models[1], SignedKind.MODEL, [keys.agg.public_key()])
        open_message(a.raw_receipts[uid], SignedKind.RECEIPT, [keys.agg.public_key()])
        for s in (a, b, c):
            s.close()
    assert reg.get_sample_value("fededge_updates_accepted_total") == 3
    assert reg.get_sample_value("fededge_updates_rejected_total", {"reason": "device_quota"}) == 4
    # a claimed 10,000 examples: it weighs examples_per_update (32), like c; b weighs 8.
    expected = (32 * 1.0 + 8 * 2.0 + 32 * 3.0) / 72
    np.testing.assert_allclose(v1.weights["w"], base.weights["w"] + expected, rtol=1e-6)
    assert v1.updates == 3


def test_reinitialisation_with_force_and_sign_key_and_replayed_old_plans(
    broker, tmp_path, capsys: pytest.CaptureFixture[str]
) -> None:
    task = new_task()
    keys = Keys(tmp_path / "keys")
    topics = Topics("fededge", task)
    plan_file = tmp_path / "plan.json"
    plan_file.write_bytes(PLAN.model_copy(update={"min_updates_per_version": 1}).to_bytes())
    init = ["model", "init", "--broker", broker.url, "--task", task, "--bundle",
            str(shipped_bundle_path("digits_mlp")), "--plan", str(plan_file),
            "--sign-key", str(keys.owner_file)]  # fmt: skip
    assert main(init) == 0
    held = read_retained(load_settings(None, {"broker": {"url": broker.url}}).broker,
                         [topics.plan, topics.graph, topics.model], wait=5)  # fmt: skip
    for topic, kind in ((topics.plan, "plan"), (topics.graph, "graph"), (topics.model, "model")):
        open_message(held[topic], kind, [keys.owner.public_key()])  # all three signed
    old_plan = held[topics.plan]
    s1 = agg_settings(broker.url, tmp_path / "agg1", task, keys)
    ds = dev_settings(broker.url, tmp_path / "dev", task, "d1", keys)
    dev = Client(ds)
    try:
        with running_aggregator(s1):
            dev.start()
            assert dev.wait_for_version(0, 30)
            x = Sender(s1, "x")
            cur = dev.core.current
            assert cur is not None
            small = {k: np.full(v.shape, 0.01, np.float32) for k, v in cur.weights.items()}
            assert x.receipt(x.update(small, n=8)).status == "accepted"
            assert dev.wait_for_version(1, 30)
            x.model(1)
            old_v1 = x.raw_models[1]  # signed by the aggregator, generation 0
            x.close()
            # The CLI reads signed messages: `model pull` verifies them with the trust keys.
            capsys.readouterr()
            pulled = tmp_path / "pulled"
            args = ["--broker", broker.url, "--task", task]
            assert main(["model", "pull", *args, "-o", str(pulled)]) == 0
            assert "version 1 from broker" in capsys.readouterr().out
            assert main(["status", *args, "--json"]) == 0
            assert '"problems": []' in capsys.readouterr().out  # signed plan and model read
            forged_key = {"FEDEDGE_TRUST__AGGREGATOR_KEY": keys.owner_pub}
            with pytest.MonkeyPatch.context() as mp:
                for k, v in forged_key.items():
                    mp.setenv(k, v)
                assert main(["model", "pull", *args, "-o", str(tmp_path / "p2")]) != 0
            assert "not trusted" in capsys.readouterr().err
        # Reset: the aggregator stopped, its state gone; `init --force` raises the generation.
        capsys.readouterr()
        assert main([*init, "--force"]) == 0, capsys.readouterr().err
        s2 = agg_settings(broker.url, tmp_path / "agg2", task, keys)
        with running_aggregator(s2) as agg:
            assert agg.plan.generation == 1 and agg.version == 0
            wait_until(lambda: dev.version == 0, 30, "the device back on version 0")
            assert dev.core.generation == 1 and dev.plan.generation == 1
            assert dev.status()["generation"] == 1
    finally:
        dev.close()
    # The generation survives a restart; the owner's own old plan, replayed, is refused.
    dev = Client(ds)
    try:
        assert dev.core.generation == 1 and dev.version == 0
        with running_aggregator(s2) as agg:
            dev.start()
            wait_until(lambda: dev.core.plan_known, 20, "the plan")
            publish(s2, topics.plan, old_plan, retain=True)
            wait_until(lambda: refused(dev, "plan", "old_generation") == 1, 20, "device")
            wait_until(lambda: untrusted(agg, "plan", "old_generation") == 1, 20, "aggregator")
            assert dev.plan.generation == 1 and agg.plan.generation == 1
            # ... and so is the old generation's version 1, although signed and higher.
            publish(s2, topics.model, old_v1, retain=True)
            wait_until(lambda: refused(dev, "model", "old_generation") == 1, 20, "old version 1")
            assert dev.version == 0
    finally:
        dev.close()


def test_a_plan_below_the_privacy_floor_is_refused_and_the_status_says_why(
    broker, tmp_path
) -> None:
    task = new_task()
    keys = Keys(tmp_path / "keys")
    sa = agg_settings(broker.url, tmp_path / "agg", task, keys)
    topics = Topics(sa.topic_prefix, task)
    publish_task(sa, PLAN, sign_key=keys.owner)  # noise_stddev 0: below the floor
    floor = {"min_noise_multiplier": 0.5, "max_clip_norm": 10.0}
    dev = Client(dev_settings(broker.url, tmp_path / "dev", task, "d1", keys, privacy=floor))
    (part,), _, _ = digits_split(1)
    with running_aggregator(sa), MqttClient(sa.broker, "watcher", persistent=False) as w:
        w.subscribe(topics.device_status("d1"), qos=1)
        dev.start()
        server = ApiServer(dev, tmp_path / "api.sock")
        server.start()
        try:
            assert dev.wait_for_version(0, 30)
            wait_until(lambda: dev.core.refused is not None, 20, "the plan refused")
            dev.fit(*cycle(part, 0, 16))
            assert dev.wait_idle(10)  # nothing to do: it does not train
            code, st = call(server.path, "GET", "/status")
            assert code == 200 and "noise multiplier 0" in st["refused"]
            assert st["outbox"] == 0 and st["updates_sent"] == 0 and st["fresh"] == 16

            def status_refused() -> bool:
                while not w.messages.empty():
                    m = w.messages.get_nowait()
                    if m.payload and decode_json(m.payload, DeviceStatus).refused:
                        return True
                return False

            wait_until(status_refused, 40, "the retained status says why")
            assert refused(dev, "plan", "privacy_floor") == 1
            # The owner publishes a plan above the floor (sigma/C = 0.5): the device takes part.
            ok = PLAN.model_copy(update={"noise_stddev": 2.5})
            publish(sa, topics.plan, sign(ok.to_bytes(), SignedKind.PLAN, keys.owner),
                    retain=True)  # fmt: skip
            wait_until(lambda: dev.status()["updates_sent"] >= 1, 30, "training resumes")
            assert dev.status()["refused"] is None
        finally:
            server.close()
            dev.close()


def test_without_keys_a_device_warns_that_it_trusts_the_broker(
    broker, tmp_path, caplog: pytest.LogCaptureFixture
) -> None:
    task = new_task()
    caplog.set_level(logging.WARNING, "fededge.device.client")
    dev = Client(dev_settings(broker.url, tmp_path / "dev", task, "d1", None))
    try:
        dev.start()
    finally:
        dev.close()
    assert "trusts whoever can publish on the broker" in caplog.text
    keys = Keys(tmp_path / "keys")
    caplog.clear()
    dev = Client(dev_settings(broker.url, tmp_path / "dev2", task, "d2", keys))
    try:
        dev.start()
    finally:
        dev.close()
    assert "trusts whoever" not in caplog.text


def test_an_unreadable_trust_key_stops_the_device_at_start(tmp_path) -> None:
    from fededge.errors import ConfigError

    s = load_settings(None, {"state_dir": tmp_path, "device": {"device_id": "d1"},
                             "trust": {"owner_key": str(tmp_path / "missing.pub")}})  # fmt: skip
    with pytest.raises(ConfigError, match=r"trust\.owner_key"):
        Client(s)
    # A private key file is not a public key.
    write_private(tmp_path / "k", Ed25519PrivateKey.generate())
    s = load_settings(None, {"state_dir": tmp_path, "device": {"device_id": "d1"},
                             "trust": {"aggregator_key": str(tmp_path / "k")}})  # fmt: skip
    with pytest.raises(ConfigError, match=r"trust\.aggregator_key"):
        Client(s)
