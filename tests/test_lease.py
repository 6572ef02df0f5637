"""One writer per task: a second `fededge aggregator` refuses or waits as a standby (lease.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from aggtools import Sender, init_task, make_settings

from fededge.aggregator.lease import Lease
from fededge.errors import LeaseError
from fededge.mqtt import MqttClient
from fededge.protocol import AggregatorLease, Plan, Topics
from fededge.testing import wait_until

pytestmark = pytest.mark.broker


def _start(
    url: str, task: str, state: Path, log: Path, *extra: str, **env_extra: str
) -> subprocess.Popen[bytes]:
    env = {**os.environ, "FEDEDGE_AGGREGATOR__METRICS": "false",
           "FEDEDGE_AGGREGATOR__LEASE_SETTLE": "0.5", **env_extra}  # fmt: skip
    cmd = [sys.executable, "-m", "fededge.cli", "aggregator", "--broker", url, "--task", task,
           "--state-dir", str(state), "--wait-for-model", "30", *extra]  # fmt: skip
    return subprocess.Popen(cmd, stdout=log.open("ab"), stderr=subprocess.STDOUT, env=env)


def _wait_log(proc: subprocess.Popen[bytes], log: Path, text: str, count: int = 1) -> None:
    def seen() -> bool:
        assert proc.poll() is None, log.read_text()[-3000:]
        return log.read_text().count(text) >= count

    try:
        wait_until(seen, 60, f"{text!r} x{count} in {log.name}", interval=0.1)
    except TimeoutError:
        raise AssertionError(log.read_text()[-3000:]) from None


def _exit_code(proc: subprocess.Popen[bytes], log: Path) -> int:
    try:
        return proc.wait(60)
    except subprocess.TimeoutExpired:
        raise AssertionError(log.read_text()[-3000:]) from None


def _stop(proc: subprocess.Popen[bytes]) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    return proc.returncode


def _task(broker, tmp_path: Path, n: int = 6):
    s = make_settings(broker.url, tmp_path / "a")
    plan = Plan(min_updates_per_version=n, clip_norm=1e9, max_examples_weight=1000)
    init_task(s, {"w": np.zeros(8, np.float32)}, plan)
    return s


def test_second_instance_refuses_with_a_clear_message(broker, tmp_path) -> None:
    s = _task(broker, tmp_path)
    log_a, log_b = tmp_path / "a.log", tmp_path / "b.log"
    a = _start(broker.url, s.task, tmp_path / "a", log_a)
    try:
        _wait_log(a, log_a, "aggregator ready")
        # Another host: its own state directory; same task, same broker.
        b = _start(broker.url, s.task, tmp_path / "b", log_b)
        assert _exit_code(b, log_b) == 1, log_b.read_text()
        out = log_b.read_text()
        assert f"task '{s.task}' already has an aggregator: instance" in out, out
        assert f"pid {a.pid}" in out and "--standby" in out
        assert not (tmp_path / "b" / "aggregator").exists()  # it opened no state
        # The running one was never disturbed (no takeover of its session) and still works.
        dev = Sender(s)
        try:
            r = dev.receipt(dev.update({"w": np.ones(8, np.float32)}, n=1), timeout=60)
            assert r.status == "accepted"
        finally:
            dev.close()
        assert "lost connection" not in log_a.read_text()
    finally:
        assert _stop(a) == 0, log_a.read_text()[-3000:]


def test_standby_takes_over_after_kill_9_and_continues_from_the_state(broker, tmp_path) -> None:
    s = _task(broker, tmp_path, n=6)
    log_a, log_b = tmp_path / "a.log", tmp_path / "b.log"
    state = tmp_path / "shared"  # same host (or shared storage): the standby has the WAL
    a = _start(broker.url, s.task, state, log_a)
    b = None
    devs = {i: Sender(s, f"dev{i}") for i in range(1, 7)}  # one update per device per version

    def send(i: int, expect: str = "accepted") -> None:
        uid = devs[i].update({"w": np.full(8, float(i), np.float32)}, n=i, uid=f"u{i}")
        assert devs[i].receipt(uid, timeout=60).status == expect

    try:
        _wait_log(a, log_a, "aggregator ready")
        b = _start(broker.url, s.task, state, log_b, "--standby")
        _wait_log(b, log_b, "standby: instance")
        for i in (1, 2, 3):  # update i is the constant vector i with weight i
            send(i)
        a.send_signal(signal.SIGKILL)
        a.wait(10)
        _wait_log(b, log_b, "aggregator ready")
        assert "with 3 pending updates" in log_b.read_text(), log_b.read_text()
        # A resend of an update the dead instance acknowledged is a duplicate for the new one.
        del devs[2].receipts["u2"]
        send(2, "duplicate")
        for i in (4, 5, 6):
            send(i)
        v1 = devs[1].model(1, timeout=60)
    finally:
        for d in devs.values():
            d.close()
        _stop(a)
        if b is not None:
            assert _stop(b) == 0, log_b.read_text()[-3000:]
    w = np.arange(1, 7, dtype=np.float64)
    assert v1.updates == 6 and v1.examples == int(w.sum())
    np.testing.assert_allclose(v1.weights["w"], float((w * w).sum() / w.sum()), rtol=1e-6)


def test_running_instance_stops_when_its_session_is_taken_over(broker, tmp_path) -> None:
    s = _task(broker, tmp_path)
    log_a = tmp_path / "a.log"
    a = _start(broker.url, s.task, tmp_path / "a", log_a)
    try:
        _wait_log(a, log_a, "aggregator ready")
        # A process that skips the lease (an old fededge, a copy-pasted client id).
        # Mosquitto 2.0.11 sends no "session taken over" DISCONNECT; the aggregator sees its
        # connection dropped right after each CONNACK and stops retaking it.
        rogue = MqttClient(broker.settings(), f"fededge-aggregator-{s.task}", persistent=True)
        rogue.connect()
        try:
            assert _exit_code(a, log_a) == 1, log_a.read_text()[-3000:]
            wait_until(lambda: rogue.connected, 30, "rogue connected for good")
        finally:
            rogue.close()
        out = log_a.read_text()
        assert "MQTT session taken over" in out and "stopping without writing" in out, out
    finally:
        _stop(a)


def test_running_instance_yields_to_a_lower_instance_claim(broker, tmp_path) -> None:
    s = _task(broker, tmp_path)
    log_a = tmp_path / "a.log"
    a = _start(broker.url, s.task, tmp_path / "a", log_a)
    try:
        _wait_log(a, log_a, "aggregator ready")
        claim = AggregatorLease(task=s.task, role="writer", instance="0-other-host-1", host="x")
        topic = Topics(s.topic_prefix, s.task).aggregator_lease("writer")
        with MqttClient(broker.settings(), "claimer", persistent=False) as c:
            c.publish(topic, b"{not a lease", wait=True)  # hostile: logged, ignored
            _wait_log(a, log_a, "ignoring a malformed lease")
            c.publish(topic, claim.to_bytes(), retain=True, wait=True)
            assert _exit_code(a, log_a) == 1, log_a.read_text()[-3000:]
            c.publish(topic, b"", retain=True, wait=True)
        assert "0-other-host-1" in log_a.read_text() and "lower instance id" in log_a.read_text()
        # It left the status to the new writer: no "offline" written over it on the way out.
        assert "could not publish offline" not in log_a.read_text()
    finally:
        _stop(a)


def test_two_claims_at_once_exactly_one_wins(broker, tmp_path) -> None:
    s = make_settings(broker.url, tmp_path / "x", lease_settle=0.5)
    leases = [Lease(s, instance=f"{i}-racer") for i in range(3)]
    outcome: dict[int, str] = {}
    go = threading.Barrier(len(leases))

    def claim(i: int) -> None:
        go.wait()
        try:
            leases[i].acquire()
            outcome[i] = "held"
        except LeaseError as e:
            outcome[i] = str(e)

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(len(leases))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    try:
        held = [i for i, o in outcome.items() if o == "held"]
        assert len(outcome) == 3 and len(held) == 1, outcome
        # Whoever lost names a holder; the survivor keeps it against a later claimant.
        late = Lease(s, instance="9-late")
        with pytest.raises(LeaseError, match=f"instance {held[0]}-racer"):
            late.acquire()
        late.release()
    finally:
        for lease in leases:
            lease.release()


def test_lease_vector_in_the_docs() -> None:
    import re

    from fededge.protocol import decode_json

    doc = Path(__file__).parent.parent / "docs" / "protocol.md"
    blocks = dict(re.findall(r"```vector (\S+)\n(.*?)```", doc.read_text(), re.S))
    claim = AggregatorLease(task="digits", role="writer", instance="3f9a01c2-agg1-4242",
                            host="agg1", pid=4242, time=1764000000.0)  # fmt: skip
    raw = blocks["aggregator-lease"].strip().encode()
    assert claim.to_bytes() == raw and decode_json(raw, AggregatorLease) == claim


@pytest.mark.parametrize("crash", [False, True], ids=["restart", "kill"])
def test_broker_restart_suspends_the_lease_and_the_aggregator_resumes(
    fresh_broker, tmp_path, crash
) -> None:
    s = _task(fresh_broker, tmp_path, n=2)
    log_a = tmp_path / "a.log"
    a = _start(fresh_broker.url, s.task, tmp_path / "a", log_a)
    dev = None
    try:
        _wait_log(a, log_a, "aggregator ready")
        if crash:  # the retained lease, model and sessions are gone with it
            fresh_broker.kill()
            fresh_broker.start()
        else:
            fresh_broker.restart()
        _wait_log(a, log_a, "still holding the writer lease")
        assert "lease connection lost: suspended" in log_a.read_text()
        dev = Sender(s)
        uid = dev.update({"w": np.ones(8, np.float32)}, n=1)
        assert dev.receipt(uid, timeout=60).status == "accepted"
        # Still the one writer: a second instance is refused.
        b = _start(fresh_broker.url, s.task, tmp_path / "b", tmp_path / "b.log")
        assert _exit_code(b, tmp_path / "b.log") == 1
    finally:
        if dev is not None:
            dev.close()
        assert _stop(a) == 0, log_a.read_text()[-3000:]
