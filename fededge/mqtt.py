"""The MQTT transport: the one module that knows paho-mqtt 2.x.

paho's callbacks become a queue of received messages, return and reason codes become
``TransportError`` with readable text, and sessions, acknowledgements, TLS, Last Will and
reconnection are set up the same way for every fededge process.

Threading: paho's network thread (``loop_start``) runs every callback; ``publish``, ``ack``,
``subscribe`` and ``close`` may be called from any other thread. This is safe in paho 2.2
because, once its thread runs, paho only *queues* outgoing packets (``_packet_queue`` appends
to a deque and pokes a socketpair; only the network thread writes to the socket), the outgoing
message table is guarded by ``_out_message_mutex`` and message ids by ``_mid_generate_mutex``.
The one unguarded spot is ``reconnect()``, which iterates the packet deque while a foreign
append would raise ``RuntimeError`` inside the network thread and kill it; ``publish`` and
``subscribe`` cannot append then (paho refuses while the socket is down) and ``ack`` only
sends while connected (see ``ack``).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import queue
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from fededge.errors import ConfigError, NotReadyError, TransportError
from fededge.settings import BrokerSettings

# MQTT's remaining-length field caps a packet at 256 MiB; checked here so the error is ours.
MAX_PAYLOAD = 268_435_455 - 65_536
# Mosquitto's default receive maximum (max_inflight_messages) is 20 and paho 2.2 ignores the
# ReceiveMaximum a v5 CONNACK announces; more in flight would be refused by the broker.
MAX_INFLIGHT = 20

_HINTS = {
    "Bad user name or password": "check broker.username and broker.password",
    "Not authorized": "the broker refuses this client/user (credentials or ACL)",
    "Client identifier not valid": "the broker rejects this client id",
    "Server unavailable": "the broker is not accepting connections",
    "Unsupported protocol version": "try broker.protocol = '3.1.1'",
}


@dataclasses.dataclass(frozen=True)
class Message:
    """One received MQTT message, as taken from ``MqttClient.messages``."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    mid: int
    dup: bool = False
    # Which connection delivered it: an ack is only valid on that connection (see ``ack``).
    _conn: int = dataclasses.field(default=0, repr=False, compare=False)


@dataclasses.dataclass(frozen=True)
class Will:
    """The Last Will the broker publishes if this client vanishes without a clean DISCONNECT."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


class MqttClient:
    """A connected MQTT client with a persistent session, a message queue and manual acks.

    Received messages go to ``messages`` (an unbounded queue; with ``manual_ack`` the broker's
    in-flight limit bounds it for QoS 1). With ``manual_ack=True`` every QoS>0 message taken
    from the queue must be passed to ``ack`` once it is processed - duplicates included.
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
        name: str = "mqtt",
    ) -> None:
        if not client_id:
            raise ConfigError("MQTT client id must not be empty")
        self.broker = broker
        self.client_id = client_id
        self.persistent = persistent
        self.manual_ack = manual_ack
        self.messages: queue.Queue[Message] = queue.Queue()
        self._log = logging.getLogger(f"fededge.mqtt.{name}")
        self._addr = f"{broker.host}:{broker.port}"
        self._v5 = broker.protocol == "5"
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._conn = 0  # connection number, bumped at every CONNACK
        self._unacked: set[int] = set()  # mids of this connection awaiting ack()
        self._subscriptions: dict[str, int] = {}
        self._sub_results: dict[int, list[ReasonCode]] = {}
        self._bg_mids: set[int] = set()  # (un)subscribes nobody waits for
        self._pub_failures: collections.OrderedDict[paho.MQTTMessageInfo, ReasonCode] = (
            collections.OrderedDict()
        )
        self._listeners: list[Callable[[bool], None]] = []
        self._connected = threading.Event()
        self._first: TransportError | bool | None = None  # outcome of the first CONNACK
        self._started = False
        self._closing = False
        self._last_error = ""
        self._net_thread: int | None = None

        self._client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=MQTTProtocolVersion.MQTTv5 if self._v5 else MQTTProtocolVersion.MQTTv311,
            # paho rejects clean_session for v5 (it uses clean_start on connect instead).
            clean_session=None if self._v5 else not persistent,
            manual_ack=manual_ack,
        )
        # An exception escaping a callback would end paho's network thread for good; ours
        # catch and log everything, this is the backstop.
        self._client.suppress_exceptions = True
        self._client.connect_timeout = broker.connect_timeout
        # paho annotates the delays as int but computes with floats; sub-second minimums work.
        self._client.reconnect_delay_set(
            broker.reconnect_min_delay,  # type: ignore[arg-type]
            broker.reconnect_max_delay,  # type: ignore[arg-type]
        )
        self._client.max_inflight_messages_set(MAX_INFLIGHT)
        self._client.max_queued_messages_set(max_queued)
        self._configure_auth_and_tls()
        if will is not None:
            self._client.will_set(will.topic, will.payload, qos=will.qos, retain=will.retain)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message
        self._client.on_subscribe = self._on_subscribe
        self._client.on_unsubscribe = self._on_subscribe
        self._client.on_publish = self._on_publish
        self._client.on_log = self._on_log

    def _configure_auth_and_tls(self) -> None:
        b = self.broker
        if b.password is not None and b.username is None:
            raise ConfigError("broker.password is set but broker.username is not")
        if b.username is not None:
            pw = b.password.get_secret_value() if b.password is not None else None
            self._client.username_pw_set(b.username, pw)
        tls_files = {"ca_file": b.ca_file, "cert_file": b.cert_file, "key_file": b.key_file}
        if not b.tls:
            if given := [k for k, v in tls_files.items() if v is not None]:
                raise ConfigError(
                    f"broker.{given[0]} is set but broker.url = {b.url!r} is not TLS; "
                    "use mqtts://host:port"
                )
            return
        if b.key_file is not None and b.cert_file is None:
            raise ConfigError("broker.key_file is set but broker.cert_file is not")
        try:
            ctx = ssl.create_default_context(cafile=str(b.ca_file) if b.ca_file else None)
            if b.cert_file is not None:
                ctx.load_cert_chain(str(b.cert_file), str(b.key_file) if b.key_file else None)
        except (OSError, ssl.SSLError) as e:
            raise ConfigError(f"broker TLS files cannot be used: {e}") from None
        self._client.tls_set_context(ctx)
        # Quirk: paho 2.2 checks the host name itself with ssl.match_hostname (removed in
        # Python 3.12) unless the context does; tls_insecure_set keeps context.check_hostname
        # and paho's flag in step, so the context always does the check when one is wanted.
        self._client.tls_insecure_set(b.tls_insecure)

    # --- connection -------------------------------------------------------------------------

    def connect(self) -> None:
        """Connect and start the network thread; block until CONNACK or raise TransportError."""
        if self._started:
            raise NotReadyError("MqttClient.connect() called twice (it reconnects by itself)")
        self._started = True
        with self._lock:
            self._first = None  # a failed connect() may be retried
        deadline = time.monotonic() + self.broker.connect_timeout
        props = None
        if self._v5:
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]  # paho
            # Quirk: paho's default clean_start (MQTT_CLEAN_START_FIRST_ONLY) wipes the session
            # on the first connect of every process, and without SessionExpiryInterval a v5
            # session ends with the connection; both silently lose a restarted aggregator's
            # unacknowledged messages.
            props.SessionExpiryInterval = self.broker.session_expiry if self.persistent else 0
        try:
            if self._v5:
                rc = self._client.connect(
                    self.broker.host,
                    self.broker.port,
                    self.broker.keepalive,
                    clean_start=not self.persistent,
                    properties=props,
                )
            else:
                rc = self._client.connect(self.broker.host, self.broker.port, self.broker.keepalive)
        except Exception as e:
            self._started = False
            raise TransportError(self._describe_connect_error(e)) from None
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            self._started = False
            raise TransportError(f"cannot connect to {self._addr}: {paho.error_string(rc)}")
        self._client.loop_start()
        with self._cond:
            self._cond.wait_for(lambda: self._first is not None, deadline - time.monotonic())
            outcome = self._first
        if outcome is True:
            self._log.info(
                "connected to %s as %s (MQTT %s)", self._addr, self.client_id, self.broker.protocol
            )
            return
        self._stop_loop()
        self._started = False
        if isinstance(outcome, TransportError):
            raise outcome
        raise TransportError(
            f"no CONNACK from {self._addr} within {self.broker.connect_timeout:g} s "
            "(broker overloaded, or not an MQTT listener?)"
        )

    def _describe_connect_error(self, e: Exception) -> str:
        where = f"MQTT broker {self._addr}"
        t = self.broker.connect_timeout
        if isinstance(e, ssl.SSLCertVerificationError):
            return f"TLS failure with {where}: certificate rejected ({e.verify_message})"
        if isinstance(e, ssl.SSLError):
            return f"TLS failure with {where}: {e}"
        if isinstance(e, TimeoutError | socket.timeout):
            return f"timed out after {t:g} s connecting to {where}"
        if isinstance(e, ConnectionRefusedError):
            return f"{where} is unreachable: connection refused (is the broker running?)"
        if isinstance(e, socket.gaierror):
            return f"cannot resolve host of {where}: {e.strerror}"
        if isinstance(e, OSError):
            return f"{where} is unreachable: {e.strerror or e}"
        return f"cannot connect to {where}: {type(e).__name__}: {e}"

    def wait_connected(self, timeout: float) -> bool:
        """Block until connected (True) or until ``timeout`` seconds pass (False)."""
        return self._connected.wait(timeout)

    @property
    def connected(self) -> bool:
        """Whether a CONNACK was received and the connection has not dropped since."""
        return self._connected.is_set() and self._client.is_connected()

    def add_connect_listener(self, fn: Callable[[bool], None]) -> None:
        """Call ``fn(session_present)`` after every (re)connect, from the network thread."""
        with self._lock:
            self._listeners.append(fn)

    def close(self, *, send_will: bool = False) -> None:
        """Disconnect (gracefully unless ``send_will``) and stop the network thread."""
        if not self._started or self._closing:
            return
        self._closing = True
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
        self._connected.clear()
        with self._cond:
            self._cond.notify_all()
        self._log.info("closed connection to %s%s", self._addr, " (will sent)" if send_will else "")

    def _break_socket(self) -> None:
        # shutdown(), not close(): the network thread may be in select() on this socket; it
        # now sees EOF and handles the loss itself.
        sock = self._client.socket()
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
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # --- operations -------------------------------------------------------------------------

    def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        """Subscribe and wait for SUBACK; the subscription is renewed after session loss."""
        self._not_on_network_thread("subscribe")
        with self._lock:
            self._subscriptions[topic_filter] = qos
        try:
            rc, mid = self._client.subscribe(topic_filter, qos)
            codes = self._wait_suback(rc, mid, f"subscribe to {topic_filter!r}")
            if codes and codes[0].is_failure:
                raise TransportError(
                    f"broker {self._addr} refused subscription to {topic_filter!r}: {codes[0]}"
                )
        except BaseException:
            with self._lock:
                self._subscriptions.pop(topic_filter, None)
            raise

    def unsubscribe(self, topic_filter: str) -> None:
        """Unsubscribe and wait for UNSUBACK."""
        self._not_on_network_thread("unsubscribe")
        with self._lock:
            self._subscriptions.pop(topic_filter, None)
        rc, mid = self._client.unsubscribe(topic_filter)
        codes = self._wait_suback(rc, mid, f"unsubscribe from {topic_filter!r}")
        if self._v5 and codes and codes[0].is_failure:
            raise TransportError(f"broker {self._addr} refused unsubscribe: {codes[0]}")

    def _not_on_network_thread(self, what: str) -> None:
        # Waiting for an answer inside a callback or connect listener would wait forever: the
        # answer is read by the very thread that is waiting.
        if threading.get_ident() == self._net_thread:
            raise NotReadyError(f"cannot {what} and wait from a connect listener or callback")

    def _wait_suback(self, rc: MQTTErrorCode, mid: int | None, what: str) -> list[ReasonCode]:
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
            raise TransportError(f"cannot {what}: {paho.error_string(rc)}")
        # The SUBACK may be handled before we get here; on_subscribe keeps results until taken.
        with self._cond:
            got = self._cond.wait_for(
                lambda: mid in self._sub_results or self._closing, self.broker.connect_timeout
            )
            if mid in self._sub_results:
                return self._sub_results.pop(mid)
            self._bg_mids.add(mid)  # a late answer is dropped, not handed to a reused mid
        why = "client closed" if got else f"no answer within {self.broker.connect_timeout:g} s"
        raise TransportError(f"cannot {what} at {self._addr}: {why}")

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

        QoS>0 messages published while disconnected are kept by paho and sent after the
        reconnect; a QoS 0 message is dropped and raises. An invalid topic or QoS raises
        ValueError (a bug, not a transport problem). ``timeout=None`` waits until closed.
        """
        data = payload.encode() if isinstance(payload, str) else payload
        if len(data) > MAX_PAYLOAD:
            raise TransportError(f"payload of {len(data)} bytes for {topic!r} exceeds MQTT's limit")
        if wait:
            self._not_on_network_thread("publish")
        if wait and not self.connected:
            raise TransportError(f"cannot publish to {topic!r}: not connected to {self._addr}")
        info = self._client.publish(topic, data, qos=qos, retain=retain)
        if info.rc == MQTTErrorCode.MQTT_ERR_QUEUE_SIZE:
            raise TransportError(
                f"cannot publish to {topic!r}: outgoing queue full "
                f"({self._client.max_queued_messages} messages)"
            )
        if info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN:
            if qos == 0:
                raise TransportError(f"QoS 0 message to {topic!r} dropped: not connected")
            # Quirk: paho keeps the message and resends it after reconnecting, but leaves rc at
            # NO_CONN, so wait_for_publish() would raise even after the PUBACK arrived.
            info.rc = MQTTErrorCode.MQTT_ERR_SUCCESS
        elif info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise TransportError(f"cannot publish to {topic!r}: {paho.error_string(info.rc)}")
        if not wait:
            return
        deadline = None if timeout is None else time.monotonic() + timeout
        while not info.is_published():
            if self._closing:
                raise TransportError(f"publish to {topic!r} aborted: client closed")
            left = 0.5 if deadline is None else min(0.5, deadline - time.monotonic())
            if left <= 0:
                raise TransportError(
                    f"no PUBACK from {self._addr} for {topic!r} within {timeout} s"
                )
            info.wait_for_publish(left)
        with self._lock:
            failure = self._pub_failures.pop(info, None)
        if failure is not None:
            raise TransportError(f"broker {self._addr} refused publish to {topic!r}: {failure}")

    def ack(self, message: Message) -> None:
        """Acknowledge a QoS>0 message received with ``manual_ack``; a no-op otherwise.

        Only sent on the connection that delivered the message: after a reconnect the broker
        redelivers every unacknowledged message and reuses freed ids, so acking a stale id
        could acknowledge a different message before it is processed.
        """
        if not self.manual_ack or message.qos == 0:
            return
        # Held while queueing the PUBACK: _on_disconnect takes the same lock before paho goes
        # on to reconnect (which walks its packet queue), so the check and the append are one
        # step with respect to a connection change.
        with self._lock:
            current = message._conn == self._conn and message.mid in self._unacked
            if current:
                self._unacked.discard(message.mid)
            if not current or not self._connected.is_set():
                self._log.debug(
                    "not acking mid %d of %s: connection changed", message.mid, message.topic
                )
                return
            rc = self._client.ack(message.mid, message.qos)
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise TransportError(f"cannot acknowledge {message.topic!r}: {paho.error_string(rc)}")

    # --- paho callbacks (network thread) ----------------------------------------------------

    def _on_connect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: paho.ConnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        try:
            if reason.is_failure:
                name = reason.getName()
                hint = _HINTS.get(name, "")
                msg = f"broker {self._addr} refused the connection: {name}"
                msg += f" ({hint})" if hint else ""
                self._log.error("%s", msg)
                with self._cond:
                    if self._first is None:
                        self._first = TransportError(msg)
                        self._cond.notify_all()
                return
            session = bool(flags.session_present)
            self._net_thread = threading.get_ident()
            with self._cond:
                self._conn += 1
                self._unacked.clear()
                subs = [] if session else list(self._subscriptions.items())
                listeners = list(self._listeners)
                reconnect = self._first is True
                self._first = True
                self._cond.notify_all()
            self._connected.set()
            if reconnect:
                self._log.info("reconnected to %s (session present: %s)", self._addr, session)
            for topic_filter, qos in subs:
                # The broker forgot our subscriptions (new or expired session): renew them.
                # Nobody can wait for this SUBACK here, on the network thread.
                rc, mid = client.subscribe(topic_filter, qos)
                if rc == MQTTErrorCode.MQTT_ERR_SUCCESS and mid is not None:
                    with self._lock:
                        self._bg_mids.add(mid)
            for fn in listeners:
                try:
                    fn(session)
                except Exception:
                    self._log.exception("connect listener %r failed", fn)
        except Exception:
            self._log.exception("internal error handling CONNACK")

    def _on_disconnect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: paho.DisconnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        with self._lock:  # see ack(): no PUBACK is queued once this has run
            self._connected.clear()
        why = reason.getName()
        if flags.is_disconnect_packet_from_server:
            why = f"broker sent DISCONNECT: {why}"
        elif why == "Unspecified error":
            # paho reports every lost socket as "Unspecified error"; its last error log line,
            # if any, says more (e.g. the TLS alert).
            why = "connection lost" + (f" ({self._last_error})" if self._last_error else "")
        elif self._last_error:
            why = f"{why} ({self._last_error})"
        self._last_error = ""
        with self._cond:
            first_pending = self._first is None
            if first_pending:
                self._first = TransportError(
                    f"connection to {self._addr} closed before CONNACK: {why} "
                    "(TLS client certificate or protocol version refused?)"
                )
            self._cond.notify_all()
        if self._closing or first_pending:
            self._log.debug("disconnected from %s: %s", self._addr, why)
        else:
            self._log.warning(
                "lost connection to %s: %s; reconnecting (backoff %g-%g s)",
                self._addr,
                why,
                self.broker.reconnect_min_delay,
                self.broker.reconnect_max_delay,
            )

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        try:
            try:
                topic = msg.topic
            except UnicodeDecodeError:
                # paho raises on access; drop (and ack, so it is not redelivered forever).
                self._log.warning("dropping message with a non-UTF-8 topic %r", msg._topic)
                if self.manual_ack and msg.qos > 0:
                    client.ack(msg.mid, msg.qos)
                return
            with self._lock:
                conn = self._conn
                if self.manual_ack and msg.qos > 0:
                    self._unacked.add(msg.mid)
            self.messages.put(
                Message(
                    topic,
                    bytes(msg.payload),
                    msg.qos,
                    bool(msg.retain),
                    msg.mid,
                    bool(msg.dup),
                    conn,
                )
            )
        except Exception:
            self._log.exception("internal error handling a message on %r", msg._topic)

    def _on_subscribe(
        self,
        client: paho.Client,
        userdata: Any,
        mid: int,
        reason_codes: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        with self._cond:
            if mid in self._bg_mids:
                self._bg_mids.discard(mid)
                background = True
            else:
                self._sub_results[mid] = list(reason_codes)
                self._cond.notify_all()
                background = False
        if background and any(rc.is_failure for rc in reason_codes):
            self._log.error(
                "broker %s refused a renewed (un)subscription: %s",
                self._addr,
                ", ".join(map(str, reason_codes)),
            )

    def _on_publish(
        self,
        client: paho.Client,
        userdata: Any,
        mid: int,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if not reason.is_failure:
            return
        self._log.warning("broker %s refused publish (mid %d): %s", self._addr, mid, reason)
        # paho calls this holding _out_message_mutex with the message still in _out_messages;
        # keying on its info object (not the reusable mid) lets publish(wait=True) find it.
        out = client._out_messages.get(mid)
        if out is not None:
            with self._lock:
                self._pub_failures[out.info] = reason
                while len(self._pub_failures) > 256:
                    self._pub_failures.popitem(last=False)

    def _on_log(self, client: paho.Client, userdata: Any, level: int, buf: str) -> None:
        if level == paho.MQTT_LOG_ERR:
            self._last_error = buf
            self._log.debug("paho: %s", buf)
        elif self._log.isEnabledFor(logging.DEBUG):
            self._log.debug("paho: %s", buf)


# --- one-shot readers ---------------------------------------------------------------------------

# Mosquitto sends a filter's retained messages right behind its SUBACK, so once every
# subscription is acknowledged they are already on the wire; this much silence after the last
# one means the broker has sent everything it holds.
RETAINED_QUIET = 0.3


def read_retained(
    broker: BrokerSettings,
    topic_filters: Iterable[str],
    *,
    wait: float,
    required: Iterable[str] = (),
    quiet: float = RETAINED_QUIET,
    name: str = "read",
) -> dict[str, bytes]:
    """The retained messages under ``topic_filters``, as {topic: payload}, via a throwaway client.

    Stop rule (the only one): after subscribing to every filter, return as soon as every topic
    in ``required`` has arrived and no retained message has arrived for ``quiet`` seconds; in any
    case return ``wait`` seconds after the last SUBACK, with whatever arrived. Only messages
    the broker sends *as retained* count (a live publication in the meantime neither resets the
    silence nor replaces a value), and an empty payload (a cleared retained message) is left
    out. Raises TransportError if the broker is unreachable or refuses a subscription.
    """
    want = set(required)
    out: dict[str, bytes] = {}
    client = MqttClient(
        broker, f"fededge-{name}-{uuid.uuid4().hex[:10]}", persistent=False, name=name
    )
    with client:  # connects, and disconnects at the end
        for f in topic_filters:
            client.subscribe(f, qos=1)
        now = time.monotonic()
        deadline = now + wait
        last = now
        while now < deadline and not (want <= out.keys() and now - last >= quiet):
            try:
                msg = client.messages.get(timeout=min(0.05, deadline - now))
            except queue.Empty:
                now = time.monotonic()
                continue
            now = time.monotonic()
            if not msg.retain:
                continue
            last = now
            if msg.payload:
                out[msg.topic] = msg.payload
            else:
                out.pop(msg.topic, None)
    return out


def discard_session(broker: BrokerSettings, client_id: str) -> None:
    """End the broker's persistent session of ``client_id``: its subscriptions and queue.

    Connecting once with a clean session does it (MQTT 3.1.1 ``clean_session``; MQTT 5
    ``clean_start`` with a session expiry of 0). A client connected under that id is
    disconnected by the broker (session takeover), so only call this for a stopped client.
    """
    with MqttClient(broker, client_id, persistent=False, name="session"):
        pass
