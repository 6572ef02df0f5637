"""The in-process device Client against a real Mosquitto, real LiteRT and the real aggregator."""

from __future__ import annotations

import contextlib
import queue
import threading

import numpy as np
import pytest
from aggtools import make_settings, running_aggregator
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

from fededge.device.bundle import load_bundle, shipped_bundle_path
from fededge.device.client import Client
from fededge.device.runtime import ModelRuntime
from fededge.errors import InputError, NotReadyError
from fededge.mqtt import MqttClient
from fededge.protocol import DeviceStatus, Graph, ModelVersion, Topics, decode_json

pytestmark = pytest.mark.broker
MAX_VERSIONS = 30


def _accuracy(
    rt: ModelRuntime, weights: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray
) -> float:
    return float(np.mean(np.argmax(rt.infer(x, weights), axis=1) == y))


def test_five_non_iid_devices_reach_085(broker, tmp_path) -> None:
    task = new_task()
    agg_settings = make_settings(broker.url, tmp_path / "agg", task=task)
    publish_task(agg_settings)
    parts, x_te, y_te = digits_split(5)
    rt = ModelRuntime.from_bundle(mlp_bundle())
    history: list[tuple[int, float]] = []
    with running_aggregator(agg_settings) as agg:
        clients = [
            Client(
                device_settings(broker.url, tmp_path / "dev", task, f"d{i}"), bundle=mlp_bundle()
            )
            for i in range(5)
        ]
        for c in clients:
            c.start()
        try:
            pos = 0
            for v in range(MAX_VERSIONS):
                for c in clients:
                    assert c.wait_for_version(v, 20), f"{c.device_id} never saw version {v}"
                for c, part in zip(clients, parts, strict=True):
                    c.fit(*cycle(part, pos, DIGITS_PLAN.examples_per_update))
                pos += DIGITS_PLAN.examples_per_update
                wait_until(lambda: (agg.version or 0) > v, 30, f"version {v + 1}")  # noqa: B023
                assert agg.model is not None
                acc = _accuracy(rt, agg.model.weights, x_te, y_te)
                history.append((agg.model.version, acc))
                if acc >= 0.85:
                    break
            print("accuracy by version", history)
            assert history[-1][1] >= 0.85, history
            # Every update got its receipt: nothing is left in any outbox.
            for c in clients:
                assert c.wait_idle(20)
                assert c.status()["outbox"] == 0
            assert agg.accepted_total == 5 * len(history)
            assert agg.rejected_total == 0
        finally:
            for c in clients:
                c.close()


def sample(c: Client, name: str, **labels: str) -> float:
    value = c.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def test_predict_fit_validation_and_version_callback(broker, tmp_path) -> None:
    task = new_task()
    agg_settings = make_settings(broker.url, tmp_path / "agg", task=task)
    plan = DIGITS_PLAN.model_copy(update={"min_updates_per_version": 1, "examples_per_update": 8})
    v0 = publish_task(agg_settings, plan)
    seen: list[tuple[int | None, int]] = []
    (part,), x_te, _ = digits_split(1)
    with running_aggregator(agg_settings) as agg:
        # No bundle: the graph arrives over MQTT (and is probed in a child process).
        c = Client(device_settings(broker.url, tmp_path / "dev", task, "solo"))
        c.on_new_version(lambda _m, old, new: seen.append((old, new)))
        c.start()
        try:
            assert c.wait_for_version(0, 20)
            probs, version = c.predict_versioned(x_te[:3])
            assert version == 0 and probs.shape == (3, 10)
            np.testing.assert_allclose(probs.sum(axis=1), 1, rtol=1e-5)
            rt = ModelRuntime.from_bundle(mlp_bundle())
            np.testing.assert_array_equal(probs, rt.infer(x_te[:3], v0.weights))
            with pytest.raises(InputError) as e:
                c.fit(x_te[:2], [1, 10])
            assert e.value.reason == "bad_label"
            with pytest.raises(InputError):
                c.fit(np.full((2, 64), np.nan), [1, 2])
            with pytest.raises(InputError):
                c.predict(np.zeros((2, 63)))
            r = c.fit(*cycle(part, 0, 5))
            assert (r.added, r.fresh) == (5, 5)
            r = c.fit(*cycle(part, 5, 3))  # 8 fresh: trains, sends, version 1 follows
            assert r.added == 3
            assert c.wait_for_version(1, 20)
            wait_until(lambda: agg.version == 1, 10, "aggregator version 1")
            assert agg.model is not None and agg.model.examples == 8
            assert c.wait_idle(10)
            st = c.status()
            assert st["fresh"] == 0 and st["examples"] == 8 and st["updates_sent"] == 1
            assert (None, 0) in seen and (0, 1) in seen
            assert not np.array_equal(c.predict(x_te[:3]), probs)
        finally:
            c.close()
    # The state directory is locked while a client uses it.
    c2 = Client(device_settings(broker.url, tmp_path / "dev", task, "solo"))
    with pytest.raises(NotReadyError):
        Client(device_settings(broker.url, tmp_path / "dev", task, "solo"))
    assert c2.version == 1  # restored from the cached model, before connecting
    c2.close()


def test_predictions_during_swaps_are_consistent(broker, tmp_path) -> None:
    """Predictions never mix two versions' weights while versions swap under them."""
    task = new_task()
    agg_settings = make_settings(broker.url, tmp_path / "agg", task=task)
    plan = DIGITS_PLAN.model_copy(update={"min_updates_per_version": 1, "examples_per_update": 16})
    publish_task(agg_settings, plan)
    (part,), x_te, _ = digits_split(1)
    rt = ModelRuntime.from_bundle(mlp_bundle())
    models: dict[int, dict[str, np.ndarray]] = {}
    with running_aggregator(agg_settings) as agg:
        agg.on_new_version(lambda m, _o, n: models.__setitem__(n, m.weights))
        c = Client(device_settings(broker.url, tmp_path / "dev", task, "swap"), bundle=mlp_bundle())

        def keep(m: ModelVersion, _old: int | None, new: int) -> None:
            models.setdefault(new, dict(m.weights))

        c.on_new_version(keep)
        c.start()
        got: list[tuple[int, np.ndarray]] = []
        stop = threading.Event()

        def predict() -> None:
            while not stop.is_set():
                p, v = c.predict_versioned(x_te[:4])
                got.append((v, p))

        try:
            assert c.wait_for_version(0, 20)
            t = threading.Thread(target=predict, name="predictor")
            t.start()
            for v in range(4):
                c.fit(*cycle(part, 16 * v, 16))
                assert c.wait_for_version(v + 1, 20)
            stop.set()
            t.join()
        finally:
            c.close()
    seen = {v for v, _ in got}
    assert len(seen) >= 2
    for v, p in got[:: max(1, len(got) // 200)]:
        np.testing.assert_array_equal(p, rt.infer(x_te[:4], models[v]))


def test_resend_after_reconnect_then_receipt_settles(fresh_broker, tmp_path) -> None:
    task = new_task()
    agg_settings = make_settings(fresh_broker.url, tmp_path / "agg", task=task)
    plan = DIGITS_PLAN.model_copy(update={"min_updates_per_version": 1, "examples_per_update": 8})
    publish_task(agg_settings, plan)
    (part,), _, _ = digits_split(1)
    s = device_settings(fresh_broker.url, tmp_path / "dev", task, "rc", receipt_timeout=600)
    c = Client(s, bundle=mlp_bundle())
    c.start()
    try:
        assert c.wait_for_version(0, 20)
        c.fit(*cycle(part, 0, 8))
        wait_until(lambda: c.status()["updates_sent"] == 1, 10, "an update")
        (uid,) = c.outbox.ids()
        wait_until(lambda: c.outbox.get(uid).attempts == 1, 10, "first send")  # type: ignore[union-attr]
        fresh_broker.restart()
        # Long before receipt_timeout: the reconnect alone triggers the resend.
        wait_until(lambda: c.outbox.get(uid).attempts == 2, 20, "resend")  # type: ignore[union-attr]
        with running_aggregator(agg_settings) as agg:
            # The aggregator subscribed after both sends: only a resend can reach it, and a
            # reconnect is what triggers one here - restart the broker once more.
            fresh_broker.restart()
            wait_until(lambda: agg.version == 1, 30, "version 1")
            assert c.wait_idle(20)
            assert agg.model is not None and (agg.model.updates, agg.model.examples) == (1, 8)
        wait_until(lambda: sample(c, "fededge_device_receipts_total", status="accepted") == 1,
                   10, "the receipt counted")  # fmt: skip
    finally:
        c.close()


def test_too_stale_update_is_dropped_and_bad_messages_refused(broker, tmp_path) -> None:
    task = new_task()
    agg_settings = make_settings(broker.url, tmp_path / "agg", task=task)
    plan = DIGITS_PLAN.model_copy(update={"examples_per_update": 8, "max_staleness": 1})
    v0 = publish_task(agg_settings, plan)
    (part,), x_te, _ = digits_split(1)
    c = Client(device_settings(broker.url, tmp_path / "dev", task, "st"), bundle=mlp_bundle())
    c.start()
    pub = MqttClient(broker.settings(), f"pub-{task}", persistent=False)
    pub.connect()
    topics = Topics("fededge", task)
    try:
        assert c.wait_for_version(0, 20)
        before = c.predict(x_te[:2])
        # Hostile or broken messages on the task's topics: refused, counted, nothing changes.
        for topic, payload in [
            (topics.model, b"garbage"),
            (
                topics.model,
                ModelVersion(task, 5, {"w": np.zeros(3, np.float32)}, "0" * 64).to_bytes(),
            ),
            (topics.model, ModelVersion("other", 6, v0.weights, "0" * 64).to_bytes()),
            (topics.plan, b'{"v": 1, "kind": "plan", "epochs": -1}'),
            (topics.graph, b"\x00" * 100),
            (topics.receipt("st"), b'{"v": 99}'),
        ]:
            pub.publish(topic, payload, wait=True, timeout=5)
        wait_until(lambda: sample(c, "fededge_device_messages_rejected_total") == 6, 10,
                   "6 rejections")  # fmt: skip
        assert c.version == 0 and c.plan == plan
        np.testing.assert_array_equal(c.predict(x_te[:2]), before)
        # No aggregator: the update waits in the outbox ...
        c.fit(*cycle(part, 0, 8))
        wait_until(lambda: len(c.outbox) == 1, 10, "an update in the outbox")
        # ... still within the window at version 1, dropped at version 2 (max_staleness 1).
        pub.subscribe(topics.device_status("st"))

        def status_shows(version: int) -> bool:  # published after the staleness check
            with contextlib.suppress(queue.Empty):
                while True:
                    m = pub.messages.get_nowait()
                    if m.payload and decode_json(m.payload, DeviceStatus).version == version:
                        return True
            return False

        for v in (1, 2):
            mv = ModelVersion(task, v, v0.weights, v0.graph_sha256, time=float(v))
            pub.publish(topics.model, mv.to_bytes(), wait=True, timeout=5)
            assert c.wait_for_version(v, 10)
            if v == 1:
                wait_until(lambda: status_shows(1), 10, "a tick on version 1")
                assert len(c.outbox) == 1
        wait_until(lambda: sample(c, "fededge_device_updates_dropped_total", reason="stale") == 1,
                   10, "a drop")  # fmt: skip
        assert len(c.outbox) == 0
    finally:
        pub.close()
        c.close()


def test_new_graph_reloads_the_interpreter(broker, tmp_path) -> None:
    task = new_task()
    publish_task(make_settings(broker.url, tmp_path / "agg", task=task))
    c = Client(device_settings(broker.url, tmp_path / "dev", task, "g"), bundle=mlp_bundle())
    c.start()
    pub = MqttClient(broker.settings(), f"pub-{task}", persistent=False)
    pub.connect()
    topics = Topics("fededge", task)
    try:
        assert c.wait_for_version(0, 20)
        cnn = load_bundle(shipped_bundle_path("digits_cnn"))
        graph = Graph(task=task, tflite=cnn.graph, spec=cnn.spec.to_json())
        # The version first, its graph second: the client waits for the graph, then swaps both.
        mv = ModelVersion(task, 1, dict(cnn.weights), graph.sha256, time=1.0)
        pub.publish(topics.model, mv.to_bytes(), retain=True, wait=True, timeout=5)

        def waits() -> bool:
            w = c.core.model.waiting
            return w is not None and w.version == 1

        wait_until(waits, 10, "a waiting model")
        assert c.version == 0
        pub.publish(topics.graph, graph.to_bytes(), retain=True, wait=True, timeout=5)
        assert c.wait_for_version(1, 30)
        assert c.spec is not None and c.spec.model == "digits_cnn"
        _, x_te, _ = digits_split(1)
        np.testing.assert_allclose(
            c.predict(x_te[:3]), ModelRuntime.from_bundle(cnn).infer(x_te[:3], cnn.weights),
            rtol=1e-6,
        )  # fmt: skip
    finally:
        pub.close()
        c.close()


def test_no_training_until_the_owner_plan_arrives(broker, tmp_path) -> None:
    """Built-in plan defaults (e.g. no noise) are never used to train and send an update."""
    from devtools import DIGITS_PLAN, cycle, device_settings, digits_split, mlp_bundle, new_task

    task = new_task()
    s = device_settings(broker.url, tmp_path, task, "lonely")
    b = mlp_bundle()
    graph = Graph(task=task, tflite=b.graph, spec=b.spec.to_json())
    mv = ModelVersion(task=task, version=0, weights=dict(b.weights), graph_sha256=graph.sha256)
    topics = Topics(s.topic_prefix, task)
    with MqttClient(s.broker, f"owner-{task}", persistent=False) as owner:
        owner.publish(topics.graph, graph.to_bytes(), retain=True, wait=True)
        owner.publish(topics.model, mv.to_bytes(), retain=True, wait=True)
        c = Client(s)
        c.start()
        try:
            assert c.wait_for_version(0, 30)
            parts, _, _ = digits_split(1)
            c.fit(*cycle(parts[0], 0, 64))
            # Enough fresh examples, but no plan from the owner: nothing is due (the core's
            # decision, unit-tested in test_device_core), so the client is idle at once.
            assert c.wait_idle(10) and not c.core.trainable()
            assert c.status()["outbox"] == 0 and c.status()["updates_sent"] == 0
            owner.publish(topics.plan, DIGITS_PLAN.to_bytes(), retain=True, wait=True)
            wait_until(lambda: c.status()["updates_sent"] > 0, 30, "an update")
        finally:
            c.close()
