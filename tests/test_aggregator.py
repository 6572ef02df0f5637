"""The aggregator against a real Mosquitto: exact weights, validation, receipts, durability."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from aggtools import Sender, init_task, make_settings, running_aggregator

from fededge.protocol import Plan, Update
from fededge.protocol.vocab import RejectReason
from fededge.testing import wait_until

pytestmark = pytest.mark.broker


def _weights() -> dict[str, np.ndarray]:
    return {"b": np.arange(3, dtype=np.float32), "w": np.ones((2, 3), dtype=np.float32)}


def test_exact_weighted_mean(broker, tmp_path) -> None:
    s = make_settings(broker.url, tmp_path)
    plan = Plan(
        min_updates_per_version=3, clip_norm=100.0, server_learning_rate=0.5, max_examples_weight=40,
        max_updates_per_device=3, max_weight=1000,
    )  # fmt: skip
    base = init_task(s, _weights(), plan)
    rng = np.random.default_rng(0)
    deltas = [
        {k: rng.normal(size=v.shape).astype(np.float32) for k, v in base.weights.items()}
        for _ in range(3)
    ]
    counts = [10, 30, 100]  # the last is capped at 40 examples
    with running_aggregator(s):
        dev = Sender(s)
        uids = [dev.update(d, n=n) for d, n in zip(deltas, counts, strict=True)]
        receipts = [dev.receipt(u) for u in uids]
        assert [r.status for r in receipts] == ["accepted"] * 3
        assert all(r.pending == 1 for r in receipts)
        v1 = dev.model(1)
        dev.close()
    w = np.array([10, 30, 40], dtype=np.float64)
    for name, b in base.weights.items():
        mean = (
            sum(wi * d[name].astype(np.float64) for wi, d in zip(w, deltas, strict=True)) / w.sum()
        )
        expected = (b.astype(np.float64) + 0.5 * mean).astype(np.float32)
        np.testing.assert_array_equal(v1.weights[name], expected)
    assert v1.parent == 0 and v1.updates == 3 and v1.examples == 140


def test_staleness_window_and_weighting(broker, tmp_path) -> None:
    s = make_settings(broker.url, tmp_path)
    plan = Plan(min_updates_per_version=1, max_staleness=1, staleness_exponent=1.0, clip_norm=100.0)
    base = init_task(s, _weights(), plan)
    ones = {k: np.ones_like(v) for k, v in base.weights.items()}
    with running_aggregator(s):
        dev = Sender(s)
        assert dev.receipt(dev.update(ones, base=0)).status == "accepted"  # makes version 1
        dev.model(1)
        # Based on version 0 while 1 is current: staleness 1, weight 10 / (1 + 1).
        r = dev.receipt(dev.update(ones, base=0, n=10))
        assert (r.status, r.version, r.pending) == ("accepted", 1, 2)
        v2 = dev.model(2)
        r = dev.receipt(dev.update(ones, base=0))  # now 2 behind
        assert (r.status, r.reason) == ("rejected", "stale")
        r = dev.receipt(dev.update(ones, base=7))
        assert (r.status, r.reason) == ("rejected", "unknown_version")
        dev.close()
    # One update per version: the mean is the update itself whatever its weight.
    np.testing.assert_array_equal(v2.weights["b"], base.weights["b"] + 2)


def test_hostile_updates_rejected_and_state_intact(broker, tmp_path) -> None:
    s = make_settings(broker.url, tmp_path, max_update_bytes=1 << 20)
    plan = Plan(min_updates_per_version=2, clip_norm=1.0, max_updates_per_device=2)
    base = init_task(s, _weights(), plan)
    good = {k: np.full(v.shape, 0.1, np.float32) for k, v in base.weights.items()}
    with running_aggregator(s) as agg:
        dev = Sender(s)
        first = dev.update(good)
        assert dev.receipt(first).status == "accepted"
        cases: dict[str, dict[str, np.ndarray]] = {
            "wrong_shape": {"b": np.zeros(4, np.float32), "w": good["w"]},
            "wrong_names": {"b": good["b"], "x": good["w"]},
            "wrong_dtype": {"b": good["b"].astype(np.float64), "w": good["w"]},
            "non_finite": {"b": np.array([0, np.nan, 0], np.float32), "w": good["w"]},
            "norm_too_large": {k: v * 100 for k, v in good.items()},
        }
        for reason, delta in cases.items():
            r = dev.receipt(dev.update(delta))
            assert (r.status, r.reason) == ("rejected", reason), r
        r = dev.receipt(dev.update(good, task="other"))
        assert r.reason == "wrong_task"
        # A device may only speak for itself: the payload's device must match the topic's.
        r = dev.receipt(dev.update(good, device="someone-else"))
        assert (r.status, r.reason) == ("rejected", "wrong_device")
        del dev.receipts[first]
        dev.update(good, uid=first)  # a resend of an acknowledged update
        assert dev.receipt(first).status == "duplicate"
        # Undecodable payloads carry no update id: no receipt, but counted and acknowledged.
        for junk in (
            b"",
            b"\x00" * 7,
            b"not safetensors at all",
            np.random.default_rng(1).bytes(5000),
            good_bytes(s, good)[:-3],
            b"\x10" + b"\x00" * 7 + b"{" * 16,
            b"\xff" * (2 << 20),
        ):
            dev.raw(junk)
        wait_for(lambda: _rejected(agg) >= 6 + 7)
        assert agg.pending is not None and agg.pending.sums.count == 1
        assert agg.version == 0
        # ... and the service still works: a valid update completes version 1.
        second = dev.update(good)
        assert dev.receipt(second).status == "accepted"
        v1 = dev.model(1)
        dev.close()
    np.testing.assert_allclose(v1.weights["b"], base.weights["b"] + 0.1, rtol=1e-6)
    assert _metric(agg, "fededge_updates_duplicate_total") == 1
    assert _metric(agg, "fededge_updates_rejected_total", reason="oversize") == 1
    assert _metric(agg, "fededge_updates_rejected_total", reason="malformed") >= 5


def good_bytes(s, delta) -> bytes:
    from fededge.protocol import Update

    return Update(
        task=s.task, device="dev1", update_id="x", base_version=0, num_examples=1, delta=delta
    ).to_bytes()


def _metric(agg, name: str, **labels: str) -> float:
    value = agg.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else float(value)


def _rejected(agg) -> float:
    return sum(_metric(agg, "fededge_updates_rejected_total", reason=r) for r in RejectReason)


def wait_for(cond: Callable[[], object], timeout: float = 20) -> None:
    wait_until(cond, timeout, "the condition")


def test_waits_for_a_broker_that_is_down_at_start(fresh_broker, tmp_path, caplog) -> None:
    import logging
    import threading

    from fededge.aggregator.service import Aggregator

    s = make_settings(fresh_broker.url, tmp_path)
    s.broker.reconnect_min_delay = 0.2
    s.broker.connect_timeout = 1.0
    init_task(s, _weights(), Plan(min_updates_per_version=1, clip_norm=100.0))
    fresh_broker.stop()
    agg = Aggregator(s)
    started = threading.Event()

    def start() -> None:
        agg.start(wait_for_model=30)
        started.set()

    caplog.set_level(logging.WARNING, "fededge.aggregator.service")
    t = threading.Thread(target=start, daemon=True)
    t.start()
    # Retrying with backoff, not failing: two refused attempts, and still not started.
    wait_until(
        lambda: sum("broker not reachable" in r.getMessage() for r in caplog.records) >= 2,
        30,
        "two connection attempts",
    )
    assert not started.is_set() and t.is_alive()
    fresh_broker.start()
    assert started.wait(30)
    assert agg.version == 0
    agg.close()


def test_invalid_retained_plan_is_replaced_by_the_last_valid_one(broker, tmp_path) -> None:
    from fededge.mqtt import MqttClient
    from fededge.protocol import Topics, decode_json

    s = make_settings(broker.url, tmp_path)
    plan = Plan(min_updates_per_version=7, noise_stddev=0.5, clip_norm=2.0)
    init_task(s, _weights(), plan)
    topics = Topics(s.topic_prefix, s.task)
    with running_aggregator(s) as agg, MqttClient(s.broker, "plan-vandal", persistent=False) as c:
        c.publish(topics.plan, b'{"v": 1, "kind": "plan", "epochs": -3}', retain=True, wait=True)
        wait_for(lambda: _metric(agg, "fededge_control_messages_rejected_total") >= 1)
        c.subscribe(topics.plan)

        def restored() -> bool:
            try:
                m = c.messages.get(timeout=0.2)
            except Exception:
                return False
            return m.payload == plan.to_bytes() and decode_json(m.payload, Plan) == plan

        wait_for(restored)
        assert agg.plan == plan


def test_update_ids_count_per_device_and_metrics_are_bounded(broker, tmp_path) -> None:
    s = make_settings(broker.url, tmp_path)
    plan = Plan(min_updates_per_version=3, clip_norm=100.0, max_updates_per_device=2)
    base = init_task(s, _weights(), plan)
    one = {k: np.ones_like(v) for k, v in base.weights.items()}
    with running_aggregator(s) as agg:
        victim, squatter = Sender(s, "victim"), Sender(s, "squatter")
        # Another device reusing an id must not make the victim's update a "duplicate".
        assert squatter.receipt(squatter.update(one, uid="shared-id")).status == "accepted"
        assert victim.receipt(victim.update(one, uid="shared-id")).status == "accepted"
        # Finite but absurd metadata would overflow the weighted metric sums.
        r = victim.receipt(victim.update(one, train_loss=1e308))
        assert (r.status, r.reason) == ("rejected", "bad_metrics")
        r = victim.receipt(victim.update(one, eval_loss=0.5, eval_accuracy=1.5))
        assert (r.status, r.reason) == ("rejected", "bad_metrics")
        assert agg.pending is not None and agg.pending.sums.count == 2
        victim.update(one)
        v1 = victim.model(1)
        victim.close()
        squatter.close()
    assert v1.updates == 3


def _buggy_check(monkeypatch) -> None:
    """Make validation fail like a bug would, by update id: bug*, misuse*, disk*."""
    from fededge.aggregator import core, policy
    from fededge.errors import NotReadyError, StorageError

    real = policy.check_update

    def check(update, **kw):
        uid = update.update_id
        if uid.startswith("bug"):
            raise ZeroDivisionError("a bug in validation")
        if uid.startswith("misuse"):
            raise NotReadyError("a misuse")
        if uid.startswith("disk"):
            raise StorageError("the disk failed")
        return real(update, **kw)

    monkeypatch.setattr(core, "check_update", check)


def test_a_bug_on_an_update_answers_internal_error_and_the_service_goes_on(
    broker, tmp_path, monkeypatch
) -> None:
    _buggy_check(monkeypatch)
    s = make_settings(broker.url, tmp_path)
    base = init_task(s, _weights(), Plan(min_updates_per_version=1))
    good = {k: np.full(v.shape, 0.1, np.float32) for k, v in base.weights.items()}
    with running_aggregator(s) as agg:
        dev = Sender(s)
        for uid in ("bug-1", "misuse-1"):  # NotReadyError is a misuse, not a disk failure
            r = dev.receipt(dev.update(good, uid=uid))
            assert (r.status, r.reason) == ("rejected", "internal_error"), r
        assert dev.receipt(dev.update(good)).status == "accepted"
        dev.model(1)
        dev.close()
    reg = agg.metrics.registry
    assert reg.get_sample_value("fededge_updates_rejected_total", {"reason": "internal_error"}) == 2
    assert reg.get_sample_value("fededge_internal_errors_total") == 2


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_storage_error_on_an_update_stops_the_service(broker, tmp_path, monkeypatch) -> None:
    from fededge.errors import StorageError

    _buggy_check(monkeypatch)
    s = make_settings(broker.url, tmp_path)
    base = init_task(s, _weights(), Plan(min_updates_per_version=1))
    good = {k: np.full(v.shape, 0.1, np.float32) for k, v in base.weights.items()}
    dev = Sender(s)
    with pytest.raises(StorageError), running_aggregator(s) as agg:
        dev.update(good, uid="disk-1")
        reg = agg.metrics.registry
        wait_until(lambda: reg.get_sample_value("fededge_update_bytes_total"), 20, "the update")
    dev.close()


@pytest.mark.parametrize("direct_io", [True, False])
def test_the_direct_io_setting_reaches_the_store(tmp_path, direct_io: bool) -> None:
    # aggregator.direct_io = false: checkpoints always go through the page cache.
    import os

    from fededge.aggregator.service import Aggregator

    s = make_settings("mqtt://127.0.0.1:1", tmp_path, direct_io=direct_io)
    agg = Aggregator(s)  # not started: no broker needed
    try:
        assert agg.store.direct_io is (direct_io and hasattr(os, "O_DIRECT"))
    finally:
        agg.close()


def test_large_updates_are_prepared_on_the_network_thread(broker, tmp_path, monkeypatch) -> None:
    # Updates of 1 MiB and more are parsed and measured on the MQTT network thread
    # (Inbox.prepare, intake.preparer): the decisions and the sum must be those without it.
    import threading

    from fededge.aggregator import codec, intake
    from fededge.mqtt.inbox import PREPARE_MIN

    prepared_on: list[str] = []
    real = codec.prepare_update

    def counting(payload: bytes) -> object:
        prepared_on.append(threading.current_thread().name)
        return real(payload)

    monkeypatch.setattr(intake, "prepare_update", counting)
    s = make_settings(broker.url, tmp_path)
    weights = {"w": np.zeros(300_000, np.float32), "b": np.zeros(5, np.float32)}
    plan = Plan(min_updates_per_version=2, clip_norm=1.0, max_updates_per_device=5)
    init_task(s, weights, plan)
    rng = np.random.default_rng(1)
    good = [{"w": (rng.standard_normal(300_000) * 1e-4).astype(np.float32),
             "b": np.full(5, 0.01, np.float32)} for _ in range(2)]  # fmt: skip
    nan = {"w": good[0]["w"].copy(), "b": np.array([0, np.nan, 0, 0, 0], np.float32)}
    big = {"w": good[0]["w"] * 1e5, "b": good[0]["b"]}
    with running_aggregator(s):
        dev = Sender(s)
        bad = [dev.update(nan), dev.update(big)]
        assert [dev.receipt(u).reason for u in bad] == ["non_finite", "norm_too_large"]
        assert [dev.receipt(dev.update(d, n=10)).status for d in good] == ["accepted"] * 2
        v1 = dev.model(1)
        dev.close()
    assert len(Update(task="t", device="d", update_id="u", base_version=0, num_examples=1,
                      delta=good[0]).to_bytes()) >= PREPARE_MIN  # fmt: skip
    assert len(prepared_on) >= 4 and all(n.startswith("paho") for n in prepared_on)
    for name in weights:
        mean = (good[0][name].astype(np.float64) + good[1][name].astype(np.float64)) / 2
        np.testing.assert_array_equal(v1.weights[name], mean.astype(np.float32))
