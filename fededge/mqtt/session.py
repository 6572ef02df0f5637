"""The state of one client's MQTT session and the paho callbacks that keep it.

Everything here runs on paho's network thread except ``wait_suback`` and ``ack``, which the
client's callers run; the shared state is guarded by ``lock`` (``cond`` wakes waiters).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, cast

import paho.mqtt.client as paho
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from fededge.errors import TransportError
from fededge.mqtt.inbox import Inbox, Message
from fededge.mqtt.pahoclient import PahoClient, Received
from fededge.mqtt.security import refusal
from fededge.settings import BrokerSettings

# MQTT 5 DISCONNECT reason code: another connection with the same client id replaced this one.
SESSION_TAKEN_OVER = 0x8E
# Brokers that do not say so (Mosquitto 2.0.11 just closes the socket, and MQTT 3.1.1 has no
# reason codes): this many connections in a row lost within FLAP_WINDOW seconds of their
# CONNACK are taken as a takeover ping-pong with another client that has our id.
FLAP_LIMIT = 3
FLAP_WINDOW = 2.0
# QoS>0 publishes in flight: without a Receive Maximum from the broker (Mosquitto's default
# max_inflight_messages is 20, and a v3.1.1 CONNACK cannot say), and the most we take from one.
MAX_INFLIGHT = 20
MAX_INFLIGHT_V5 = 1000


def inflight_window(properties: Properties | None) -> int:
    """How many QoS>0 publishes to keep unacknowledged: the Receive Maximum of an MQTT 5
    CONNACK (Mosquitto announces its ``max_inflight_messages``), up to ``MAX_INFLIGHT_V5``;
    ``MAX_INFLIGHT`` without one (MQTT 3.1.1 has none; Mosquitto's default is 20).

    Quirk: paho 2.2 ignores the CONNACK's Receive Maximum and keeps its own limit (20 by
    default); a receiver that answers each of a group of messages with a QoS 1 receipt then
    queues half its receipts behind the other half whenever the broker allows more.
    """
    announced = getattr(properties, "ReceiveMaximum", None) if properties is not None else None
    if type(announced) is not int or announced < 1:
        return MAX_INFLIGHT
    return min(announced, MAX_INFLIGHT_V5)


class Session:
    """Connection number, subscriptions, unacknowledged messages and pending (un)subscribes."""

    def __init__(
        self, broker: BrokerSettings, addr: str, log: logging.Logger, inbox: Inbox, manual_ack: bool
    ) -> None:
        self.broker, self.addr, self.log, self.inbox = broker, addr, log, inbox
        self.manual_ack = manual_ack  # the application acks (otherwise: taking a message acks it)
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)
        self.conn = 0  # connection number, bumped at every CONNACK
        self.unacked: set[int] = set()  # mids of this connection awaiting ack()
        self.subscriptions: dict[str, int] = {}
        self.sub_results: dict[int, list[ReasonCode]] = {}
        self.bg_mids: set[int] = set()  # (un)subscribes nobody waits for
        self.pub_failures: collections.OrderedDict[paho.MQTTMessageInfo, ReasonCode] = (
            collections.OrderedDict()
        )
        self.listeners: list[Callable[[bool], None]] = []
        self.connected = threading.Event()
        self.first: TransportError | bool | None = None  # outcome of the first CONNACK
        self.closing = False
        # Set when the broker ended the connection because another client connected with our
        # id (MQTT 5 reason 0x8E); with ``exclusive`` the client then stops reconnecting.
        self.taken_over = threading.Event()
        self.exclusive = False
        self._connack_at = 0.0
        self._flaps = 0
        self.last_error = ""
        self.net_thread: int | None = None
        self.client: paho.Client | None = None

    def attach(self, client: paho.Client) -> None:
        """Make this session the receiver of ``client``'s callbacks."""
        self.client = client
        client.on_connect = self.on_connect
        client.on_disconnect = self.on_disconnect
        client.on_message = self.on_message
        client.on_subscribe = self.on_subscribe
        client.on_unsubscribe = self.on_subscribe
        client.on_publish = self.on_publish
        if isinstance(client, PahoClient):
            client.on_publish_batch = self.on_batch
        # Quirk: with an on_log callback paho formats every log line it makes, several per
        # packet (with str() of its v5 properties); through a logger it formats nothing
        # unless the logger is enabled for the level. This one is for errors, and for
        # everything only when fededge.mqtt logs at DEBUG.
        client.on_log = None
        client.enable_logger(_PahoLog(self))  # type: ignore[arg-type]

    # --- called by the client's users ---------------------------------------------------------

    def wait_suback(self, rc: MQTTErrorCode, mid: int | None, what: str) -> list[ReasonCode]:
        """The reason codes of the (UN)SUBACK for ``mid``, or TransportError."""
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
            raise TransportError(f"cannot {what}: {paho.error_string(rc)}")
        # The SUBACK may be handled before we get here; on_subscribe keeps results until taken.
        timeout = self.broker.connect_timeout
        with self.cond:
            got = self.cond.wait_for(lambda: mid in self.sub_results or self.closing, timeout)
            if mid in self.sub_results:
                return self.sub_results.pop(mid)
            self.bg_mids.add(mid)  # a late answer is dropped, not handed to a reused mid
        why = "client closed" if got else f"no answer within {timeout:g} s"
        raise TransportError(f"cannot {what} at {self.addr}: {why}")

    def wait_published(self, info: paho.MQTTMessageInfo, what: str, timeout: float | None) -> None:
        """Wait for the PUBACK of ``info`` (``timeout=None``: until closed); TransportError if
        none comes or the broker refused the message."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not info.is_published():
            if self.closing:
                raise TransportError(f"publish to {what} aborted: client closed")
            left = 0.5 if deadline is None else min(0.5, deadline - time.monotonic())
            if left <= 0:
                raise TransportError(f"no PUBACK from {self.addr} for {what} within {timeout} s")
            info.wait_for_publish(left)
        with self.lock:
            failure = self.pub_failures.pop(info, None)
        if failure is not None:
            raise TransportError(f"broker {self.addr} refused publish to {what}: {failure}")

    def ack_many(self, messages: list[Message]) -> None:
        """``ack`` each of ``messages``, in order, under one hold of the lock; the PUBACKs of
        QoS 1 messages queued as one packet (``PahoClient.queue_pubacks``: the same bytes)."""
        with self.lock:
            client = self.client
            if not isinstance(client, PahoClient) or any(m.qos == 2 for m in messages):
                for message in messages:
                    self._ack_locked(message)
                return
            mids = [m.mid for m in messages if self._ack_due(m)]
            rc = client.queue_pubacks(mids)
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                raise TransportError(f"cannot acknowledge {len(mids)} message(s): "
                                     f"{paho.error_string(rc)}")  # fmt: skip

    def ack(self, message: Message) -> None:
        """Send the PUBACK of a QoS>0 message, if it came on the current connection.

        After a reconnect the broker redelivers every unacknowledged message and reuses freed
        ids, so acking a stale id could acknowledge a different message before it is processed.
        """
        # Held while queueing the PUBACK: on_disconnect takes the same lock before paho goes on
        # to reconnect (which walks its packet queue), so the check and the append are one step
        # with respect to a connection change.
        with self.lock:
            self._ack_locked(message)

    def _ack_due(self, message: Message) -> bool:
        """Whether a PUBACK is to be sent for ``message`` now (lock held): QoS>0, not yet
        acknowledged, and on the current connection (the id then leaves ``unacked``)."""
        if message.qos == 0 or self.client is None:
            return False
        current = message._conn == self.conn and message.mid in self.unacked
        if current:
            self.unacked.discard(message.mid)
        if not current or not self.connected.is_set():
            self.log.debug("not acking mid %d of %s: connection changed", message.mid,
                           message.topic)  # fmt: skip
            return False
        return True

    def _ack_locked(self, message: Message) -> None:
        if not self._ack_due(message):
            return
        assert self.client is not None
        rc = self.client.ack(message.mid, message.qos)
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise TransportError(f"cannot acknowledge {message.topic!r}: {paho.error_string(rc)}")

    # --- paho callbacks (network thread) ------------------------------------------------------

    def on_connect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: paho.ConnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        try:
            if reason.is_failure:
                msg = refusal(self.addr, reason.getName())
                self.log.error("%s", msg)
                with self.cond:
                    if self.first is None:
                        self.first = TransportError(msg)
                        self.cond.notify_all()
                return
            session = bool(flags.session_present)
            self.net_thread = threading.get_ident()
            # paho's setter refuses on a live connection; paho reads the limit only when it
            # sends, and resends the session's messages after this callback.
            client._max_inflight_messages = inflight_window(properties)
            with self.cond:
                self.conn += 1
                self.unacked.clear()
                subs = [] if session else list(self.subscriptions.items())
                listeners = list(self.listeners)
                reconnect = self.first is True
                self.first = True
                self.cond.notify_all()
            self._connack_at = time.monotonic()
            self.connected.set()
            if reconnect:
                self.log.info("reconnected to %s (session present: %s)", self.addr, session)
            for topic_filter, qos in subs:
                # The broker forgot our subscriptions (new or expired session): renew them.
                # Nobody can wait for this SUBACK here, on the network thread.
                rc, mid = client.subscribe(topic_filter, qos)
                if rc == MQTTErrorCode.MQTT_ERR_SUCCESS and mid is not None:
                    with self.lock:
                        self.bg_mids.add(mid)
            for fn in listeners:
                try:
                    fn(session)
                except Exception:
                    self.log.exception("connect listener %r failed", fn)
        except Exception:
            self.log.exception("internal error handling CONNACK")

    def on_disconnect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: paho.DisconnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        with self.lock:  # see ack(): no PUBACK is queued once this has run
            self.connected.clear()
        why = reason.getName()
        quick = time.monotonic() - self._connack_at < FLAP_WINDOW
        self._flaps = self._flaps + 1 if quick and not self.closing else 0
        said = flags.is_disconnect_packet_from_server and reason.value == SESSION_TAKEN_OVER
        if said or self._flaps >= FLAP_LIMIT:
            self.taken_over.set()
            if not said:
                self.log.error("%d connections in a row to %s lost within %g s of being "
                               "accepted: another client is probably using our client id",
                               self._flaps, self.addr, FLAP_WINDOW)  # fmt: skip
            if self.exclusive:
                # Reconnecting would take the session back from the other client, which does
                # the same: two processes kicking each other off every second. Stop instead.
                # Quirk: paho has no public switch; loop_forever reads this flag right after
                # the disconnect callback (disconnect() here would be overridden by the
                # CONNECTION_LOST state it sets afterwards).
                client._reconnect_on_failure = False
                self.log.error("broker %s: another client connected with our client id "
                               "(session taken over); not reconnecting", self.addr)  # fmt: skip
                with self.cond:
                    self.cond.notify_all()
                return
        if flags.is_disconnect_packet_from_server:
            why = f"broker sent DISCONNECT: {why}"
        elif why == "Unspecified error":
            # paho reports every lost socket as "Unspecified error"; its last error log line,
            # if any, says more (e.g. the TLS alert).
            why = "connection lost" + (f" ({self.last_error})" if self.last_error else "")
        elif self.last_error:
            why = f"{why} ({self.last_error})"
        self.last_error = ""
        with self.cond:
            first_pending = self.first is None
            if first_pending:
                self.first = TransportError(
                    f"connection to {self.addr} closed before CONNACK: {why} "
                    "(TLS client certificate or protocol version refused?)"
                )
            self.cond.notify_all()
        if self.closing or first_pending:
            self.log.debug("disconnected from %s: %s", self.addr, why)
        else:
            b = self.broker
            self.log.warning("lost connection to %s: %s; reconnecting (backoff %g-%g s)",
                             self.addr, why, b.reconnect_min_delay, b.reconnect_max_delay)  # fmt: skip

    def on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        # paho runs with manual acks for every client: a QoS>0 message is acknowledged when the
        # application takes it from the inbox (or acks it itself), never here (see Inbox).
        try:
            try:
                topic = msg.topic
            except UnicodeDecodeError:
                # paho raises on access; drop (and ack, so it is not redelivered forever).
                self.log.warning("dropping message with a non-UTF-8 topic %r", msg._topic)
                if msg.qos > 0:
                    client.ack(msg.mid, msg.qos)
                return
            with self.lock:
                conn = self.conn
                if msg.qos > 0:
                    self.unacked.add(msg.mid)
            # bytes, or with in_place_payloads a large payload's own bytearray (pahoclient.py)
            payload = msg.payload
            if type(payload) is not bytearray:
                payload = bytes(payload)  # no copy if it is bytes already
            message = Message(topic, cast(bytes, payload), msg.qos, bool(msg.retain), msg.mid,
                              bool(msg.dup), conn)  # fmt: skip
            if not self.inbox.offer(message, lambda: self.closing):
                self._not_queued(message)
        except Exception:
            self.log.exception("internal error handling a message on %r", msg._topic)

    def on_batch(self, batch: list[Received]) -> None:
        """``on_message`` for a batch of PUBLISHes read at once (pahoclient.py): one lock, one
        offer, one wake-up of the reader."""
        try:
            with self.lock:
                conn = self.conn
                unacked = self.unacked
                for r in batch:
                    if r.qos:
                        unacked.add(r.mid)
            messages = [Message(r.topic, r.payload, r.qos, r.retain, r.mid, r.dup, conn)
                        for r in batch]  # fmt: skip
            before = self.inbox.dropped
            for message in self.inbox.offer_many(messages, lambda: self.closing):
                before += message.qos == 0
                self._not_queued(message, before)
        except Exception:
            self.log.exception("internal error handling %d messages", len(batch))

    def _not_queued(self, message: Message, dropped: int | None = None) -> None:
        """Log a message the inbox did not take; ``dropped``: the inbox's count of dropped
        QoS 0 messages with this one (after a batch the inbox's own count is further on)."""
        if message.qos > 0:
            # Only when closing: unacknowledged, so a persistent session gets it again.
            self.log.debug("closing: left %s unacknowledged", message.topic)
            return
        if dropped is None:
            dropped = self.inbox.dropped
        if dropped == 1 or dropped % 1000 == 0:
            self.log.warning(
                "inbox half full (%d messages): dropped %d QoS 0 message(s) so far, last on %s",
                self.inbox.qsize(), dropped, message.topic,
            )  # fmt: skip

    def on_subscribe(
        self,
        client: paho.Client,
        userdata: Any,
        mid: int,
        reason_codes: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        with self.cond:
            if mid in self.bg_mids:
                self.bg_mids.discard(mid)
                background = True
            else:
                self.sub_results[mid] = list(reason_codes)
                self.cond.notify_all()
                background = False
        if background and any(rc.is_failure for rc in reason_codes):
            self.log.error("broker %s refused a renewed (un)subscription: %s",
                           self.addr, ", ".join(map(str, reason_codes)))  # fmt: skip

    def on_publish(
        self,
        client: paho.Client,
        userdata: Any,
        mid: int,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if not reason.is_failure:
            return
        self.log.warning("broker %s refused publish (mid %d): %s", self.addr, mid, reason)
        # paho calls this holding _out_message_mutex with the message still in _out_messages;
        # keying on its info object (not the reusable mid) lets publish(wait=True) find it.
        out = client._out_messages.get(mid)
        if out is not None:
            with self.lock:
                self.pub_failures[out.info] = reason
                while len(self.pub_failures) > 256:
                    self.pub_failures.popitem(last=False)

    def on_log(self, level: int, buf: str) -> None:
        """A line of paho's log (``level`` as in ``logging``): its last error is kept for the
        disconnect message, everything goes to our log at DEBUG."""
        if level >= logging.ERROR:
            self.last_error = buf
        self.log.debug("paho: %s", buf)


class _PahoLog:
    """What paho needs of a ``logging.Logger`` (``log``), formatting only what is used."""

    def __init__(self, session: Session) -> None:
        self._session = session

    def log(self, level: int, fmt: str, *args: Any) -> None:
        s = self._session
        if level >= logging.ERROR or s.log.isEnabledFor(logging.DEBUG):
            s.on_log(level, fmt % args if args else fmt)
