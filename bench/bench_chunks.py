"""Chunked transfer: what splitting 4 MB messages into 128 KiB chunks costs, end to end.

Two fededge MqttClients on a private Mosquitto: one publishes N messages of SIZE bytes (QoS 1,
not retained, as updates are), the other takes whole messages from its inbox. Measured with no
limit (one message each) and with ``max_message_bytes = 131072`` (AWS IoT Core's limit:
chunked, reassembled, SHA-256 checked); plus split + reassemble in-process (no broker).

    python bench/bench_chunks.py [--messages 50] [--size 4000000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fededge.mqtt import MqttClient
from fededge.protocol.chunks import Reassembler, decode_chunk, split
from fededge.testing.broker import Mosquitto

MiB = 1024 * 1024


def one_run(m: Mosquitto, n: int, size: int, limit: int | None) -> float:
    """Seconds from the first publish to the last whole message taken."""
    payloads = [uuid.uuid4().bytes * (size // 16) for _ in range(n)]
    topic = f"bench/{uuid.uuid4().hex[:6]}"
    settings = m.settings()
    rx = MqttClient(settings, f"rx-{uuid.uuid4().hex[:6]}", persistent=False)
    tx = MqttClient(settings, f"tx-{uuid.uuid4().hex[:6]}", persistent=False)
    tx.max_message_bytes = limit
    with rx, tx:
        rx.subscribe(topic, qos=1)
        t0 = time.perf_counter()
        for p in payloads:
            tx.publish(topic, p, qos=1)
        for p in payloads:
            got = rx.messages.get(timeout=60)
            assert got.payload == p
        return time.perf_counter() - t0


def in_process(size: int, limit: int) -> float:
    payload = uuid.uuid4().bytes * (size // 16)
    t0 = time.perf_counter()
    chunks, _ = split(payload, limit)
    r = Reassembler(max_transfer_bytes=1 << 30, max_bytes=1 << 30)
    out = None
    for c in chunks:
        out = r.add("t", decode_chunk(c, max_transfer_bytes=1 << 30), 0.0, deliver=True)
    assert out == payload
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--messages", type=int, default=50)
    ap.add_argument("--size", type=int, default=4_000_000)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        # a chunked 4 MB message is 31 messages: the default queue cap (1000) would drop some
        m = Mosquitto(Path(tmp) / "b", max_inflight_messages=40, max_queued_messages=100_000)
        m.start()
        try:
            for limit in (None, 131_072):
                runs = [one_run(m, a.messages, a.size, limit) for _ in range(a.repeats)]
                s = statistics.median(runs)
                print(f"limit={limit}: {a.messages} x {a.size} B in {s:.3f} s (median of "
                      f"{a.repeats}) = {a.messages * a.size / MiB / s:.0f} MiB/s, "
                      f"{a.messages / s:.1f} msg/s")  # fmt: skip
        finally:
            m.stop()
    runs = [in_process(a.size, 131_072) for _ in range(max(5, a.repeats))]
    s = statistics.median(runs)
    print(f"split + reassemble in-process, {a.size} B at 131072: {s * 1000:.1f} ms "
          f"({a.size / MiB / s:.0f} MiB/s)")  # fmt: skip


if __name__ == "__main__":
    main()
