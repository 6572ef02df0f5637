"""What a client receives: the ``Message`` record and the bounded ``Inbox`` it waits in."""

from __future__ import annotations

import dataclasses
import queue
import threading
from collections.abc import Callable

#: Messages an inbox holds by default. QoS>0 messages are bounded well below this by the
#: broker's in-flight window (see ``Inbox``), so it is mostly room for QoS 0 bursts.
DEFAULT_INBOX = 1000


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


class Inbox(queue.Queue[Message]):
    """The received messages of one client, in order, bounded: back-pressure, not memory growth.

    paho's network thread puts, the application takes (``get``/``get_nowait``), as from any
    ``queue.Queue``. Every QoS>0 message is acknowledged to the broker only once it is taken
    (or, with ``manual_ack``, once the application acks it), so the broker never has more of
    them in flight to this client than its in-flight window (Mosquitto's
    ``max_inflight_messages``: 20 by default, 40 in configs/mosquitto.conf; an MQTT 5 client's
    Receive Maximum): that window is the real bound, and further messages wait in the broker's
    own bounded queue (``max_queued_messages``/``max_queued_bytes``).

    Past that, two rules keep the inbox at ``maxsize``:

    - a QoS>0 message that finds the inbox full **blocks** the network thread until there is
      room (paho reads and writes nothing meanwhile: TCP back-pressure up to the broker). It
      cannot be dropped: it is acknowledged when taken, and the broker would not resend it in
      this session. This only happens if the broker's window exceeds ``maxsize // 2``, and a
      thread that waits for a PUBACK or SUBACK then waits until a message is taken.
    - a QoS 0 message is taken only while the inbox is less than half full, and otherwise
      **dropped** and counted (``dropped``). QoS 0 promises nothing, the broker does not limit
      it, and blocking for it would let any publisher stall this connection: keep-alives and the
      PUBACKs a publisher waits for are read by the same thread.
    """

    def __init__(
        self, maxsize: int = DEFAULT_INBOX, *, on_take: Callable[[Message], None] | None = None
    ) -> None:
        if maxsize < 2:
            raise ValueError(f"an inbox needs room for at least 2 messages, got {maxsize}")
        super().__init__(maxsize)
        self.qos0_limit = maxsize // 2
        self.dropped = 0  # QoS 0 messages dropped because the inbox was half full
        self.blocked = threading.Event()  # set while the network thread waits for room
        self._on_take = on_take

    def offer(self, message: Message, abandon: Callable[[], bool]) -> bool:
        """Put ``message`` by the rules above; False if it was dropped (QoS 0) or ``abandon()``
        turned true while waiting for room (the client is closing)."""
        if message.qos == 0:
            # One producer (the network thread): the size cannot grow between check and put.
            if self.qsize() >= self.qos0_limit:
                self.dropped += 1
                return False
            self.put_nowait(message)
            return True
        while True:
            try:
                self.put(message, timeout=0.1)
            except queue.Full:
                self.blocked.set()
                if abandon():
                    return False
            else:
                self.blocked.clear()
                return True

    def get(self, block: bool = True, timeout: float | None = None) -> Message:
        message = super().get(block, timeout)
        if self._on_take is not None:
            self._on_take(message)
        return message
