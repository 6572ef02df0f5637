"""Per-update CPU of the aggregator's main thread, without a broker (issue 14).

Feeds real update payloads (built with ``fededge.protocol.Update``, as bench/bench_ingest.py
does: 50 devices, f32 deltas of ``d`` parameters, unique update ids) through the sans-IO
``AggregatorCore`` the way ``Aggregator.step`` drives it: groups of ``--group`` updates are
ingested (``Incoming`` per message) and committed, pipelined as under load (``commit(now,
pipeline=True)``: the group's fsync runs on the WAL thread while the next group is validated;
the last group is flushed). The state directory is real (``--state-dir``, default a temporary
directory) with fsync on and ``checkpoint_every`` 64 like bench_ingest.py; the plan never
completes a version during a run, so this is the ingest path alone. Receipts and
acknowledgements are produced as effects and counted (every update must be accepted), not
published: the MQTT work is not measured here.

Reported per size: CPU microseconds per update, as ``time.process_time`` (the whole process,
including the WAL thread's fsync bookkeeping) and ``time.thread_time`` (the main thread only),
median of ``--runs`` runs each on a fresh state directory.

    python bench/bench_ingest_core.py [--sizes 2410:3000,100000:600] [--runs 7] [--group 20]
        [--no-pipeline] [--no-fsync] [--profile out.prof]

``--profile`` writes a cProfile of the last run of the first size (open it with ``pstats``);
for a sampling profile run the script under ``py-spy record --native -r 2000``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fededge.aggregator.core import AggregatorCore
from fededge.aggregator.effects import Ack, Effect, Incoming, Publish, incoming
from fededge.aggregator.metrics import AggregatorMetrics
from fededge.aggregator.store import Store, task_root
from fededge.protocol import ModelVersion, Plan, Topics
from fededge.settings import load_settings

DEVICES = 50


def payloads(task: str, n: int, d: int) -> list[tuple[str, bytes]]:
    """(device, update bytes) as bench/bench_ingest.py publishes them."""
    from bench.bench_ingest import _payloads

    return [(f"d{i % DEVICES}", p) for i, p in enumerate(_payloads(task, n, d))]


def make_core(state: Path, task: str, d: int, n: int, *, fsync: bool) -> AggregatorCore:
    """A core on a fresh state directory holding version 0 and a plan (as `model init`)."""
    settings = load_settings(
        None,
        {
            "task": task,
            "state_dir": state,
            "aggregator": {"metrics": False, "fsync": fsync, "checkpoint_every": 64},
        },
    )
    store = Store(task_root(state, task), fsync=fsync)
    core = AggregatorCore(settings, store, AggregatorMetrics())
    topics = core.topics
    # 50 devices send every update: the bench measures ingest, not the device quota.
    plan = Plan(min_updates_per_version=10 * n, clip_norm=1.0, max_updates_per_device=n)
    mv = ModelVersion(
        task=task, version=0, weights={"w": np.zeros(d, np.float32)}, graph_sha256="0" * 64
    )
    for topic, body in ((topics.plan, plan.to_bytes()), (topics.model, mv.to_bytes())):
        effects = core.control(Incoming(topic, body, object()), time.time())
        assert isinstance(effects[-1], Ack), effects
    return core


def one_run(
    state: Path, d: int, msgs: list[tuple[str, bytes]], task: str, args: argparse.Namespace
) -> tuple[float, float]:
    """CPU seconds (process, main thread) to ingest and commit every message once."""
    n = len(msgs)
    core = make_core(state, task, d, n, fsync=not args.no_fsync)
    topics = Topics("fededge", task)
    messages = [(topics.update(dev), body) for dev, body in msgs]
    group = args.group
    pipeline = not args.no_pipeline
    receipts = acks = 0

    def count(effects: list[Effect]) -> None:
        nonlocal receipts, acks
        for e in effects:
            if isinstance(e, Ack):
                acks += 1
            elif isinstance(e, Publish) and b'"accepted"' in e.payload:
                receipts += 1

    ingest = core.ingest
    p0, t0 = time.process_time(), time.thread_time()
    for i in range(0, n, group):
        for topic, body in messages[i : i + group]:
            # As Aggregator.step: an Incoming per message (effects.incoming); most are
            # answered by the commit.
            effects = ingest(incoming(topic, body, None, 1))
            if effects:
                count(effects)
        count(core.commit(time.time(), pipeline=pipeline))
    count(core.flush(time.time()))
    p1, t1 = time.process_time(), time.thread_time()
    pending = core.state.pending
    assert pending is not None
    pending.close()
    core.state.store.close()
    if receipts != n or acks != n:
        raise RuntimeError(f"{receipts} accepted receipts and {acks} acks for {n} updates")
    return p1 - p0, t1 - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sizes", default="2410:3000,100000:600",
                    help="params:updates, comma-separated")  # fmt: skip
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--group", type=int, default=20, help="updates per group commit")
    ap.add_argument("--no-pipeline", action="store_true", help="commit each group at once")
    ap.add_argument("--no-fsync", action="store_true")
    ap.add_argument("--state-dir", type=Path, default=None, help="on the disk to measure")
    ap.add_argument("--profile", type=Path, default=None, help="cProfile the last run here")
    args = ap.parse_args(argv)
    sizes = [tuple(int(x) for x in part.split(":")) for part in args.sizes.split(",")]
    from fededge.aggregator import kernels

    kernels.warmup(parallel=False)
    with tempfile.TemporaryDirectory(dir=args.state_dir) as tmp:
        for k, (d, n) in enumerate(sizes):
            task = f"b{uuid.uuid4().hex[:6]}"
            msgs = payloads(task, n, d)
            one_run(Path(tmp) / f"warm{d}", d, msgs[: 2 * args.group], task, args)
            proc, main_t = [], []
            for r in range(args.runs):
                state = Path(tmp) / f"s{d}-{r}"
                if args.profile is not None and k == 0 and r == args.runs - 1:
                    import cProfile

                    with cProfile.Profile() as prof:
                        one_run(state, d, msgs, task, args)
                    prof.dump_stats(args.profile)
                    continue
                p, t = one_run(state, d, msgs, task, args)
                proc.append(p / n * 1e6)
                main_t.append(t / n * 1e6)
            print(
                f"d={d:>9,} n={n:>5}: process {statistics.median(proc):7.1f} us/update "
                f"(min {min(proc):.1f}), main thread {statistics.median(main_t):7.1f} "
                f"(min {min(main_t):.1f})",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
