"""Chunked transfer: split a message that is too large for the broker, reassemble it strictly.

Pure (no I/O, the clock is passed in). A message larger than the broker's limit travels as
chunk messages, each a self-describing safetensors message (``kind = "chunk"``, the reserved
``chunk`` metadata key holding its index) whose one ``U8`` tensor ``data`` is a slice of the
whole; retained messages also get a manifest (``chunk = "manifest"``, no tensor) on their own
topic. :class:`Reassembler` puts them back together with bounded memory and rejects hostile
streams with a :class:`ChunkError` naming the reason. Specified in docs/protocol.md
("Chunked transfer").
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import numpy as np

from fededge.errors import ProtocolError
from fededge.protocol.tensors import decode_tensors, encode_header, encode_tensors
from fededge.protocol.vocab import is_name

#: Bytes of a chunk message that are not data: its safetensors header (about 300 bytes) plus
#: the MQTT fixed header, packet id and topic. A topic is at most ~400 bytes (prefix, task,
#: device and ``/chunks/{i}``), so a chunk message stays within ``max_message_bytes``.
OVERHEAD = 1024
#: The smallest ``max_message_bytes`` that makes sense (a chunk must carry some data).
MIN_MESSAGE_BYTES = 4096
#: Chunks one transfer may have (bounds the per-transfer index table).
MAX_CHUNKS = 1 << 20
MANIFEST = "manifest"
_KEYS = frozenset({"chunk", "count", "fededge", "kind", "length", "sha256", "size", "transfer"})
_PREFILTER = b'"kind":"chunk"'


class ChunkReason(StrEnum):
    """Why a chunk (or a whole transfer) was refused: a log field and a metric label."""

    MALFORMED = "malformed"  # not a valid chunk message
    TOO_LARGE = "too_large"  # declared length above the receiver's limit for one transfer
    BUSY = "busy"  # no room: too many transfers in progress, or their bytes over the cap
    INCONSISTENT = "inconsistent"  # count/length/size/digest differ from earlier chunks
    OVERLAP = "overlap"  # an index seen before, with different bytes
    DIGEST_MISMATCH = "digest_mismatch"  # the reassembled bytes do not hash to sha256
    EXPIRED = "expired"  # no progress for the timeout: dropped
    EVICTED = "evicted"  # pushed out by newer transfers on the same topic


class ChunkError(ProtocolError):
    """A refused chunk or transfer; ``reason`` is a :class:`ChunkReason`."""

    def __init__(self, message: str, reason: ChunkReason) -> None:
        super().__init__(message)
        self.chunk_reason = reason


@dataclass(frozen=True)
class Chunk:
    """One decoded chunk message (``index`` is None for a manifest)."""

    transfer: str
    index: int | None
    count: int
    length: int
    size: int
    sha256: str
    data: bytes | memoryview = b""

    @property
    def shape(self) -> tuple[str, int, int, int, str]:
        """What every chunk of one transfer must agree on."""
        return (self.transfer, self.count, self.length, self.size, self.sha256)


def payload_budget(max_message_bytes: int) -> int:
    """The largest payload sent whole under ``max_message_bytes``; also the chunk data size."""
    if max_message_bytes < MIN_MESSAGE_BYTES:
        raise ValueError(
            f"max_message_bytes must be >= {MIN_MESSAGE_BYTES}, got {max_message_bytes}"
        )
    return max_message_bytes - OVERHEAD


def needs_chunks(payload_len: int, max_message_bytes: int | None) -> bool:
    """Whether a payload of ``payload_len`` bytes must be chunked under the limit."""
    return max_message_bytes is not None and payload_len > payload_budget(max_message_bytes)


def transfer_id(payload: bytes) -> str:
    """The transfer id a sender uses: the first 32 hex digits of the payload's SHA-256.

    Derived from the bytes, so a resend of the same message (an update from the outbox, a
    republished version) joins a partial transfer the receiver still holds.
    """
    return hashlib.sha256(payload).hexdigest()[:32]


def _meta(c: Chunk, index: str) -> dict[str, str]:
    return {
        "chunk": index,
        "count": str(c.count),
        "fededge": "1",
        "kind": "chunk",
        "length": str(c.length),
        "sha256": c.sha256,
        "size": str(c.size),
        "transfer": c.transfer,
    }


def split(payload: bytes, max_message_bytes: int) -> tuple[list[bytes], bytes]:
    """The chunk messages of ``payload`` in index order, and its manifest."""
    size = payload_budget(max_message_bytes)
    length = len(payload)
    if length == 0:
        raise ValueError("an empty payload is never chunked")
    digest = hashlib.sha256(payload).hexdigest()
    head = Chunk(digest[:32], None, math.ceil(length / size), length, size, digest)
    view = memoryview(payload)
    u8 = np.dtype(np.uint8)
    chunks = []
    for i in range(head.count):
        part = view[i * size : (i + 1) * size]
        chunks.append(encode_header([("data", u8, (len(part),))], _meta(head, str(i))) + part)
    return chunks, encode_tensors({}, _meta(head, MANIFEST))


def looks_like_chunk(payload: bytes) -> bool:
    """Cheap test for a chunk or manifest (sorted metadata puts ``kind`` near the start)."""
    return payload.find(_PREFILTER, 0, 1024) >= 0  # no copy of the first KiB


def _uint(meta: dict[str, str], key: str, lo: int, hi: int) -> int:
    raw = meta[key]
    if not raw.isdigit() or len(raw) > 19 or (len(raw) > 1 and raw[0] == "0"):
        raise ChunkError(
            f"chunk {key} {raw[:32]!r} is not a decimal integer", ChunkReason.MALFORMED
        )
    v = int(raw)
    if not lo <= v <= hi:
        raise ChunkError(f"chunk {key} {v} is outside [{lo}, {hi}]", ChunkReason.MALFORMED)
    return v


def decode_chunk(payload: bytes, *, max_transfer_bytes: int) -> Chunk:
    """Parse an untrusted chunk or manifest message; raise ChunkError on anything wrong."""
    try:
        tp = decode_tensors(payload, max_bytes=max_transfer_bytes + 2 * OVERHEAD)
    except ProtocolError as e:
        raise ChunkError(f"not a chunk message: {e}", ChunkReason.MALFORMED) from None
    meta = tp.metadata
    if meta.keys() != _KEYS or meta["fededge"] != "1" or meta["kind"] != "chunk":
        raise ChunkError(f"chunk metadata keys {sorted(meta)[:12]} are not the chunk's",
                         ChunkReason.MALFORMED)  # fmt: skip
    transfer, digest = meta["transfer"], meta["sha256"]
    if not is_name(transfer):
        raise ChunkError(f"bad transfer id {transfer[:70]!r}", ChunkReason.MALFORMED)
    if len(digest) != 64 or any(ch not in "0123456789abcdef" for ch in digest):
        raise ChunkError("sha256 is not 64 lowercase hex digits", ChunkReason.MALFORMED)
    length = _uint(meta, "length", 1, 1 << 62)
    if length > max_transfer_bytes:
        raise ChunkError(f"transfer of {length} bytes exceeds the limit of {max_transfer_bytes}",
                         ChunkReason.TOO_LARGE)  # fmt: skip
    size = _uint(meta, "size", 1, 1 << 62)
    count = _uint(meta, "count", 1, MAX_CHUNKS)
    if count != math.ceil(length / size):
        raise ChunkError(f"count {count} != ceil(length {length} / size {size})",
                         ChunkReason.MALFORMED)  # fmt: skip
    if meta["chunk"] == MANIFEST:
        if tp.tensors:
            raise ChunkError("a manifest carries no tensor", ChunkReason.MALFORMED)
        return Chunk(transfer, None, count, length, size, digest)
    index = _uint(meta, "chunk", 0, count - 1)
    data = tp.tensors.get("data")
    if data is None or len(tp.tensors) != 1 or data.dtype != np.uint8 or data.ndim != 1:
        raise ChunkError("a chunk carries exactly one 1-D U8 tensor 'data'", ChunkReason.MALFORMED)
    want = min(size, length - index * size)
    if data.shape[0] != want:
        raise ChunkError(f"chunk {index} holds {data.shape[0]} bytes, expected {want}",
                         ChunkReason.MALFORMED)  # fmt: skip
    # a view into the message's own bytes (no copy): the join at the end copies once
    return Chunk(transfer, index, count, length, size, digest, data.data.cast("B"))


@dataclass
class _Partial:
    head: Chunk
    touched: float
    parts: dict[int, bytes | memoryview] = field(default_factory=dict)
    # SHA-256 of chunks 0..hashed-1, fed as soon as they are contiguous: each byte is hashed
    # once, while chunks arrive, instead of in a second pass over the whole message
    hasher: Any = field(default_factory=hashlib.sha256)
    hashed: int = 0

    def feed(self) -> None:
        while self.hashed in self.parts:
            self.hasher.update(self.parts[self.hashed])
            self.hashed += 1

    @property
    def complete(self) -> bool:
        return len(self.parts) == self.head.count


@dataclass
class _Stream:
    """The transfers in progress on one topic, and (retained topics) the manifest wanted."""

    transfers: dict[str, _Partial] = field(default_factory=dict)
    wanted: Chunk | None = None


class Reassembler:
    """Bounded reassembly of chunked messages, keyed by topic.

    Memory: each transfer reserves its declared length when its first chunk arrives; at most
    ``max_transfers`` transfers and ``max_bytes`` reserved bytes in all, at most ``per_topic``
    per topic (the oldest is evicted), none larger than ``max_transfer_bytes``. A transfer
    without a new chunk for ``timeout`` seconds is dropped (:meth:`expire`). Refusals raise
    :class:`ChunkError` and are counted in ``refused`` by reason.
    """

    def __init__(
        self,
        *,
        max_transfer_bytes: int,
        max_bytes: int,
        max_transfers: int = 32,
        per_topic: int = 4,
        timeout: float = 120.0,
    ) -> None:
        self.max_transfer_bytes = max_transfer_bytes
        self.max_bytes = max_bytes
        self.max_transfers = max_transfers
        self.per_topic = per_topic
        self.timeout = timeout
        self.refused: Counter[str] = Counter()
        self.completed = 0
        self._streams: dict[str, _Stream] = {}
        self._reserved = 0

    @property
    def reserved_bytes(self) -> int:
        return self._reserved

    @property
    def transfers(self) -> int:
        return sum(len(s.transfers) for s in list(self._streams.values()))

    @property
    def active(self) -> bool:
        """Whether any transfer is in progress (``transfers`` > 0), cheaply when none is."""
        return bool(self._streams) and self.transfers > 0

    def _fail(self, reason: ChunkReason, message: str) -> ChunkError:
        self.refused[reason] += 1
        return ChunkError(message, reason)

    def _drop(self, topic: str, transfer: str) -> None:
        s = self._streams.get(topic)
        if s is None:
            return
        p = s.transfers.pop(transfer, None)
        if p is not None:
            self._reserved -= p.head.length
        if not s.transfers and s.wanted is None:
            del self._streams[topic]

    def decode(self, payload: bytes) -> Chunk:
        """Decode a chunk or manifest, counting a refusal."""
        try:
            return decode_chunk(payload, max_transfer_bytes=self.max_transfer_bytes)
        except ChunkError as e:
            self.refused[e.chunk_reason] += 1
            raise

    def add(self, topic: str, c: Chunk, now: float, *, deliver: bool) -> bytes | None:
        """Take chunk ``c`` of a transfer on ``topic``; the whole message once it is complete
        and (``deliver=False``: retained chunks) its manifest has arrived, else None."""
        assert c.index is not None
        s = self._streams.setdefault(topic, _Stream())
        p = s.transfers.get(c.transfer)
        if p is None:
            self._make_room(topic, s, c, now)
            p = s.transfers[c.transfer] = _Partial(c, now)
            self._reserved += c.length
        elif p.head.shape != c.shape:
            self._drop(topic, c.transfer)
            raise self._fail(ChunkReason.INCONSISTENT,
                             f"chunk {c.index} of transfer {c.transfer} disagrees with its first "
                             "chunk (count, length, size or digest); transfer dropped")  # fmt: skip
        old = p.parts.get(c.index)
        if old is not None and old != c.data:
            self._drop(topic, c.transfer)
            raise self._fail(ChunkReason.OVERLAP, f"chunk {c.index} of transfer {c.transfer} "
                             "sent twice with different bytes; transfer dropped")  # fmt: skip
        p.parts[c.index] = c.data
        p.feed()
        p.touched = now
        if deliver or (s.wanted is not None and s.wanted.shape == c.shape):
            return self._finish(topic, s, p)
        return None

    def manifest(self, topic: str, m: Chunk, now: float) -> bytes | None:
        """A retained manifest arrived on ``topic``: the whole message if its chunks are all
        here (checked against the manifest's digest), else None (it is delivered by the chunk
        that completes it)."""
        s = self._streams.setdefault(topic, _Stream())
        s.wanted = m
        p = s.transfers.get(m.transfer)
        if p is None:
            return None
        if p.head.shape != m.shape:
            self._drop(topic, m.transfer)
            raise self._fail(
                ChunkReason.INCONSISTENT,
                f"manifest of transfer {m.transfer} disagrees with its chunks",
            )
        p.touched = now
        return self._finish(topic, s, p)

    def forget(self, topic: str) -> None:
        """A retained message was cleared: drop its wanted manifest (not its partials)."""
        s = self._streams.get(topic)
        if s is not None:
            s.wanted = None
            if not s.transfers:
                del self._streams[topic]

    def _finish(self, topic: str, s: _Stream, p: _Partial) -> bytes | None:
        if not p.complete:
            return None
        head = p.head
        ok = p.hasher.hexdigest() == head.sha256
        whole = b"".join(p.parts[i] for i in range(head.count)) if ok else b""
        self._drop(topic, head.transfer)
        if s.wanted is not None and s.wanted.transfer == head.transfer:
            s.wanted = None
            if not s.transfers:
                self._streams.pop(topic, None)
        if not ok:
            raise self._fail(ChunkReason.DIGEST_MISMATCH,
                             f"transfer {head.transfer} reassembled to bytes whose SHA-256 is not "
                             f"{head.sha256}; dropped")  # fmt: skip
        self.completed += 1
        return whole

    def _make_room(self, topic: str, s: _Stream, c: Chunk, now: float) -> None:
        self.expire(now)
        while len(s.transfers) >= self.per_topic:
            victim = min(
                (p for p in s.transfers.values()
                 if s.wanted is None or p.head.transfer != s.wanted.transfer),
                key=lambda p: p.touched, default=None,
            )  # fmt: skip
            if victim is None:
                break
            self._drop(topic, victim.head.transfer)
            self.refused[ChunkReason.EVICTED] += 1
        if self.transfers >= self.max_transfers or self._reserved + c.length > self.max_bytes:
            if not s.transfers and s.wanted is None:
                self._streams.pop(topic, None)
            raise self._fail(
                ChunkReason.BUSY,
                f"no room for transfer {c.transfer} of {c.length} bytes: "
                f"{self.transfers} transfers hold {self._reserved} of "
                f"{self.max_bytes} bytes (limit {self.max_transfers} transfers)",
            )

    def expire(self, now: float) -> list[tuple[str, str]]:
        """Drop transfers without progress for ``timeout`` s; (topic, transfer) of each."""
        gone = [
            (topic, t)
            for topic, s in self._streams.items()
            for t, p in s.transfers.items()
            if now - p.touched > self.timeout
        ]
        for topic, t in gone:
            self._drop(topic, t)
            self.refused[ChunkReason.EXPIRED] += 1
        return gone
