"""The broker configuration as shipped: configs/mosquitto.conf and configs/acl.example in a real
Mosquitto (only ports and file paths substituted), with per-device passwords and with mutual TLS.

A real aggregator and real device clients complete an asynchronous version and a secure round
through it; a device that tries to speak for another device, or as the owner or the aggregator,
is refused by the broker; and a device that subscribes to everything receives the broadcasts
and its own messages, never another device's update, receipt, masked input or shares.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import queue
import subprocess
import threading
import uuid
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from devtools import DIGITS_PLAN, digits_split, mlp_bundle, publish_task
from secagg_tools import enroll

from fededge.device.client import Client
from fededge.errors import TransportError
from fededge.mqtt import Message, MqttClient
from fededge.protocol import Plan, Topics, Update
from fededge.protocol.messages import SecureAggregation
from fededge.secagg.graph import TERMINAL, Stage
from fededge.secagg.messages import BROADCAST_TYPES
from fededge.settings import BrokerSettings, Settings, load_settings
from fededge.testing import wait_until
from fededge.testing.broker import find_mosquitto, free_port, make_password_file, wait_port

pytestmark = pytest.mark.broker

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
OWNER, AGGREGATOR, OBSERVER = "fededge-owner", "fededge-aggregator", "fededge-observer"
DEVICES = ("d00", "d01", "d02", "d03")
PASSWORDS = {name: f"pw-{name}-{i}" for i, name in enumerate((OWNER, AGGREGATOR, OBSERVER,
                                                               *DEVICES))}  # fmt: skip
# What a device publishes in a round: one topic per stage (rounds/{round}/{stage}/{device}).
DEVICE_STAGES = tuple(s.value for s in Stage if s not in TERMINAL)
Transport = Literal["password", "mtls"]
TRANSPORTS: tuple[Transport, ...] = ("password", "mtls")
START_TIMEOUT = 30.0  # a ceiling for a loaded machine


# --- certificates -------------------------------------------------------------------------------


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(
    cn: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None,
    kind: Literal["ca", "server", "client"],
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    issuer_name, issuer_key = issuer or (_name(cn), key)
    b = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=kind == "ca", path_length=None), critical=True)
    )
    if kind == "ca":
        b = b.add_extension(
            x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True
        )
    else:
        usage = (
            ExtendedKeyUsageOID.SERVER_AUTH if kind == "server" else ExtendedKeyUsageOID.CLIENT_AUTH
        )
        b = b.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if kind == "server":
        san = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        b = b.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return b.sign(issuer_key, hashes.SHA256())


@dataclass
class Pki:
    """A server CA and the broker's certificate; a device CA and one certificate per device."""

    directory: Path
    server_ca: Path = field(init=False)
    device_ca: Path = field(init=False)

    def __post_init__(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._cas: dict[str, tuple[x509.Name, ec.EllipticCurvePrivateKey]] = {}
        self.server_ca = self._ca("server-ca", "fededge test server CA")
        self.device_ca = self._ca("device-ca", "fededge test device CA")
        self._ca("rogue-ca", "someone else's CA")
        self.broker_cert, self.broker_key = self.issue("broker", "localhost", "server-ca", "server")

    def _ca(self, stem: str, cn: str) -> Path:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _cert(cn, key, None, "ca")
        self._cas[stem] = (cert.subject, key)
        path = self.directory / f"{stem}.crt"
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return path

    def issue(
        self,
        stem: str,
        cn: str,
        ca: str = "device-ca",
        kind: Literal["server", "client"] = "client",
    ) -> tuple[Path, Path]:
        """A certificate for ``cn`` signed by ``ca``: (certificate file, key file)."""
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _cert(cn, key, self._cas[ca], kind)
        crt, pem = self.directory / f"{stem}.crt", self.directory / f"{stem}.key"
        crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        pem.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        return crt, pem


# --- the shipped config, localised ----------------------------------------------------------------

# The shipped listeners and what the test calls them.
LISTENERS = {"listener 1883 127.0.0.1": "plain", "listener 8883": "tls", "listener 8884": "mtls"}


def localise(conf: str, tmp: Path, ports: dict[str, int], files: dict[str, dict[str, Path]]) -> str:
    """The shipped config with ports and paths pointed into ``tmp``; every other line unchanged.

    ``files[listener][key]`` replaces a file-path setting inside that listener's block
    (``files["global"]`` outside any listener).
    """
    out, where = [], "global"
    for line in conf.splitlines():
        key = line.partition(" ")[0]
        if line in LISTENERS:
            where = LISTENERS[line]
            line = f"listener {ports[where]} 127.0.0.1"
        elif key == "user":
            # Started as root, Mosquitto would drop to "mosquitto", which cannot use pytest's
            # private temp folders; "root" keeps the current user.
            line = "user root"
        elif key == "persistence_location":
            line = f"persistence_location {tmp}/"
        elif key == "log_dest":
            line = f"log_dest file {tmp / 'mosquitto.log'}"
        elif key in files.get(where, {}):
            line = f"{key} {files[where][key]}"
        elif key in files["global"]:
            line = f"{key} {files['global'][key]}"
        out.append(line)
    return "\n".join(out) + "\n"


@dataclass
class ShippedBroker:
    ports: dict[str, int]
    pki: Pki
    log: Path
    device_certs: dict[str, tuple[Path, Path]]

    def settings(self, user: str, transport: Transport | Literal["plain"] = "plain",
                 **kw: Any) -> dict[str, Any]:  # fmt: skip
        """Broker settings (a dict for load_settings) for ``user`` over one of the listeners."""
        s: dict[str, Any] = {"connect_timeout": 10.0, "reconnect_min_delay": 0.1,
                             "reconnect_max_delay": 1.0}  # fmt: skip
        if transport == "mtls":
            cert, key = self.device_certs[user]
            s |= {"url": f"mqtts://localhost:{self.ports['mtls']}", "ca_file": self.pki.server_ca,
                  "cert_file": cert, "key_file": key}  # fmt: skip
        else:
            port = self.ports["tls" if transport == "password" else "plain"]
            scheme = "mqtts" if transport == "password" else "mqtt"
            s |= {"url": f"{scheme}://localhost:{port}", "username": user,
                  "password": PASSWORDS[user]}  # fmt: skip
            if transport == "password":
                s["ca_file"] = self.pki.server_ca
        return s | kw

    def broker(self, user: str, transport: Transport | Literal["plain"] = "plain",
               **kw: Any) -> BrokerSettings:  # fmt: skip
        return BrokerSettings(**self.settings(user, transport, **kw))


@pytest.fixture
def shipped(tmp_path: Path) -> Iterator[ShippedBroker]:
    binary = find_mosquitto()
    if binary is None:
        pytest.skip("mosquitto is not installed (apt-get install mosquitto)")
    pki = Pki(tmp_path / "pki")
    certs = {d: pki.issue(d, d) for d in DEVICES}
    ports = {name: free_port() for name in LISTENERS.values()}
    files = {
        "global": {
            "password_file": make_password_file(tmp_path, PASSWORDS),
            "acl_file": CONFIGS / "acl.example",  # as shipped
            "certfile": pki.broker_cert,
            "keyfile": pki.broker_key,
        },
        "tls": {"cafile": pki.server_ca},
        "mtls": {"cafile": pki.device_ca},
    }
    shipped_conf = (CONFIGS / "mosquitto.conf").read_text()
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(localise(shipped_conf, tmp_path, ports, files))
    # Only ports, paths and the user changed; every path-bearing line was redirected.
    lines = [ln for ln in conf.read_text().splitlines() if ln and not ln.startswith("#")]
    assert not [ln for ln in lines if "/etc/" in ln or "/var/" in ln]
    assert "use_identity_as_username true" in lines and "require_certificate true" in lines
    log = tmp_path / "mosquitto.log"
    proc = subprocess.Popen(
        [binary, "-c", str(conf)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        for port in ports.values():
            if not wait_port(port, START_TIMEOUT):
                proc.kill()
                out = proc.communicate()[0].decode(errors="replace")
                pytest.fail(f"mosquitto rejected the shipped config:\n{out}\n{log.read_text()}")
        yield ShippedBroker(ports, pki, log, certs)
    finally:
        proc.terminate()
        proc.wait(10)


# --- fleet ----------------------------------------------------------------------------------------


def aggregator_settings(b: ShippedBroker, state: Path, task: str) -> Settings:
    agg = {"metrics": False, "status_interval": 1.0}
    return load_settings(None, {"broker": b.settings(AGGREGATOR), "task": task,
                                "state_dir": state, "aggregator": agg})  # fmt: skip


def owner_settings(b: ShippedBroker, task: str, tmp: Path) -> Settings:
    return load_settings(None, {"broker": b.settings(OWNER), "task": task, "state_dir": tmp})


def device_settings(b: ShippedBroker, transport: Transport, state: Path, task: str,
                    device: str) -> Settings:  # fmt: skip
    dev = {"device_id": device, "metrics": False, "seed": zlib.crc32(device.encode())}
    return load_settings(None, {"broker": b.settings(device, transport), "task": task,
                                "state_dir": state, "device": dev})  # fmt: skip


@contextlib.contextmanager
def devices(b: ShippedBroker, transport: Transport, state: Path, task: str,
            names: tuple[str, ...]) -> Iterator[dict[str, Client]]:  # fmt: skip
    clients = {d: Client(device_settings(b, transport, state, task, d)) for d in names}
    try:
        for c in clients.values():
            c.start()
        yield clients
    finally:
        for c in clients.values():
            with contextlib.suppress(Exception):
                c.close(timeout=5)


@contextlib.contextmanager
def listener(
    settings: BrokerSettings, topic_filter: str | list[str], name: str
) -> Iterator[list[Message]]:
    """A client subscribed to ``topic_filter`` (or several); the list fills with what it gets."""
    got: list[Message] = []
    client = MqttClient(settings, f"{name}-{uuid.uuid4().hex[:8]}", persistent=False)
    client.connect()
    client.subscribe_all([topic_filter] if isinstance(topic_filter, str) else topic_filter)
    stop = threading.Event()

    def pump() -> None:
        while not stop.is_set():
            with contextlib.suppress(queue.Empty):
                got.append(client.messages.get(timeout=0.1))

    t = threading.Thread(target=pump, daemon=True)
    t.start()
    try:
        yield got
    finally:
        stop.set()
        t.join(5)
        client.close()


def foreign(topics: Topics, topic: str, me: str) -> str | None:
    """The device other than ``me`` whose message ``topic`` is, or None."""
    if (where := topics.parse_round(topic)) is not None:
        return where.device if where.device not in (None, me) else None
    for kind in ("updates", "receipts", "devices"):
        device = topics.device_of(topic, kind)
        if device is not None and device != me:
            return device
    return None


def allowed_for_device(topics: Topics, topic: str, me: str) -> bool:
    """Whether the shipped ACL may deliver ``topic`` to device ``me`` (its documented rights)."""
    if topic in (topics.model, topics.plan, topics.graph, f"{topics.base}/roster",
                 topics.receipt(me), topics.device_status(me)):  # fmt: skip
        return True
    where = topics.parse_round(topic)
    if where is None:
        return False
    if where.kind == "broadcast":
        return where.type in BROADCAST_TYPES
    return where.kind == "to" and where.device == me


def digits_examples(n_devices: int) -> list[tuple[np.ndarray, np.ndarray]]:
    parts, _, _ = digits_split(n_devices)
    return [(x[:32], y[:32]) for x, y in parts]


# --- tests ----------------------------------------------------------------------------------------


def test_acl_grants_every_round_topic_of_the_protocol() -> None:
    """The ACL names round topics one by one (a "+" would let devices read each other's): it
    must follow the protocol's list of stages and broadcasts."""
    lines = set((CONFIGS / "acl.example").read_text().splitlines())
    for stage in DEVICE_STAGES:
        assert f"pattern write fededge/+/rounds/+/{stage}/%u" in lines, stage
    for kind in BROADCAST_TYPES:
        assert f"pattern read fededge/+/rounds/+/{kind}" in lines, kind
        assert f"pattern deny fededge/+/rounds/checkin/{kind}" in lines, kind
    assert "pattern read fededge/+/rounds/+/to/%u" in lines
    assert not [ln for ln in lines if ln.startswith("pattern read") and "rounds/#" in ln]


def test_shipped_config_starts_without_warnings(shipped: ShippedBroker) -> None:
    text = shipped.log.read_text()
    startup = text[: text.index(" running")].splitlines()
    problems = [ln for ln in startup if ("warning" in ln.lower() or "error" in ln.lower())
                and "does not contain '%c' or '%u'" not in ln]  # fmt: skip
    assert problems == [], text


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_async_version_completes_and_devices_see_only_their_own(
    shipped: ShippedBroker, tmp_path: Path, transport: Transport
) -> None:
    from aggtools import running_aggregator

    task = f"t{uuid.uuid4().hex[:8]}"
    topics = Topics("fededge", task)
    names = DEVICES[:3]
    plan = DIGITS_PLAN.model_copy(update={"min_updates_per_version": len(names)})
    publish_task(owner_settings(shipped, task, tmp_path / "owner"), plan)
    spy_settings = shipped.broker("d00", transport)
    # d00 asks for everything and for the other devices' topics by name.
    b = topics.base
    spy_filters = ["#", f"{b}/updates/+", f"{b}/receipts/+", f"{b}/devices/+/status"]
    with (
        listener(spy_settings, spy_filters, "spy") as spied,
        listener(shipped.broker(OBSERVER), f"{topics.base}/#", "observer") as seen,
        running_aggregator(aggregator_settings(shipped, tmp_path / "agg", task)) as agg,
        devices(shipped, transport, tmp_path, task, names) as fleet,
    ):
        wait_until(lambda: all(c.version == 0 for c in fleet.values()), 60, "version 0")
        for c, (x, y) in zip(fleet.values(), digits_examples(len(names)), strict=True):
            c.fit(x, y)
        wait_until(lambda: agg.version == 1, 60, "version 1")
        wait_until(lambda: all(c.version == 1 for c in fleet.values()), 60, "devices on v1")
        assert agg.model is not None and agg.model.updates == len(names)
        # Every device's update and receipt went over the bus (the observer saw them) ...
        wait_until(lambda: {topics.receipt(d) for d in names} <= {m.topic for m in seen},
                   30, "every receipt seen by the observer")  # fmt: skip
        assert {topics.update(d) for d in names} <= {m.topic for m in seen}
    # ... and a device subscribed to "#" got the broadcasts and its own, nothing of the others.
    got = {m.topic for m in spied}
    assert {topics.model, topics.plan, topics.receipt("d00")} <= got
    assert [t for t in got if not allowed_for_device(topics, t, "d00")] == []
    assert [t for t in got if foreign(topics, t, "d00")] == []


def sa_plan(n: int) -> Plan:
    sa = SecureAggregation(cohort_size=n, min_cohort=n, threshold=n // 2 + 1, stage_timeout=10.0,
                           checkin_window=60.0, checkin_interval=0.5)  # fmt: skip
    return DIGITS_PLAN.model_copy(update={"secure_aggregation": sa, "min_updates_per_version": n})


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_secure_round_completes_and_no_device_reads_another_devices_round(
    shipped: ShippedBroker, tmp_path: Path, transport: Transport
) -> None:
    from aggtools import running_aggregator

    task = f"t{uuid.uuid4().hex[:8]}"
    topics = Topics("fededge", task)
    names = DEVICES
    publish_task(owner_settings(shipped, task, tmp_path / "owner"), sa_plan(len(names)))
    # The owner enrolls the devices' identity keys in the signed roster (owner-only topic).
    enroll(shipped.broker(OWNER), tmp_path, task, names)
    # d00 asks for everything, for the round topics and for d01's round messages by name.
    rb = topics.rounds_base
    spy_filters = ["#", f"{rb}/#", *(f"{rb}/+/{s}/d01" for s in DEVICE_STAGES), f"{rb}/+/to/d01"]
    with (
        listener(shipped.broker("d00", transport), spy_filters, "spy") as spied,
        listener(shipped.broker(OBSERVER), f"{topics.base}/#", "observer") as seen,
        running_aggregator(aggregator_settings(shipped, tmp_path / "agg", task)) as agg,
        devices(shipped, transport, tmp_path, task, names) as fleet,
    ):
        wait_until(lambda: all(c.version == 0 for c in fleet.values()), 60, "version 0")
        for c, (x, y) in zip(fleet.values(), digits_examples(len(names)), strict=True):
            c.fit(x, y)
        wait_until(lambda: agg.version == 1, 90, "version 1 from a secure round")
        assert agg.model is not None and agg.model.updates == len(names)
        assert agg.rounds.rounds_done == 1 and agg.accepted_total == 0
    # The round's messages of every stage, of every device, were on the bus ...
    on_bus = {topics.parse_round(m.topic) for m in seen} - {None}
    for d in names:
        for stage in DEVICE_STAGES:
            assert any(w and w.kind == "stage" and w.type == stage and w.device == d
                       for w in on_bus), (d, stage)  # fmt: skip
        assert any(w and w.kind == "to" and w.device == d for w in on_bus), d
        assert any(w and w.kind == "checkin" and w.device == d for w in on_bus), d
    # ... and d00, subscribed to "#", received the broadcasts and its own shares only.
    got = {m.topic for m in spied}
    kinds = {(w.kind, w.type) for w in map(topics.parse_round, got) if w is not None}
    assert {("broadcast", "config"), ("broadcast", "unmask_request"), ("to", "to")} <= kinds
    assert [t for t in got if not allowed_for_device(topics, t, "d00")] == []
    assert [t for t in got if foreign(topics, t, "d00")] == []


def forged_update(task: str, device: str) -> bytes:
    weights = mlp_bundle().weights
    delta = {k: np.zeros_like(v) for k, v in weights.items()}
    return Update(task=task, device=device, update_id=uuid.uuid4().hex[:16], base_version=0,
                  num_examples=32, delta=delta).to_bytes()  # fmt: skip


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_device_cannot_speak_for_another_device_the_owner_or_the_aggregator(
    shipped: ShippedBroker, tmp_path: Path, transport: Transport
) -> None:
    from aggtools import running_aggregator

    task = f"t{uuid.uuid4().hex[:8]}"
    t = Topics("fededge", task)
    plan = DIGITS_PLAN
    publish_task(owner_settings(shipped, task, tmp_path / "owner"), plan)
    # Over mTLS the device also claims to be d02 by user name: the certificate decides.
    claim = {"username": "d02", "password": "x"} if transport == "mtls" else {}
    forgeries = {
        t.update("d02"): forged_update(task, "d02"),
        t.receipt("d02"): b'{"kind":"receipt"}',
        t.device_status("d02"): b'{"state":"offline"}',
        t.plan: plan.model_copy(update={"learning_rate": 100.0}).to_bytes(),
        t.model: b"random weights",
        t.graph: b"a graph",
        f"{t.base}/roster": b"a roster",
        t.aggregator_status: b"{}",
        t.version_metrics(1): b"{}",
        t.checkin("d02"): b"{}",
        t.round_stage("r1", "masked", "d02"): b"masked input",
        t.round_stage("r1", "unmask", "d02"): b"shares",
        t.round_broadcast("r1", "config"): b"config",
        t.round_to("r1", "d02"): b"shares for d02",
    }
    with (
        listener(shipped.broker(OBSERVER), f"{t.base}/#", "observer") as seen,
        running_aggregator(aggregator_settings(shipped, tmp_path / "agg", task)) as agg,
        MqttClient(
            shipped.broker("d01", transport, **claim), "fededge-device-d01", persistent=False
        ) as d01,  # fmt: skip
    ):
        for topic, payload in forgeries.items():
            # MQTT 5: the broker answers "Not authorized" in the PUBACK and drops it.
            with pytest.raises(TransportError, match="Not authorized"):
                d01.publish(topic, payload, wait=True, timeout=30)
        # Its own update goes through: once its receipt is out, anything routed before it
        # (the forgeries, had the broker let them through) has been handled too.
        d01.publish(t.update("d01"), forged_update(task, "d01"), wait=True, timeout=30)
        wait_until(lambda: t.receipt("d01") in {m.topic for m in seen}, 30, "d01's receipt")
        assert agg.accepted_total == 1
        assert agg.version == 0 and agg.plan == plan
    # Nothing forged was delivered (what the observer saw on those topics is the owner's and
    # the aggregator's own), and the forged update got no receipt.
    assert [m.topic for m in seen if forgeries.get(m.topic) == m.payload] == []
    assert not {t.update("d02"), t.receipt("d02")} & {m.topic for m in seen}


def test_mtls_listener_needs_a_device_certificate(shipped: ShippedBroker) -> None:
    b = shipped
    ok = b.broker("d01", "mtls")
    no_cert = b.broker("d01", "mtls", cert_file=None, key_file=None, username="d01",
                       password=PASSWORDS["d01"])  # fmt: skip
    rogue_cert, rogue_key = b.pki.issue("rogue-d01", "d01", ca="rogue-ca")
    rogue = b.broker("d01", "mtls", cert_file=rogue_cert, key_file=rogue_key)
    for settings in (no_cert, rogue):
        with pytest.raises(TransportError):
            MqttClient(settings, f"x-{uuid.uuid4().hex[:6]}", persistent=False).connect()
    # The password listener does not accept a certificate instead of a password.
    cert_only = b.broker(
        "d01",
        "password",
        username=None,
        password=None,
        cert_file=ok.cert_file,
        key_file=ok.key_file,
    )
    with pytest.raises(TransportError, match=r"Not authorized|refused"):
        MqttClient(cert_only, f"y-{uuid.uuid4().hex[:6]}", persistent=False).connect()
    with MqttClient(ok, f"z-{uuid.uuid4().hex[:6]}", persistent=False) as c:
        assert c.connected


def test_wrong_password_and_anonymous_are_refused(shipped: ShippedBroker) -> None:
    for user, password in [("d01", "wrong"), ("d01", PASSWORDS["d02"])]:
        s = shipped.broker("d01", "password", username=user, password=password)
        with pytest.raises(TransportError, match=r"Bad user name or password|Not authorized"):
            MqttClient(s, f"w-{uuid.uuid4().hex[:6]}", persistent=False).connect()
    anon = shipped.broker("d01", username=None, password=None)
    with pytest.raises(TransportError, match=r"Not authorized|Bad user name"):
        MqttClient(anon, f"a-{uuid.uuid4().hex[:6]}", persistent=False).connect()


@pytest.mark.parametrize("user", [OWNER, AGGREGATOR, OBSERVER])
def test_service_users_are_no_devices(shipped: ShippedBroker, user: str) -> None:
    """The device patterns apply to every user; the ACL denies them to the service users, so an
    observer (read-only) cannot contribute an update as a device named like itself."""
    t = Topics("fededge", f"t{uuid.uuid4().hex[:8]}")
    with MqttClient(shipped.broker(user), f"{user}-{uuid.uuid4().hex[:6]}", persistent=False) as c:
        for topic in (t.update(user), t.device_status(user), t.checkin(user),
                      t.round_stage("r1", "masked", user)):  # fmt: skip
            with pytest.raises(TransportError, match="Not authorized"):
                c.publish(topic, b"x", wait=True, timeout=30)
