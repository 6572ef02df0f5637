"""Finalize time and memory of robust aggregation (plan ``robust``) against the streaming mean.

    NUMBA_NUM_THREADS=1 .venv/bin/python -m bench.bench_robust --d 1000000 --k 10,50 --repeats 3

Writes k updates of d float32 (or int8) parameters into a pending version's WAL (no fsync),
then times ``robust.aggregate`` (read back block by block with pread, per-coordinate kernel)
for the weighted mean (``robust_zeroing`` only), trimmed_mean and median, and the streaming
finalize of the ordinary path; peak extra Python/numpy memory by tracemalloc. The WAL is in
the page cache (just written): this measures the CPU side, not a cold disk.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

from fededge.aggregator import kernels, robust
from fededge.aggregator.pending import PendingVersion
from fededge.aggregator.store import Store
from fededge.protocol import ModelVersion, Plan, Update
from fededge.protocol.encoding import encode_delta
from fededge.protocol.vocab import NO_GRAPH


def _pending(root: Path, d: int, k: int, enc: str, seed: int) -> PendingVersion:
    base = ModelVersion(task="t", version=0, weights={"w": np.zeros(d, np.float32)},
                        graph_sha256=NO_GRAPH)  # fmt: skip
    pending = PendingVersion(Store(root, fsync=False), base, checkpoint_every=16,
                             max_update_bytes=1 << 31)  # fmt: skip
    pending.keep_log = True
    rng = np.random.default_rng(seed)
    for i in range(k):
        delta = encode_delta({"w": rng.normal(size=d).astype(np.float32)}, enc, 256, rng)
        u = Update(task="t", device=f"d{i}", update_id=f"u{i}", base_version=0, num_examples=10,
                   delta=delta, encoding=enc, block=256 if enc == "int8" else 0)  # fmt: skip
        pending.stage(u, u.to_bytes(), 10.0, 1.0)
        pending.commit()
    return pending


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d", type=int, default=1_000_000)
    p.add_argument("--k", default="10,50")
    p.add_argument("--enc", default="f32,int8")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--parallel", action="store_true", help="the threaded kernels")
    a = p.parse_args(argv)
    robust.warmup(parallel=a.parallel)
    kernels.warmup(parallel=False)
    print(f"d = {a.d:,}; seconds per version (median of {a.repeats}); peak extra MiB")
    print("| k | encoding | streaming mean finalize | weighted mean (zeroing) | trimmed_mean | "
          "median | peak MiB (trimmed_mean) |")  # fmt: skip
    print("|---:|---|---:|---:|---:|---:|---:|")
    plans = [Plan(robust_zeroing=1e6), Plan(robust="trimmed_mean", robust_beta=0.2),
             Plan(robust="median")]  # fmt: skip
    for k in (int(x) for x in a.k.split(",")):
        for enc in a.enc.split(","):
            with tempfile.TemporaryDirectory() as tmp:
                pending = _pending(Path(tmp), a.d, k, enc, 0)
                times: list[list[float]] = [[] for _ in range(len(plans) + 1)]
                peak = 0.0
                for _ in range(a.repeats):
                    t0 = time.perf_counter()
                    pending.finalize(1.0)
                    times[0].append(time.perf_counter() - t0)
                    for j, plan in enumerate(plans, start=1):
                        t0 = time.perf_counter()
                        robust.aggregate(pending, plan, parallel=a.parallel)
                        times[j].append(time.perf_counter() - t0)
                tracemalloc.start()  # a separate run: tracing slows allocations
                robust.aggregate(pending, plans[1])
                peak = tracemalloc.get_traced_memory()[1] / 2**20
                tracemalloc.stop()
                pending.close()
            cols = " | ".join(f"{statistics.median(t):.3f}" for t in times)
            print(f"| {k} | {enc} | {cols} | {peak:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
