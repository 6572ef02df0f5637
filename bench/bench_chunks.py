"""Chunked transfer: what splitting 4 MB messages into 128 KiB chunks costs, end to end.

Two fededge MqttClients on a private Mosquitto: one publishes N messages of SIZE bytes (QoS 1,
not retained, as updates are), the other takes whole messages from its inbox (both in this
process). Then a real aggregator (WAL, fsync, fold) ingests 1M-parameter updates sent by a
process of their own, until the last receipt. Measured with no
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
from typing import Any

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


def _devices(url: str, task: str, limit: int | None, n: int, params: int, out: Any) -> None:
    """The sending side, in a process of its own (devices split on their own CPUs): publish
    ``n`` updates, return the seconds from the first publish to the last receipt."""
    import numpy as np

    from fededge.protocol import Receipt, Topics, Update, decode_json
    from fededge.settings import BrokerSettings

    topics = Topics("fededge", task)
    rng = np.random.default_rng(0)
    payloads = [
        Update(task=task, device="d", update_id=f"u{i}", base_version=0, num_examples=1,
               delta={"w": (rng.standard_normal(params) * 1e-4).astype(np.float32)}).to_bytes()
        for i in range(n)
    ]  # fmt: skip
    tx = MqttClient(BrokerSettings(url=url, max_message_bytes=limit), f"tx-{uuid.uuid4().hex[:6]}",
                    persistent=False)  # fmt: skip
    with tx:
        tx.subscribe(topics.receipt("d"), qos=1)
        t0 = time.perf_counter()
        for p in payloads:
            tx.publish(topics.update("d"), p, qos=1)
        got = set()
        while len(got) < n:
            r = decode_json(tx.messages.get(timeout=120).payload, Receipt)
            assert r.status == "accepted", r
            got.add(r.update_id)
        out.put(time.perf_counter() - t0)


def ingest_run(m: Mosquitto, n: int, params: int, limit: int | None, tmp: Path) -> float:
    """Seconds from the first update published to the last receipt, through a real aggregator
    (WAL with fsync, validation, fold); updates chunked by the sender when ``limit`` is set."""
    import multiprocessing as mp
    import threading

    import numpy as np

    from fededge.aggregator.service import Aggregator
    from fededge.protocol import ModelVersion, Plan
    from fededge.protocol.vocab import NO_GRAPH
    from fededge.settings import load_settings
    from fededge.tasks import publish_initial

    task = f"b{uuid.uuid4().hex[:8]}"
    settings = load_settings(None, {
        "broker": {"url": m.url, "max_message_bytes": limit}, "task": task,
        "state_dir": tmp / task, "aggregator": {"metrics": False},
    })  # fmt: skip
    w = {"w": np.zeros(params, np.float32)}
    plan = Plan(min_updates_per_version=10**6, max_updates_per_device=10**6)
    publish_initial(settings, None, ModelVersion(task=task, version=0, weights=w,
                    graph_sha256=NO_GRAPH), plan)  # fmt: skip
    agg = Aggregator(settings)
    agg.start(wait_for_model=30)
    stop = threading.Event()
    t = threading.Thread(target=lambda: agg.run(stop.is_set), daemon=True)
    t.start()
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    proc = ctx.Process(target=_devices, args=(m.url, task, limit, n, params, out))
    proc.start()
    try:
        return float(out.get(timeout=300))
    finally:
        proc.join(30)
        stop.set()
        t.join(10)
        agg.close()


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
    ap.add_argument("--updates", type=int, default=40, help="aggregator run: 1M-param updates")
    ap.add_argument("--params", type=int, default=1_000_000)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        # a chunked 4 MB message is 31 messages: the default queue cap (1000) would drop some
        m = Mosquitto(Path(tmp) / "b", max_inflight_messages=40, max_queued_messages=100_000)
        m.start()
        try:
            for limit in (None, 131_072, 1_048_576):
                runs = [one_run(m, a.messages, a.size, limit) for _ in range(a.repeats)]
                s = statistics.median(runs)
                print(f"limit={limit}: {a.messages} x {a.size} B in {s:.3f} s (median of "
                      f"{a.repeats}) = {a.messages * a.size / MiB / s:.0f} MiB/s, "
                      f"{a.messages / s:.1f} msg/s")  # fmt: skip
            for limit in (None, 131_072, 1_048_576):
                runs = [ingest_run(m, a.updates, a.params, limit, Path(tmp))
                        for _ in range(a.repeats)]  # fmt: skip
                s = statistics.median(runs)
                print(
                    f"aggregator, limit={limit}: {a.updates} updates of {a.params} params "
                    f"in {s:.3f} s (median of {a.repeats}) = {a.updates / s:.1f} updates/s"
                )
        finally:
            m.stop()
    runs = [in_process(a.size, 131_072) for _ in range(max(5, a.repeats))]
    s = statistics.median(runs)
    print(f"split + reassemble in-process, {a.size} B at 131072: {s * 1000:.1f} ms "
          f"({a.size / MiB / s:.0f} MiB/s)")  # fmt: skip


if __name__ == "__main__":
    main()
