"""Benchmark the aggregation kernels against a triad, numpy and Flower's aggregate functions.

Run from the repository root, in an environment with fededge[aggregator], flwr and psutil:

    NUMBA_NUM_THREADS=2 python -m bench.bench_kernels            # writes docs/benchmarks.md

Every method folds the same n float32 updates of d parameters (weights = example counts).
Headline rows are single-threaded kernels (the serial and buffered kernels never touch Numba's
thread pool); only the "parallel" row uses 2 threads, so NUMBA_NUM_THREADS must allow 2.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("NUMBA_NUM_THREADS", "2")  # before numba is imported

import numba
import numpy as np
from numba import njit
from numpy.typing import NDArray

if __package__ in (None, ""):  # also runnable as `python bench/bench_kernels.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._report import machine, write_section
from fededge import kernels

try:
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.server.strategy.aggregate import aggregate, aggregate_inplace
except ImportError:  # pragma: no cover - the bench environment installs flwr
    sys.exit("flwr is not installed: pip install 'fededge[bench]' (or flwr) in this venv")

L3_BYTES = 32 << 20  # fallback when sysfs does not say


@njit(cache=True, nogil=True)
def triad(a: NDArray[np.float64], b: NDArray[np.float64], c: NDArray[np.float64], s: float) -> None:
    """STREAM triad a = b + s * c on one thread: the memory bandwidth baseline."""
    for i in range(a.shape[0]):
        a[i] = b[i] + s * c[i]


def l3_bytes() -> int:
    """Size of the last-level cache from sysfs (decides whether the accumulator stays cached)."""
    try:
        text = Path("/sys/devices/system/cpu/cpu0/cache/index3/size").read_text().strip()
        return int(text.rstrip("KMG")) << {"K": 10, "M": 20, "G": 30}[text[-1]]
    except (OSError, ValueError, KeyError):
        return L3_BYTES


def timed(setup: Callable[[], None], fn: Callable[[], object], repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs after one warm-up; ``setup`` untimed."""
    times = []
    for r in range(repeats + 1):
        setup()
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        if r:
            times.append(dt)
    return statistics.median(times)


def peak_extra(fn: Callable[[], object]) -> int:
    """Peak bytes allocated during ``fn()`` by tracemalloc (numpy reports its buffers to it)."""
    gc.collect()
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        result = fn()
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    del result
    return peak


Fold = Callable[[NDArray[np.float64], NDArray[np.float32], NDArray[np.float64]], None]


def fold_serial(acc: NDArray[np.float64], xs: NDArray[np.float32], w: NDArray[np.float64]) -> None:
    """One fused pass per update."""
    for i in range(xs.shape[0]):
        kernels.accumulate(acc, xs[i], float(w[i]))


def fold_buffered(
    acc: NDArray[np.float64], xs: NDArray[np.float32], w: NDArray[np.float64]
) -> None:
    """One pass per 8 updates, as an aggregator decoding into an (8, d) buffer would."""
    for j in range(0, xs.shape[0], 8):
        kernels.accumulate_many(acc, xs[j : j + 8], w[j : j + 8])


def fold_parallel(
    acc: NDArray[np.float64], xs: NDArray[np.float32], w: NDArray[np.float64]
) -> None:
    """One fused pass per update, split over Numba's threads."""
    for i in range(xs.shape[0]):
        kernels.accumulate(acc, xs[i], float(w[i]), parallel=True)


def fold_numpy(acc: NDArray[np.float64], xs: NDArray[np.float32], w: NDArray[np.float64]) -> None:
    """The textbook numpy loop; a float64 weight makes the temporary float64 too."""
    for i in range(xs.shape[0]):
        acc += w[i] * xs[i]


def triad_gbs(nbytes: int, repeats: int) -> float:
    """Triad GB/s over float64 arrays that move ``nbytes`` per pass (24 B/element)."""
    m = nbytes // 24
    a, b, c = np.zeros(m), np.ones(m), np.full(m, 2.0)
    return 24 * m / timed(lambda: None, lambda: triad(a, b, c, 3.0), repeats) / 1e9


def measure_fold(
    fold: Fold, xs: NDArray[np.float32], w: NDArray[np.float64], repeats: int, memory: bool
) -> tuple[float, int | None, NDArray[np.float64]]:
    """Median time into a zeroed long-lived accumulator, and peak memory with a fresh one."""
    acc = np.zeros(xs.shape[1])
    t = timed(lambda: acc.fill(0.0), lambda: fold(acc, xs, w), repeats)
    mem = peak_extra(lambda: fold(np.zeros(xs.shape[1]), xs, w)) if memory else None
    return t, mem, acc


def measure_flower(
    xs: NDArray[np.float32], examples: NDArray[np.int64], repeats: int
) -> tuple[float, int, NDArray[np.float32]]:
    """Flower's ``aggregate`` over the same updates, one layer each."""
    results = [([xs[i]], int(examples[i])) for i in range(xs.shape[0])]
    t = timed(lambda: None, lambda: aggregate(results), repeats)
    mem = peak_extra(lambda: aggregate(results))
    return t, mem, aggregate(results)[0]


def measure_flower_inplace(fit: list[tuple[Any, Any]], repeats: int) -> tuple[float, int, float]:
    """Flower's ``aggregate_inplace`` over FitRes objects; also times the decoding alone."""
    t = timed(lambda: None, lambda: aggregate_inplace(fit), repeats)
    mem = peak_extra(lambda: aggregate_inplace(fit))

    def decode_all() -> None:
        for _, f in fit:  # one at a time, as aggregate_inplace holds only one decoded update
            parameters_to_ndarrays(f.parameters)

    return t, mem, timed(lambda: None, decode_all, repeats)


def run_size(d: int, n: int, repeats: int) -> dict[str, Any]:
    """Measure every method at one model size; returns rows and the triad figure."""
    rng = np.random.default_rng(d)
    updates = np.empty((n, d), dtype=np.float32)
    for i in range(n):
        rng.standard_normal(d, dtype=np.float32, out=updates[i])
    examples = rng.integers(10, 1000, n)
    weights = examples.astype(np.float64)
    acc_cached = 8 * d <= l3_bytes() // 2  # leave room for the update stream
    tri = triad_gbs(4 * d * n, repeats)

    rows: list[dict[str, Any]] = []
    ours: list[tuple[str, Fold, float | None]] = [
        ("fededge serial (fused)", fold_serial, 4 + (0 if acc_cached else 16)),
        ("fededge buffered (k=8)", fold_buffered, 4 + (0 if acc_cached else 16 / 8)),
        ("numpy `acc += w * x`", fold_numpy, None),
    ]
    for name, fold, traffic in ours:
        t, mem, acc = measure_fold(fold, updates, weights, repeats, memory=True)
        rows.append({"name": name, "t": t, "mem": mem, "traffic": traffic})
    numba.set_num_threads(2)
    t, _, _ = measure_fold(fold_parallel, updates, weights, repeats, memory=False)
    numba.set_num_threads(1)
    rows.append({"name": "fededge parallel (2 threads)", "t": t, "mem": None, "traffic": None})

    t, mem, flwr_mean = measure_flower(updates, examples, repeats)
    rows.append({"name": "Flower `aggregate`", "t": t, "mem": mem, "traffic": None})
    flwr_err = float(np.max(np.abs(flwr_mean - acc / weights.sum()), initial=0.0))
    del flwr_mean

    # aggregate_inplace never looks at the ClientProxy, so None stands in for it.
    status = Status(code=Code.OK, message="")
    fit: list[tuple[Any, Any]] = [
        (None, FitRes(status, ndarrays_to_parameters([updates[i]]), int(examples[i]), {}))
        for i in range(n)
    ]
    del updates  # only the serialised copies are needed from here on
    gc.collect()
    t, mem, t_decode = measure_flower_inplace(fit, repeats)
    rows.append({"name": "Flower `aggregate_inplace`", "t": t, "mem": mem, "traffic": None})
    return {
        "d": d,
        "n": n,
        "triad": tri,
        "rows": rows,
        "decode_ms": t_decode / n * 1e3,
        "acc_cached": acc_cached,
        "flwr_err": flwr_err,
    }


def table(res: dict[str, Any]) -> str:
    """Markdown table for one model size."""
    d, n, tri = res["d"], res["n"], res["triad"]
    t_flwr = next(r["t"] for r in res["rows"] if r["name"] == "Flower `aggregate`")
    lines = [
        f"**d = {d:,}, n = {n}** — triad {tri:.1f} GB/s; float64 accumulator "
        f"{8 * d / 2**20:.0f} MiB {'fits' if res['acc_cached'] else 'does not fit'} in L3.",
        "",
        "| method | ms/update | update GB/s | % of triad | traffic GB/s (% triad) "
        "| vs Flower `aggregate` | peak extra memory |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in res["rows"]:
        ms = r["t"] / n * 1e3
        gbs = 4 * d * n / r["t"] / 1e9
        traffic = "—"
        if r["traffic"] is not None:
            tg = r["traffic"] * d * n / r["t"] / 1e9
            traffic = f"{tg:.1f} ({100 * tg / tri:.0f}%)"
        mem = "—" if r["mem"] is None else f"{r['mem'] / 2**20:.0f} MiB"
        lines.append(
            f"| {r['name']} | {ms:.3f} | {gbs:.1f} | {100 * gbs / tri:.0f}% | {traffic} "
            f"| {t_flwr / r['t']:.1f}x | {mem} |"
        )
    lines.append("")
    lines.append(
        f"Flower `aggregate_inplace` includes `np.load` of each update "
        f"({res['decode_ms']:.3f} ms/update of it, measured alone). Flower computes in float32: "
        f"its mean differs from the float64 one by up to {res['flwr_err']:.1e}."
    )
    return "\n".join(lines)


def verdict(results: list[dict[str, Any]]) -> str:
    """State the issue's targets against the measured numbers."""
    out = []
    for res in results:
        d, n, tri = res["d"], res["n"], res["triad"]
        rows = {r["name"]: r for r in res["rows"]}
        best = min(("fededge serial (fused)", "fededge buffered (k=8)"), key=lambda k: rows[k]["t"])
        r = rows[best]
        pct = 100 * 4 * d * n / r["t"] / 1e9 / tri
        traffic_pct = 100 * r["traffic"] * d * n / r["t"] / 1e9 / tri
        speedup = rows["Flower `aggregate`"]["t"] / r["t"]
        mem_ratio = rows["Flower `aggregate`"]["mem"] / max(r["mem"], 1)
        out.append(
            f"- d = {d:,}: best kernel ({best}) streams updates at {pct:.0f}% of triad "
            f"(target >= 75%: {'met' if pct >= 75 else 'not met'}; memory traffic "
            f"{traffic_pct:.0f}% of triad), {speedup:.1f}x Flower `aggregate` "
            f"(target >= 10x: {'met' if speedup >= 10 else 'not met'}), using "
            f"{mem_ratio:.0f}x less extra memory."
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    """Run the kernel benchmark and write the ``kernels`` section of docs/benchmarks.md."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    p.add_argument("--n", type=int, default=100, help="updates per aggregation")
    p.add_argument("--repeats", type=int, default=7, help="runs per method at d <= 1M")
    p.add_argument("--repeats-large", type=int, default=3, help="runs per method at d > 1M")
    p.add_argument("--no-write", action="store_true", help="print only, keep docs untouched")
    args = p.parse_args(argv)
    if int(os.environ["NUMBA_NUM_THREADS"]) < 2:
        sys.exit("the parallel row needs NUMBA_NUM_THREADS >= 2")
    kernels.warmup()
    triad(np.zeros(3), np.ones(3), np.ones(3), 1.0)
    numba.set_num_threads(1)
    results = []
    for d in args.sizes:
        reps = args.repeats if d <= 1_000_000 else args.repeats_large
        t0 = time.perf_counter()
        results.append(run_size(d, args.n, reps))
        print(f"d={d}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    md = "\n\n".join(
        [
            "## Aggregation kernels",
            f"Machine: {machine()}.",
            "Reproduce: `NUMBA_NUM_THREADS=2 python -m bench.bench_kernels` from the repository "
            "root in a venv with `fededge[aggregator]`, `flwr` and `psutil` "
            "(`pip install -e '.[bench]'`).",
            "Each method folds the same n float32 updates (weights = example counts, 10–999) "
            "into one result; medians of several runs "
            f"({args.repeats} at d <= 1M, {args.repeats_large} above). *update GB/s* = bytes of "
            "float32 updates consumed per second (4 B/parameter/update), *% of triad* compares "
            "it with a one-thread Numba STREAM triad `a = b + s*c` (float64, STREAM byte "
            "counting, 24 B/element) over arrays holding as many bytes as the n updates, "
            "measured in the same run. *traffic GB/s* counts the bytes the kernel must move "
            "from memory: the update (4 B) plus, when the float64 accumulator does not fit in "
            "L3, its read and write (16 B, divided by k for the buffered kernel). *Peak extra "
            "memory* is the tracemalloc peak during one whole aggregation (numpy reports its "
            "buffers to tracemalloc; the kernels allocate nothing), including the accumulator, "
            "excluding the inputs. Headline rows run on one thread; the 2-thread row swings a "
            "lot on this shared host.",
            *[table(r) for r in results],
            "Targets (issue 2): kernel >= 75% of same-run triad on one thread, >= 10x Flower "
            "`aggregate`, one accumulator of memory instead of n copies.",
            verdict(results),
        ]
    )
    if args.no_write:
        print(md)
    else:
        write_section("kernels", md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
