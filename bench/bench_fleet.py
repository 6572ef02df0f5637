"""A fleet of 100, 1,000 and 10,000 simulated devices against one real `fededge aggregator`.

Each size gets a fresh task, a fresh `fededge aggregator` process (the CLI, as deployed) and the
same number of updates in total, spread over its devices, through a private Mosquitto with the
shipped in-flight window (40). Devices are `fededge.testing.simulator.FleetSimulator` identities
(real MQTT, real update messages, real receipts, resend on timeout). Reported per size: accepted
updates per second, the aggregator's resident memory (peak of samples every 0.2 s, and at the
end), and the accounting: every update exactly one accepted receipt, nothing lost, and the
aggregator's own accepted total (its retained status) equal to the fleet's.

    python bench/bench_fleet.py [--sizes 100,1000,10000] [--updates 10000] [--params 2410]
"""

from __future__ import annotations

import argparse
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._report import machine, write_section
from fededge.mqtt import MqttClient
from fededge.protocol import AggregatorStatus, ModelVersion, Plan, Topics, decode_json
from fededge.protocol.vocab import NO_GRAPH
from fededge.settings import load_settings
from fededge.tasks import publish_initial
from fededge.testing.broker import Mosquitto
from fededge.testing.simulator import FleetSimulator, SimStats


def rss_kib(pid: int) -> int:
    """Resident set size of ``pid`` in KiB (0 once it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class Status:
    """Follows the aggregator's retained status message."""

    def __init__(self, broker: Mosquitto, topics: Topics) -> None:
        self.last: AggregatorStatus | None = None
        self.client = MqttClient(broker.settings(), f"bench-status-{topics.task}", persistent=False)
        self.client.connect()
        self.client.subscribe(topics.aggregator_status, qos=1)

    def wait(
        self, ok: Callable[[AggregatorStatus], bool], timeout: float = 120.0
    ) -> AggregatorStatus:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                msg = self.client.messages.get(timeout=0.2)
            except queue.Empty:
                continue
            if msg.payload:
                self.last = decode_json(msg.payload, AggregatorStatus)
                if ok(self.last):
                    return self.last
        raise TimeoutError(f"aggregator status never matched; last: {self.last}")

    def close(self) -> None:
        self.client.close()


def one_size(broker: Mosquitto, root: Path, devices: int, total: int, d: int) -> dict[str, float]:
    each = max(1, total // devices)
    task = f"fleet{devices}"
    state = root / task
    env = {**os.environ, "FEDEDGE_AGGREGATOR__METRICS": "false",
           "FEDEDGE_AGGREGATOR__STATUS_INTERVAL": "1"}  # fmt: skip
    settings = load_settings(
        None, {"broker": {"url": broker.url}, "task": task, "state_dir": state}
    )
    plan = Plan(
        min_updates_per_version=1000,
        max_updates_per_device=max(1, each),  # a device's whole share fits in one version
        max_staleness=1000,
        clip_norm=1.0,
    )
    mv = ModelVersion(task=task, version=0, weights={"w": np.zeros(d, np.float32)},
                      graph_sha256=NO_GRAPH)  # fmt: skip
    publish_initial(settings, None, mv, plan)
    topics = Topics(settings.topic_prefix, task)
    status = Status(broker, topics)
    log = (root / f"{task}.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "fededge.cli", "aggregator", "--broker", broker.url,
         "--task", task, "--state-dir", str(state), "--log-level", "warning"],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    peak = [0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.2):
            peak[0] = max(peak[0], rss_kib(proc.pid))

    sampler = threading.Thread(target=sample, daemon=True)
    try:
        status.wait(lambda s: s.state == "online" and s.version == 0)
        rss_idle = rss_kib(proc.pid)
        sampler.start()
        sim = FleetSimulator(
            broker.settings(),
            task,
            devices,
            connections=max(1, devices // 2500),
            max_outstanding=1000,
            receipt_timeout=30.0,
        )
        with sim:
            stats: SimStats = sim.run(each, timeout=1800)
        final = status.wait(lambda s: s.accepted_total >= stats.accepted)
        rss_end = rss_kib(proc.pid)
    finally:
        stop.set()
        proc.terminate()
        proc.wait(30)
        status.close()
        log.close()
    ok = (
        stats.lost == 0
        and stats.double_accepted == 0
        and stats.accepted == stats.created == devices * each
        and final.accepted_total == stats.accepted
        and not stats.rejected
    )
    print(f"{devices} devices: {stats}", file=sys.stderr)
    return {
        "devices": devices,
        "updates": stats.created,
        "rate": stats.updates_per_second,
        "rss_idle": rss_idle / 1024,
        "rss_peak": max(peak[0], rss_end) / 1024,
        "rss_end": rss_end / 1024,
        "resent": stats.resent,
        "agg_total": final.accepted_total,
        "ok": ok,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sizes", default="100,1000,10000")
    ap.add_argument("--updates", type=int, default=10_000, help="in total, per size")
    ap.add_argument("--params", type=int, default=2410)
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        broker = Mosquitto(
            Path(tmp) / "mosquitto", max_queued_messages=100_000, max_inflight_messages=40
        )
        broker.start()
        try:
            for n in sizes:
                rows.append(one_size(broker, Path(tmp), n, args.updates, args.params))
        finally:
            broker.kill()
    base = rows[0]["rss_peak"]
    spread = max(abs(r["rss_peak"] - base) / base for r in rows)
    table = "\n".join(
        f"| {r['devices']:,} | {r['updates']:,} | {r['rate']:.0f} | {r['rss_idle']:.0f} | "
        f"{r['rss_peak']:.0f} | {r['resent']} | {r['agg_total']:,} | "
        f"{'yes' if r['ok'] else '**NO**'} |"
        for r in rows
    )
    load = os.getloadavg()
    md = f"""## A fleet of simulated devices against one aggregator

Machine: {machine()}; load average at the end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}
(shared with other jobs).
Command: `python bench/bench_fleet.py --sizes {args.sizes} --updates {args.updates} --params {args.params}`.
One `fededge aggregator` process per size (fresh task and state, defaults, fsync on), a private
Mosquitto with `max_inflight_messages 40`; {args.updates:,} updates of {args.params:,} float32
parameters in total per size, spread over the devices; at most 1,000 updates without a receipt
fleet-wide, one per device; devices from `fededge.testing.simulator` in one process (one MQTT
connection per 2,500 devices). RSS: the aggregator's resident memory once ready (idle) and the
peak of samples every 0.2 s during the run.

| devices | updates | accepted updates/s | RSS idle MiB | RSS peak MiB | resends | aggregator's accepted total | exactly once |
|---:|---:|---:|---:|---:|---:|---:|:---:|
{table}

Peak RSS across sizes within {spread:.0%} of the smallest fleet's (target: 10%). "Exactly
once": every update has exactly one accepted receipt, none is unsettled, nothing was rejected,
and the aggregator's accepted total (its retained status) equals the fleet's count.
A simulated device keeps one update in flight, so 100 devices keep at most 100 unanswered
(fewer than one broker window per group commit): their lower rate is the fleet's, not the
aggregator's.
"""
    write_section("fleet", md)
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
