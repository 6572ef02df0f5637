"""The example configs: every TOML loads as settings; mosquitto.conf and acl.example run in a real
Mosquitto and grant exactly what acl.example says."""

from __future__ import annotations

import os
import queue
import re
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from fededge.mqtt.session import MAX_INFLIGHT_V5
from fededge.settings import load_settings
from fededge.testing.broker import (
    find_mosquitto,
    free_port,
    make_password_file,
    make_tls_files,
    wait_port,
)
from fededge.testing.pytest_plugin import MosquittoFactory

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
TOMLS = sorted(CONFIGS.glob("*.toml"))
PASSWORDS = {"fededge-aggregator": "agg-secret", "pi-01": "pw1", "pi-02": "pw2",
             "fededge-bridge-site-1": "bridge-secret"}  # fmt: skip


def test_every_example_toml_is_shipped() -> None:
    assert {p.name for p in TOMLS} >= {"device.toml", "aggregator.toml"}


@pytest.mark.parametrize("path", TOMLS, ids=lambda p: p.name)
def test_example_config_loads(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for key in [k for k in os.environ if k.startswith("FEDEDGE_")]:
        monkeypatch.delenv(key)
    settings = load_settings(path)
    assert settings.task == "digits"
    assert settings.topic_prefix == "fededge"


def test_gateway_stale_floor_matches_the_central_aggregator() -> None:
    """A gateway's versions_kept above the coordinator's would let it accept resends the central
    side no longer recognises (docs/operations.md 2.5, "Resends")."""
    gw = load_settings(CONFIGS / "gateway.toml").aggregator
    assert gw.versions_kept == load_settings(CONFIGS / "aggregator.toml").aggregator.versions_kept


def test_mosquitto_memory_drop_in_sets_what_the_benches_measured(
    mosquitto_factory: MosquittoFactory,
) -> None:
    """systemd/mosquitto-memory.conf sets exactly fededge.memory.BROKER_MALLOC_ENV (what
    bench/bench_ingest.py runs its broker with), both variables, and a broker started with it
    has them in its environment."""
    from fededge.memory import BROKER_MALLOC_ENV

    unit = (CONFIGS.parent / "systemd" / "mosquitto-memory.conf").read_text()
    assert re.search(r"^\[Service\]$", unit, re.M)
    env = dict(re.findall(r"^Environment=(\w+)=(\S+)$", unit, re.M))
    assert env == BROKER_MALLOC_ENV
    assert set(env) == {"MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"}
    b = mosquitto_factory(env=BROKER_MALLOC_ENV)
    assert b.proc is not None
    seen = Path(f"/proc/{b.proc.pid}/environ").read_bytes().split(b"\0")
    for k, v in env.items():
        assert f"{k}={v}".encode() in seen


def test_size_limits_agree() -> None:
    conf = (CONFIGS / "mosquitto.conf").read_text()
    packet = int(re.search(r"^max_packet_size (\d+)$", conf, re.M).group(1))  # type: ignore[union-attr]
    inflight = int(re.search(r"^max_inflight_messages (\d+)$", conf, re.M).group(1))  # type: ignore[union-attr]
    agg = load_settings(CONFIGS / "aggregator.toml").aggregator
    # Room for the topic and properties beside the largest update.
    assert agg.max_update_bytes is not None and agg.max_update_bytes + 64 * 1024 <= packet
    # Receipts are published with the broker's window (MQTT 5 Receive Maximum, capped).
    assert 20 <= inflight <= MAX_INFLIGHT_V5


@dataclass
class Broker:
    plain_port: int
    tls_port: int
    ca_file: Path
    log: Path


def _localise(conf: str, tmp: Path, ports: tuple[int, int], files: dict[str, Path]) -> str:
    """The shipped config with its paths and ports pointed into ``tmp``; nothing else changed."""
    plain, tls = ports
    out = []
    for line in conf.splitlines():
        key = line.partition(" ")[0]
        if line == "listener 1883 127.0.0.1":
            line = f"listener {plain} 127.0.0.1"
        elif line == "listener 8883":
            line = f"listener {tls} 127.0.0.1"
        elif line == "listener 8884":  # mTLS (tests/test_shipped_broker.py exercises it)
            line = f"listener {free_port()} 127.0.0.1"
        elif key == "user":
            # Started as root, Mosquitto would drop to "mosquitto", which cannot use pytest's
            # private temp folders; "root" keeps the current user.
            line = "user root"
        elif key == "persistence_location":
            line = f"persistence_location {tmp}/"
        elif key in files:
            line = f"{key} {files[key]}"
        elif key == "log_dest":
            line = f"log_dest file {tmp / 'mosquitto.log'}"
        out.append(line)
    return "\n".join(out) + "\n"


@pytest.fixture
def fleet_broker(tmp_path: Path) -> Iterator[Broker]:
    """Mosquitto running the shipped mosquitto.conf and acl.example."""
    binary = find_mosquitto()
    if binary is None:
        pytest.skip("mosquitto is not installed (apt-get install mosquitto)")
    tls = make_tls_files(tmp_path / "tls")
    files = {
        "cafile": tls.ca_cert,
        "certfile": tls.server_cert,
        "keyfile": tls.server_key,
        "password_file": make_password_file(tmp_path, PASSWORDS),
        "acl_file": CONFIGS / "acl.example",
    }
    ports = (free_port(), free_port())
    conf = tmp_path / "mosquitto.conf"
    shipped = (CONFIGS / "mosquitto.conf").read_text()
    conf.write_text(_localise(shipped, tmp_path, ports, files))
    # Every path-bearing line of the shipped file was redirected.
    settings = [ln for ln in conf.read_text().splitlines() if ln and not ln.startswith("#")]
    assert not [ln for ln in settings if "/etc/" in ln or "/var/" in ln]
    log = tmp_path / "mosquitto.log"
    proc = subprocess.Popen(
        [binary, "-c", str(conf)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        for port in ports:
            if not wait_port(port, 30.0):
                proc.kill()
                out = proc.communicate()[0].decode(errors="replace")
                pytest.fail(f"mosquitto rejected the config:\n{out}\n{log.read_text()}")
        yield Broker(ports[0], ports[1], tls.ca_cert, log)
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.mark.broker
def test_mosquitto_accepts_the_config_without_warnings(fleet_broker: Broker) -> None:
    # TLS on the device listener, with the CA the devices are given.
    ctx = ssl.create_default_context(cafile=str(fleet_broker.ca_file))
    with (
        socket.create_connection(("127.0.0.1", fleet_broker.tls_port), timeout=5) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        assert tls.version() in ("TLSv1.2", "TLSv1.3")
    text = fleet_broker.log.read_text()
    # What mosquitto said while loading the config (later lines are about our probes).
    startup = text[: text.index(" running")].splitlines()
    problems = [
        line
        for line in startup
        if re.search(r"warning|error", line, re.I)
        # Read-for-everyone patterns are deliberate (see acl.example).
        and "does not contain '%c' or '%u'" not in line
    ]
    assert problems == [], text


class _Client:
    """A paho MQTT 5 client logged in as ``user``, recording messages and connect results."""

    def __init__(self, port: int, user: str, password: str | None) -> None:
        self.messages: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.connack: queue.Queue[ReasonCode] = queue.Queue()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=user, protocol=mqtt.MQTTv5)
        if password is not None:
            self.client.username_pw_set(user, password)
        self.client.on_connect = lambda c, u, f, rc, p: self.connack.put(rc)
        self.client.on_message = lambda c, u, m: self.messages.put((m.topic, bytes(m.payload)))
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.result = self.connack.get(timeout=30)

    def subscribe(self, topic: str) -> None:
        done: queue.Queue[int] = queue.Queue()
        self.client.on_subscribe = lambda c, u, mid, rcs, p: done.put(mid)
        _, mid = self.client.subscribe(topic, qos=1)
        assert done.get(timeout=30) == mid

    def publish(self, topic: str, payload: bytes) -> None:
        self.client.publish(topic, payload, qos=1).wait_for_publish(30)

    def received(self, expected: int, timeout: float = 30.0) -> list[tuple[str, bytes]]:
        """The first ``expected`` messages, and any others already here, sorted.

        No pause for extras: the tests publish what must not arrive before what must, from one
        client, and the broker keeps that order, so a wrongly delivered message is queued before
        the last expected one. ``timeout`` is a ceiling for a loaded machine.
        """
        out: list[tuple[str, bytes]] = []
        deadline = time.monotonic() + timeout
        while len(out) < expected and (left := deadline - time.monotonic()) > 0:
            try:
                out.append(self.messages.get(timeout=left))
            except queue.Empty:
                break
        while True:
            try:
                out.append(self.messages.get_nowait())
            except queue.Empty:
                return sorted(out)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.mark.broker
def test_anonymous_and_wrong_passwords_are_refused(fleet_broker: Broker) -> None:
    for user, password in [("anyone", None), ("pi-01", "wrong")]:
        c = _Client(fleet_broker.plain_port, user, password)
        assert c.result.is_failure, (user, c.result)
        c.close()


@pytest.mark.broker
def test_acl_confines_each_device_to_its_own_topics(fleet_broker: Broker) -> None:
    port = fleet_broker.plain_port
    agg = _Client(port, "fededge-aggregator", PASSWORDS["fededge-aggregator"])
    d1 = _Client(port, "pi-01", PASSWORDS["pi-01"])
    d2 = _Client(port, "pi-02", PASSWORDS["pi-02"])
    clients = [agg, d1, d2]
    try:
        assert not any(c.result.is_failure for c in clients)
        base = "fededge/digits"
        agg.subscribe(f"{base}/updates/+")
        agg.subscribe(f"{base}/model")
        agg.subscribe(f"{base}/devices/+/status")
        for d in (d1, d2):
            d.subscribe(f"{base}/receipts/+")  # allowed, but only its own arrive
            d.subscribe(f"{base}/model")
            d.subscribe(f"{base}/updates/+")  # devices may not read others' updates

        # Denied first; the allowed publish after it proves the denied one had its chance.
        d1.publish(f"{base}/updates/pi-02", b"forged")
        d1.publish(f"{base}/model", b"forged model")
        d1.publish(f"{base}/devices/pi-02/status", b"forged status")
        d1.publish(f"{base}/devices/pi-01/status", b"online")
        d1.publish(f"{base}/updates/pi-01", b"update")
        assert agg.received(2) == [
            (f"{base}/devices/pi-01/status", b"online"),
            (f"{base}/updates/pi-01", b"update"),
        ]

        agg.publish(f"{base}/receipts/pi-01", b"r1")
        agg.publish(f"{base}/receipts/pi-02", b"r2")
        agg.publish(f"{base}/model", b"v1")
        assert d1.received(2) == [
            (f"{base}/model", b"v1"),
            (f"{base}/receipts/pi-01", b"r1"),
        ]
        assert d2.received(2) == [
            (f"{base}/model", b"v1"),
            (f"{base}/receipts/pi-02", b"r2"),
        ]
    finally:
        for c in clients:
            c.close()


@pytest.mark.broker
def test_acl_confines_a_site_bridge_to_its_gateway(fleet_broker: Broker) -> None:
    """The bridge user of site-1 (configs/site-bridge.conf) sends only its gateway's partial sums
    and device statuses up, and reads the broadcasts and its own gateway's answers."""
    port = fleet_broker.plain_port
    agg = _Client(port, "fededge-aggregator", PASSWORDS["fededge-aggregator"])
    bridge = _Client(port, "fededge-bridge-site-1", PASSWORDS["fededge-bridge-site-1"])
    clients = [agg, bridge]
    try:
        assert not any(c.result.is_failure for c in clients)
        base = "fededge/digits"
        for topic in ("aggregator/partials/+", "model", "devices/+/status", "updates/+"):
            agg.subscribe(f"{base}/{topic}")
        for topic in ("aggregator/acks/+", "model", "receipts/+", "updates/+"):
            bridge.subscribe(f"{base}/{topic}")

        bridge.publish(f"{base}/model", b"forged model")
        bridge.publish(f"{base}/aggregator/partials/gateway-site-2", b"another site's")
        bridge.publish(f"{base}/aggregator/partials/shard-0", b"a shard's")
        bridge.publish(f"{base}/updates/pi-01", b"forged update")
        bridge.publish(f"{base}/devices/pi-07/status", b"online")
        bridge.publish(f"{base}/aggregator/partials/gateway-site-1", b"partial")
        assert agg.received(2) == [
            (f"{base}/aggregator/partials/gateway-site-1", b"partial"),
            (f"{base}/devices/pi-07/status", b"online"),
        ]

        agg.publish(f"{base}/receipts/pi-01", b"r1")
        agg.publish(f"{base}/updates/pi-01", b"u")  # the aggregator cannot publish these
        agg.publish(f"{base}/aggregator/acks/gateway-site-2", b"not yours")
        agg.publish(f"{base}/aggregator/acks/gateway-site-1", b"ack")
        agg.publish(f"{base}/model", b"v1")
        assert bridge.received(2) == [
            (f"{base}/aggregator/acks/gateway-site-1", b"ack"),
            (f"{base}/model", b"v1"),
        ]
    finally:
        for c in clients:
            c.close()
