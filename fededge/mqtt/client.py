"""``MqttClient``: connect, subscribe, publish and acknowledge over one paho client."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from types import TracebackType

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from fededge.errors import ConfigError, NotReadyError, TransportError
from fededge.mqtt.chunked import ChunkedInbox, ChunkLimits, publish_chunked
from fededge.mqtt.inbox import DEFAULT_INBOX, Message
from fededge.mqtt.pahoclient import PAHO_RECEIVE_PATH, PahoClient
from fededge.mqtt.readahead import ReadAheadSocket
from fededge.mqtt.security import configure_auth_and_tls, describe_connect_error
from fededge.mqtt.session import MAX_INFLIGHT, Session
from fededge.protocol.chunks import needs_chunks
from fededge.settings import BrokerSettings

# MQTT's remaining-length field caps a packet at 256 MiB; checked here so the error is ours.
MAX_PAYLOAD = 268_435_455 - 65_536


@dataclasses.dataclass(frozen=True)
class Will:
    """The Last Will the broker publishes if this client vanishes without a clean DISCONNECT."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


def _paho_client(
    broker: BrokerSettings, client_id: str, persistent: bool, max_queued: int, will: Will | None
) -> paho.Client:
    """A paho client set up the fededge way (callbacks are attached by the Session)."""
    v5 = broker.protocol == "5"
    # The cheaper receive path overrides paho 2.2 internals; any other paho gets paho's own.
    client = (PahoClient if PAHO_RECEIVE_PATH else paho.Client)(
        CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311,
        # paho rejects clean_session for v5 (it uses clean_start on connect instead).
        clean_session=None if v5 else not persistent,
        # Always: a message is acknowledged when taken from the inbox, or by ack() (see Inbox).
        manual_ack=True,
    )
    # An exception escaping a callback would end paho's network thread for good; ours catch
    # and log everything, this is the backstop.
    client.suppress_exceptions = True
    client.connect_timeout = broker.connect_timeout
    # paho annotates the delays as int but computes with floats; sub-second minimums work.
    client.reconnect_delay_set(
        broker.reconnect_min_delay,  # type: ignore[arg-type]
        broker.reconnect_max_delay,  # type: ignore[arg-type]
    )
    client.max_inflight_messages_set(MAX_INFLIGHT)
    client.max_queued_messages_set(max_queued)
    configure_auth_and_tls(client, broker)
    if will is not None:
        client.will_set(will.topic, will.payload, qos=will.qos, retain=will.retain)
    return client


def _send_connect(client: paho.Client, b: BrokerSettings, persistent: bool) -> MQTTErrorCode:
    """Open the socket and send CONNECT (paho's ``connect``; it raises on socket errors)."""
    if b.protocol != "5":
        return client.connect(b.host, b.port, b.keepalive)
    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]  # paho
    # Quirk: paho's default clean_start (MQTT_CLEAN_START_FIRST_ONLY) wipes the session on the
    # first connect of every process, and without SessionExpiryInterval a v5 session ends with
    # the connection; both silently lose a restarted aggregator's unacknowledged messages.
    props.SessionExpiryInterval = b.session_expiry if persistent else 0
    return client.connect(b.host, b.port, b.keepalive, clean_start=not persistent,
                          properties=props)  # fmt: skip


class MqttClient:
    """A connected MQTT client with a persistent session, a bounded inbox and manual acks.

    Received messages go to ``messages`` (an ``Inbox``: a bounded ``queue.Queue``, see there
    for what happens when it is full). With ``manual_ack=True`` every QoS>0 message taken from
    it must be passed to ``ack`` once it is processed - duplicates included; otherwise taking
    a message acknowledges it. With ``in_place_payloads`` a payload of 64 KiB or more is a
    ``bytearray`` (the buffer the socket filled, not copied): read it like bytes, never
    modify it, never use it as a dict key.
    """

    def __init__(
        self,
        broker: BrokerSettings,
        client_id: str,
        *,
        persistent: bool = True,
        manual_ack: bool = False,
        will: Will | None = None,
        max_queued: int = 0,
        max_inbox: int = DEFAULT_INBOX,
        name: str = "mqtt",
        exclusive: bool = False,
        in_place_payloads: bool = False,
    ) -> None:
        if not client_id:
            raise ConfigError("MQTT client id must not be empty")
        self.broker = broker
        self.client_id = client_id
        self.persistent = persistent
        self.manual_ack = manual_ack
        self._log = logging.getLogger(f"fededge.mqtt.{name}")
        self._addr = f"{broker.host}:{broker.port}"
        self._v5 = broker.protocol == "5"
        # Whole messages only: chunks are reassembled as they arrive (fededge/mqtt/chunked.py).
        limits = ChunkLimits(
            max_transfer_bytes=min(MAX_PAYLOAD, broker.chunk_max_bytes),
            max_bytes=broker.chunk_max_bytes,
            max_transfers=broker.chunk_max_transfers,
            timeout=broker.chunk_timeout,
        )
        self.messages = ChunkedInbox(
            max_inbox,
            max_bytes=broker.inbox_max_bytes,
            on_take=None if manual_ack else self._ack_taken,
            limits=limits,
        )
        self._session = Session(broker, self._addr, self._log, self.messages, manual_ack)
        self.messages.ack = self._session.ack
        #: Messages above this are published in chunks; set from the broker setting, and the
        #: plan's ``max_message_bytes`` by the services (the smaller wins).
        self.max_message_bytes: int | None = broker.max_message_bytes
        self._retained_chunks: dict[str, int] = {}
        self._session.exclusive = exclusive
        self._started = False

        self._client = _paho_client(broker, client_id, persistent, max_queued, will)
        if isinstance(self._client, PahoClient):
            # Large payloads stay in the buffer they were received into (pahoclient.py): a
            # bytearray, which the aggregator's parsers, WAL and hashes read like bytes.
            self._client.in_place_payloads = in_place_payloads
        self._session.attach(self._client)

    # --- connection -------------------------------------------------------------------------

    def connect(self) -> None:
        """Connect and start the network thread; block until CONNACK or raise TransportError."""
        if self._started:
            raise NotReadyError("MqttClient.connect() called twice (it reconnects by itself)")
        self._started = True
        s = self._session
        with s.lock:
            s.first = None  # a failed connect() may be retried
        b = self.broker
        timeout = b.connect_timeout
        deadline = time.monotonic() + timeout
        try:
            rc = _send_connect(self._client, self.broker, self.persistent)
        except Exception as e:
            self._started = False
            raise TransportError(describe_connect_error(e, self._addr, timeout)) from None
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            self._started = False
            raise TransportError(f"cannot connect to {self._addr}: {paho.error_string(rc)}")
        self._client.loop_start()
        with s.cond:
            s.cond.wait_for(lambda: s.first is not None, deadline - time.monotonic())
            outcome = s.first
        if outcome is True:
            self._log.info("connected to %s as %s (MQTT %s)", self._addr, self.client_id,
                           b.protocol)  # fmt: skip
            return
        self._stop_loop()
        self._started = False
        if isinstance(outcome, TransportError):
            raise outcome
        raise TransportError(
            f"no CONNACK from {self._addr} within {timeout:g} s "
            "(broker overloaded, or not an MQTT listener?)"
        )

    def wait_connected(self, timeout: float) -> bool:
        """Block until connected (True) or until ``timeout`` seconds pass (False)."""
        return self._session.connected.wait(timeout)

    @property
    def connected(self) -> bool:
        """Whether a CONNACK was received and the connection has not dropped since."""
        return self._session.connected.is_set() and self._client.is_connected()

    @property
    def taken_over(self) -> bool:
        """Whether the broker replaced this connection by another with the same client id.

        MQTT 5 only (3.1.1 just closes the socket). An ``exclusive`` client then stays
        disconnected instead of taking the session back.
        """
        return self._session.taken_over.is_set()

    def add_connect_listener(self, fn: Callable[[bool], None]) -> None:
        """Call ``fn(session_present)`` after every (re)connect, from the network thread."""
        with self._session.lock:
            self._session.listeners.append(fn)

    def close(self, *, send_will: bool = False) -> None:
        """Disconnect (gracefully unless ``send_will``) and stop the network thread."""
        s = self._session
        if not self._started or s.closing:
            return
        s.closing = True  # also ends a network thread waiting for room in the inbox
        if send_will and not self._v5:
            # MQTT 3.1.1 has no "disconnect with will": the broker sends the will only when
            # the connection breaks, so break it. disconnect() then stops the reconnect loop.
            self._break_socket()
            self._client.disconnect()
        else:
            code = 0x04 if send_will else 0x00  # 0x04: Disconnect with Will Message
            reason = ReasonCode(PacketTypes.DISCONNECT, identifier=code) if self._v5 else None
            self._client.disconnect(reasoncode=reason)
            # Let the network thread write DISCONNECT; if it cannot (stuck broker), break
            # the socket so the thread notices and ends.
            deadline = time.monotonic() + min(self.broker.connect_timeout, 5.0)
            while self._client.is_connected() and time.monotonic() < deadline:
                time.sleep(0.01)
            if self._client.is_connected():
                self._log.warning("DISCONNECT to %s not sent in time; dropping", self._addr)
                self._break_socket()
        self._stop_loop()
        s.connected.clear()
        with s.cond:
            s.cond.notify_all()
        self._log.info("closed connection to %s%s", self._addr, " (will sent)" if send_will else "")

    def _break_socket(self) -> None:
        # shutdown(), not close(): the network thread may be in select() on this socket; it
        # now sees EOF and handles the loss itself.
        sock = self._client.socket()
        if isinstance(sock, ReadAheadSocket):
            sock = sock.raw
        if isinstance(sock, socket.socket):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def _stop_loop(self) -> None:
        # disconnect() moves paho to DISCONNECTED so loop_forever's reconnect wait ends; a
        # pending reconnect attempt can still take up to connect_timeout.
        if self._client.is_connected() is False:
            self._client.disconnect()
        self._client.loop_stop()

    def __enter__(self) -> MqttClient:
        if not self._started:
            self.connect()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:  # fmt: skip
        self.close()

    # --- operations -------------------------------------------------------------------------

    def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        """Subscribe and wait for SUBACK; the subscription is renewed after session loss."""
        self.subscribe_all([topic_filter], qos)

    def subscribe_all(self, topic_filters: list[str], qos: int = 1) -> None:
        """Subscribe to several filters with one SUBSCRIBE and wait for its SUBACK.

        The broker answers before it sends any retained message of the filters, so a caller
        that drains the inbox afterwards never waits on a SUBACK stuck behind a full inbox.
        """
        self._not_on_network_thread("subscribe")
        if not topic_filters:
            return
        s = self._session
        with s.lock:
            s.subscriptions.update(dict.fromkeys(topic_filters, qos))
        what = f"subscribe to {', '.join(map(repr, topic_filters))}"
        try:
            rc, mid = self._client.subscribe([(f, qos) for f in topic_filters])
            codes = s.wait_suback(rc, mid, what)
            refused = [
                f"{f!r}: {c}" for f, c in zip(topic_filters, codes, strict=False) if c.is_failure
            ]
            if refused:
                raise TransportError(
                    f"broker {self._addr} refused subscription to {'; '.join(refused)}"
                )
        except BaseException:
            with s.lock:
                for f in topic_filters:
                    s.subscriptions.pop(f, None)
            raise

    def unsubscribe(self, topic_filter: str) -> None:
        """Unsubscribe and wait for UNSUBACK."""
        self._not_on_network_thread("unsubscribe")
        s = self._session
        with s.lock:
            s.subscriptions.pop(topic_filter, None)
        rc, mid = self._client.unsubscribe(topic_filter)
        codes = s.wait_suback(rc, mid, f"unsubscribe from {topic_filter!r}")
        if self._v5 and codes and codes[0].is_failure:
            raise TransportError(f"broker {self._addr} refused unsubscribe: {codes[0]}")

    def _not_on_network_thread(self, what: str) -> None:
        # Waiting for an answer inside a callback or connect listener would wait forever: the
        # answer is read by the very thread that is waiting.
        if threading.get_ident() == self._session.net_thread:
            raise NotReadyError(f"cannot {what} and wait from a connect listener or callback")

    def publish(
        self,
        topic: str,
        payload: bytes | str,
        *,
        qos: int = 1,
        retain: bool = False,
        wait: bool = False,
        timeout: float | None = None,
    ) -> None:
        """Publish; with ``wait`` block until the broker's PUBACK (or raise TransportError).

        A payload above ``max_message_bytes`` goes out in chunks (fededge/mqtt/chunked.py).
        QoS>0 messages published while disconnected are kept by paho and sent after the
        reconnect; a QoS 0 message is dropped and raises. An invalid topic or QoS raises
        ValueError (a bug, not a transport problem). ``timeout=None`` waits until closed.
        """
        data = payload.encode() if isinstance(payload, str) else payload
        publish_chunked(self._publish_one, topic, data, qos=qos, retain=retain,
                        limit=self.max_message_bytes, retained_counts=self._retained_chunks,
                        wait=wait, timeout=timeout)  # fmt: skip

    def publish_many(self, items: list[tuple[str, bytes]]) -> list[tuple[str, TransportError]]:
        """``publish(topic, payload, qos=1)`` for each (topic, payload), in order, without
        waiting; the failures (an outgoing queue full) are returned, not raised, and do not
        stop the others. Small QoS 1 messages go out through ``PahoClient.publish_many_qos1``
        (the same packets, one lock and one queued packet for all): the aggregator answers
        each group of updates with a receipt per update."""
        client = self._client
        limit = self.max_message_bytes
        if not isinstance(client, PahoClient) or any(
            len(p) > MAX_PAYLOAD or needs_chunks(len(p), limit) for _, p in items
        ):
            failed: list[tuple[str, TransportError]] = []
            for topic, payload in items:
                try:
                    self.publish(topic, payload, qos=1)
                except TransportError as e:
                    failed.append((topic, e))
            return failed
        infos = client.publish_many_qos1(items)
        failures = []
        for (topic, _), info in zip(items, infos, strict=True):
            if info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN:  # kept: sent after the reconnect
                info.rc = MQTTErrorCode.MQTT_ERR_SUCCESS
            elif info.rc == MQTTErrorCode.MQTT_ERR_QUEUE_SIZE:
                failures.append((topic, TransportError(
                    f"cannot publish to {topic!r}: outgoing queue full "
                    f"({client.max_queued_messages} messages)")))  # fmt: skip
            elif info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                failures.append((topic, TransportError(
                    f"cannot publish to {topic!r}: {paho.error_string(info.rc)}")))  # fmt: skip
        return failures

    def _publish_one(
        self, topic: str, data: bytes, *, qos: int, retain: bool, wait: bool,
        timeout: float | None,
    ) -> None:  # fmt: skip
        if len(data) > MAX_PAYLOAD:
            raise TransportError(f"payload of {len(data)} bytes for {topic!r} exceeds MQTT's limit")
        if wait:
            self._not_on_network_thread("publish")
        if wait and not self.connected:
            raise TransportError(f"cannot publish to {topic!r}: not connected to {self._addr}")
        client = self._client
        if qos == 1 and isinstance(client, PahoClient):
            info: paho.MQTTMessageInfo = client.publish_qos1(topic, data, retain)
        else:
            info = client.publish(topic, data, qos=qos, retain=retain)
        if info.rc == MQTTErrorCode.MQTT_ERR_QUEUE_SIZE:
            raise TransportError(f"cannot publish to {topic!r}: outgoing queue full "
                                 f"({self._client.max_queued_messages} messages)")  # fmt: skip
        if info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN:
            if qos == 0:
                raise TransportError(f"QoS 0 message to {topic!r} dropped: not connected")
            # Quirk: paho keeps the message and resends it after reconnecting, but leaves rc at
            # NO_CONN, so wait_for_publish() would raise even after the PUBACK arrived.
            info.rc = MQTTErrorCode.MQTT_ERR_SUCCESS
        elif info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise TransportError(f"cannot publish to {topic!r}: {paho.error_string(info.rc)}")
        if wait:
            self._session.wait_published(info, f"{topic!r}", timeout)

    @contextlib.contextmanager
    def batched(self) -> Iterator[None]:
        """Queue the packets of the publish()/ack() calls inside, and wake paho's network
        thread once at the end instead of once per packet.

        Quirk: paho's ``_packet_queue`` writes a byte to its socket pair for every packet
        queued from another thread, so the network thread wakes (and takes the GIL) per
        packet; the aggregator queues a receipt and a PUBACK per update, in groups. With the
        write end hidden, packets are only queued; one byte at the end wakes the thread, which
        writes them all. Packets queued by the network thread itself need no wake-up. Not for
        ``publish(wait=True)`` (nothing would send it until the block ends).
        """
        c = self._client
        pair = c._sockpairW
        if pair is None or threading.get_ident() == self._session.net_thread:
            yield
            return
        c._sockpairW = None
        try:
            yield
        finally:
            if c._sockpairW is None:  # paho made no new pair meanwhile (it does in loop_start)
                c._sockpairW = pair
            with contextlib.suppress(OSError):  # BlockingIOError: a wake-up is pending anyway
                pair.send(b"0")

    def ack(self, message: Message) -> None:
        """Acknowledge a QoS>0 message received with ``manual_ack``; a no-op otherwise.

        Only sent on the connection that delivered the message (see ``Session.ack``).
        """
        if self.manual_ack:
            self._session.ack(message)

    def ack_many(self, messages: list[Message]) -> None:
        """``ack`` each of ``messages`` in order (one lock for all)."""
        if self.manual_ack and messages:
            self._session.ack_many(messages)

    def _ack_taken(self, message: Message) -> None:
        # Without manual_ack a message is acknowledged as it leaves the inbox: the broker's
        # in-flight window then bounds what waits in it (see Inbox).
        try:
            self._session.ack(message)
        except TransportError as e:
            self._log.debug("%s", e)
