"""fededge.mqtt against a real private Mosquitto: sessions, acks, wills, TLS, auth, restarts."""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import select
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from broker import Mosquitto, free_port, make_password_file, make_tls_files

from fededge.errors import ConfigError, NotReadyError, TransportError
from fededge.mqtt import Inbox, Message, MqttClient, Will, discard_session, read_retained
from fededge.settings import BrokerSettings
from fededge.testing import wait_until

pytestmark = pytest.mark.broker

PROTOCOLS = ["3.1.1", "5"]


def _id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def get(client: MqttClient, timeout: float = 5.0) -> Message:
    """The next received message, failing the test after ``timeout``."""
    try:
        return client.messages.get(timeout=timeout)
    except queue.Empty:
        pytest.fail(f"no message within {timeout} s")


def nothing(client: MqttClient) -> None:
    """Assert that nothing is queued for ``client``, by an event rather than a wait.

    The client publishes a marker to itself: the broker routes messages to a client in the
    order it processes them, so anything already routed (or held in its session) arrives
    before the marker. The marker is acknowledged and its subscription dropped, and the
    UNSUBACK round trip proves the acknowledgement reached the broker.
    """
    marker = f"marker/{uuid.uuid4().hex}"
    client.subscribe(marker, qos=1)
    client.publish(marker, b"marker", qos=1, wait=True, timeout=10)
    m = get(client)
    assert (m.topic, m.payload) == (marker, b"marker"), f"unexpected message on {m.topic}"
    client.ack(m)
    client.unsubscribe(marker)


@pytest.fixture
def clients() -> Iterator[Callable[..., MqttClient]]:
    """Connected clients closed at the end of the test: ``make(settings, client_id, **kw)``."""
    made: list[MqttClient] = []

    def make(settings: BrokerSettings, client_id: str | None = None, **kw: Any) -> MqttClient:
        c = MqttClient(settings, client_id or _id("c"), **kw)
        made.append(c)
        c.connect()
        return c

    yield make
    for c in made:
        c.close()


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_round_trip(broker: Mosquitto, clients: Callable[..., MqttClient], protocol: str) -> None:
    settings = broker.settings(protocol=protocol)
    sub = clients(settings)
    pub = clients(settings)
    assert sub.connected and sub.wait_connected(0)
    topic = f"rt/{uuid.uuid4().hex}"
    sub.subscribe(f"{topic}/+", qos=1)
    pub.publish(f"{topic}/a", b"\x00\x01binary", qos=1, wait=True, timeout=5)
    pub.publish(f"{topic}/b", "text", qos=0)
    m1, m2 = get(sub), get(sub)
    assert (m1.topic, m1.payload, m1.qos, m1.retain) == (f"{topic}/a", b"\x00\x01binary", 1, False)
    assert (m2.topic, m2.payload, m2.qos) == (f"{topic}/b", b"text", 0)
    sub.unsubscribe(f"{topic}/+")
    pub.publish(f"{topic}/a", b"after", wait=True, timeout=5)
    nothing(sub)


def test_clients_work_with_descriptors_beyond_selects_limit(broker: Mosquitto) -> None:
    """A process with over 1,024 files open gives its MQTT sockets descriptors select()
    refuses (paho then reconnected forever); the client waits in poll() instead and works:
    connect, subscribe, publish and receive, a wake-up by publish() from another thread."""
    import resource

    from fededge.mqtt.pahoclient import FD_SETSIZE, poll_select

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = FD_SETSIZE + 200
    if soft < want:
        if hard != resource.RLIM_INFINITY and hard < want:
            pytest.skip(f"the open-file limit ({hard}) is below {want}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    devnull = os.open(os.devnull, os.O_RDONLY)
    held: list[int] = []
    try:
        while len(held) < FD_SETSIZE + 10 and (not held or held[-1] < FD_SETSIZE + 5):
            held.append(os.dup(devnull))
        settings = broker.settings()
        with MqttClient(settings, _id("hi-s")) as sub, MqttClient(settings, _id("hi-p")) as pub:
            sock = sub._client._sock
            assert sock is not None and sock.fileno() >= FD_SETSIZE
            topic = f"fd/{uuid.uuid4().hex}"
            sub.subscribe(f"{topic}/+", qos=1)
            for i in range(50):
                pub.publish(f"{topic}/{i}", str(i).encode(), qos=1, wait=i == 49, timeout=30)
            assert [get(sub).payload for _ in range(50)] == [str(i).encode() for i in range(50)]
        a, b = socket.socketpair()
        with a, b:
            assert poll_select([a], [b], 0) == ([], [b])
            b.send(b"x")
            assert poll_select([a], [], 5) == ([a], [])
            a.close()
            with pytest.raises(ValueError):
                poll_select([a], [], 0)
    finally:
        for fd in held:
            os.close(fd)
        os.close(devnull)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_retained(broker: Mosquitto, clients: Callable[..., MqttClient], protocol: str) -> None:
    settings = broker.settings(protocol=protocol)
    topic = f"ret/{uuid.uuid4().hex}"
    clients(settings).publish(topic, b"v1", retain=True, wait=True, timeout=5)
    late = clients(settings)
    late.subscribe(topic)
    m = get(late)
    assert (m.payload, m.retain) == (b"v1", True)


WILL_CLIENT = textwrap.dedent(
    """
    import sys, time
    from fededge.mqtt import MqttClient, Will
    from fededge.settings import BrokerSettings
    url, protocol, topic = sys.argv[1:4]
    c = MqttClient(BrokerSettings(url=url, protocol=protocol), "will-client",
                   will=Will(topic, b"offline"))
    c.connect()
    c.publish(topic, b"online", retain=True, wait=True, timeout=5)
    print("ready", flush=True)
    time.sleep(60)
    """
)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_last_will_when_process_dies(
    broker: Mosquitto, clients: Callable[..., MqttClient], protocol: str
) -> None:
    topic = f"status/{uuid.uuid4().hex}"
    watcher = clients(broker.settings(protocol=protocol))
    watcher.subscribe(topic)
    proc = subprocess.Popen(
        [sys.executable, "-c", WILL_CLIENT, broker.url, protocol, topic],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        assert get(watcher).payload == b"online"
        os.kill(proc.pid, signal.SIGKILL)
        m = get(watcher)
        assert (m.topic, m.payload) == (topic, b"offline")
    finally:
        proc.kill()
        proc.wait()
    # Retained, so a status reader that comes later still sees it.
    late = clients(broker.settings(protocol=protocol))
    late.subscribe(topic)
    assert get(late).payload == b"offline"


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_close_sends_will_only_when_asked(
    broker: Mosquitto, clients: Callable[..., MqttClient], protocol: str
) -> None:
    settings = broker.settings(protocol=protocol)
    topic = f"status/{uuid.uuid4().hex}"
    watcher = clients(settings)
    watcher.subscribe(topic)
    clients(settings, will=Will(topic, b"not sent", retain=False)).close()
    # The next will on the topic is the second client's: the first one's was never sent.
    clients(settings, will=Will(topic, b"gone", retain=False)).close(send_will=True)
    assert get(watcher).payload == b"gone"


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_unacked_message_redelivered_after_reconnect(
    broker: Mosquitto, clients: Callable[..., MqttClient], protocol: str
) -> None:
    settings = broker.settings(protocol=protocol)
    topic = f"updates/{uuid.uuid4().hex}"
    cid = _id("agg")
    agg = clients(settings, cid, manual_ack=True)
    agg.subscribe(topic, qos=1)
    pub = clients(settings)
    for payload in (b"acked", b"not-acked"):
        pub.publish(topic, payload, qos=1, wait=True, timeout=5)
    first, second = get(agg), get(agg)
    assert [first.payload, second.payload] == [b"acked", b"not-acked"]
    agg.ack(first)
    agg.ack(first)  # a second ack of the same message is ignored
    # The ack travels on paho's thread; the next round trip to the broker proves it arrived.
    agg.publish(f"{topic}/sync", b"", qos=1, wait=True, timeout=5)
    agg.close()

    again = clients(settings, cid, manual_ack=True)
    m = get(again)
    assert m.payload == b"not-acked" and m.qos == 1
    nothing(again)
    # A message from the previous connection cannot be acked on this one (its id may be reused).
    again.ack(second)
    again.ack(m)
    again.publish(f"{topic}/sync", b"", qos=1, wait=True, timeout=5)
    again.close()
    third = clients(settings, cid, manual_ack=True)
    nothing(third)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_non_persistent_client_starts_clean(
    broker: Mosquitto, clients: Callable[..., MqttClient], protocol: str
) -> None:
    settings = broker.settings(protocol=protocol)
    topic = f"clean/{uuid.uuid4().hex}"
    cid = _id("clean")
    c = clients(settings, cid, persistent=False, manual_ack=True)
    c.subscribe(topic)
    clients(settings).publish(topic, b"x", wait=True, timeout=5)
    assert get(c).payload == b"x"
    c.close()
    sessions: list[bool] = []
    c2 = MqttClient(settings, cid, persistent=False)
    c2.add_connect_listener(sessions.append)
    with c2:
        nothing(c2)
    assert sessions == [False]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_broker_crash_reconnect_and_resubscribe(
    fresh_broker: Mosquitto, clients: Callable[..., MqttClient], protocol: str
) -> None:
    settings = fresh_broker.settings(protocol=protocol)
    sub = clients(settings, manual_ack=True)
    sessions: list[bool] = []
    sub.add_connect_listener(sessions.append)
    sub.subscribe("crash/#")
    pub = clients(settings)
    fresh_broker.kill()  # nothing was saved: the broker forgets the session
    wait_until(lambda: not sub.connected and not pub.connected)
    with pytest.raises(TransportError, match="not connected"):
        pub.publish("crash/x", b"", wait=True)
    with pytest.raises(TransportError, match="dropped"):
        pub.publish("crash/x", b"", qos=0)
    fresh_broker.start()
    assert sub.wait_connected(10) and pub.wait_connected(10)
    wait_until(lambda: sessions == [False])
    # The resubscription is not awaited; wait for the broker to log it before publishing.
    wait_until(lambda: fresh_broker.log_text().count("crash/#") >= 2)
    pub.publish("crash/x", b"back", wait=True, timeout=5)
    m = get(sub)
    assert m.payload == b"back"
    sub.ack(m)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_broker_clean_restart_keeps_session(
    fresh_broker: Mosquitto, clients: Callable[..., MqttClient], protocol: str
) -> None:
    settings = fresh_broker.settings(protocol=protocol)
    sub = clients(settings, manual_ack=True)
    sessions: list[bool] = []
    sub.add_connect_listener(sessions.append)
    sub.subscribe("restart/#")
    pub = clients(settings)
    # Queued while the subscriber is connected but not yet acked: survives a clean restart.
    pub.publish("restart/1", b"before", wait=True, timeout=5)
    assert get(sub).payload == b"before"
    fresh_broker.restart()
    assert sub.wait_connected(10) and pub.wait_connected(10)
    wait_until(lambda: sessions == [True])
    m = get(sub)  # the unacked message comes again, now on the new connection
    assert m.payload == b"before"
    sub.ack(m)
    # While the broker was down, a QoS 1 publish was kept by paho and sent after reconnect.
    fresh_broker.stop()
    wait_until(lambda: not pub.connected)
    pub.publish("restart/2", b"queued", qos=1)
    fresh_broker.start()
    m = get(sub, 10)
    # QoS 1 is at least once: if the broker stopped before our PUBACK of "before" reached it,
    # it delivers "before" once more. Anything but a redelivery of it is a failure.
    while m.payload == b"before":
        sub.ack(m)
        m = get(sub, 10)
    assert m.payload == b"queued"
    sub.ack(m)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_tls_with_client_certificate(
    mosquitto_factory: Callable[..., Mosquitto],
    clients: Callable[..., MqttClient],
    tmp_path: Path,
    protocol: str,
) -> None:
    tls = make_tls_files(tmp_path / "tls")
    port, port2 = free_port(), free_port()
    # A second listener on 127.0.0.2, a name the server certificate does not carry.
    mosquitto_factory(tls.listener(port) + tls.listener(port2, host="127.0.0.2"))
    url = f"mqtts://localhost:{port}"
    good = BrokerSettings(
        url=url,
        protocol=protocol,
        ca_file=tls.ca_cert,
        cert_file=tls.client_cert,
        key_file=tls.client_key,
        connect_timeout=5,
    )
    c = clients(good)
    c.subscribe("tls/t")
    c.publish("tls/t", b"secret", wait=True, timeout=5)
    assert get(c).payload == b"secret"

    no_cert = BrokerSettings(url=url, protocol=protocol, ca_file=tls.ca_cert, connect_timeout=5)
    with pytest.raises(TransportError) as e:
        MqttClient(no_cert, _id("nocert")).connect()
    assert str(port) in str(e.value)

    other_ca = make_tls_files(tmp_path / "other")
    wrong_ca = BrokerSettings(url=url, protocol=protocol, ca_file=other_ca.ca_cert)
    with pytest.raises(TransportError, match=r"TLS failure.*certificate"):
        MqttClient(wrong_ca, _id("wrongca")).connect()

    wrong_name = good.model_copy(update={"url": f"mqtts://127.0.0.2:{port2}"})
    with pytest.raises(TransportError, match=r"TLS failure.*(IP address mismatch|hostname)"):
        MqttClient(wrong_name, _id("name")).connect()
    clients(wrong_name.model_copy(update={"tls_insecure": True})).publish("tls/t", b"", wait=True)


def test_tls_settings_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not TLS"):
        MqttClient(BrokerSettings(url="mqtt://h:1", ca_file=tmp_path / "ca"), "x")
    with pytest.raises(ConfigError, match="TLS files"):
        MqttClient(BrokerSettings(url="mqtts://h:1", ca_file=tmp_path / "missing.crt"), "x")
    with pytest.raises(ConfigError, match="username"):
        MqttClient(BrokerSettings(password="p"), "x")


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_username_password(
    mosquitto_factory: Callable[..., Mosquitto],
    clients: Callable[..., MqttClient],
    tmp_path: Path,
    protocol: str,
) -> None:
    try:
        pwfile = make_password_file(tmp_path, {"alice": "s3cret"})
    except FileNotFoundError:
        pytest.skip("mosquitto_passwd is not installed")
    m = mosquitto_factory([f"password_file {pwfile}"], allow_anonymous=False)
    ok = m.settings(protocol=protocol, username="alice", password="s3cret")
    clients(ok).publish("auth/t", b"x", wait=True, timeout=5)

    bad = m.settings(protocol=protocol, username="alice", password="wrong")
    with pytest.raises(TransportError, match="refused the connection") as e:
        MqttClient(bad, _id("bad")).connect()
    assert "user name or password" in str(e.value) or "Not authorized" in str(e.value)
    assert "wrong" not in str(e.value)

    with pytest.raises(TransportError, match="refused the connection"):
        MqttClient(m.settings(protocol=protocol), _id("anon")).connect()


def test_acl_refused_publish_is_an_error_on_mqtt5(
    mosquitto_factory: Callable[..., Mosquitto], clients: Callable[..., MqttClient], tmp_path: Path
) -> None:
    # MQTT 3.1.1 cannot report it (PUBACK has no reason code); Mosquitto 2.0 grants every
    # subscription and filters by ACL at delivery, so only the publish side is testable.
    acl = tmp_path / "acl"
    acl.write_text("topic readwrite open/#\n")
    m = mosquitto_factory([f"acl_file {acl}"])
    c = clients(m.settings(protocol="5"))
    c.subscribe("open/x")
    with pytest.raises(TransportError, match=r"refused publish.*Not authorized"):
        c.publish("closed/x", b"x", wait=True, timeout=5)
    c.publish("open/x", b"fine", wait=True, timeout=5)
    assert get(c).payload == b"fine"


def test_closed_port_fails_fast_and_connect_can_be_retried(
    mosquitto_factory: Callable[..., Mosquitto],
) -> None:
    m = mosquitto_factory(start=False)
    # A refusal is reported as such, not after connect_timeout (that path says "no CONNACK
    # ... within 120 s"): the message proves it failed fast, with no clock in the test.
    c = MqttClient(m.settings(connect_timeout=120), "retry")
    with pytest.raises(TransportError, match="unreachable: connection refused"):
        c.connect()
    m.start()
    with c:
        assert c.connected


def test_silent_listener_times_out() -> None:
    # Accepts TCP but never answers CONNECT: the CONNACK wait must end at connect_timeout.
    import socket

    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        port = srv.getsockname()[1]
        settings = BrokerSettings(url=f"mqtt://127.0.0.1:{port}", connect_timeout=0.5)
        with pytest.raises(TransportError, match="no CONNACK"):
            MqttClient(settings, "silent").connect()


def test_connect_twice_and_listener_errors_are_logged(
    broker: Mosquitto, caplog: pytest.LogCaptureFixture
) -> None:
    c = MqttClient(broker.settings(), _id("l"), name="listener-test")
    seen = threading.Event()

    def bad(session_present: bool) -> None:
        seen.set()
        raise RuntimeError("listener bug")

    c.add_connect_listener(bad)
    with caplog.at_level(logging.ERROR, logger="fededge.mqtt"), c:
        assert seen.wait(5)
        with pytest.raises(NotReadyError):
            c.connect()
        wait_until(lambda: "listener bug" in caplog.text)
        assert c.connected  # the client survived its listener's exception
    assert not c.connected


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_32mb_payload_round_trip(
    broker: Mosquitto, clients: Callable[..., MqttClient], protocol: str
) -> None:
    settings = broker.settings(protocol=protocol)
    sub = clients(settings, manual_ack=True)
    sub.subscribe("big/t")
    payload = os.urandom(1024) * (32 * 1024)
    clients(settings).publish("big/t", payload, wait=True, timeout=60)
    m = get(sub, 60)
    assert len(m.payload) == len(payload) and m.payload == payload
    sub.ack(m)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_publish_and_ack_from_other_threads(
    broker: Mosquitto, clients: Callable[..., MqttClient], protocol: str
) -> None:
    # publish() from two threads and ack() from this one while paho's thread runs: every
    # message arrives once and nothing is redelivered (all acks reached the broker).
    settings = broker.settings(protocol=protocol)
    topic = f"threads/{uuid.uuid4().hex}"
    cid = _id("acker")
    sub = clients(settings, cid, manual_ack=True)
    sub.subscribe(f"{topic}/#")
    pub = clients(settings)
    n = 500

    def send(k: int) -> None:
        for i in range(n):
            pub.publish(f"{topic}/{k}", f"{k}:{i}", qos=1, wait=i == n - 1, timeout=30)

    threads = [threading.Thread(target=send, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    seen = []
    for _ in range(2 * n):
        m = get(sub, 30)
        seen.append(m.payload)
        sub.ack(m)
    for t in threads:
        t.join()
    assert sorted(seen) == sorted(f"{k}:{i}".encode() for k in range(2) for i in range(n))
    for k in range(2):  # per publisher, in order
        assert [p for p in seen if p.startswith(f"{k}:".encode())] == [
            f"{k}:{i}".encode() for i in range(n)
        ]
    sub.publish(f"{topic}/sync", b"", wait=True, timeout=5)
    m = get(sub)
    assert m.topic == f"{topic}/sync"
    sub.ack(m)
    sub.publish(f"{topic}-other", b"", wait=True, timeout=5)  # a round trip after that ack
    sub.close()
    again = clients(settings, cid, manual_ack=True)
    nothing(again)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_read_retained(
    broker: Mosquitto, clients: Callable[..., MqttClient], protocol: str
) -> None:
    settings = broker.settings(protocol=protocol)
    base = f"rr/{uuid.uuid4().hex}"
    pub = clients(settings)
    for name, payload in (("a", b"A"), ("b/1", b"B1"), ("b/2", b"B2"), ("gone", b"x")):
        pub.publish(f"{base}/{name}", payload, retain=True, wait=True, timeout=5)
    pub.publish(f"{base}/gone", b"", retain=True, wait=True, timeout=5)  # cleared
    pub.publish(f"{base}/live", b"L", retain=False, wait=True, timeout=5)  # never retained
    got = read_retained(settings, [f"{base}/a", f"{base}/b/+", f"{base}/none"], wait=10)
    assert got == {f"{base}/a": b"A", f"{base}/b/1": b"B1", f"{base}/b/2": b"B2"}
    assert read_retained(settings, [f"{base}/#"], wait=10, required=[f"{base}/a"]) == {
        f"{base}/a": b"A",
        f"{base}/b/1": b"B1",
        f"{base}/b/2": b"B2",
    }


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_read_retained_waits_for_a_required_topic(
    broker: Mosquitto, clients: Callable[..., MqttClient], protocol: str
) -> None:
    settings = broker.settings(protocol=protocol)
    topic = f"rr/{uuid.uuid4().hex}"
    result: list[dict[str, bytes]] = []
    reader = threading.Thread(
        target=lambda: result.append(read_retained(settings, [topic], wait=3, required=[topic]))
    )
    reader.start()
    # Published once the reader has subscribed (the broker logs its SUBSCRIBE), so it reaches
    # the reader as a live message, not a retained one: the reader keeps waiting ...
    wait_until(lambda: broker.log_text().count(topic) >= 1)
    pub = clients(settings)
    pub.publish(topic, b"live", retain=True, wait=True, timeout=5)
    # ... until the wait ends, and then returns what was retained when it subscribed: nothing.
    reader.join(90)
    assert result == [{}]
    assert read_retained(settings, [topic], wait=10, required=[topic]) == {topic: b"live"}


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_discard_session(
    broker: Mosquitto, clients: Callable[..., MqttClient], protocol: str
) -> None:
    settings = broker.settings(protocol=protocol)
    topic = f"ds/{uuid.uuid4().hex}"
    cid = _id("ds")
    first = clients(settings, cid, manual_ack=True)
    first.subscribe(topic, qos=1)
    first.close()
    clients(settings).publish(topic, b"queued", qos=1, wait=True, timeout=5)
    discard_session(settings, cid)
    sessions: list[bool] = []
    again = MqttClient(settings, cid, manual_ack=True)
    again.add_connect_listener(sessions.append)
    with again:
        nothing(again)
    assert sessions == [False]


# --- the bounded inbox ----------------------------------------------------------------------------


def _msg(i: int, qos: int) -> Message:
    return Message(f"t/{i}", str(i).encode(), qos, False, i + 1)


def test_inbox_policy_without_a_broker() -> None:
    taken: list[int] = []
    inbox = Inbox(4, on_take=lambda m: taken.append(m.mid))
    # QoS 0: only while less than half full; the rest is dropped and counted.
    assert [inbox.offer(_msg(i, 0), lambda: False) for i in range(4)] == [True, True, False, False]
    assert inbox.dropped == 2 and inbox.qsize() == 2
    # QoS 1 fills it to the brim, then waits for room (here: until told to give up).
    assert inbox.offer(_msg(4, 1), lambda: False) and inbox.offer(_msg(5, 1), lambda: False)
    assert inbox.full()
    assert not inbox.offer(_msg(6, 1), lambda: True)
    assert inbox.blocked.is_set()
    done = threading.Event()
    threading.Thread(target=lambda: inbox.offer(_msg(7, 1), done.is_set), daemon=True).start()
    wait_until(lambda: inbox.blocked.is_set(), 10, "the producer waiting for room")
    assert [inbox.get().payload for _ in range(3)] == [b"0", b"1", b"4"]
    wait_until(lambda: not inbox.blocked.is_set(), 10, "the waiting message put")
    assert [inbox.get_nowait().payload for _ in range(2)] == [b"5", b"7"]
    assert taken == [1, 2, 5, 6, 8]  # taking acknowledges (mid = i + 1)
    with pytest.raises(ValueError, match="at least 2"):
        Inbox(1)


def test_inbox_prepare_hook_runs_on_large_payloads_only(caplog: pytest.LogCaptureFixture) -> None:
    from fededge.mqtt.inbox import PREPARE_MIN

    inbox = Inbox(8)
    big, small = b"x" * PREPARE_MIN, b"x" * (PREPARE_MIN - 1)
    inbox.offer(Message("t/0", big, 1, False, 1), lambda: False)  # no hook: nothing prepared
    seen: list[tuple[str, int]] = []

    def prepare(topic: str, payload: bytes) -> object:
        seen.append((topic, len(payload)))
        if topic == "t/bad":
            raise RuntimeError("a bug in the hook")
        return ("prepared", topic)

    inbox.prepare = prepare
    inbox.offer(Message("t/1", big, 1, False, 2), lambda: False)
    with caplog.at_level(logging.ERROR, logger="fededge.mqtt.inbox"):
        left = inbox.offer_many([Message("t/2", small, 1, False, 3),
                                 Message("t/3", big, 1, False, 4),
                                 Message("t/bad", big, 1, False, 5)], lambda: False)  # fmt: skip
    assert left == []
    assert "prepare hook failed on a message on t/bad" in caplog.text
    got = [inbox.get_nowait() for _ in range(5)]
    assert [m.prepared for m in got] == [None, ("prepared", "t/1"), None, ("prepared", "t/3"), None]
    assert seen == [("t/1", PREPARE_MIN), ("t/3", PREPARE_MIN), ("t/bad", PREPARE_MIN)]
    assert got[4].payload == big  # a failing hook loses nothing: the message is queued as is
    assert Message("t/1", big, 1, False, 2) == got[1]  # not part of equality


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_full_inbox_stops_reading_and_loses_nothing(
    broker: Mosquitto, clients: Callable[..., MqttClient], protocol: str
) -> None:
    """QoS 1 into an inbox of 10 that nobody empties: it fills and paho's thread waits while the
    broker holds the rest; taking messages lets it go on; closing it then leaves the waiting
    messages unacknowledged, and its persistent session gets every one it had not taken."""
    settings = broker.settings(protocol=protocol)
    topic = f"bp/{uuid.uuid4().hex}"
    cid = _id("slow")
    sub = clients(settings, cid, max_inbox=10)
    sub.subscribe(topic, qos=1)
    pub = clients(settings)
    n = 200
    for i in range(n):
        pub.publish(topic, str(i).encode(), qos=1, wait=i == n - 1, timeout=30)
    wait_until(sub.messages.blocked.is_set, 30, "the network thread waiting for room")
    assert sub.messages.qsize() == 10  # the bound, although 190 more are waiting at the broker
    got = [int(get(sub).payload) for _ in range(15)]
    assert got == list(range(15))
    sub.close()  # ends the wait; nothing it had not taken was acknowledged
    again = clients(settings, cid, max_inbox=10)
    rest: set[int] = set()
    while not rest >= set(range(15, n)):
        rest.add(int(get(again, 30).payload))
    # At least once: a PUBACK queued just before close() can be lost with the socket (closed
    # with unread data, TCP resets it), and the broker then sends that message again.
    assert rest <= set(range(n))
    nothing(again)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_full_inbox_drops_qos0_and_counts(
    broker: Mosquitto, clients: Callable[..., MqttClient], protocol: str, caplog: Any
) -> None:
    settings = broker.settings(protocol=protocol)
    topic = f"q0/{uuid.uuid4().hex}"
    sub = clients(settings, max_inbox=10)
    sub.subscribe(topic, qos=0)
    pub = clients(settings)
    with caplog.at_level(logging.WARNING, logger="fededge.mqtt"):
        for i in range(100):
            pub.publish(topic, str(i).encode(), qos=0)
        pub.publish(topic, b"last", qos=1, wait=True, timeout=10)  # delivered at QoS 0 too
        wait_until(lambda: sub.messages.dropped == 96, 30, "96 dropped QoS 0 messages")
    assert [get(sub).payload for _ in range(5)] == [str(i).encode() for i in range(5)]
    assert "dropped 1 QoS 0 message(s)" in caplog.text
    nothing(sub)


def test_only_the_transport_package_knows_paho() -> None:
    root = Path(__file__).resolve().parent.parent / "fededge"
    users = {
        str(p.relative_to(root))
        for p in root.rglob("*.py")
        if "import paho" in (text := p.read_text()) or "from paho" in text
    }
    assert users and all(u.startswith("mqtt/") for u in users), users


def test_batched_publications_and_acks_all_go_out(
    broker: Mosquitto, clients: Callable[..., MqttClient]
) -> None:
    """Inside ``batched()`` packets are only queued; the end of the block sends them all."""
    settings = broker.settings()
    topic = f"batch/{uuid.uuid4().hex}"
    sub = clients(settings, manual_ack=True)
    sub.subscribe(f"{topic}/in", qos=1)
    echo = clients(settings)
    echo.subscribe(f"{topic}/out", qos=1)
    pub = clients(settings)
    for i in range(30):
        pub.publish(f"{topic}/in", str(i).encode(), qos=1)
    got = [get(sub) for _ in range(20)]  # the broker's window: 20 until we acknowledge
    with sub.batched():
        for m in got:
            sub.publish(f"{topic}/out", m.payload, qos=1)
            sub.ack(m)
    with sub.batched():
        pass  # an empty batch is harmless
    # The acknowledgements reached the broker: it sends the 10 others.
    rest = [get(sub) for _ in range(10)]
    for m in rest:
        sub.ack(m)
    assert sorted(int(m.payload) for m in got + rest) == list(range(30))
    assert sorted(int(get(echo).payload) for _ in range(20)) == sorted(int(m.payload) for m in got)
    sub.publish(f"{topic}/out", b"after", qos=1, wait=True, timeout=10)  # the pair still works
    assert get(echo).payload == b"after"


def test_read_ahead_socket_returns_the_stream_in_order() -> None:
    # paho's socket reads ahead (fededge/mqtt/readahead.py): any sequence of recv sizes gets
    # the bytes sent, in order; pending() counts what was read ahead; EOF and "nothing yet"
    # pass through as from the socket itself.
    import socket

    from fededge.mqtt.readahead import READ_AHEAD, ReadAheadSocket, read_ahead

    a, b = socket.socketpair()
    with a, b:
        b.setblocking(False)
        r = read_ahead(b)
        assert isinstance(r, ReadAheadSocket) and r.raw is b and r.fileno() == b.fileno()
        with pytest.raises(BlockingIOError):
            r.recv(1)
        data = bytes(range(256)) * 40
        a.sendall(data)
        got = r.recv(1)
        assert r.pending() == len(data) - 1
        for size in (1, 2, 7, 100, 5000):
            got += r.recv(size)
        got += r.recv(len(data))
        assert got == data and r.pending() == 0
        big = b"x" * (READ_AHEAD + 10)  # more than a socket buffer: sent while read
        sender = threading.Thread(target=a.sendall, args=(big,))
        sender.start()
        got = b""
        while len(got) < len(big):
            select.select([b], [], [], 10)
            with contextlib.suppress(BlockingIOError):
                got += r.recv(READ_AHEAD)
        sender.join()
        assert got == big
        a.sendall(data)  # recv_into: from the read-ahead buffer, then from the socket
        assert r.recv(3) == data[:3]
        out = bytearray(len(data))
        n = 3
        while n < len(data):
            n += r.recv_into(memoryview(out)[n : n + 1000])
        assert out[3:] == data[3:] and r.pending() == 0
        out = bytearray(len(big))
        sender = threading.Thread(target=a.sendall, args=(big,))
        sender.start()
        n = 0
        while n < len(big):
            select.select([b], [], [], 10)
            with contextlib.suppress(BlockingIOError):
                n += r.recv_into(memoryview(out)[n:])
        sender.join()
        assert out == big
        a.close()
        assert r.recv(1) == b"" and r.recv_into(memoryview(bytearray(10))) == 0


@pytest.mark.parametrize("v5", [False, True])
def test_publish_decoder_agrees_with_pahos(v5: bool) -> None:
    # fededge/mqtt/pahoclient.py decodes PUBLISH packets with one copy of the payload: same
    # fields as paho's decode_publish, and MalformedPacket wherever paho raises it.
    from paho.mqtt import _packet
    from paho.mqtt.enums import MQTTProtocolVersion
    from paho.mqtt.exception import MalformedPacket

    from fededge.mqtt.pahoclient import decode_publish

    proto = MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311
    topic = b"fededge/t/updates/d1"
    props = b"\x05\x01\x01\x23\x00\x07" if v5 else b""  # payload format 1, topic alias 7
    packets = []
    for qos in (0, 1):
        head = len(topic).to_bytes(2, "big") + topic + (b"\x12\x34" if qos else b"")
        for payload in (b"", b"x", bytes(range(256)) * 3):
            packets.append((qos << 1 | 0x08 | 0x01, head + props + payload))
            packets.append((qos << 1, head + (b"\x00" if v5 else b"") + payload))
    good = len(packets)
    # Malformed: cut anywhere in the fixed fields, a topic longer than the packet, a
    # properties length longer than the packet or of five bytes.
    whole = packets[2][1]
    packets += [(0x02, whole[:i]) for i in range(len(topic) + 8)]
    packets += [(0x02, b"\xff\xff" + topic), (0x00, b"\x00\x00abc")]
    if v5:
        packets += [(0x00, b"\x00\x01t\x7f"), (0x00, b"\x00\x01t\xff\xff\xff\xff\x01")]
    for i, (header, packet) in enumerate(packets):
        try:
            want = _packet.decode_publish(header, bytes(packet), proto)
        except MalformedPacket:
            with pytest.raises(MalformedPacket):
                decode_publish(header, bytearray(packet), v5)
            continue
        assert i < good or len(packet) >= len(topic) + 5, (i, packet)
        got = decode_publish(header, bytearray(packet), v5)
        assert got[:5] == want[:5] and got.payload == bytes(want.payload)
        assert type(got.payload) is bytes
        assert str(got.properties) == str(want.properties)


@pytest.mark.parametrize("prealloc", [1 << 26, 100])
def test_large_bodies_arrive_whole(
    broker: Mosquitto, clients: Callable[..., MqttClient], monkeypatch: pytest.MonkeyPatch,
    prealloc: int,
) -> None:  # fmt: skip
    # Bodies are received into a preallocated buffer, or above PREALLOCATE_MAX grown as paho
    # does (fededge/mqtt/pahoclient.py): both give the payloads sent, back to back.
    from fededge.mqtt import pahoclient

    monkeypatch.setattr(pahoclient, "PREALLOCATE_MAX", prealloc)
    settings = broker.settings()
    sub, pub = clients(settings), clients(settings)
    topic = f"big/{uuid.uuid4().hex}"
    sub.subscribe(topic, qos=1)
    payloads = [bytes([i]) * n for i, n in enumerate((1, 99, 100, 101, 70_000, 3 << 20))]
    for p in payloads:
        pub.publish(topic, p, qos=1)
    assert [get(sub).payload for _ in payloads] == payloads
