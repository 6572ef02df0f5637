"""Chunked transfer, pure: the chunk format, its test vector and the reassembler's bounds."""

from __future__ import annotations

import dataclasses
import hashlib
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fededge.mqtt import Message
from fededge.protocol.chunks import (
    OVERHEAD,
    Chunk,
    ChunkError,
    ChunkReason,
    Reassembler,
    decode_chunk,
    looks_like_chunk,
    needs_chunks,
    split,
)
from fededge.protocol.tensors import encode_tensors

LIMIT = 4096  # the smallest max_message_bytes: 3072 data bytes per chunk
SIZE = LIMIT - OVERHEAD


def _vector(name: str) -> bytes:
    text = (Path(__file__).parent.parent / "docs" / "protocol.md").read_text()
    m = re.search(rf"```vector {re.escape(name)}\n(.*?)```", text, re.S)
    assert m, name
    return bytes.fromhex("".join(m.group(1).split()))


def _reasm(**kw: object) -> Reassembler:
    args: dict[str, object] = {"max_transfer_bytes": 1 << 20, "max_bytes": 4 << 20}
    args.update(kw)
    return Reassembler(**args)  # type: ignore[arg-type]


def test_vectors() -> None:
    """protocol.md: 7000 bytes 0..255 repeating under max_message_bytes = 4096."""
    payload = bytes(i % 256 for i in range(7000))
    chunks, manifest = split(payload, LIMIT)
    assert len(chunks) == 3
    assert chunks[2] == _vector("chunk-2")
    assert manifest == _vector("chunk-manifest")
    c = decode_chunk(chunks[2], max_transfer_bytes=1 << 20)
    assert (c.index, c.count, c.length, c.size) == (2, 3, 7000, 3072)
    assert c.sha256 == hashlib.sha256(payload).hexdigest()
    assert c.transfer == c.sha256[:32]
    assert c.data == payload[6144:]


def test_only_large_messages_are_chunked() -> None:
    assert not needs_chunks(10**9, None)
    assert not needs_chunks(SIZE, LIMIT)
    assert needs_chunks(SIZE + 1, LIMIT)
    with pytest.raises(ValueError):
        needs_chunks(10, 1000)


@settings(max_examples=60, deadline=None)
@given(
    payload=st.binary(min_size=1, max_size=5 * SIZE),
    order=st.randoms(use_true_random=False),
    dups=st.integers(0, 3),
)
def test_roundtrip_any_order_with_duplicates(payload: bytes, order, dups: int) -> None:
    chunks, manifest = split(payload, LIMIT)
    for c in chunks:
        assert len(c) <= LIMIT - 100  # room for topic and MQTT header
        assert looks_like_chunk(c)
    stream = chunks + chunks[:dups]
    order.shuffle(stream)
    r = _reasm()
    got = [w for c in stream if (w := r.add("t", r.decode(c), 0.0, deliver=True)) is not None]
    # the first completion delivers; duplicates after it start a new partial (a resend)
    assert got[0] == payload
    # retained flow: nothing before the manifest, the whole message with it
    r2 = _reasm()
    for c in chunks:
        assert r2.add("m", r2.decode(c), 0.0, deliver=False) is None
    assert r2.manifest("m", r2.decode(manifest), 0.0) == payload
    assert r2.reserved_bytes == 0 and r2.transfers == 0


def test_manifest_first_then_chunks() -> None:
    payload = bytes(range(256)) * 40
    chunks, manifest = split(payload, LIMIT)
    r = _reasm()
    assert r.manifest("m", r.decode(manifest), 0.0) is None
    out = [r.add("m", r.decode(c), 0.0, deliver=False) for c in chunks]
    assert out[:-1] == [None] * (len(chunks) - 1) and out[-1] == payload


def test_never_a_mix_of_two_versions() -> None:
    """Chunks of version A and B interleave on the retained topics; the manifest decides."""
    a, b = b"A" * 9000, b"B" * 9000
    ca, _ = split(a, LIMIT)
    cb, mb = split(b, LIMIT)
    r = _reasm()
    assert r.add("m", r.decode(ca[0]), 0.0, deliver=False) is None
    assert r.add("m", r.decode(cb[1]), 0.0, deliver=False) is None
    assert r.manifest("m", r.decode(mb), 0.0) is None  # B wanted, incomplete
    assert r.add("m", r.decode(ca[1]), 0.0, deliver=False) is None  # A complete? not wanted
    assert r.add("m", r.decode(ca[2]), 0.0, deliver=False) is None
    assert r.add("m", r.decode(cb[0]), 0.0, deliver=False) is None
    assert r.add("m", r.decode(cb[2]), 0.0, deliver=False) == b


def _forge(c: Chunk, index: str, data: bytes, **meta: str) -> bytes:
    import numpy as np

    md = {
        "chunk": index, "count": str(c.count), "fededge": "1", "kind": "chunk",
        "length": str(c.length), "sha256": c.sha256, "size": str(c.size), "transfer": c.transfer,
    }  # fmt: skip
    md.update(meta)
    return encode_tensors({"data": np.frombuffer(data, dtype=np.uint8)}, md)


def test_hostile_chunks_are_refused_and_counted() -> None:
    payload = b"x" * 8000
    chunks, _ = split(payload, LIMIT)
    head = decode_chunk(chunks[0], max_transfer_bytes=1 << 20)
    r = _reasm()
    bad = {
        "count": _forge(head, "0", b"x" * SIZE, count="5"),  # count != ceil(length/size)
        "index": _forge(head, "3", b"x" * SIZE),  # index past the count
        "short": _forge(head, "0", b"x" * 10),  # wrong data length
        "zero-led": _forge(head, "00", b"x" * SIZE),
        "negative": _forge(head, "-1", b"x" * SIZE),
        "transfer": _forge(head, "0", b"x" * SIZE, transfer="a/b"),
        "digest": _forge(head, "0", b"x" * SIZE, sha256="Z" * 64),
        "extra": _forge(head, "0", b"x" * SIZE, extra="1"),
        "version": _forge(head, "0", b"x" * SIZE, fededge="2"),
        "garbage": b"\x00" * 64,
    }
    for name, raw in bad.items():
        with pytest.raises(ChunkError) as ei:
            r.decode(raw)
        assert ei.value.chunk_reason == ChunkReason.MALFORMED, name
    assert r.refused[ChunkReason.MALFORMED] == len(bad)
    big = _forge(head, "0", b"x" * SIZE, length=str(2 << 20), count=str(-(-(2 << 20) // SIZE)))
    with pytest.raises(ChunkError) as ei:
        r.decode(big)
    assert ei.value.chunk_reason == ChunkReason.TOO_LARGE
    # overlap: the same index with other bytes drops the whole transfer
    r.add("u", r.decode(chunks[0]), 0.0, deliver=True)
    with pytest.raises(ChunkError) as ei:
        r.add("u", r.decode(_forge(head, "0", b"y" * SIZE)), 0.0, deliver=True)
    assert ei.value.chunk_reason == ChunkReason.OVERLAP and r.transfers == 0
    # inconsistent: a chunk of the same transfer id with another digest
    r.add("u", r.decode(chunks[0]), 0.0, deliver=True)
    with pytest.raises(ChunkError) as ei:
        r.add("u", r.decode(_forge(head, "1", b"x" * SIZE, sha256="0" * 64)), 0.0, deliver=True)
    assert ei.value.chunk_reason == ChunkReason.INCONSISTENT and r.transfers == 0
    # digest mismatch: well-formed chunks whose bytes are not what the digest says
    forged = [_forge(head, str(i), (b"y" * SIZE)[: min(SIZE, 8000 - i * SIZE)]) for i in range(3)]
    with pytest.raises(ChunkError) as ei:
        for f in forged:
            r.add("u", r.decode(f), 0.0, deliver=True)
    assert ei.value.chunk_reason == ChunkReason.DIGEST_MISMATCH
    assert r.transfers == 0 and r.reserved_bytes == 0


def test_bounds_busy_evicted_expired() -> None:
    r = _reasm(max_bytes=20_000, max_transfers=3, per_topic=2, timeout=10.0)
    firsts = [split(bytes([i]) * 9000, LIMIT)[0][0] for i in range(6)]
    r.add("a", r.decode(firsts[0]), 0.0, deliver=True)
    r.add("b", r.decode(firsts[1]), 0.0, deliver=True)
    with pytest.raises(ChunkError) as ei:  # 27,000 bytes would be reserved: over 20,000
        r.add("c", r.decode(firsts[2]), 0.0, deliver=True)
    assert ei.value.chunk_reason == ChunkReason.BUSY
    assert r.reserved_bytes == 18_000
    # per topic: a third transfer on "a" evicts the oldest there
    r2 = _reasm(per_topic=2)
    for i in range(3):
        r2.add("a", r2.decode(firsts[i]), float(i), deliver=True)
    assert r2.transfers == 2 and r2.refused[ChunkReason.EVICTED] == 1
    # endless transfer: no progress for the timeout, dropped and its bytes released
    assert r.expire(10.5) == [
        ("a", decode_chunk(firsts[0], max_transfer_bytes=1 << 20).transfer),
        ("b", decode_chunk(firsts[1], max_transfer_bytes=1 << 20).transfer),
    ]
    assert r.reserved_bytes == 0 and r.refused[ChunkReason.EXPIRED] == 2


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["a", "b"]), st.binary(max_size=400)), max_size=30))
def test_fuzzed_streams_never_crash(stream: list[tuple[str, bytes]]) -> None:
    """Random bytes and mutated real chunks: only ChunkError, and the bounds hold."""
    real, manifest = split(b"q" * 7000, LIMIT)
    r = _reasm(max_bytes=50_000, max_transfers=4)
    for i, (topic, junk) in enumerate(stream):
        raw = bytearray(junk if i % 2 else real[i % 3])
        if not i % 2 and junk:
            raw[junk[0] % len(raw)] ^= junk[-1] | 1  # flip a byte somewhere
        try:
            c = r.decode(bytes(raw))
            if c.index is None:
                r.manifest(topic, c, float(i))
            else:
                r.add(topic, c, float(i), deliver=bool(i % 3))
        except ChunkError:
            pass
        assert r.reserved_bytes <= 50_000 and r.transfers <= 4
    assert decode_chunk(manifest, max_transfer_bytes=1 << 20).index is None


def _msgs(topic: str, payloads: list[bytes], retain: bool = False, mid0: int = 1) -> list[Message]:
    return [Message(topic, p, 1, retain, mid0 + i) for i, p in enumerate(payloads)]


def test_chunked_inbox_acks_each_chunk_and_queues_only_whole_messages() -> None:
    """The network thread offers chunks: each is acked once held; the whole message carries
    the last chunk's identity, so the application's ack (the aggregator's, after its WAL)
    acknowledges that one. Nothing but whole messages waits in the queue."""
    import queue as q

    from fededge.mqtt.chunked import ChunkedInbox

    acked: list[int] = []
    inbox = ChunkedInbox(100)
    inbox.ack = lambda m: acked.append(m.mid)
    payload = bytes(range(256)) * 30
    chunks, manifest = split(payload, LIMIT)
    for m in _msgs("p/t/updates/d", chunks):
        assert inbox.offer(m, lambda: False)
    assert inbox.qsize() == 1
    whole = inbox.get(timeout=1)
    assert (whole.topic, whole.payload, whole.mid) == ("p/t/updates/d", payload, len(chunks))
    assert acked == list(range(1, len(chunks)))
    # retained: chunks on chunk topics, then the manifest on the topic; junk on a chunk topic
    # and a cleared surplus chunk are acked and swallowed; other messages pass through
    acked.clear()
    for i, m in enumerate(_msgs("", chunks, retain=True, mid0=10)):
        inbox.offer(dataclasses.replace(m, topic=f"p/t/model/chunks/{i}"), lambda: False)
    for m in (*_msgs("p/t/model/chunks/7", [b"junk", b""], retain=True, mid0=20),
              *_msgs("p/t/model", [manifest], retain=True, mid0=30),
              *_msgs("p/t/plan", [b'{"v":1}'], mid0=40)):  # fmt: skip
        inbox.offer(m, lambda: False)
    whole = inbox.get(timeout=1)
    assert (whole.topic, whole.payload, whole.mid, whole.retain) == ("p/t/model", payload, 30, True)
    assert inbox.get(timeout=1).topic == "p/t/plan"
    assert sorted(acked) == [10, 11, 12, 20, 21]
    assert inbox.reassembler.refused[ChunkReason.MALFORMED] == 1
    with pytest.raises(q.Empty):
        inbox.get(timeout=0.01)
