"""Chunked transfer over MQTT: messages above the broker's limit, sent and received whole.

:class:`ChunkedInbox` sits in front of a client's :class:`~fededge.mqtt.inbox.Inbox`: chunks
and manifests are reassembled as paho's network thread receives them, by a
:class:`~fededge.protocol.chunks.Reassembler`, and acknowledged once held; the inbox only ever
holds whole messages, so the device driver and the aggregator see the same messages as on a
broker without a limit. A reassembled message carries the MQTT identity of its last chunk
(non-retained transfers) or of its manifest (retained ones), so the application's ``ack``
after processing acknowledges that one: a transfer is only "done" at the broker once the whole
message was handled.
:func:`publish_chunked` is the sending side (protocol.md, "Chunked transfer").
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from fededge.errors import TransportError
from fededge.mqtt.inbox import DEFAULT_INBOX_BYTES, Inbox, Message
from fededge.protocol.chunks import (
    MIN_MESSAGE_BYTES,
    ChunkError,
    ChunkReason,
    Reassembler,
    looks_like_chunk,
    needs_chunks,
    split,
)

log = logging.getLogger("fededge.mqtt.chunked")
CHUNKS = "/chunks/"


def chunk_topic(topic: str, index: int) -> str:
    """The retained topic of chunk ``index`` of the message retained on ``topic``."""
    return f"{topic}{CHUNKS}{index}"


def with_chunk_filters(filters: Iterable[str]) -> list[str]:
    """``filters`` plus the filter of each one's retained chunks (``{f}/chunks/+``)."""
    fs = list(filters)
    return fs + [f"{f}/chunks/+" for f in fs if not f.endswith("#")]


def effective_limit(*limits: int | None) -> int | None:
    """The smallest of the limits that are set (None: no limit, nothing is chunked)."""
    set_ = [x for x in limits if x is not None]
    return min(set_) if set_ else None


PublishOne = Callable[..., None]


def publish_chunked(
    publish_one: PublishOne,
    topic: str,
    data: bytes,
    *,
    qos: int,
    retain: bool,
    limit: int | None,
    retained_counts: dict[str, int],
    **kw: Any,
) -> None:
    """Publish ``data`` on ``topic``, in chunks if it exceeds ``limit``.

    Non-retained: the chunks, in order, on ``topic`` itself. Retained: chunk i retained on
    ``{topic}/chunks/{i}``, then the manifest retained on ``topic`` (a reader assembles only the
    chunks the manifest names, by digest), then the chunk topics the previous publication on
    ``topic`` used beyond this one's count are cleared. ``retained_counts`` remembers those
    counts (per client: a restarted publisher leaves older surplus chunks, which readers ignore).
    """
    if not needs_chunks(len(data), limit):
        publish_one(topic, data, qos=qos, retain=retain, **kw)
        old = retained_counts.pop(topic, 0) if retain else 0
        for i in range(old):
            publish_one(chunk_topic(topic, i), b"", qos=qos, retain=True, **kw)
        return
    assert limit is not None
    if qos == 0:
        raise ValueError(f"a chunked message to {topic!r} needs QoS 1 (each chunk is acked)")
    chunks, manifest = split(data, limit)
    if not retain:
        for c in chunks:
            publish_one(topic, c, qos=qos, retain=False, **kw)
        return
    for i, c in enumerate(chunks):
        publish_one(chunk_topic(topic, i), c, qos=qos, retain=True, **kw)
    publish_one(topic, manifest, qos=qos, retain=True, **kw)
    old = retained_counts.get(topic, 0)
    retained_counts[topic] = len(chunks)
    for i in range(len(chunks), old):
        publish_one(chunk_topic(topic, i), b"", qos=qos, retain=True, **kw)


@dataclasses.dataclass(frozen=True)
class ChunkLimits:
    """What a receiver holds for transfers in progress (BrokerSettings ``chunk_*``)."""

    max_transfer_bytes: int = 257 * 1024 * 1024
    max_bytes: int = 300 * 1024 * 1024
    max_transfers: int = 32
    timeout: float = 120.0


class ChunkedInbox(Inbox):
    """An inbox that holds whole messages only: chunks are reassembled as they arrive.

    paho's network thread ``offer``s every received message. A chunk or manifest goes to the
    :class:`Reassembler` and is acknowledged at once, unless it completes a message: then the
    whole message, carrying that chunk's MQTT identity, is queued like any other and
    acknowledged when taken or acked by the application (as any message). Chunks do not wait
    in the queue, so the broker's in-flight window still counts whole messages, and memory of
    partial transfers is bounded by the reassembler's limits. Refused chunks are acknowledged
    too (a broker must not redeliver a hostile stream forever), logged as ``refused chunk on
    <topic> reason=<reason>`` and counted in ``reassembler.refused`` (exported by
    :func:`register_chunk_metrics`).
    """

    def __init__(
        self,
        maxsize: int,
        *,
        max_bytes: int = DEFAULT_INBOX_BYTES,
        on_take: Callable[[Message], None] | None = None,
        limits: ChunkLimits = ChunkLimits(),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(maxsize, max_bytes=max_bytes, on_take=on_take)
        #: Acknowledges a chunk (set by the client once its session exists).
        self.ack: Callable[[Message], None] = lambda message: None
        self._clock = clock
        self._lock = threading.Lock()  # the network thread offers, the application expires
        self.reassembler = Reassembler(
            max_transfer_bytes=limits.max_transfer_bytes, max_bytes=limits.max_bytes,
            max_transfers=limits.max_transfers, timeout=limits.timeout,
        )  # fmt: skip
        self.retained_activity = 0.0  # clock() of the last retained chunk or manifest taken
        self.passthrough = False  # True: no reassembly (tools that see chunk topics as such)

    def offer(self, message: Message, abandon: Callable[[], bool]) -> bool:
        if self.passthrough or self._whole(message):
            return super().offer(message, abandon)
        with self._lock:
            whole = self._take(message)
        if whole is None:
            return True  # held (and acknowledged) or refused
        return super().offer(whole, abandon)

    def offer_many(self, messages: list[Message], abandon: Callable[[], bool]) -> list[Message]:
        if self.passthrough:
            return super().offer_many(messages, abandon)
        left: list[Message] = []
        run: list[Message] = []  # whole messages in a row, queued at once
        for message in messages:
            if self._whole(message):
                run.append(message)
                continue
            if run:
                left += super().offer_many(run, abandon)
                run = []
            if not self.offer(message, abandon):
                left.append(message)
        if run:
            left += super().offer_many(run, abandon)
        return left

    def _whole(self, message: Message) -> bool:
        # The common message (an update, a status): what _take would return unchanged, without
        # its lock and clock (read by the network thread only: the one producer).
        payload = message.payload
        return (
            not message.retain
            and bool(payload)
            and not self.reassembler.active
            and CHUNKS not in message.topic
            and not looks_like_chunk(payload)
        )

    def get(self, block: bool = True, timeout: float | None = None) -> Message:
        try:
            return super().get(block, timeout)
        except queue.Empty:
            with self._lock:  # endless transfers end even when nothing arrives
                self._expire(self._clock())
            raise

    def _expire(self, now: float) -> None:
        r = self.reassembler
        if r.transfers:
            for topic, t in r.expire(now):
                log.warning("refused chunk on %s reason=expired: transfer %s made no progress "
                            "for %g s; dropped", topic, t, r.timeout)  # fmt: skip

    def _release(self, msg: Message) -> None:
        try:
            self.ack(msg)
        except TransportError as e:  # connection gone: the broker redelivers, a duplicate
            log.debug("%s", e)

    def _take(self, msg: Message) -> Message | None:
        """``msg`` itself, the whole message it completes, or None (held or refused)."""
        r = self.reassembler
        now = self._clock()
        self._expire(now)
        base, sep, tail = msg.topic.rpartition(CHUNKS)
        # {topic}/chunks/{decimal index}: no other fededge topic ends like that (a device or
        # round named "chunks" has more levels after its name, none of them a number)
        in_chunk_topic = bool(sep) and tail.isdigit() and len(tail) <= 7
        if in_chunk_topic and not msg.payload:
            self._release(msg)  # a cleared surplus chunk of an older retained message
            return None
        if not msg.payload or not looks_like_chunk(msg.payload):
            if in_chunk_topic:
                r.refused[ChunkReason.MALFORMED] += 1
                self._refuse(msg, ChunkError("not a chunk message", ChunkReason.MALFORMED))
                return None
            if msg.retain and not msg.payload:
                r.forget(msg.topic)
            return msg
        if msg.retain:
            self.retained_activity = now
        try:
            c = r.decode(msg.payload)
            if c.index is None:
                if in_chunk_topic:
                    r.refused[ChunkReason.MALFORMED] += 1
                    raise ChunkError("a manifest on a chunk topic", ChunkReason.MALFORMED)
                whole = r.manifest(msg.topic, c, now)
                topic = msg.topic
            else:
                topic = base if in_chunk_topic else msg.topic
                whole = r.add(topic, c, now, deliver=not in_chunk_topic)
        except ChunkError as e:
            self._refuse(msg, e)
            return None
        if whole is None:
            self._release(msg)
            return None
        return Message(topic, whole, msg.qos, msg.retain, msg.mid, msg.dup, msg._conn)

    def _refuse(self, msg: Message, e: ChunkError) -> None:
        reason = str(e.chunk_reason)
        log.warning("refused chunk on %s reason=%s: %s", msg.topic, reason, e,
                    extra={"topic": msg.topic, "reason": reason})  # fmt: skip
        self._release(msg)


class _RefusedCollector:
    """Exposes a client's ``reassembler.refused`` as a Prometheus counter by reason."""

    def __init__(self, name: str, client: Callable[[], Any]) -> None:
        self._name = name
        self._client = client

    def collect(self) -> Iterable[Any]:
        from prometheus_client.core import CounterMetricFamily

        fam = CounterMetricFamily(self._name, "Chunks and chunked transfers refused, by reason "
                                  "(protocol.md, Chunked transfer)", labels=["reason"])  # fmt: skip
        client = self._client()
        refused = client.messages.reassembler.refused if client is not None else {}
        for reason in ChunkReason:
            fam.add_metric([str(reason)], float(refused.get(reason, 0)))
        yield fam


def register_chunk_metrics(registry: Any, name: str, client: Callable[[], Any]) -> None:
    """Add ``{name}_total{reason}`` to ``registry``, read from ``client()``'s reassembler."""
    registry.register(_RefusedCollector(name, client))


__all__ = [
    "MIN_MESSAGE_BYTES",
    "ChunkLimits",
    "ChunkedInbox",
    "chunk_topic",
    "effective_limit",
    "publish_chunked",
    "register_chunk_metrics",
    "with_chunk_filters",
]
