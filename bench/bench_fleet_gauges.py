"""Cost of the aggregator's fleet gauges (fededge/aggregator/fleet.py) per event and per scrape.

Run: ``python -m bench.bench_fleet_gauges [--devices N]`` (writes the "fleet-gauges" section of
docs/benchmarks.md). No broker: the tracker is fed the bytes the aggregator would receive.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import tracemalloc

from prometheus_client import CollectorRegistry, generate_latest

from bench._report import machine, median_time, write_section
from fededge.aggregator.fleet import FleetTracker
from fededge.protocol import DeviceStatus

VERSIONS = 50
CALLS = 20_000


def _status(name: str, i: int) -> bytes:
    return DeviceStatus(device=name, state="online", version=i % VERSIONS, examples=120,
                        updates_sent=7, software="fededge 0.1.0", time=1.764e9).to_bytes()  # fmt: skip


def _tracker(devices: int) -> tuple[FleetTracker, CollectorRegistry, int]:
    """A full tracker and the bytes it holds (names included, as parsed from topics)."""
    payloads = [_status(f"device-{i:06d}", i) for i in range(devices)]
    gc.collect()
    tracemalloc.start()
    reg = CollectorRegistry()
    fleet = FleetTracker(reg, lambda: VERSIONS, max_devices=devices)
    for i, p in enumerate(payloads):
        name = f"device-{i:06d}"
        fleet.on_status(name, p)
        fleet.on_update(name, VERSIONS - 1, VERSIONS)
    held, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return fleet, reg, held


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--devices", type=int, default=100_000)
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    n = args.devices
    fleet, reg, held = _tracker(n)
    events = list(zip([f"device-{i:06d}" for i in range(n)],
                      [_status(f"device-{i:06d}", i) for i in range(n)], strict=True))  # fmt: skip
    it = itertools.cycle(events)

    def statuses() -> None:
        for _ in range(CALLS):
            name, payload = next(it)
            fleet.on_status(name, payload)

    def updates() -> None:
        for _ in range(CALLS):
            fleet.on_update(next(it)[0], VERSIONS - 1, VERSIONS)

    status_us = median_time(statuses, repeats=5) / CALLS * 1e6
    update_us = median_time(updates, repeats=5) / CALLS * 1e6
    scrape_ms = median_time(lambda: generate_latest(reg), repeats=7) * 1e3
    share = n / 30 * status_us / 1e6  # every device republishes its status every 30 s
    md = f"""## Fleet gauges (issue 14)

Machine: {machine()}

`python -m bench.bench_fleet_gauges --devices {n}`: the aggregator's fleet tracker with {n:,} online
devices in {VERSIONS} versions, fed the bytes the aggregator receives (no broker). Medians of
5 runs of {CALLS:,} events (7 scrapes). The host is shared with other jobs: expect swings.

| devices | memory held | per device | status message | accepted update | scrape (whole registry) | statuses every 30 s |
|---:|---:|---:|---:|---:|---:|---:|
| {n:,} | {held / 2**20:.1f} MiB | {held / n:.0f} B | {status_us:.1f} µs | {update_us:.2f} µs | {scrape_ms:.2f} ms | {share * 100:.1f}% of a core |

A status costs a JSON decode and validation; an accepted update an OrderedDict move and two
tally updates. The exposition has the same number of series for any number of devices.
"""
    print(md)
    if not args.no_write:
        write_section("fleet-gauges", md)


if __name__ == "__main__":
    main()
