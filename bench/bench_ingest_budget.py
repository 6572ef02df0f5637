"""The CPU budget of ingest: how much CPU per update an aggregator may spend and keep a ratio.

bench/bench_ingest.py compares the aggregator with a raw paho subscriber on one shared
machine: publisher, Mosquitto and subscriber compete for the same cores, so every
microsecond of CPU the aggregator spends per update is taken from the publisher and the
broker. This bench measures that trade directly. A *budget client* does the MQTT work the
protocol requires, as the aggregator does it (fededge's ``MqttClient`` with manual
acknowledgement; a batch is what has arrived, up to 500; one QoS 1 receipt per update,
published in bulk; the batch acknowledged at once) and in place of validation, the
write-ahead log and the fold it spins for ``burn`` microseconds of thread CPU per update,
holding the GIL. For each ``burn`` the ratio to a raw run just before it says what an
aggregator whose own work costs that much could reach at best; the real aggregator
(``aggregator_throughput``, fsync on) runs in the same interleaving, with its CPU per update
from the first publish to the last receipt.

    python bench/bench_ingest_budget.py [--size 2410:12000] [--burns 0,10,20,30]
        [--repeats 5]

Prints a markdown table, and the largest burn whose median ratio reaches each target
(interpolated between the measured burns).
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from broker import Mosquitto

from bench import bench_ingest as bi
from bench._report import machine, write_section


def budget_throughput(port: int, n: int, d: int, burn_us: float) -> tuple[float, float]:
    """Seconds from the first publish until n updates are answered by the budget client, and
    that client's process CPU per update (µs) over the same interval."""
    client, task = bi.protocol_client(port, "budget")
    # A receipt of the real size (an accepted receipt is ~150 bytes).
    receipt = b'{"v":1,"kind":"receipt","task":"t","device":"d1","update_id":"u1",' + b" " * 80
    topic = f"fededge/{task}/receipts/d1"
    p, go = bi.start_publisher(port, task, n, d)
    cpu0 = os.times()
    t0 = time.perf_counter()
    go.set()
    got = 0
    spin = time.thread_time
    while got < n:
        batch = [client.messages.get(timeout=120)]
        batch += client.messages.take(499)
        end = spin() + burn_us * 1e-6 * len(batch)
        while spin() < end:
            pass
        with client.batched():
            client.publish_many([(topic, receipt)] * len(batch))
            client.ack_many(batch)
        got += len(batch)
    elapsed = time.perf_counter() - t0
    cpu1 = os.times()
    cpu = cpu1.user - cpu0.user + cpu1.system - cpu0.system
    p.join(60)
    client.close()
    return elapsed, cpu * 1e6 / n


def _budget(burns: list[float], ratios: list[float], target: float) -> str:
    """The burn at which the median ratio crosses ``target`` (linear between neighbours)."""
    if ratios[0] < target:
        return f"none (below {target} with no burn)"
    for (b0, r0), (b1, r1) in itertools.pairwise(zip(burns, ratios, strict=True)):
        if r1 < target <= r0:
            return f"~{b0 + (r0 - target) * (b1 - b0) / (r0 - r1):.0f} µs"
    return f"over {burns[-1]:.0f} µs"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--size", default="2410:12000", help="params:updates")
    ap.add_argument("--burns", default="0,10,20,30", help="µs of CPU per update, comma-separated")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    d, n = (int(x) for x in args.size.split(":"))
    burns = sorted(float(b) for b in args.burns.split(","))
    arms: list[float | None] = [*burns, None]  # None: the real aggregator
    ratios: dict[float | None, list[float]] = {a: [] for a in arms}
    cpus: dict[float | None, list[float]] = {a: [] for a in arms}
    load0 = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        broker = Mosquitto(
            Path(tmp) / "mosquitto", max_queued_messages=100_000, max_inflight_messages=40
        )
        broker.start()
        try:
            for r in range(args.repeats):
                for arm in arms if r % 2 == 0 else arms[::-1]:  # ABBA: drift cancels
                    bi._settle()
                    raw, _ = bi.raw_throughput(broker.port, n, d)
                    if arm is None:
                        state = Path(tmp) / f"agg{r}"
                        secs = bi.aggregator_throughput(broker.port, n, d, state, True)
                        cpu = bi.LAST_CPU[0] * 1e6 / n
                        bi._settle(state)
                    else:
                        secs, cpu = budget_throughput(broker.port, n, d, arm)
                    ratios[arm].append(raw / secs)
                    cpus[arm].append(cpu)
                    print(f"run {r} {'aggregator' if arm is None else f'burn {arm:g}'}: "
                          f"ratio {raw / secs:.2f}, CPU {cpu:.0f} µs/update", file=sys.stderr)  # fmt: skip
        finally:
            broker.kill()
    load1 = os.getloadavg()
    med = {a: statistics.median(ratios[a]) for a in arms}
    rows = []
    for a in arms:
        name = "fededge aggregator (fsync on)" if a is None else f"MQTT work + {a:g} µs burn"
        rows.append(f"| {name} | {statistics.median(cpus[a]):.0f} | **{med[a]:.2f}** "
                    f"({min(ratios[a]):.2f}-{max(ratios[a]):.2f}) |")  # fmt: skip
    curve = [med[b] for b in burns]
    table = "\n".join(rows)
    md = f"""## Ingest CPU budget

Machine: {machine()}.
Load average (1 min) {load0[0]:.1f} at the start, {load1[0]:.1f} at the end.
Command: `python bench/bench_ingest_budget.py --size {args.size} --burns {args.burns} \
--repeats {args.repeats}`.

How much CPU per update can an aggregator spend and keep a ratio to raw paho on this machine?
A budget client does the MQTT work the protocol requires, as the aggregator does it (batches of
what has arrived, up to 500; a QoS 1 receipt per update published in bulk; the batch
acknowledged at once) and spins for a fixed CPU time per update instead of validating, logging
and folding. Each run is paired with a raw run just before it (ABBA order over the arms);
{d:,} parameters, {n:,} updates, medians of {args.repeats} runs. CPU is the client's process CPU
from the first publish to the last answer.

| client | CPU per update (µs) | vs raw (range) |
|---|---:|---:|
{table}

Budget beyond the MQTT work for 0.8 of raw: {_budget(burns, curve, 0.8)}; for 0.9:
{_budget(burns, curve, 0.9)}. Where the aggregator's ratio falls short of a burn arm of the same
CPU, the difference is structure (fsync latency, thread hand-offs), not CPU.
"""
    print(md)
    write_section("ingest-budget", md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
