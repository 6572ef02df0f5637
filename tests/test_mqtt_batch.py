"""The batch receive path of fededge's paho client (fededge/mqtt/pahoclient.py), its inbox
(bounded in messages and bytes, with a low-water mark) and the in-flight window from CONNACK.

The batch path must decide exactly what paho's own path decides: the same byte stream, cut
anywhere, gives the same PUBLISHes in the same order and the same PUBACK outcomes; whatever
it does not take (properties, QoS 2, failure codes, malformed or incomplete packets) is left
to paho, which fails the connection where paho fails it.
"""

from __future__ import annotations

import random
import socket
import struct
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion

from fededge.mqtt import MqttClient
from fededge.mqtt.inbox import Inbox, Message
from fededge.mqtt.pahoclient import PAHO_RECEIVE_PATH, PahoClient, Received
from fededge.mqtt.readahead import DIRECT_MIN, read_ahead
from fededge.testing import wait_until
from fededge.testing.broker import Mosquitto
from fededge.testing.pytest_plugin import MosquittoFactory

# paho is pinned to 2.2 (pyproject.toml): the batch path is always the one in use.
assert PAHO_RECEIVE_PATH, "fededge's paho subclass needs paho 2.2"

N_OUT = 8  # QoS 1 publications awaiting PUBACK before the stream is read


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _packet(header: int, body: bytes) -> bytes:
    return bytes([header]) + _varint(len(body)) + body


def _publish(topic: bytes, payload: bytes, qos: int, mid: int, v5: bool, *, props: bytes = b"",
             retain: bool = False, dup: bool = False) -> bytes:  # fmt: skip
    body = struct.pack("!H", len(topic)) + topic + (struct.pack("!H", mid) if qos else b"")
    if v5:
        body += _varint(len(props)) + props
    header = 0x30 | qos << 1 | (0x08 if dup else 0) | (0x01 if retain else 0)
    return _packet(header, body + payload)


def _stream(v5: bool, rng: random.Random) -> bytes:
    """Every kind of packet a broker may send after CONNACK, the batch path's and paho's."""
    out = []
    for i in range(40):
        out.append(_publish(f"t/{i}".encode(), rng.randbytes(rng.randrange(0, 300)), i % 2,
                            100 + i, v5, retain=i % 3 == 0, dup=i % 5 == 0))  # fmt: skip
    out.append(_packet(0x40, struct.pack("!H", 1)))  # PUBACK, no reason code
    out.append(_packet(0x40, struct.pack("!H", 999)))  # PUBACK of nothing we sent
    out.append(_packet(0xD0, b""))  # PINGRESP
    out.append(_publish(b"t/\xff\xfe", b"bad utf-8 topic", 1, 300, v5))
    out.append(_publish(b"t/big", rng.randbytes(300_000), 1, 301, v5))  # beyond read-ahead
    # A run of large ones (each body's rest received straight into its unzeroed buffer, the
    # read-ahead after it small), then a small one: random bytes, so stale memory would show.
    for i in range(3):
        size = rng.randrange(DIRECT_MIN, 3 * DIRECT_MIN)
        out.append(_publish(f"t/big{i}".encode(), rng.randbytes(size), 1, 310 + i, v5))
    out.append(_publish(b"t/after-big", b"small", 1, 313, v5))
    out.append(_publish(b"t/q2", b"qos 2", 2, 302, v5))
    if v5:
        out.append(_publish(b"t/props", b"with properties", 1, 303, v5, props=b"\x01\x01"))
        out.append(_packet(0x40, struct.pack("!HB", 2, 0x00)))  # success, explicit
        out.append(_packet(0x40, struct.pack("!HB", 3, 0x10)))  # no matching subscribers
        out.append(_packet(0x40, struct.pack("!HB", 4, 0x80)))  # unspecified error
        out.append(_packet(0x40, struct.pack("!HBB", 5, 0x00, 0)))  # empty properties
        out.append(_packet(0x40, struct.pack("!HB", 6, 0x87)))  # not authorized
    else:
        out += [_packet(0x40, struct.pack("!H", m)) for m in range(2, 7)]
    for i in range(30):
        out.append(_publish(f"u/{i}".encode(), bytes([i]) * i, 1, 400 + i, v5))
        if i % 7 == 0:
            out.append(_packet(0x40, struct.pack("!H", 7 + i // 7)))
    return b"".join(out)


class Recorder:
    """A paho client (plain or fededge's) reading a socket pair; what its callbacks saw."""

    def __init__(self, cls: type[paho.Client], v5: bool) -> None:
        proto = MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311
        self.client = cls(CallbackAPIVersion.VERSION2, client_id="rec", protocol=proto,
                          manual_ack=True)  # fmt: skip
        self.client.max_inflight_messages_set(N_OUT // 2)  # half of them queued behind
        self.peer, sock = socket.socketpair()
        sock.setblocking(False)
        self.client._sock = read_ahead(sock) if cls is PahoClient else sock
        self.client._state = paho._ConnectionState.MQTT_CS_CONNECTED  # type: ignore[attr-defined]
        self.published: list[tuple[Any, ...]] = []
        self.acked: list[tuple[int, int]] = []
        self.client.on_message = self._on_message
        self.client.on_publish = lambda _c, _u, mid, rc, _p: self.acked.append((mid, rc.value))
        if isinstance(self.client, PahoClient):
            self.client.on_publish_batch = self._on_batch
        for i in range(N_OUT):
            self.client.publish(f"o/{i}", b"x", qos=1)

    def _on_message(self, _c: paho.Client, _u: object, m: paho.MQTTMessage) -> None:
        self.published.append((m._topic, bytes(m.payload), m.qos, bool(m.retain), m.mid,
                               bool(m.dup)))  # fmt: skip

    def _on_batch(self, batch: list[Received]) -> None:
        for r in batch:
            self.published.append((r.topic.encode(), r.payload, r.qos, r.retain, r.mid, r.dup))

    def feed(self, data: bytes, cuts: list[int]) -> MQTTErrorCode:
        """Send ``data`` in pieces and read after each; the first error, or success."""
        pos = 0
        for end in [*cuts, len(data)]:
            # Sent by a thread: a piece larger than the socket buffer is read while it is sent.
            sender = threading.Thread(target=self.peer.sendall, args=(data[pos:end],))
            sender.start()
            pos = end
            while True:
                rc = self.read()
                if rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_AGAIN):
                    sender.join()
                    return rc
                if not sender.is_alive() and not _readable(self.client._sock):
                    break
                _readable(self.client._sock, 0.1)
            sender.join()
            rc = self.read()
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                return rc
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    def read(self) -> MQTTErrorCode:
        # As paho's loop: read while bytes are there (pending() for the read-ahead socket).
        c = self.client
        while True:
            rc = c.loop_read()
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or c._sock is None:
                return rc
            sock = c._sock
            if getattr(sock, "pending", lambda: 0)() == 0 and not _readable(sock):
                return rc

    def state(self) -> tuple[int, list[int]]:
        c = self.client
        return c._inflight_messages, sorted(c._out_messages)

    def close(self) -> None:
        self.peer.close()
        if self.client._sock is not None:
            self.client._sock.close()


def _readable(sock: Any, timeout: float = 0) -> bool:
    import select

    try:
        return bool(select.select([sock], [], [], timeout)[0])
    except (OSError, ValueError):
        return False


@pytest.mark.parametrize("v5", [False, True])
@pytest.mark.parametrize("seed", range(6))
def test_batch_path_agrees_with_pahos_on_any_cut_of_the_stream(v5: bool, seed: int) -> None:
    rng = random.Random(seed)
    data = _stream(v5, rng)
    cuts = sorted(rng.sample(range(1, len(data)), 1 + seed * 7))
    if seed == 0:
        cuts = []  # the whole stream at once
    plain, ours = Recorder(paho.Client, v5), Recorder(PahoClient, v5)
    try:
        assert plain.feed(data, cuts) == ours.feed(data, cuts) == MQTTErrorCode.MQTT_ERR_SUCCESS
        assert ours.published == plain.published
        # QoS 2 waits for PUBREL
        assert len(ours.published) == 40 + 1 + 1 + 4 + 30 + (1 if v5 else 0)
        assert ours.acked == plain.acked  # same mids, same reason codes, same order
        assert ours.state() == plain.state()
    finally:
        plain.close()
        ours.close()


@pytest.mark.parametrize("v5", [False, True])
@pytest.mark.parametrize(
    "bad",
    [
        _packet(0x32, b"\xff\xff" + b"t"),  # topic longer than the packet
        _packet(0x32, b"\x00\x01t\x00\x00" + b"\x00"),  # QoS 1 with packet id 0
        b"\x30\xff\xff\xff\xff\x01",  # remaining length of five bytes
        _packet(0x36, b"\x00\x01t\x00\x01"),  # QoS 3
        _packet(0x40, b"\x00"),  # PUBACK too short
        _packet(0x00, b""),  # reserved packet type
    ],
)
def test_malformed_packets_fail_as_in_paho(v5: bool, bad: bytes) -> None:
    rng = random.Random(1)
    good = b"".join(_publish(f"t/{i}".encode(), rng.randbytes(50), 1, 10 + i, v5)
                    for i in range(5))  # fmt: skip
    data = good + bad + good
    plain, ours = Recorder(paho.Client, v5), Recorder(PahoClient, v5)
    try:
        rc_plain, rc_ours = plain.feed(data, []), ours.feed(data, [])
        assert rc_ours == rc_plain
        assert ours.published == plain.published
        assert ours.acked == plain.acked
    finally:
        plain.close()
        ours.close()


# --- the inbox ------------------------------------------------------------------------------------


def _m(i: int, qos: int = 1, size: int = 1) -> Message:
    return Message(f"t/{i}", bytes([i % 256]) * size, qos, False, i + 1)


def test_inbox_takes_batches_in_order_and_waits_for_a_quarter_to_drain() -> None:
    inbox = Inbox(8)
    assert inbox.offer_many([_m(i) for i in range(6)], lambda: False) == []
    # QoS 0 only below half: 6 of 8 are there, so these two are dropped and counted.
    assert inbox.offer_many([_m(6, 0), _m(7, 0)], lambda: False) == [_m(6, 0), _m(7, 0)]
    assert inbox.dropped == 2
    left: list[list[Message]] = []
    t = threading.Thread(target=lambda: left.append(
        inbox.offer_many([_m(i) for i in range(8, 12)], lambda: False)), daemon=True)  # fmt: skip
    t.start()
    # 8 and 9 fill it; 10 waits until a quarter (2) is taken, not until one is.
    wait_until(inbox.blocked.is_set, 10, "the producer waiting for room")
    assert inbox.qsize() == 8
    assert inbox.get_nowait().mid == 1
    assert inbox.blocked.is_set() and inbox.qsize() == 7  # one taken: still waiting
    assert inbox.get_nowait().mid == 2
    t.join(30)
    assert not t.is_alive() and left == [[]] and not inbox.blocked.is_set()
    assert [inbox.get_nowait().mid for _ in range(8)] == [3, 4, 5, 6, 9, 10, 11, 12]


def test_inbox_bound_in_bytes_takes_one_large_message_when_empty() -> None:
    inbox = Inbox(100, max_bytes=1000)
    assert inbox.offer(_m(0, size=5000), lambda: False)  # larger than the bound: empty, taken
    assert inbox.full() and inbox.nbytes == 5000
    assert not inbox.offer(_m(1, size=10), lambda: True)  # full in bytes: waits (here gives up)
    assert inbox.get_nowait().mid == 1 and inbox.nbytes == 0
    assert inbox.offer_many([_m(i, size=300) for i in range(2, 5)], lambda: False) == []
    assert inbox.nbytes == 900 and not inbox.full()
    assert inbox.offer(_m(5, size=300), lambda: False) and inbox.full()
    # Closing while waiting: the rest of the batch is handed back, in order.
    rest = [_m(i, size=10) for i in range(6, 9)]
    assert inbox.offer_many(rest, lambda: True) == rest
    with pytest.raises(ValueError, match="at least 1 byte"):
        Inbox(10, max_bytes=0)


class _Steps:
    """A fake clock and sleep for ``Inbox.linger``: each sleep advances the clock by its
    argument and then delivers the next wave of arrivals (a list of messages) to the inbox."""

    def __init__(self, inbox: Inbox, waves: list[list[Message]]) -> None:
        self.inbox, self.waves, self.now, self.sleeps = inbox, list(waves), 100.0, 0

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps += 1
        self.now += seconds
        if self.waves:
            assert self.inbox.offer_many(self.waves.pop(0), lambda: True) == []

    def linger(self, batch: list[Message], limit: int, delay: float, **kw: int) -> None:
        self.inbox.linger(batch, limit, delay, clock=self.clock, sleep=self.sleep, **kw)


def test_linger_grows_the_group_while_messages_arrive_and_stops_at_a_quiet_step() -> None:
    inbox = Inbox(100)
    steps = _Steps(inbox, [[_m(1), _m(2)], [_m(3)], [], [_m(4)]])
    batch = [_m(0)]
    steps.linger(batch, 50, 0.005)
    # Two steps brought messages, the third nothing: the group is committed then, and the
    # message of the fourth wave is left for the next group.
    assert [m.mid for m in batch] == [1, 2, 3, 4] and steps.sleeps == 3
    assert inbox.qsize() == 0
    steps.sleep(0)
    assert inbox.qsize() == 1


def test_linger_stops_at_the_group_limit_the_byte_bound_and_the_delay() -> None:
    inbox = Inbox(100)
    # The limit: the step that fills the group ends it; the rest stays in the inbox.
    steps = _Steps(inbox, [[_m(i) for i in range(1, 4)], [_m(i) for i in range(4, 9)]])
    batch = [_m(0)]
    steps.linger(batch, 6, 0.005)
    assert len(batch) == 6 and steps.sleeps == 2 and inbox.qsize() == 3
    # The byte bound: a group of 10 + 3 x 400 bytes has passed 1,000 and waits no more.
    inbox = Inbox(100)
    steps = _Steps(inbox, [[_m(1, size=400), _m(2, size=400)], [_m(3, size=400)]])
    batch = [_m(0, size=10)]
    steps.linger(batch, 50, 0.005, max_bytes=1000)
    assert [m.mid for m in batch] == [1, 2, 3, 4] and steps.sleeps == 2
    already = [_m(9, size=2000)]  # already over the bound: no wait at all
    steps.linger(already, 50, 0.005, max_bytes=1000)
    assert steps.sleeps == 2
    # The delay: five steps of a fifth of it, however long messages keep coming.
    inbox = Inbox(100)
    steps = _Steps(inbox, [[_m(i)] for i in range(1, 20)])
    steps.now = 0.0
    batch = [_m(0)]
    steps.linger(batch, 50, 5.0)  # steps of 1.0: exact in binary
    assert steps.sleeps == 5 and len(batch) == 6 and steps.now == 5.0
    # No delay: no wait (what the inbox holds is taken by the caller).
    steps.linger(batch, 50, 0.0)
    assert steps.sleeps == 5


# --- with a broker --------------------------------------------------------------------------------


@pytest.fixture
def window_broker(mosquitto_factory: MosquittoFactory) -> Iterator[Mosquitto]:
    yield mosquitto_factory(max_inflight_messages=40, max_queued_messages=10_000)


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_in_flight_window_is_the_brokers_receive_maximum(
    window_broker: Mosquitto, protocol: str
) -> None:
    """paho ignores the Receive Maximum of an MQTT 5 CONNACK; fededge's client takes it (40
    here), and keeps 20 under MQTT 3.1.1, which cannot announce one."""
    c = MqttClient(window_broker.settings(protocol=protocol), f"w-{uuid.uuid4().hex[:6]}")
    with c:
        assert c._client._max_inflight_messages == (40 if protocol == "5" else 20)
        for i in range(200):  # more than the window: all acknowledged, none refused
            c.publish(f"w/{i}", b"x", qos=1, wait=i == 199, timeout=30)
        assert c._client._inflight_messages == 0


@pytest.mark.parametrize("bulk", [False, True])
@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_group_acking_subscriber_gets_everything_once_in_order(
    window_broker: Mosquitto, protocol: str, bulk: bool
) -> None:
    """A subscriber that takes messages in groups and acknowledges each group after
    publishing a receipt per message (the aggregator's pattern), through the batch path:
    every message exactly once, in order, and the inbox never above its bound; with
    ``bulk``, receipts by ``publish_many`` and PUBACKs by ``ack_many`` (one packet per group
    each), and every receipt arrives once, in order."""
    settings = window_broker.settings(protocol=protocol)
    topic = f"g/{uuid.uuid4().hex[:8]}"
    sub = MqttClient(settings, f"s-{uuid.uuid4().hex[:6]}", manual_ack=True, max_inbox=50)
    pub = MqttClient(settings, f"p-{uuid.uuid4().hex[:6]}")
    receipts = MqttClient(settings, f"r-{uuid.uuid4().hex[:6]}")
    with sub, pub, receipts:
        receipts.subscribe(f"{topic}-receipts/+", qos=1)
        sub.subscribe(f"{topic}/+", qos=1)
        n = 3000
        for i in range(n):
            pub.publish(f"{topic}/d{i % 7}", i.to_bytes(4, "big") * 10, qos=1)
        got: list[int] = []
        most = 0
        while len(got) < n:
            batch = [sub.messages.get(timeout=30)]
            most = max(most, sub.messages.qsize() + 1)
            while len(batch) < 20 and sub.messages.qsize():
                batch.append(sub.messages.get_nowait())
            with sub.batched():
                if bulk:
                    failed = sub.publish_many(
                        [(f"{topic}-receipts/{m.mid}", m.payload[:4]) for m in batch]
                    )
                    assert failed == []
                    sub.ack_many(batch)
                else:
                    for m in batch:
                        sub.publish(f"{topic}-receipts/{m.mid}", m.payload[:4], qos=1)
                        sub.ack(m)
            got += [int.from_bytes(m.payload[:4], "big") for m in batch]
        assert got == list(range(n))
        assert most <= 50
        answered = [int.from_bytes(receipts.messages.get(timeout=30).payload, "big")
                    for _ in range(n)]  # fmt: skip
        assert answered == list(range(n))
        assert receipts.messages.qsize() == 0


def test_publish_many_reports_each_message_beyond_a_full_outgoing_queue(
    window_broker: Mosquitto,
) -> None:
    """``publish_many`` publishes what the outgoing queue (``max_queued``) takes and returns
    a TransportError for each message beyond it, without stopping at the first."""
    c = MqttClient(window_broker.settings(), f"q-{uuid.uuid4().hex[:6]}", max_queued=10)
    with c:
        with c._client._out_message_mutex:  # no PUBACK is handled meanwhile
            failed = c.publish_many([(f"q/{i}", b"x") for i in range(50)])
            taken = [m.info for m in c._client._out_messages.values()]
        assert [t for t, _ in failed] == [f"q/{i}" for i in range(10, 50)]
        assert all("outgoing queue full (10 messages)" in str(e) for _, e in failed)
        assert len(taken) == 10
        for info in taken:  # the ten taken are acknowledged: the queue drains
            info.wait_for_publish(60)
            assert info.is_published()
        c.publish("q/last", b"x", qos=1, wait=True, timeout=30)


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_room_freed_by_pubacks_goes_to_queued_messages_in_order_without_a_wakeup(
    window_broker: Mosquitto, protocol: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Publishing far beyond the window from two threads: the network thread sends the queued
    messages as PUBACKs free room (one scan per run of PUBACKs), never overtaken by a newer
    publish() of the same thread, and without writing a wake-up byte to itself per packet."""
    woken_by: list[int] = []
    base = paho.Client._packet_queue

    def recording(self: paho.Client, *args: Any, **kwargs: Any) -> MQTTErrorCode:
        woken_by.append(threading.get_ident())  # paho's own path: it writes the wake-up byte
        return base(self, *args, **kwargs)

    monkeypatch.setattr(paho.Client, "_packet_queue", recording)
    settings = window_broker.settings(protocol=protocol)
    topic = f"q/{uuid.uuid4().hex[:8]}"
    sub = MqttClient(settings, f"s-{uuid.uuid4().hex[:6]}")
    pub = MqttClient(settings, f"p-{uuid.uuid4().hex[:6]}")
    with sub, pub:
        sub.subscribe(f"{topic}/+", qos=1)
        n = 1500

        def send(k: int) -> None:
            for i in range(n):
                pub.publish(f"{topic}/{k}", f"{k}:{i}".encode(), qos=1)

        threads = [threading.Thread(target=send, args=(k,)) for k in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        seen = [sub.messages.get(timeout=30).payload for _ in range(2 * n)]
        net = pub._client._thread
        assert net is not None and net.ident not in woken_by
        assert pub._client._inflight_messages <= pub._client._max_inflight_messages
    for k in range(2):  # each publisher's messages in its order: none overtook a queued one
        assert [p for p in seen if p.startswith(f"{k}:".encode())] == [
            f"{k}:{i}".encode() for i in range(n)
        ]


def test_inbox_bound_in_bytes_holds_large_messages_at_the_broker(
    window_broker: Mosquitto,
) -> None:
    """``broker.inbox_max_bytes``: a client that takes nothing holds at most that many payload
    bytes (the broker keeps the rest); taking them lets the rest in, all in order, and the
    large ones arrive as the buffer they were received into when asked for in place."""
    settings = window_broker.settings(inbox_max_bytes=1 << 20)
    topic = f"big/{uuid.uuid4().hex[:8]}"
    sub = MqttClient(settings, f"s-{uuid.uuid4().hex[:6]}", manual_ack=True,
                     in_place_payloads=True)  # fmt: skip
    pub = MqttClient(window_broker.settings(), f"p-{uuid.uuid4().hex[:6]}")
    with sub, pub:
        sub.subscribe(topic, qos=1)
        sizes = [200_000] * 20 + [10]
        for i, size in enumerate(sizes):
            pub.publish(topic, bytes([i]) * size, qos=1, wait=i == len(sizes) - 1, timeout=30)
        wait_until(sub.messages.blocked.is_set, 30, "the network thread waiting for room")
        assert sub.messages.nbytes <= (1 << 20) + 200_000
        got: list[Message] = []
        while len(got) < len(sizes):
            m = sub.messages.get(timeout=30)
            sub.ack(m)
            got.append(m)
        assert [len(m.payload) for m in got] == sizes
        assert all(m.payload == bytes([i]) * len(m.payload) for i, m in enumerate(got))
        assert isinstance(got[0].payload, bytearray) and type(got[-1].payload) is bytes


@pytest.mark.parametrize("window", [1000, 7])
@pytest.mark.parametrize("v5", [False, True])
def test_gathered_writes_send_exactly_pahos_bytes(v5: bool, window: int) -> None:
    """Outgoing packets gathered into one sendmsg (with short writes into a small TCP send
    buffer, and QoS 0 publications that go paho's way) make the same byte stream as paho's
    one send per packet; QoS 1 publications without a Condition each get the same mids, and
    so do runs of them published at once (``publish_many_qos1``, runs of PUBACKs queued by
    ``queue_pubacks``), beyond the in-flight window too (those wait, queued, and are sent in
    order as PUBACKs free room, retained or not: ``_update_inflight``)."""
    import select

    proto = MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311
    rng = random.Random(7)
    ops = [(rng.random(), rng.randrange(0, 3000)) for _ in range(400)]
    streams: list[bytes] = []
    mids: list[list[int]] = []
    states: list[list[int]] = []
    for cls, bulk in ((paho.Client, False), (PahoClient, False), (PahoClient, True)):
        c = cls(CallbackAPIVersion.VERSION2, client_id="w", protocol=proto, manual_ack=True)
        c.max_inflight_messages_set(window)
        peer, sock = _tcp_pair()  # TCP: a full send buffer takes part of a write
        sock.setblocking(False)
        c._sock = read_ahead(sock) if cls is PahoClient else sock
        c._state = paho._ConnectionState.MQTT_CS_CONNECTED  # type: ignore[attr-defined]
        got = bytearray()
        reader = threading.Thread(target=_read_to_eof, args=(peer, got), daemon=True)
        reader.start()
        infos: list[paho.MQTTMessageInfo] = []
        runs: list[tuple[str, list[int]]] = []  # runs of the same operation, in order
        for i, (kind, _) in enumerate(ops):
            op = "qos0" if kind < 0.1 else "ack" if kind < 0.3 else "qos1"
            if runs and runs[-1][0] == op:
                runs[-1][1].append(i)
            else:
                runs.append((op, [i]))
        for op, idx in runs:
            if bulk and isinstance(c, PahoClient) and op != "qos0":
                if op == "ack":
                    assert (
                        c.queue_pubacks([1000 + i for i in idx]) == MQTTErrorCode.MQTT_ERR_SUCCESS
                    )
                else:  # retained ones (every fifth) between runs: publish_qos1
                    run: list[tuple[str, bytes]] = []
                    for i in [*idx, -1]:
                        if i >= 0 and i % 5:
                            run.append((f"r/{i}", bytes([i % 256]) * ops[i][1]))
                            continue
                        infos += c.publish_many_qos1(run)
                        run = []
                        if i >= 0:
                            payload = bytes([i % 256]) * ops[i][1]
                            infos.append(c.publish_qos1(f"r/{i}", payload, retain=True))
                continue
            for i in idx:
                payload = bytes([i % 256]) * ops[i][1]
                if op == "qos0":
                    c.publish(f"s/{i}", payload, qos=0)
                elif op == "ack":
                    c.ack(1000 + i, 1)  # a PUBACK
                elif isinstance(c, PahoClient):
                    infos.append(c.publish_qos1(f"r/{i}", payload, retain=i % 5 == 0))
                else:
                    infos.append(c.publish(f"r/{i}", payload, qos=1, retain=i % 5 == 0))
        assert all(info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS for info in infos)
        states.append([m.state for m in c._out_messages.values()])
        # PUBACKs for the oldest three in flight, until none is queued: the room goes to the
        # queued ones in order (_update_inflight), packed as paho packs them.
        while any(m.state == paho.mqtt_ms_queued for m in c._out_messages.values()):
            with c._out_message_mutex:
                done = [mid for mid, m in c._out_messages.items()
                        if m.state == paho.mqtt_ms_wait_for_puback][:3]  # fmt: skip
                for mid in done:
                    del c._out_messages[mid]
                    c._inflight_messages -= 1
                assert c._update_inflight() == MQTTErrorCode.MQTT_ERR_SUCCESS
        while c._out_packet:  # what did not fit: written as the reader makes room
            select.select([], [sock], [], 5)
            assert c.loop_write() == MQTTErrorCode.MQTT_ERR_SUCCESS
        sock.shutdown(socket.SHUT_WR)
        reader.join(30)
        assert not reader.is_alive()
        streams.append(bytes(got))
        mids.append([info.mid for info in infos])
        assert not any(info.is_published() for info in infos)  # no PUBACK has come
        peer.close()
        sock.close()
    assert len(streams[0]) > (100_000 if window > 100 else 10_000)
    assert streams[1] == streams[0] and streams[2] == streams[0]
    assert mids[1] == mids[0] and mids[2] == mids[0]
    assert states[1] == states[0] and states[2] == states[0]
    assert states[0].count(paho.mqtt_ms_queued) == (0 if window > 100 else len(mids[0]) - window)


def _read_to_eof(sock: socket.socket, into: bytearray) -> None:
    while data := sock.recv(65536):
        into += data


def _tcp_pair() -> tuple[socket.socket, socket.socket]:
    """A connected loopback TCP pair with small buffers: (reader, writer)."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        writer = socket.socket()
        writer.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 32768)
        writer.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        writer.connect(server.getsockname())
        reader, _ = server.accept()
    reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32768)
    return reader, writer


def test_unfilled_bytearray_is_a_bytearray_of_the_size_asked() -> None:
    # Large packet bodies are allocated without zeroing (every byte is received into them
    # before they are read); small ones, where zeroing costs nothing, are plain bytearray(n).
    from fededge.mqtt.pahoclient import UNFILLED_MIN, unfilled_bytearray

    small = unfilled_bytearray(UNFILLED_MIN - 1)
    assert type(small) is bytearray and small == bytes(UNFILLED_MIN - 1)
    for n in (UNFILLED_MIN, 400_000, 4 * 1024 * 1024):
        big = unfilled_bytearray(n)
        assert type(big) is bytearray and len(big) == n
        big[:] = b"\x01" * n  # writable, resizable like any bytearray
        del big[:10]
        assert len(big) == n - 10 and big[-1] == 1
