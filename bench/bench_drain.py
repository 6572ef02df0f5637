"""Draining a backlog: the aggregator's ingest capacity without a publisher on the same cores.

bench/bench_ingest.py times publish -> subscribe with the publisher, Mosquitto and the
subscriber on one 2-core machine, so whatever CPU the subscriber spends is taken from the
publisher, which paces the run. In a deployment the devices publish from elsewhere. This bench
takes the publisher out of the timed window: n updates are published to a persistent session
while its subscriber is disconnected (Mosquitto queues them), and the subscriber is then timed
from its connect to the n-th update handled, the broker its only competitor for the cores.

- raw: a paho subscriber (MQTT 3.1.1, ``clean_session=False``) that only counts, timed from
  ``reconnect()`` to its n-th ``on_message``;
- aggregator: ``fededge.aggregator.service.Aggregator`` on its defaults (fsync on), whose
  persistent session was made by a first start and closed; a new instance on the same state
  directory is timed from its CONNACK (the broker delivers the backlog from then on; warming
  its kernels and recovering its empty state come before the connect and are not counted) to
  its n-th durable, folded update.

Each aggregator run is paired with the raw run just before it; the ratio is the median of the
per-pair ratios (raw seconds / aggregator seconds). Writes the section "ingest-drain".

    python bench/bench_drain.py [--sizes 2410:24000,100000:3000,1000000:600] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import paho.mqtt.client as paho

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from broker import Mosquitto

from bench import bench_ingest as bi
from bench._report import machine, write_section


def _backlog(port: int, task: str, n: int, d: int) -> None:
    """Publish n updates of d parameters for ``task`` and wait until the broker has them all."""
    p, go = bi.start_publisher(port, task, n, d)
    go.set()
    p.join(600)
    if p.exitcode != 0:
        raise RuntimeError(f"publisher exited with {p.exitcode}")


def raw_drain(port: int, n: int, d: int) -> float:
    """Seconds for a counting paho subscriber to receive a backlog of n updates."""
    task = f"raw{uuid.uuid4().hex[:6]}"
    got = 0
    done = threading.Event()

    def on_message(_c: paho.Client, _u: object, _m: paho.MQTTMessage) -> None:
        nonlocal got
        got += 1
        if got == n:
            done.set()

    sub = bi.raw_subscriber(port, task, on_message, persistent=True)
    sub.disconnect()
    sub.loop_stop()
    _backlog(port, task, n, d)
    t0 = time.perf_counter()
    sub.reconnect()
    sub.loop_start()
    finished = done.wait(600)
    elapsed = time.perf_counter() - t0
    sub.loop_stop()
    sub.disconnect()
    if not finished:
        raise RuntimeError(f"raw subscriber got {got}/{n}")
    return elapsed


def aggregator_drain(port: int, n: int, d: int, state: Path) -> tuple[float, float]:
    """Seconds for a restarted aggregator to make a backlog of n updates durable and folded,
    and its CPU per update (ms) over the same interval."""
    from fededge.aggregator.service import Aggregator

    settings = bi.aggregator_task(port, n, d, state)
    task = settings.task
    first = Aggregator(settings)  # makes the persistent session and its subscriptions
    first.start(wait_for_model=30)
    first.close()
    _backlog(port, task, n, d)
    agg = Aggregator(settings)
    # Timed from the CONNACK: warming the kernels and recovery come before the connect, and
    # the broker delivers the backlog once connected (the raw run is timed from its connect).
    marks: list[tuple[float, os.times_result]] = []
    agg.start(
        wait_for_model=30, on_connected=lambda: marks.append((time.perf_counter(), os.times()))
    )
    t0, cpu0 = marks[0]

    def done() -> bool:
        if time.perf_counter() - t0 > 600:
            raise RuntimeError(f"aggregator accepted {agg.accepted_total}/{n}")
        return agg.accepted_total >= n

    agg.run(done)
    elapsed = time.perf_counter() - t0
    cpu1 = os.times()
    agg.close()
    cpu = cpu1.user - cpu0.user + cpu1.system - cpu0.system
    return elapsed, cpu / n * 1e3


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sizes", default="2410:24000,100000:3000,1000000:600",
                    help="params:updates, comma-separated")  # fmt: skip
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    sizes = [tuple(int(x) for x in part.split(":")) for part in args.sizes.split(",")]
    load0 = os.getloadavg()
    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        broker = Mosquitto(Path(tmp) / "mosquitto", max_queued_messages=100_000,
                           max_inflight_messages=40, env=bi.broker_env())  # fmt: skip
        broker.start()
        try:
            for d, n in sizes:
                raws, aggs, ratios, cpus = [], [], [], []
                for r in range(args.repeats):
                    bi._settle()
                    raws.append(raw_drain(broker.port, n, d))
                    bi._settle()
                    secs, cpu = aggregator_drain(broker.port, n, d, Path(tmp) / f"s{d}-{r}")
                    bi._settle(Path(tmp) / f"s{d}-{r}")
                    aggs.append(secs)
                    cpus.append(cpu)
                    ratios.append(raws[-1] / secs)
                    print(f"{d} params, run {r}: raw {raws[-1]:.2f}s aggregator {secs:.2f}s "
                          f"ratio {ratios[-1]:.2f}", file=sys.stderr)  # fmt: skip
                raw_s, agg_s = statistics.median(raws), statistics.median(aggs)
                lines.append(
                    f"| {d:,} | {n:,} | {n / raw_s:,.0f} | {n / agg_s:,.0f} | "
                    f"{statistics.median(cpus):.3f} ms | **{statistics.median(ratios):.2f}** "
                    f"({min(ratios):.2f}-{max(ratios):.2f}) |"
                )
        finally:
            broker.kill()
    load1 = os.getloadavg()
    table = "\n".join(lines)
    write_section(
        "ingest-drain",
        f"""## Draining a backlog (ingest without the publisher on the same cores)

Machine: {machine()}.
Load average (1 min) {load0[0]:.1f} at the start, {load1[0]:.1f} at the end.
Command: `python bench/bench_drain.py --sizes {args.sizes} --repeats {args.repeats}`.

The updates of bench/bench_ingest.py, published to a persistent session while its subscriber
is away (Mosquitto as there: `max_inflight_messages` 40, the malloc settings of
`systemd/mosquitto-memory.conf`); the subscriber is timed from its connect until the last
update is handled: a raw paho subscriber that counts, or a restarted aggregator (fsync on,
defaults; timed from its CONNACK, after its kernels are warm) until the last update is durable
and folded. Only the broker
shares the 2 cores with it, as in a deployment where devices publish from elsewhere. Medians
of {args.repeats} pairs (raw just before aggregator); the ratio is the median of the per-pair
ratios (range in brackets), above 1 where the aggregator drains faster.

| parameters | updates | raw paho updates/s | aggregator updates/s | aggregator CPU per update | aggregator vs raw |
|---:|---:|---:|---:|---:|---:|
{table}
""",
    )
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
