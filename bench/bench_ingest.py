"""End-to-end ingest: small and large updates through Mosquitto into the aggregator, durably.

Baseline, measured in the same run on the same private broker: raw paho publish-to-subscribe
throughput of the same payloads (QoS 1, one publisher process, one subscriber that does
nothing but count). The aggregator run uses the same publisher and counts an update only when
its receipt says it is folded into fsync'ed state.

    python bench/bench_ingest.py [--sizes 2410:3000,100000:600,1000000:150] [--repeats 5]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import queue
import shutil
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from broker import Mosquitto

from bench._report import machine, write_section

if TYPE_CHECKING:
    from fededge.mqtt import MqttClient
    from fededge.settings import Settings

MiB = 1024 * 1024


def _payloads(task: str, n: int, d: int) -> list[bytes]:
    from fededge.protocol import Update

    rng = np.random.default_rng(0)
    delta = {"w": (rng.standard_normal(d) * (0.5 / np.sqrt(d))).astype(np.float32)}
    return [
        Update(
            task=task,
            device=f"d{i % 50}",
            update_id=f"u{i}",
            base_version=0,
            num_examples=32,
            delta=delta,
        ).to_bytes()
        for i in range(n)
    ]


class EventLike(Protocol):
    """A multiprocessing event, as the publisher process sees it."""

    def set(self) -> None: ...

    def wait(self, timeout: float | None = None) -> bool: ...


def start_publisher(port: int, task: str, n: int, d: int) -> tuple[mp.Process, EventLike]:
    """The publisher process, started and ready: its payloads made and its connection up
    (making 1.2 GB of payloads takes ~0.5 s, which no timed run must include). Set the
    returned event to start publishing."""
    ready, go = mp.Event(), mp.Event()
    p = mp.Process(target=_publisher,
                   args=(port, f"fededge/{task}/updates/{{device}}", task, n, d, ready, go))  # fmt: skip
    p.start()
    while not ready.wait(0.5):
        if not p.is_alive():
            raise RuntimeError(f"publisher exited with {p.exitcode} before it was ready")
    return p, go


def _publisher(
    port: int, topic_fmt: str, task: str, n: int, d: int, ready: EventLike, go: EventLike
) -> None:
    payloads = _payloads(task, n, d)
    c = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"pub-{uuid.uuid4().hex[:6]}")
    c.max_inflight_messages_set(20)
    c.max_queued_messages_set(0)
    connected = threading.Event()
    c.on_connect = lambda *_: connected.set()
    c.connect("127.0.0.1", port)
    c.loop_start()
    if not connected.wait(60):
        raise RuntimeError("publisher: no CONNACK in 60 s")
    ready.set()
    go.wait()
    infos = [
        c.publish(topic_fmt.format(device=f"d{i % 50}"), p, qos=1) for i, p in enumerate(payloads)
    ]
    for info in infos:
        info.wait_for_publish(120)
    c.loop_stop()
    c.disconnect()


def raw_subscriber(
    port: int,
    task: str,
    on_message: Callable[[paho.Client, object, paho.MQTTMessage], None],
    *,
    persistent: bool = False,
) -> paho.Client:
    """A paho subscriber to the task's updates (QoS 1), its network loop running, once the
    broker has answered its SUBACK (``persistent``: ``clean_session=False``)."""
    sub = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"sub-{task}",
                      clean_session=not persistent)  # fmt: skip
    sub.on_message = on_message
    subscribed = threading.Event()
    sub.on_subscribe = lambda *_: subscribed.set()
    sub.connect("127.0.0.1", port)
    sub.subscribe(f"fededge/{task}/updates/+", qos=1)
    sub.loop_start()
    if not subscribed.wait(60):
        raise RuntimeError("raw subscriber: no SUBACK in 60 s")
    return sub


def raw_throughput(port: int, n: int, d: int) -> tuple[float, int]:
    """Seconds from the first to the last of n messages at a counting paho subscriber."""
    task = f"raw{uuid.uuid4().hex[:6]}"
    got: list[float] = []
    done = threading.Event()
    size = len(_payloads(task, 1, d)[0])

    def on_message(_c: paho.Client, _u: object, _m: paho.MQTTMessage) -> None:
        got.append(time.perf_counter())
        if len(got) == n:
            done.set()

    sub = raw_subscriber(port, task, on_message)
    p, go = start_publisher(port, task, n, d)
    t0 = time.perf_counter()
    go.set()
    done.wait(300)
    p.join(60)
    sub.loop_stop()
    sub.disconnect()
    if len(got) < n:
        raise RuntimeError(f"raw subscriber got {len(got)}/{n}")
    return got[-1] - t0, size


def protocol_client(port: int, name: str) -> tuple[MqttClient, str]:
    """A fededge MqttClient as the aggregator has it (persistent session, manual
    acknowledgement), connected and subscribed to the updates of a new task; and that task."""
    from fededge.mqtt import MqttClient
    from fededge.settings import BrokerSettings

    task = f"{name[:3]}{uuid.uuid4().hex[:6]}"
    client = MqttClient(BrokerSettings(url=f"mqtt://127.0.0.1:{port}"), f"{name}-{task}",
                        persistent=True, manual_ack=True)  # fmt: skip
    client.connect()
    client.subscribe(f"fededge/{task}/updates/+", qos=1)
    return client, task


def floor_throughput(port: int, n: int, d: int) -> float:
    """The protocol's MQTT work without the aggregator: fededge's MqttClient with manual
    acknowledgement takes each update, publishes a receipt-sized QoS 1 message and acks it,
    in groups like the aggregator's (what any aggregator keeping the protocol must do)."""
    client, task = protocol_client(port, "floor")
    receipt = b'{"v":1,"kind":"receipt","task":"t","device":"d1","update_id":"u1",' + b" " * 100
    p, go = start_publisher(port, task, n, d)
    t0 = time.perf_counter()
    go.set()
    got = 0
    while got < n:
        batch = [client.messages.get(timeout=120)]
        while len(batch) < 20:
            try:
                batch.append(client.messages.get_nowait())
            except queue.Empty:
                break
        for m in batch:
            client.publish(f"fededge/{task}/receipts/d1", receipt, qos=1)
            client.ack(m)
        got += len(batch)
    elapsed = time.perf_counter() - t0
    p.join(60)
    client.close()
    return elapsed


def aggregator_task(port: int, n: int, d: int, state: Path, fsync: bool = True) -> Settings:
    """A new task for n updates of d parameters, initialised on the broker (plan and version
    0, as `model init`), and the aggregator's settings for it (defaults, metrics off)."""
    from fededge.protocol import ModelVersion, Plan
    from fededge.settings import load_settings
    from fededge.tasks import publish_initial

    task = f"agg{uuid.uuid4().hex[:6]}"
    settings = load_settings(None, {
        "broker": {"url": f"mqtt://127.0.0.1:{port}"}, "task": task, "state_dir": state,
        "aggregator": {"metrics": False, "fsync": fsync, "checkpoint_every": 64},
    })  # fmt: skip
    mv = ModelVersion(
        task=task, version=0, weights={"w": np.zeros(d, np.float32)}, graph_sha256="0" * 64
    )
    # 50 devices send every update: the bench measures ingest, not the device quota.
    plan = Plan(min_updates_per_version=10 * n, clip_norm=1.0, max_updates_per_device=n)
    publish_initial(settings, None, mv, plan)
    return settings


def aggregator_throughput(
    port: int, n: int, d: int, state: Path, fsync: bool, profile: Path | None = None
) -> float:
    """Seconds from the first publish until n receipts say 'accepted' (durable and folded)."""
    from fededge.aggregator.service import Aggregator

    settings = aggregator_task(port, n, d, state, fsync)
    task = settings.task
    agg = Aggregator(settings)
    agg.start(wait_for_model=30)
    p, go = start_publisher(port, task, n, d)
    cpu0 = os.times()
    t0 = time.perf_counter()
    go.set()

    # The aggregator's own loop stops at the n-th accepted update: no polling thread takes
    # the GIL from it (the raw subscriber is timed by its callback, without polling either).
    def done() -> bool:
        if time.perf_counter() - t0 > 600:
            raise RuntimeError(f"aggregator accepted {agg.accepted_total}/{n}")
        return agg.accepted_total >= n

    if profile is None:
        agg.run(done)
    else:
        import cProfile

        with cProfile.Profile() as prof:
            agg.run(done)
        prof.dump_stats(profile)
    elapsed = time.perf_counter() - t0
    cpu1 = os.times()
    LAST_CPU[0] = cpu1.user - cpu0.user + cpu1.system - cpu0.system
    p.join(60)
    agg.close()
    return elapsed


#: CPU seconds of this process (the aggregator's threads) in the last timed aggregator run,
#: from the first publish to the n-th receipt: its start-up excluded.
LAST_CPU = [0.0]


TARGETS = {2410: 0.8, 100_000: 0.8, 1_000_000: 0.9}  # issue 14: ingest with fsync vs raw


@dataclass
class Row:
    """Medians for one update size (seconds for n updates) and the per-run ratios."""

    d: int
    n: int
    size: int
    raw: float
    agg: float
    nofs: float
    ratios: list[float]
    nofs_ratio: float
    floor: float  # the protocol's MQTT work alone, vs raw (floor_throughput)


def _settle(state: Path | None = None) -> None:
    """Between timed runs: drop a run's state and write back what the page cache holds, so
    that no run pays for the writeback of the one before (the fsync-off run leaves hundreds of
    MB dirty at 1M parameters; their writeback slowed whichever run came next)."""
    if state is not None:
        shutil.rmtree(state, ignore_errors=True)
    os.sync()


def one_size(port: int, tmp: Path, n: int, d: int, repeats: int) -> Row:
    """Interleaved repeats of raw, aggregator (fsync) and aggregator (no fsync) for one size."""
    raw, agg, nofs, ratios, floor = [], [], [], [], []
    size = 0
    for r in range(repeats):
        _settle()
        secs, size = raw_throughput(port, n, d)
        raw.append(secs)
        floor.append(secs / floor_throughput(port, n, d))
        agg.append(aggregator_throughput(port, n, d, tmp / f"s{d}-{r}", True))
        _settle(tmp / f"s{d}-{r}")
        nofs.append(aggregator_throughput(port, n, d, tmp / f"n{d}-{r}", False))
        _settle(tmp / f"n{d}-{r}")
        ratios.append(raw[-1] / agg[-1])
        print(f"{d} params, run {r}: raw {raw[-1]:.2f}s aggregator {agg[-1]:.2f}s "
              f"(no fsync {nofs[-1]:.2f}s), ratio {ratios[-1]:.2f}, floor {floor[-1]:.2f}",
              file=sys.stderr)  # fmt: skip
    return Row(d, n, size, statistics.median(raw), statistics.median(agg),
               statistics.median(nofs), ratios,
               statistics.median(r / a for r, a in zip(raw, nofs, strict=True)),
               statistics.median(floor))  # fmt: skip


def broker_env(stock: bool = False) -> dict[str, str]:
    """The broker's malloc settings: those of systemd/mosquitto-memory.conf, or none."""
    from fededge.memory import BROKER_MALLOC_ENV

    return {} if stock else dict(BROKER_MALLOC_ENV)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sizes", default="2410:3000,100000:600,1000000:150",
                    help="params:updates, comma-separated")  # fmt: skip
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--state-dir", type=Path, default=None, help="on the disk to measure")
    ap.add_argument("--stock-broker", action="store_true",
                    help="Mosquitto on glibc's default malloc settings, not those of "
                    "systemd/mosquitto-memory.conf (docs/operations.md recommends them)")  # fmt: skip
    args = ap.parse_args(argv)
    sizes = [tuple(int(x) for x in part.split(":")) for part in args.sizes.split(",")]
    load0 = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory(dir=args.state_dir) as tmp:
        # The in-flight window of configs/mosquitto.conf (40): the publisher's window (MQTT 5
        # Receive Maximum); Mosquitto does not hold it towards the aggregator (see the text).
        broker = Mosquitto(Path(tmp) / "mosquitto", max_queued_messages=100_000,
                           max_inflight_messages=40, env=broker_env(args.stock_broker))  # fmt: skip
        broker.start()
        try:
            for d, n in sizes:
                rows.append(one_size(broker.port, Path(tmp), n, d, args.repeats))
        finally:
            broker.kill()
    load1 = os.getloadavg()
    lines = []
    for row in rows:
        mib = row.n * row.size / MiB
        ratio = statistics.median(row.ratios)
        target = TARGETS.get(row.d)
        verdict = "" if target is None else (" met" if ratio >= target else " **not met**")
        # Three decimals where two would round a miss up to its target (0.797 is not 0.80).
        shown = f"{ratio:.3f}" if target and ratio < target <= round(ratio, 2) else f"{ratio:.2f}"
        lines.append(
            f"| {row.d:,} | {row.size / 1024:,.0f} KiB | {row.n:,} "
            f"| {row.n / row.raw:,.0f} ({mib / row.raw:,.0f} MiB/s) "
            f"| {row.n / row.agg:,.0f} | **{shown}** ({min(row.ratios):.2f}-"
            f"{max(row.ratios):.2f}) | {row.nofs_ratio:.2f} | {row.floor:.2f} "
            f"| {'' if target is None else f'{target:.1f}'}{verdict} |"
        )
    table = "\n".join(lines)
    broker_malloc = (
        "on glibc's default malloc settings (`--stock-broker`: not as docs/operations.md "
        "recommends for large models)"
        if args.stock_broker
        else "its malloc set as `systemd/mosquitto-memory.conf` sets it "
        "(`MALLOC_MMAP_THRESHOLD_`, `MALLOC_TRIM_THRESHOLD_`; `--stock-broker` measures without)"
    )
    columns = (
        "| parameters | update | updates | raw paho updates/s | aggregator updates/s (fsync) "
        "| vs raw | vs raw, fsync off | MQTT floor vs raw | target |\n"
        "|---:|---:|---:|---:|---:|---:|---:|---:|---|"
    )
    intro = f"""Machine: {machine()}.
Load average (1/5/15 min) {load0[0]:.1f}/{load0[1]:.1f}/{load0[2]:.1f} at the start and
{load1[0]:.1f}/{load1[1]:.1f}/{load1[2]:.1f} at the end: the 2 cores are shared with other jobs,
so absolute rates swing by 2x between runs; the ratios pair each aggregator run with the raw run
just before it.
Command: `python bench/bench_ingest.py --sizes {args.sizes} --repeats {args.repeats}\
{" --stock-broker" if args.stock_broker else ""}`.
"""
    if args.stock_broker:  # the method is the section "ingest"'s: only what differs
        write_section(
            "ingest-stock-broker",
            f"""## Ingest on a stock broker

{intro}
The bench of "End-to-end ingest through Mosquitto" with the broker {broker_malloc}.
Glibc then trims the broker's heap and faults message buffers in again; the more messages the
broker holds, the more: the aggregator acknowledges after its fsync, a raw subscriber at once.

{columns}
{table}
""",
        )
        return 0
    md = f"""## End-to-end ingest through Mosquitto

{intro}
Per size: updates of that many float32 parameters from one publisher process at QoS 1
through a private Mosquitto on loopback with `max_inflight_messages 40` as in
`configs/mosquitto.conf`, {broker_malloc}. Baseline, measured in the same run just before each aggregator run:
a raw paho subscriber that only counts (it acknowledges at once). The aggregator runs on its
defaults (`group_commit_max` 500, `commit_delay` 20 ms, fsync on, state on the local disk, receipts
signed if a key is configured: none here) and counts an update only when its receipt says it is
durable and folded. Medians of {args.repeats} interleaved runs; the ratio is the median of the
per-run ratios (range in brackets).

{columns}
{table}

How the aggregator gets there (issue 14), in the order it was done:

1. *Group commit without a timer, pipelined*: a group is what has arrived when the inbox runs
   dry (no `commit_delay` wait, at most `group_commit_max`, then 100); with more updates
   waiting the group's WAL fsync runs on a sync thread while the next group is validated (its receipts and
   PUBACKs follow once durable); checkpoints are written in the background; a group's records
   go out in one `writev` (record head and payload as separate parts: no copy of the payload).
2. *Per-update Python*: a fast path for plain f32 updates in `Update.from_bytes` (it falls back
   to the general parser, so errors and reasons are unchanged), cached plan checks, one fold
   per group, receipts and WAL headers formatted directly (byte-equal to the models, tested);
   `bench/bench_ingest_core.py` measures this part without a broker.
3. *The MQTT client* (`fededge/mqtt/pahoclient.py`, shared by every fededge client): a
   read-ahead socket; every whole packet in the read-ahead buffer parsed in one loop, runs of
   PUBLISHes handed to the inbox at once (one lock, one wake-up), PUBACKs matched without
   paho's decoder and its scan of all outgoing messages; outgoing packets gathered into one
   `sendmsg`; QoS 1 publications without a `threading.Condition` each; large payloads kept in
   the buffer the socket filled (no copy); the in-flight window taken from the MQTT 5 CONNACK
   (paho ignores it). Each decides exactly as paho's own path (tests/test_mqtt_batch.py).
4. *Bounds*: Mosquitto 2.0.11 does not hold `max_inflight_messages` towards a subscriber that
   acknowledges in groups (it holds 40 while nothing is acknowledged; 40 acknowledged at once
   released 460 more), so the client's inbox bound (1,000 messages, `broker.inbox_max_bytes`
   256 MiB) is what holds, with a low-water mark so the network thread is not woken per
   message when it is full. The WAL CRC-32 is computed by ISA-L (`isal`, the same checksum as
   zlib's, ~5x faster).
5. *Fourth round*: plain f32 updates decoded by one pattern match (anything else takes the
   general parser), the small-vector norm without numba's dispatcher, staleness metrics and
   WAL records per group (main thread ~-16% per 2,410-parameter update); a 256 KiB read-ahead
   (one PUBLISH in fifty cut at the end of a read instead of one in seven); room freed by a
   run of PUBACKs given to queued receipts in one scan, and no wake-up byte written by the
   network thread to itself (paho wrote one per packet: ~45% of that thread's CPU at 2,410
   parameters); checkpoints that hold only the ids since the last append to an ids file (their
   cost no longer grows with the version); on the checkpoint path (large models) the group's
   checkpoint written from the accumulator itself, no 8 MB copy; freed large blocks kept
   mapped (`fededge/memory.py`: half the page faults per 1M-parameter update).
6. *Method*: every timed run starts with the page cache written back (`os.sync`) and the
   previous run's state removed: the fsync-off run leaves hundreds of MB dirty at 1M
   parameters, and their writeback slowed whichever run came next.
7. *Fifth round*: large packets received in place (no zeroed buffer, the rest of a body
   straight from the socket, a small read-ahead after it); checkpoints written over one of two
   slots with one `fdatasync` instead of a new file renamed into place; no system call on the
   main thread in the WAL path (each released the GIL, which the network thread then held
   for up to a switch interval). `bench/bench_ingest_ab.py` measures such changes in pairs.
8. *Sixth round*: a group's receipts and PUBACKs packed in bulk with paho's bytes (one lock
   and one queued packet per group; receipts released by the broker's PUBACKs packed the same
   way); checkpoints of large accumulators written with direct I/O (no page-cache copy or
   writeback), which every 1M-parameter group now takes; `group_commit_max` 500. The clock
   starts once the publisher has made its payloads and connected.
9. *Seventh round*: the group commit lingers while updates keep arriving (`commit_delay` 5 ms:
   steps of 1 ms, committed at the first step that brings nothing, at `group_commit_max` or at
   16 MiB). Groups of ~170 instead of ~25-47 at 2,410 parameters: CPU per update 0.78x there,
   0.88x at 100k. `bench/bench_ingest_budget.py` measures how much CPU per update an
   aggregator can spend on this machine and still reach a ratio (see its section).
10. *Eighth round, the broker*: at 1M parameters the top kernel symbol on the machine was the
   broker's `clear_page_erms`: glibc in Mosquitto trimmed its heap and faulted message buffers
   in again, 257,000 page faults per 600 updates to the aggregator against 157,000 to the raw
   subscriber (the aggregator's PUBACK follows its fsync, so the broker holds more messages at
   once). The broker now runs with the malloc settings of `systemd/mosquitto-memory.conf`,
   which operations.md recommends for large models; raw paho and the aggregator are both
   measured on it. The section "Ingest on a stock broker" has the same bench without them.
11. *Ninth round, the cache*: without the publisher on the same cores (`bench/bench_drain.py`)
   the aggregator's main thread is bound by memory at 1M parameters, reading each 4 MB update
   from memory for its norm and again for the fold. Updates of 1 MiB or more are now parsed
   and measured on the network thread right after the socket read (`Inbox.prepare`), the norm
   in ~0.25 ms instead of ~0.9: draining +4%; live, within the noise.
12. *Tenth round, CPU on a saturated machine*: at 1M parameters the 2 cores are busy for the
   whole run (`perf`: 2% idle; per update ~2.8 ms of CPU in Mosquitto, ~2.9 in the publisher,
   ~3.1 in the aggregator against ~2.1 in the raw subscriber), so the ratio follows the
   aggregator's CPU. A group of up to 8 updates is now folded in one pass over the accumulator
   whatever its size (a group of 3 was two passes, 7 three); accumulators of 2 MiB and more
   live on transparent huge pages (a direct-I/O checkpoint pins 4 pages instead of 2,048);
   `commit_delay` 20 ms (steps of 4 ms, about the gap between two 4 MB updates: groups of
   4.4 on average, against 2.1-2.6: half the checkpoints and fold passes). Paired runs, each against
   the commit before it (wall, CPU per update): one-pass fold and huge pages 0.96x / 0.94x at
   1M (8 pairs; 0.99x / 1.09x in 6 more); `commit_delay` 20 ms 0.90x / 0.81x at 1M, 0.97x /
   0.92x at 100k, 0.94x / 0.95x at 2,410.

"MQTT floor": the MQTT work the protocol requires and the raw subscriber does not do, with
nothing else: fededge's `MqttClient` with manual acknowledgement taking each update, publishing
a receipt-sized QoS 1 message and acknowledging, in groups of 20 (`floor_throughput`): four
packets per update where the raw subscriber handles two, and the PUBACK sent after the group
rather than inline. On these 2 shared cores every update's CPU in the aggregator process is
CPU the publisher (~55 µs per update at 2,410 parameters) and Mosquitto do not get.
"""
    write_section("ingest", md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
