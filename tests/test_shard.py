"""Sharded aggregation: 3 worker processes + a coordinator, kill -9 of a worker and of the
coordinator; every accepted update is counted exactly once (partial.py, shard.py,
coordinator.py)."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest
from aggtools import Sender, init_task, make_settings
from test_lease import _start, _stop, _wait_log
from test_shipped_broker import shipped  # noqa: F401  (the fixture)

from fededge.aggregator.partial import BatchSum, PartialSum, ids_digest
from fededge.aggregator.policy import Layout
from fededge.errors import ProtocolError
from fededge.protocol import ModelVersion, Plan, Update
from fededge.testing import wait_until

D = 6  # parameters


def _delta(i: int) -> np.ndarray:
    return np.full(D, float(i % 17) - 8.0, np.float32) + np.arange(D, dtype=np.float32) * 0.01


def test_partial_sum_roundtrip_and_hostile_input() -> None:
    layout = Layout.of({"w": np.zeros(D, np.float32)})
    b = BatchSum(layout)
    for i in (1, 2):
        u = Update(task="t", device=f"d{i}", update_id=f"u{i}", base_version=0, num_examples=i,
                   delta={"w": _delta(i)}, train_loss=0.5)  # fmt: skip
        b.add(u, float(i), 1.0)
    p = b.message("t", "shard-0", 7, 3)
    raw = p.to_bytes()
    q = PartialSum.from_bytes(raw, max_bytes=1 << 20)
    assert (q.worker, q.seq, q.base_version, q.count, q.examples) == ("shard-0", 7, 3, 2, 3)
    assert q.keys == ["d1/u1", "d2/u2"] and q.weight == 3.0 and q.floats["loss_wsum"] == 3.0
    d1, d2 = (_delta(i).astype(np.float64) for i in (1, 2))
    np.testing.assert_array_equal(q.sums["w"], 1.0 * d1 + 2.0 * d2)  # float64, exact
    for bad in (raw[:-8], raw.replace(b'"count":"2"', b'"count":"3"'),
                raw.replace(ids_digest(p.keys).encode(), b"0" * 64), b"garbage"):  # fmt: skip
        with pytest.raises(ProtocolError):
            PartialSum.from_bytes(bad, max_bytes=1 << 20)


def _versions(root: Path) -> dict[int, tuple[ModelVersion, list[str]]]:
    out = {}
    for path in sorted((root / "versions").glob("*.safetensors")):
        v = int(path.stem)
        info = json.loads(path.with_suffix(".json").read_text())
        keys = [k for k in info.get("update_keys", []) if not k.startswith("#")]
        out[v] = (ModelVersion.from_bytes(path.read_bytes(), max_bytes=1 << 30), keys)
    return out


def _open_batches(root: Path) -> list[str]:
    keys: list[str] = []
    for path in (root / "batches").glob("*.bin"):
        keys += PartialSum.from_bytes(path.read_bytes(), max_bytes=1 << 30).keys
    return keys


pytestmark = pytest.mark.broker


def test_three_workers_and_a_coordinator_count_each_update_once(broker, tmp_path) -> None:
    s = make_settings(broker.url, tmp_path / "state")
    plan = Plan(min_updates_per_version=35, clip_norm=1e9, max_examples_weight=1000,
                max_staleness=1000, staleness_exponent=0.0, max_updates_per_device=1000)  # fmt: skip
    init_task(s, {"w": np.zeros(D, np.float32)}, plan)
    state = tmp_path / "state"
    logs = {name: tmp_path / f"{name}.log" for name in ("coord", "w0", "w1", "w2")}
    args: dict[str, tuple[str, ...]] = {"coord": ("--shards", "3", "--coordinator")}
    args.update({f"w{i}": ("--shards", "3", "--shard-id", str(i)) for i in range(3)})
    procs: dict[str, subprocess.Popen[bytes]] = {}
    root = state / "aggregator" / s.task

    def start(name: str, count: int = 1) -> None:
        procs[name] = _start(broker.url, s.task, state, logs[name], *args[name],
                             FEDEDGE_AGGREGATOR__VERSIONS_KEPT="100")  # fmt: skip
        ready = "aggregator ready" if name == "coord" else "ready: task="
        _wait_log(procs[name], logs[name], ready, count)

    def kill(name: str) -> None:
        procs[name].send_signal(signal.SIGKILL)
        procs[name].wait(10)

    devs = [Sender(s, f"dev{k}") for k in range(4)]
    sent: dict[str, tuple[int, int]] = {}  # key -> (i, n): the update's delta and weight

    def send(i: int) -> None:
        dev = devs[i % len(devs)]
        uid = f"u{i}"
        sent[f"{dev.device}/{uid}"] = (i, 1 + i % 5)
        dev.update({"w": _delta(i)}, n=1 + i % 5, uid=uid)

    def receipts(upto: int) -> None:
        for i in range(upto):
            dev = devs[i % len(devs)]
            try:
                r = dev.receipt(f"u{i}", timeout=60)
            except TimeoutError:
                raise AssertionError({n: p.read_text()[-1500:] for n, p in logs.items()}) from None
            assert r.status in ("accepted", "duplicate"), r

    try:
        for name in ("coord", "w0", "w1", "w2"):
            start(name)
        for i in range(30):
            send(i)
        receipts(30)
        kill("w1")  # its open batch is in its log, its unacked updates in its session
        for i in range(30, 60):
            send(i)
        start("w1", 2)
        receipts(60)

        # Kill the coordinator while it holds stored batches (fewer than 35 updates) that no
        # version has yet: they are merged after the restart, none twice.
        def stored_and_quiet() -> bool:  # all sent batches answered, some not in a version
            return not any(_worker_keys(root, w) for w in range(3)) and bool(_open_batches(root))

        wait_until(stored_and_quiet, 60, "stored batches")
        kill("coord")
        for i in range(60, 90):
            send(i)
        start("coord", 2)
        _wait_log(procs["coord"], logs["coord"], "stored batches (")
        receipts(90)
        # A device that lost its receipt resends: another worker may take it (a conflict
        # the coordinator resolves) or the same one (a duplicate).
        for i in (3, 33, 63):
            send(i)
        for i in range(90, 100):
            send(i)
        receipts(100)

        def settled() -> bool:
            logged = [k for w in range(3) for k in _worker_keys(root, w)]
            counted = [k for _, keys in _versions(root).values() for k in keys]
            return not logged and sorted(counted + _open_batches(root)) == sorted(sent)

        try:
            wait_until(settled, 60, "every update in a version or a stored batch")
        except TimeoutError:
            raise AssertionError({n: p.read_text()[-2000:] for n, p in logs.items()}) from None
    finally:
        for dev in devs:
            dev.close()
        codes = {name: _stop(p) for name, p in procs.items()}
    assert set(codes.values()) == {0}, codes
    versions = _versions(root)
    counted = [k for _, keys in versions.values() for k in keys]
    assert len(counted) == len(set(counted))  # none twice
    assert len(versions) >= 3 and len(counted) >= 50  # version 0 and merged ones (>= 10 each)
    prev = versions[0][0]
    for v in sorted(versions)[1:]:
        model, keys = versions[v]
        assert model.updates == len(keys) >= 35
        w = np.array([sent[k][1] for k in keys], np.float64)
        deltas = np.stack([_delta(sent[k][0]).astype(np.float64) for k in keys])
        expected = prev.weights["w"].astype(np.float64) + (w[:, None] * deltas).sum(0) / w.sum()
        np.testing.assert_allclose(model.weights["w"], expected, rtol=1e-5, atol=1e-5)
        prev = model
    out = "".join(p.read_text() for p in logs.values())
    assert "reopened with" in out or "restored" in out


def _worker_keys(root: Path, w: int) -> list[str]:
    from fededge.aggregator.wal import read_segment

    keys = []
    for path in root.with_name(f"{root.name}.shard-{w}").glob("batch-*.wal"):
        for rec in read_segment(path, repair=False):
            u = Update.from_bytes(rec.payload, max_bytes=1 << 30)
            keys.append(f"{u.device}/{u.update_id}")
    return keys


def test_partial_sum_vectors_in_the_docs() -> None:
    import re

    from fededge.aggregator.partial import FLOAT_SUMS
    from fededge.protocol import BatchAck, decode_json

    doc = Path(__file__).parent.parent / "docs" / "protocol.md"
    blocks = dict(re.findall(r"```vector (\S+)\n(.*?)```", doc.read_text(), re.S))
    floats = dict.fromkeys(FLOAT_SUMS, 0.0) | {"weight": 3.0, "loss_w": 1.5, "loss_wsum": 3.0,
                                               "norm_sum": 2.5}  # fmt: skip
    p = PartialSum("digits", "shard-0", 7, 42, {"w": np.array([1.5, -2.0])}, 2, 3,
                   ["pi-17/0f3a9c", "pi-18/77aa01"], floats)  # fmt: skip
    raw = bytes.fromhex("".join(blocks["partial-sum"].split()))
    assert p.to_bytes() == raw
    q = PartialSum.from_bytes(raw, max_bytes=4096)
    assert q.keys == p.keys and q.floats == floats
    ack = BatchAck(task="digits", worker="shard-0", seq=7, status="conflict",
                   exclude=["pi-18/77aa01"])  # fmt: skip
    assert ack.to_bytes() == blocks["batch-ack"].strip().encode()
    assert decode_json(ack.to_bytes(), BatchAck) == ack


def test_worker_outside_the_coordinators_shard_set_is_refused(broker, tmp_path) -> None:
    from test_lease import _exit_code

    s = make_settings(broker.url, tmp_path / "state")
    init_task(s, {"w": np.zeros(D, np.float32)}, Plan(min_updates_per_version=2))
    state, log_c, log_w = tmp_path / "state", tmp_path / "coord.log", tmp_path / "w.log"
    coord = _start(broker.url, s.task, state, log_c, "--shards", "3", "--coordinator")
    try:
        _wait_log(coord, log_c, "aggregator ready")
        # Configured for 4 shards; the coordinator knows 3. Its probe is refused before it
        # subscribes to (and could acknowledge) any update.
        w = _start(broker.url, s.task, state, log_w, "--shards", "4", "--shard-id", "3")
        assert _exit_code(w, log_w) == 2, log_w.read_text()[-3000:]
        assert "the coordinator refused shard-3: shard-3 is not one of this task's 3" in (
            log_w.read_text()
        )
        assert "ready: task=" not in log_w.read_text()
        # Hostile input on the partials topic: rejected with a log line, nothing stored.
        from fededge.mqtt import MqttClient
        from fededge.protocol import Topics

        with MqttClient(broker.settings(), "hostile", persistent=False) as c:
            c.publish(Topics(s.topic_prefix, s.task).partial("shard-0"), b"\x00" * 64, wait=True)
        _wait_log(coord, log_c, "rejected partial sum on")
        assert not list((state / "aggregator" / s.task / "batches").glob("*"))
        # Same shard twice: the second refuses on the shard's lease.
        w0 = _start(broker.url, s.task, state, tmp_path / "w0.log", "--shards", "3",
                    "--shard-id", "0")  # fmt: skip
        _wait_log(w0, tmp_path / "w0.log", "ready: task=")
        again = _start(broker.url, s.task, tmp_path / "other", tmp_path / "again.log",
                       "--shards", "3", "--shard-id", "0")  # fmt: skip
        assert _exit_code(again, tmp_path / "again.log") == 1
        assert "holds the shard-0 lease" in (tmp_path / "again.log").read_text()
        assert _stop(w0) == 0
    finally:
        assert _stop(coord) == 0, log_c.read_text()[-3000:]


def test_shipped_acl_lets_the_aggregator_account_run_leases_and_shards(shipped, tmp_path) -> None:  # noqa: F811
    """configs/acl.example as shipped: the aggregator account claims leases, shares the update
    stream and exchanges batches; a device can do none of it."""
    from test_shipped_broker import AGGREGATOR, DEVICES, aggregator_settings

    from fededge.aggregator.lease import Lease
    from fededge.errors import TransportError
    from fededge.mqtt import MqttClient
    from fededge.protocol import Topics

    s = aggregator_settings(shipped, tmp_path / "agg", "acl")
    t = Topics(s.topic_prefix, s.task)
    lease = Lease(s)
    lease.acquire()
    assert lease.held
    lease.release()
    with MqttClient(shipped.broker(AGGREGATOR), "agg-acl", persistent=False) as c:
        c.subscribe_all([t.shared_updates_filter("fededge-acl"), t.partials_filter,
                         t.batch_ack("shard-0")])  # fmt: skip
        c.publish(t.partial("shard-0"), b"x", wait=True, timeout=10)
        c.publish(t.batch_ack("shard-0"), b"x", wait=True, timeout=10)
    device = shipped.broker(DEVICES[0])
    with MqttClient(device, "dev-acl", persistent=False) as c:
        for topic in (t.aggregator_lease("writer"), t.partial("shard-0")):
            with pytest.raises(TransportError, match="refused"):
                c.publish(topic, b"x", wait=True, timeout=10)
    # Mosquitto's acl_file checks reads at delivery, not at SUBSCRIBE: a device in the workers'
    # shared group would take (and lose) its share of the updates, hence a group name the
    # devices cannot guess (aggregator.shard_group); one in another group gets nothing.
    worker = MqttClient(shipped.broker(AGGREGATOR), "worker-acl", persistent=False)
    thief = MqttClient(device, "thief-acl", persistent=False)
    sender = MqttClient(shipped.broker(DEVICES[1]), "sender-acl", persistent=False)
    with worker, thief, sender:
        worker.subscribe(t.shared_updates_filter("secret-4f1c"))
        thief.subscribe(t.shared_updates_filter("fededge-acl"))
        for i in range(10):
            sender.publish(t.update(DEVICES[1]), b"%d" % i, wait=True, timeout=10)
        got = [worker.messages.get(timeout=10).payload for _ in range(10)]
        assert sorted(got) == sorted(b"%d" % i for i in range(10))
        assert thief.messages.empty()
