"""Cost of one checkpoint of the pending version against the updates it already holds.

A pending version of ``--params`` parameters is given ``n`` folded updates (ids and devices as
the aggregator holds them, sums filled in directly: no fold is measured), checkpointed once,
then ``--runs`` times given ``--new`` more updates and checkpointed again (as the periodic
background checkpoint does every ``checkpoint_every`` updates). Reported per n: the median wall
time and CPU time (whole process: the checkpoint thread encodes and writes, the main thread
waits for it and for anything it queued) of those later checkpoints, with fsync on, in a real
state directory (``--state-dir``).

    python bench/bench_checkpoint.py [--pending 1000,10000,50000] [--params 2410] [--new 64]
        [--runs 15] [--state-dir DIR]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fededge.aggregator.pending import PendingVersion
from fededge.aggregator.store import Store
from fededge.protocol import ModelVersion

DEVICES = 10_000


def add(p: PendingVersion, n: int) -> None:
    """``n`` more updates in the pending version's sums, as folding them records them."""
    s = p.sums
    for i in range(s.count, s.count + n):
        s.ids.append(f"u{i:08d}-{i * 7919 % 1000003:07d}")  # update ids as devices name them
        s.devices.append(f"device-{i % DEVICES:05d}")
    s.count += n


def one(state: Path, n: int, args: argparse.Namespace) -> tuple[float, float]:
    """Median seconds (wall, process CPU) of a checkpoint of a version holding ``n`` updates."""
    store = Store(state)
    base = ModelVersion(task="t", version=1, weights={"w": np.zeros(args.params, np.float32)},
                        graph_sha256="0" * 64)  # fmt: skip
    p = PendingVersion(store, base, checkpoint_every=64, max_update_bytes=1 << 20)
    p.acc[:] = np.random.default_rng(0).normal(size=p.acc.size)
    add(p, n)
    p.checkpoint()
    wall, cpu = [], []
    for _ in range(args.runs):
        add(p, args.new)
        w0, c0 = time.perf_counter(), time.process_time()
        p.checkpoint()
        p.settle_checkpoints()  # and what it queued after it (the ids file's append)
        wall.append(time.perf_counter() - w0)
        cpu.append(time.process_time() - c0)
    p.close()
    store.close()
    return statistics.median(wall), statistics.median(cpu)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--pending", default="1000,10000,50000", help="updates already pending")
    ap.add_argument("--params", type=int, default=2410)
    ap.add_argument("--new", type=int, default=64, help="updates since the last checkpoint")
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--state-dir", type=Path, default=None, help="on the disk to measure")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=args.state_dir) as tmp:
        for n in (int(x) for x in args.pending.split(",")):
            wall, cpu = one(Path(tmp) / f"s{n}", n, args)
            print(f"pending={n:>7,} +{args.new}: checkpoint {wall * 1e3:7.2f} ms wall, "
                  f"{cpu * 1e3:7.2f} ms CPU", flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
