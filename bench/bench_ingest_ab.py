"""Paired A/B of the aggregator's ingest: this tree against a git revision, on one broker.

bench/bench_ingest.py compares the aggregator with a raw paho subscriber; on a shared 2-core
machine its per-run ratios swing by 0.1-0.2, more than most single changes move them. This
bench answers "is this tree faster than REV": each run is one process that ingests ``n``
updates of ``d`` parameters into a fresh aggregator (bench_ingest.aggregator_throughput of
that tree: same publisher, fsync on), the two trees alternate (ABBA), and it reports the
median wall time and the median CPU time of the aggregator process per update (from the
first publish to the last receipt: its start-up excluded), with the ratio new/baseline.

    python bench/bench_ingest_ab.py --baseline HEAD~3 [--sizes 100000:3000,1000000:300]
        [--pairs 4] [--env FEDEDGE_AGGREGATOR__COMMIT_DELAY=0.02]

The baseline is checked out with ``git worktree`` into a temporary directory (removed after);
both trees run on this checkout's virtual environment.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# One run, in the tree at sys.argv[1]: the aggregator's wall and process CPU seconds.
_RUN = """
import json, os, sys, tempfile
from pathlib import Path
root, d, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
sys.path[:0] = [root, root + "/bench", root + "/tests"]
import bench_ingest as bi
from broker import Mosquitto
tmp = Path(tempfile.mkdtemp())
# The broker's environment (argv[4], JSON) is set for it alone: a baseline tree may predate
# Mosquitto(env=...), and this process's malloc has read its settings already.
saved = dict(os.environ)
os.environ.update(json.loads(sys.argv[4]))
b = Mosquitto(tmp / "m", max_queued_messages=100_000, max_inflight_messages=40)
b.start()
os.environ.clear()
os.environ.update(saved)
try:
    wall = bi.aggregator_throughput(b.port, n, d, tmp / "s", True)
finally:
    b.kill()
print("RESULT", wall, bi.LAST_CPU[0])
"""


def one_run(tree: Path, d: int, n: int, env: dict[str, str] | None = None) -> tuple[float, float]:
    from fededge.memory import BROKER_MALLOC_ENV  # this tree's: both trees' brokers run with it

    out = subprocess.run(
        [sys.executable, "-c", _RUN, str(tree), str(d), str(n), json.dumps(BROKER_MALLOC_ENV)],
        capture_output=True,
        text=True,
        check=False,
        cwd=tree,
        env=None if env is None else {**os.environ, **env},
    )
    m = re.search(r"^RESULT (\S+) (\S+)$", out.stdout, re.M)
    if m is None:
        raise RuntimeError(f"run in {tree} failed:\n{out.stderr[-3000:]}")
    os.sync()  # no run pays for the writeback of the one before
    return float(m.group(1)), float(m.group(2))


def _env_pair(text: str) -> tuple[str, str]:
    """``NAME=VALUE`` of --env; argparse reports anything else as a usage error."""
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return name, value


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--baseline", required=True, help="git revision to compare with")
    ap.add_argument("--sizes", default="100000:3000,1000000:300", help="params:updates, ...")
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", type=_env_pair,
                    help="set for this tree's runs only, e.g. FEDEDGE_AGGREGATOR__COMMIT_DELAY=0.02 "
                    "(with --baseline HEAD: an A/B of a setting)")  # fmt: skip
    args = ap.parse_args(argv)
    env = dict(args.env) or None
    sizes = [tuple(int(x) for x in part.split(":")) for part in args.sizes.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "baseline"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(base),
                        args.baseline], check=True, capture_output=True)  # fmt: skip
        try:
            shown = " ".join(f"{k}={v}" for k, v in args.env)
            print(f"baseline {args.baseline}; this tree{' with ' + shown if env else ''}"
                  f"; medians of {args.pairs} runs each, ABBA")  # fmt: skip
            print("| parameters | updates | wall: baseline | this tree | ratio "
                  "| CPU/update: baseline | this tree | ratio |")  # fmt: skip
            print("|---:|---:|---:|---:|---:|---:|---:|---:|")
            for d, n in sizes:
                runs: dict[str, list[tuple[float, float]]] = {"base": [], "new": []}
                for i in range(args.pairs):
                    order = ("base", "new") if i % 2 == 0 else ("new", "base")
                    for which in order:
                        runs[which].append(
                            one_run(base, d, n) if which == "base" else one_run(ROOT, d, n, env)
                        )
                wb, wn = (statistics.median(w for w, _ in runs[k]) for k in ("base", "new"))
                cb, cn = (statistics.median(c for _, c in runs[k]) * 1e6 / n
                          for k in ("base", "new"))  # fmt: skip
                print(f"| {d:,} | {n:,} | {wb:.2f} s | {wn:.2f} s | {wn / wb:.2f} "
                      f"| {cb:,.0f} µs | {cn:,.0f} µs | {cn / cb:.2f} |")  # fmt: skip
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base)],
                           check=False, capture_output=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
