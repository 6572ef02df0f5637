"""What a client receives: the ``Message`` record and the bounded ``Inbox`` it waits in."""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

#: Messages an inbox holds by default. QoS>0 messages are bounded well below this by the
#: broker's in-flight window (see ``Inbox``), so it is mostly room for QoS 0 bursts.
DEFAULT_INBOX = 1000
#: Payload bytes an inbox holds by default: 64 updates of 1M float32 parameters.
DEFAULT_INBOX_BYTES = 256 * 1024 * 1024
#: ``Inbox.linger`` sleeps in this many steps of its delay.
LINGER_STEPS = 5
#: ``Inbox.linger`` stops once a group holds this many payload bytes: per-group costs (an
#: fsync or a checkpoint, a few system calls and thread wake-ups) are then small against the
#: group's own work (folding 16 MiB of updates takes ~12 ms here). 16 rather than 4 MiB:
#: paired runs at 100k parameters, wall 0.96x and CPU per update 0.92x (groups of ~40
#: updates instead of ~10, one checkpoint each).
LINGER_BYTES = 16 * 1024 * 1024


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
    #: What the inbox's ``prepare`` hook made of a large payload on the network thread (None
    #: for small payloads, without a hook, or if the hook gave nothing).
    prepared: object = dataclasses.field(default=None, repr=False, compare=False)


#: Payloads from this size on are handed to an inbox's ``prepare`` hook. Not smaller: a GIL
#: hand-off per message on the network thread costs more than the cache saves (aggregator,
#: paired runs: 100k parameters, 400 KB, wall 1.03x and CPU 1.06x; see docs/decisions.md).
PREPARE_MIN = 1024 * 1024


class Inbox(queue.Queue[Message]):
    """The received messages of one client, in order, bounded: back-pressure, not memory growth.

    paho's network thread offers, the application takes (``get``/``get_nowait``), as from any
    ``queue.Queue``. Every QoS>0 message is acknowledged to the broker only once it is taken
    (or, with ``manual_ack``, once the application acks it). The broker's in-flight window
    (Mosquitto's ``max_inflight_messages``, an MQTT 5 client's Receive Maximum) does **not**
    bound what waits here. Quirk, measured on Mosquitto 2.0.11 with ``max_inflight_messages
    40``, MQTT 5 and 3.1.1 alike: a subscriber that acknowledges in groups while publishing
    receives far more than 40 unacknowledged messages (over 1,000 seen). So this inbox is the
    bound, in messages (``maxsize``) and in payload bytes (``max_bytes``; one message larger
    than that is still taken when the inbox is empty), and further messages wait in the
    broker's own bounded queue (``max_queued_messages``/``max_queued_bytes``).

    Two rules keep it there:

    - a QoS>0 message that finds the inbox full **blocks** the network thread until the
      application has taken a quarter of it (paho reads and writes nothing meanwhile: TCP
      back-pressure up to the broker). It cannot be dropped: it is acknowledged when taken, and
      the broker would not resend it in this session. Waiting for a quarter, not for one
      message, keeps the two threads from handing the interpreter to each other per message. A
      thread that waits for a PUBACK or SUBACK meanwhile waits until that much is taken.
    - a QoS 0 message is taken only while the inbox is less than half full, and otherwise
      **dropped** and counted (``dropped``). QoS 0 promises nothing, the broker does not limit
      it, and blocking for it would let any publisher stall this connection: keep-alives and the
      PUBACKs a publisher waits for are read by the same thread.
    """

    def __init__(
        self,
        maxsize: int = DEFAULT_INBOX,
        *,
        max_bytes: int = DEFAULT_INBOX_BYTES,
        on_take: Callable[[Message], None] | None = None,
    ) -> None:
        if maxsize < 2:
            raise ValueError(f"an inbox needs room for at least 2 messages, got {maxsize}")
        if max_bytes < 1:
            raise ValueError(f"an inbox needs room for at least 1 byte, got {max_bytes}")
        super().__init__(maxsize)
        self.max_bytes = max_bytes
        self.qos0_limit = maxsize // 2
        self.nbytes = 0  # payload bytes waiting
        self.dropped = 0  # QoS 0 messages dropped because the inbox was half full
        self.blocked = threading.Event()  # set while the network thread waits for room
        self._on_take = on_take
        self._room = threading.Condition(self.mutex)  # notified by _get at the low-water mark
        self._waiting = False
        self._low = maxsize - max(1, maxsize // 4)
        self._low_bytes = max_bytes - max_bytes // 4
        #: ``prepare(topic, payload)``, run on the network thread for each payload of at least
        #: ``PREPARE_MIN`` bytes before it is queued; its result becomes ``Message.prepared``.
        #: For work that reads a large payload: right after the socket read it is still in
        #: the CPU's cache, by the time the application takes it often not (the aggregator's
        #: norm of a 4 MB update: ~0.25 ms against ~0.9 ms). An exception in it is logged and
        #: the message queued unprepared: the application must not depend on it.
        self.prepare: Callable[[str, bytes], object] | None = None

    # Called by queue.Queue with ``mutex`` held.
    def _put(self, item: Message) -> None:
        self.queue.append(item)
        self.nbytes += len(item.payload)

    def _get(self) -> Message:
        item: Message = self.queue.popleft()
        self.nbytes -= len(item.payload)
        if self._waiting and len(self.queue) <= self._low and self.nbytes <= self._low_bytes:
            self._room.notify()
        return item

    def _is_full(self) -> bool:
        n = len(self.queue)
        return n >= self.maxsize or (n > 0 and self.nbytes >= self.max_bytes)

    def full(self) -> bool:
        with self.mutex:
            return self._is_full()

    def offer(self, message: Message, abandon: Callable[[], bool]) -> bool:
        """Put ``message`` by the rules above; False if it was dropped (QoS 0) or ``abandon()``
        turned true while waiting for room (the client is closing)."""
        return not self._queue_many([message], abandon)

    def offer_many(self, messages: list[Message], abandon: Callable[[], bool]) -> list[Message]:
        """Put ``messages`` in order by the rules above; those not queued (QoS 0 dropped, or
        not queued because ``abandon()`` turned true while waiting for room)."""
        return self._queue_many(messages, abandon)

    def _prepare(self, messages: list[Message]) -> None:
        prepare = self.prepare
        if prepare is None:
            return
        for message in messages:
            if len(message.payload) >= PREPARE_MIN:
                try:
                    prepared = prepare(message.topic, message.payload)
                except Exception:
                    log.exception("prepare hook failed on a message on %s", message.topic)
                    continue
                object.__setattr__(message, "prepared", prepared)  # before anyone sees it

    def _queue_many(self, messages: list[Message], abandon: Callable[[], bool]) -> list[Message]:
        self._prepare(messages)  # outside the mutex: the application keeps taking meanwhile
        left: list[Message] = []
        with self.mutex:
            added = 0
            for i, message in enumerate(messages):
                if message.qos == 0:
                    if len(self.queue) >= self.qos0_limit:
                        self.dropped += 1
                        left.append(message)
                        continue
                elif self._is_full():
                    if added:
                        self.not_empty.notify(added)
                        added = 0
                    if not self._wait_for_room(abandon):
                        left.extend(messages[i:])
                        break
                self._put(message)
                self.unfinished_tasks += 1
                added += 1
            if added:
                self.not_empty.notify(added)
        return left

    def _wait_for_room(self, abandon: Callable[[], bool]) -> bool:
        # With ``mutex`` held; _get notifies once the application took a quarter of the inbox.
        # ``blocked`` stays set if abandoned: the next message queued clears it.
        self.blocked.set()
        self._waiting = True
        try:
            while self._is_full():
                if abandon():
                    return False
                self._room.wait(0.1)
        finally:
            self._waiting = False
        self.blocked.clear()
        return True

    def take(self, limit: int) -> list[Message]:
        """Up to ``limit`` waiting messages, oldest first, without waiting (one lock for all);
        as ``get_nowait`` for each."""
        with self.mutex:
            n = min(limit, len(self.queue))
            taken = [self._get() for _ in range(n)]
            if n:
                self.not_full.notify(n)
        if self._on_take is not None:
            for message in taken:
                self._on_take(message)
        return taken

    def linger(
        self,
        batch: list[Message],
        limit: int,
        delay: float,
        *,
        max_bytes: int = LINGER_BYTES,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], object] = time.sleep,
    ) -> None:
        """Let a group grow while messages keep arriving (group commit): sleep in steps of
        ``delay / LINGER_STEPS``, appending to ``batch`` what arrived, until it holds ``limit``
        messages or ``max_bytes`` of payload, ``delay`` has passed, or a step brings nothing.

        A step that brings nothing means the load has stopped or the broker's in-flight window
        towards this client is full (brokers that hold it, as EMQX does, send nothing more
        until the group is acknowledged), so waiting longer would only add latency. Sleeping,
        rather than waiting on the queue, lets the network thread fill the inbox without
        waking this thread (and handing it the GIL) for every message that arrives.
        """
        if delay <= 0:
            return
        step = delay / LINGER_STEPS
        deadline = clock() + delay
        nbytes = sum(len(m.payload) for m in batch)
        while len(batch) < limit and nbytes < max_bytes and clock() < deadline:
            sleep(step)
            more = self.take(limit - len(batch))
            if not more:
                return
            batch += more
            nbytes += sum(len(m.payload) for m in more)

    def get(self, block: bool = True, timeout: float | None = None) -> Message:
        message = super().get(block, timeout)
        if self._on_take is not None:
            self._on_take(message)
        return message
