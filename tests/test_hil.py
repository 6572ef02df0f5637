"""Hardware-in-loop: the real `fededge aggregator` and `fededge device` daemons as processes,
the devices on emulated hosts (network namespaces behind delayed, lossy links, see
tests/netns.py), checked against the exact set of updates each version must fold.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aggtools import make_settings
from devtools import DIGITS_PLAN, call, cycle, digits_split, mlp_bundle, new_task, publish_task
from netns import Host, Impairment, Network, unavailable_reason

from fededge.device.examples import StateDb
from fededge.device.outbox import Outbox
from fededge.device.runtime import ModelRuntime
from fededge.device.training import local_update
from fededge.protocol import ModelVersion
from fededge.testing import wait_until
from fededge.testing.broker import Mosquitto, free_port

pytestmark = [pytest.mark.slow, pytest.mark.broker]

MosquittoFactory = Callable[..., Mosquitto]

# The link of every device: what `tc qdisc add dev X root netem delay 80ms 20ms loss 5%` does.
LINK = Impairment(delay_ms=80, jitter_ms=20, loss=0.05)
RECEIPT_TIMEOUT = 1.5
EXAMPLES = 8
# Two updates per device per version: the broker-kill test has each device send two.
PLAN = DIGITS_PLAN.model_copy(
    update={"examples_per_update": EXAMPLES, "noise_stddev": 0.0, "max_updates_per_device": 2}
)
UPDATE_RE = re.compile(r"update ([0-9a-f]{32}) on version (\d+)")
DUPLICATE_RE = re.compile(r"duplicate update device=(\S+) update_id=([0-9a-f]+)")


class Proc:
    """A fededge daemon process, on an emulated host or (host=None) in the root namespace."""

    def __init__(self, args: list[str], log: Path, host: Host | None, **env: str) -> None:
        self.args = host.command(args) if host is not None else args
        self.log = log
        self.env = {
            **os.environ,
            "FEDEDGE_BROKER__RECONNECT_MIN_DELAY": "0.1",
            "FEDEDGE_BROKER__RECONNECT_MAX_DELAY": "1",
            "FEDEDGE_BROKER__KEEPALIVE": "5",
            **env,
        }
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(self.args, env=self.env, stdout=out, stderr=out)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def check_alive(self) -> None:
        assert self.proc is not None and self.proc.poll() is None, (
            f"{self.log.name} exited:\n{self.log_text()[-3000:]}"
        )

    def terminate(self) -> int:
        assert self.proc is not None
        self.proc.terminate()
        return self.proc.wait(30)

    def cleanup(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


class Device(Proc):
    """`fededge device` inside a namespace; its API socket is a file, reachable from here."""

    def __init__(
        self, url: str, task: str, state_dir: Path, device_id: str, host: Host, seed: int
    ) -> None:
        args = [sys.executable, "-m", "fededge.cli", "device", "--broker", url, "--task", task,
                "--state-dir", str(state_dir), "--device-id", device_id]  # fmt: skip
        super().__init__(
            args,
            state_dir / f"{device_id}.log",
            host,
            FEDEDGE_DEVICE__METRICS="false",
            FEDEDGE_DEVICE__RECEIPT_TIMEOUT=str(RECEIPT_TIMEOUT),
            FEDEDGE_DEVICE__SEED=str(seed),
        )
        self.seed = seed
        self.id, self.task, self.state_dir = device_id, task, state_dir
        self.socket = state_dir / "api.sock"

    def status(self) -> dict[str, Any]:
        code, body = call(self.socket, "GET", "/status")
        assert code == 200, body
        return body  # type: ignore[no-any-return]

    def wait(self, cond: Callable[[dict[str, Any]], bool], what: str, timeout: float = 60) -> None:
        def ready() -> bool:
            self.check_alive()
            with contextlib.suppress(OSError):
                return cond(self.status())
            return False

        try:
            wait_until(ready, timeout, f"{self.id}: {what}", interval=0.05)
        except TimeoutError as e:
            raise TimeoutError(f"{e}\n{self.log_text()[-3000:]}") from None

    def give(self, part: tuple[np.ndarray, np.ndarray], start: int) -> None:
        """Hand the daemon one update's worth of labelled examples."""
        x, y = cycle(part, start, EXAMPLES)
        code, body = call(self.socket, "POST", "/examples", {"x": x.tolist(), "y": y.tolist()})
        assert code == 200, body

    def update_ids(self) -> list[str]:
        """Ids of the updates this daemon made, from its log (in order)."""
        return [m[1] for m in UPDATE_RE.finditer(self.log_text())]

    def outbox_after_exit(self) -> list[str]:
        db = StateDb(self.state_dir / "device" / self.id / self.task / "state.sqlite")
        try:
            return Outbox(db).ids()
        finally:
            db.close()


class Aggregator(Proc):
    """`fededge aggregator` in the root namespace, beside the broker."""

    def __init__(self, url: str, task: str, state_dir: Path) -> None:
        args = [sys.executable, "-m", "fededge.cli", "aggregator", "--broker", url, "--task", task,
                "--state-dir", str(state_dir), "--wait-for-model", "30"]  # fmt: skip
        super().__init__(args, state_dir / "aggregator.log", None,
                         FEDEDGE_AGGREGATOR__METRICS="false")  # fmt: skip
        self.versions = state_dir / "aggregator" / task / "versions"

    def info(self, version: int) -> dict[str, Any] | None:
        """A stored version's metadata, once it is complete (the store writes weights last)."""
        if not (self.versions / f"{version:08d}.safetensors").exists():
            return None
        return json.loads((self.versions / f"{version:08d}.json").read_text())  # type: ignore[no-any-return]

    def wait_version(self, version: int, timeout: float = 60) -> dict[str, Any]:
        def info() -> dict[str, Any] | None:
            self.check_alive()
            return self.info(version)

        try:
            return wait_until(info, timeout, f"version {version}", interval=0.05)
        except TimeoutError as e:
            raise TimeoutError(f"{e}:\n{self.log_text()[-3000:]}") from None

    def weights(self, version: int) -> dict[str, np.ndarray]:
        payload = (self.versions / f"{version:08d}.safetensors").read_bytes()
        return dict(ModelVersion.from_bytes(payload, max_bytes=1 << 30).weights)

    def duplicates(self) -> list[tuple[str, str]]:
        return [(m[1], m[2]) for m in DUPLICATE_RE.finditer(self.log_text())]


@pytest.fixture
def net() -> Iterator[Network]:
    """A private network of emulated hosts, deleted with everything in it after the test."""
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    with Network(seed=1) as n:
        yield n


@pytest.fixture
def hil_broker(net: Network, mosquitto_factory: MosquittoFactory) -> tuple[Mosquitto, str]:
    """A private Mosquitto that also listens on the gateway: (broker, URL for the devices)."""
    port = free_port()
    m = mosquitto_factory([f"listener {port} {net.gateway}"])
    return m, f"mqtt://{net.gateway}:{port}"


@contextlib.contextmanager
def fleet(
    net: Network, broker: Mosquitto, url: str, tmp: Path, n_devices: int, min_updates: int
) -> Iterator[tuple[Aggregator, list[Device]]]:
    """A task published, its aggregator and ``n_devices`` daemons on impaired hosts, on v0."""
    task = new_task()
    plan = PLAN.model_copy(update={"min_updates_per_version": min_updates})
    publish_task(make_settings(broker.url, tmp / "agg", task=task), plan)
    agg = Aggregator(broker.url, task, tmp / "agg")
    devices = []
    for i in range(n_devices):
        host = net.add_host()
        mode = host.impair(LINK)
        devices.append(Device(url, task, tmp / f"dev{i}", f"h{i}", host, seed=100 + i))
    print(f"links impaired with {mode}")
    procs: list[Proc] = [agg, *devices]
    try:
        for p in procs:
            p.start()
        for d in devices:
            d.wait(lambda st: st["version"] == 0 and st["connected"], "version 0")

        # The aggregator too must hold version 0 before a test kills the broker: a killed
        # broker loses the retained task it has not saved yet, and an aggregator still
        # starting (Numba warm-up on a loaded machine) would then find no model at all.
        def agg_ready() -> bool:
            agg.check_alive()  # fails at once, with its log, if it exited
            return "aggregator ready" in agg.log_text()

        wait_until(agg_ready, 120, "the aggregator to be ready on version 0")
        yield agg, devices
    finally:
        for p in procs:
            p.cleanup()
        for h in net.hosts:
            print(f"{h.name}: {h.line.forwarded} packets forwarded, {h.line.dropped} dropped")


def expected_weights(
    work: list[tuple[Device, tuple[np.ndarray, np.ndarray], list[int]]],
) -> dict[str, np.ndarray]:
    """Version 1 recomputed here: each device's training replayed from its seed, then FedAvg.

    A device trains with LiteRT on one thread from its seeded generator, so the replay gives
    the very deltas it published; the version is base + the example-weighted mean delta.
    """
    bundle = mlp_bundle()
    rt = ModelRuntime.from_bundle(bundle)
    base = {k: np.asarray(v, dtype=np.float32) for k, v in bundle.weights.items()}
    acc = {k: np.zeros(v.shape, np.float64) for k, v in base.items()}
    total = 0
    for device, part, starts in work:
        rng = np.random.default_rng(device.seed)
        for start in starts:
            x, y = cycle(part, start, EXAMPLES)
            lu = local_update(rt, base, x, y, epochs=PLAN.epochs, batch_size=PLAN.batch_size,
                              learning_rate=PLAN.learning_rate, clip_norm=PLAN.clip_norm,
                              noise_stddev=0.0, rng=rng)  # fmt: skip
            for k in acc:
                acc[k] += lu.num_examples * lu.delta[k].astype(np.float64)
            total += lu.num_examples
    return {k: (base[k] + acc[k] / total).astype(np.float32) for k in base}


def assert_weights(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert got.keys() == want.keys()
    for k in want:
        # float32 training replayed bit for bit; only the final float64 -> float32 may differ.
        np.testing.assert_allclose(got[k], want[k], rtol=0, atol=1e-6, err_msg=k)


def stop_and_check_outboxes(devices: list[Device]) -> None:
    """Every outbox is empty, and stays so across a clean shutdown."""
    for d in devices:
        d.wait(lambda st: st["outbox"] == 0, "empty outbox")
    for d in devices:
        assert d.terminate() == 0, d.log_text()[-3000:]
        assert d.outbox_after_exit() == []


def settle(
    agg: Aggregator,
    devices: list[Device],
    parts: list[tuple[np.ndarray, np.ndarray]],
    start: int,
    per_device: int,
    version: int,
) -> None:
    """No update was counted twice, shown by an event instead of a pause.

    Once a device's outbox is empty it sends nothing old again; then it makes ``per_device``
    fresh updates. MQTT keeps one client's messages on a topic in order, and a reconnect with
    the same client id ends the old connection, so any late copy of an earlier update reaches
    the aggregator before the fresh ones: the next version (``min_updates`` = all fresh updates)
    must hold exactly the fresh updates, and no version may follow it.
    """
    for d in devices:
        d.wait(lambda st: st["outbox"] == 0, "empty outbox")
    before = {d.id: set(d.update_ids()) for d in devices}
    for d, part in zip(devices, parts, strict=True):
        for k in range(per_device):
            d.give(part, start + k * EXAMPLES)

    def fresh() -> list[str] | None:
        ids = [u for d in devices for u in d.update_ids() if u not in before[d.id]]
        return ids if len(ids) == per_device * len(devices) else None

    info = agg.wait_version(version)
    new = wait_until(fresh, 60, "the fresh update ids in the device logs")
    assert sorted(info["update_ids"]) == sorted(new), "an earlier update was counted again"
    for d in devices:
        d.wait(lambda st: st["outbox"] == 0, "empty outbox")
    assert agg.info(version + 1) is None, "a version after the fresh updates"


def test_emulated_link_carries_tcp_and_can_be_cut(net: Network) -> None:
    host = net.add_host()
    host.impair(LINK)
    with socket.create_server((net.gateway, 0)) as server:
        port = server.getsockname()[1]
        client = (f"import socket; s = socket.create_connection(('{net.gateway}', {port}), 10); "
                  "s.sendall(bytes(range(256)) * 400); s.close()")  # fmt: skip
        proc = subprocess.Popen(host.command([sys.executable, "-c", client]))
        server.settimeout(20)
        conn, (peer, _) = server.accept()
        with conn:
            got = b"".join(iter(lambda: conn.recv(65536), b""))
        assert proc.wait(20) == 0
    assert peer == host.address
    assert got == bytes(range(256)) * 400  # in order and complete despite delay and loss
    host.link_down()
    cut = subprocess.run(host.command([sys.executable, "-c", client]), capture_output=True)
    assert cut.returncode != 0 and b"unreachable" in cut.stderr  # no route while down
    host.link_up()
    assert subprocess.run(host.command(["ip", "route", "get", net.gateway]),
                          capture_output=True).returncode == 0  # fmt: skip


def test_three_devices_behind_lossy_links_each_deliver_one_update(
    net: Network, hil_broker: tuple[Mosquitto, str], tmp_path: Path
) -> None:
    broker, url = hil_broker
    parts, _, _ = digits_split(3)
    with fleet(net, broker, url, tmp_path, 3, min_updates=3) as (agg, devices):
        for d, part in zip(devices, parts, strict=True):
            d.give(part, 0)
        info = agg.wait_version(1)
        ids = [d.update_ids() for d in devices]
        assert all(len(i) == 1 for i in ids), ids
        assert sorted(info["update_ids"]) == sorted(i[0] for i in ids)
        assert info["metrics"]["updates"] == 3
        assert info["metrics"]["examples"] == 3 * EXAMPLES
        work = [(d, p, [0]) for d, p in zip(devices, parts, strict=True)]
        assert_weights(agg.weights(1), expected_weights(work))
        settle(agg, devices, parts, EXAMPLES, 1, 2)
        stop_and_check_outboxes(devices)


def test_link_cut_delivers_the_update_exactly_once(
    net: Network, hil_broker: tuple[Mosquitto, str], tmp_path: Path
) -> None:
    broker, url = hil_broker
    (part,), _, _ = digits_split(1)
    with fleet(net, broker, url, tmp_path, 1, min_updates=1) as (agg, (d,)):
        host = net.hosts[0]
        host.link_down()
        d.give(part, 0)
        d.wait(lambda st: st["updates_sent"] == 1 and st["outbox"] == 1, "an update, offline")
        # The status can be ahead of the log file.
        (uid,) = wait_until(d.update_ids, 30, "the update id in the device log")
        # Past the receipt timeout the daemon resends into the dead link, or keepalive notices
        # first and it waits to reconnect: wait for either, not for a number of seconds.
        d.wait(
            lambda st: not st["connected"] or f"resending update {uid}" in d.log_text(),
            "a resend into the cut link, or the disconnect",
        )
        assert d.status()["outbox"] == 1
        assert agg.info(1) is None
        host.link_up()
        info = agg.wait_version(1)
        # What the protocol promises: the update is delivered and counted exactly once. How
        # many copies reached the aggregator (0 or more "duplicate" answers) depends on timing.
        assert info["update_ids"] == [uid]
        assert info["metrics"]["updates"] == 1
        assert_weights(agg.weights(1), expected_weights([(d, part, [0])]))
        # The receipt that settled the outbox entry (may be "duplicate": the aggregator answers
        # a copy arriving in the same group commit before the first copy's "accepted").
        d.wait(lambda st: st["outbox"] == 0, "the receipt")
        assert re.search(rf"update {uid} (accepted|duplicate) ", d.log_text())
        settle(agg, [d], [part], EXAMPLES, 1, 2)
        assert all(dup[1] in d.update_ids() for dup in agg.duplicates())
        resends = d.log_text().count(f"resending update {uid}")
        print(f"resends: {resends}, duplicates answered: {len(agg.duplicates())}")
        stop_and_check_outboxes([d])


def test_broker_kill_and_restart_folds_every_update_once(
    net: Network, hil_broker: tuple[Mosquitto, str], tmp_path: Path
) -> None:
    broker, url = hil_broker
    parts, _, _ = digits_split(3)
    with fleet(net, broker, url, tmp_path, 3, min_updates=6) as (agg, devices):
        for d, part in zip(devices, parts, strict=True):
            d.give(part, 0)
        for d in devices:
            d.wait(lambda st: st["updates_sent"] == 1, "first update")
        broker.kill()  # SIGKILL: sessions, queues and retained messages since start are lost
        for d, part in zip(devices, parts, strict=True):
            d.give(part, EXAMPLES)  # trained and queued while there is no broker
        for d in devices:
            d.wait(lambda st: st["updates_sent"] == 2 and st["outbox"] >= 1, "second update")
        assert agg.info(1) is None
        broker.start()
        info = agg.wait_version(1)
        ids = [d.update_ids() for d in devices]
        assert all(len(i) == 2 for i in ids), ids
        expected = sorted(u for i in ids for u in i)
        assert sorted(info["update_ids"]) == expected
        assert info["metrics"]["updates"] == 6
        assert info["metrics"]["examples"] == 6 * EXAMPLES
        work = [(d, p, [0, EXAMPLES]) for d, p in zip(devices, parts, strict=True)]
        assert_weights(agg.weights(1), expected_weights(work))
        # Both sides reconnected by themselves.
        for d in devices:
            d.wait(lambda st: st["connected"] and st["version"] == 1, "reconnect, version 1")
        settle(agg, devices, parts, 2 * EXAMPLES, 2, 2)
        every = {u for d in devices for u in d.update_ids()}
        assert {uid for _, uid in agg.duplicates()} <= every
        stop_and_check_outboxes(devices)
        assert agg.terminate() == 0
