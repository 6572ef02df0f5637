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
from fededge.aggregator import kernels

try:
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.server.strategy.aggregate import aggregate, aggregate_inplace
except ImportError:  # pragma: no cover - the bench environment installs flwr
    sys.exit("flwr is not installed: pip install 'fededge[bench]' (or flwr) in this venv")

L3_BYTES = 32 << 20  # fallback when sysfs does not say
TRIAD_MAX_BYTES = 1 << 30  # 3 arrays of 341 MiB: 30x the L3, without doubling peak memory


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


def fold_group(acc: NDArray[np.float64], xs: NDArray[np.float32], w: NDArray[np.float64]) -> None:
    """8 updates per pass from separate 1-D buffers (no (k, d) copy), as received payloads."""
    for j in range(0, xs.shape[0], 8):
        kernels.accumulate_group(acc, list(xs[j : j + 8]), w[j : j + 8])


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


class Triad:
    """A one-thread STREAM triad over float64 arrays far bigger than the L3 cache."""

    def __init__(self, nbytes: int) -> None:
        m = nbytes // 24
        self.a, self.b, self.c = np.zeros(m), np.ones(m), np.full(m, 2.0)

    def gbs(self) -> float:
        """Bandwidth of one pass, STREAM counting (24 B/element: read b, c, write a)."""
        t0 = time.perf_counter()
        triad(self.a, self.b, self.c, 3.0)
        return 24 * self.a.shape[0] / (time.perf_counter() - t0) / 1e9


Case = tuple[str, Callable[[], None], Callable[[], object]]


def interleaved(
    cases: list[Case], tri: Triad, repeats: int
) -> dict[str, list[tuple[float, float]]]:
    """Run every case ``repeats`` times (after a warm-up round), round-robin, each right after a
    triad pass; returns (seconds, triad GB/s) pairs per case. Interleaving spreads the shared
    host's noise over all methods instead of letting one burst hit one method's runs."""
    out: dict[str, list[tuple[float, float]]] = {name: [] for name, _, _ in cases}
    for r in range(repeats + 1):
        for name, setup, fn in cases:
            g = tri.gbs()
            setup()
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
            if r:
                out[name].append((dt, g))
    return out


Timings = dict[str, list[tuple[float, float]]]

OURS: list[tuple[str, Fold, float | None]] = [
    # name, fold, bytes moved per parameter per update when acc does NOT fit in L3
    ("fededge serial (fused)", fold_serial, 4 + 16),
    ("fededge buffered (k=8)", fold_buffered, 4 + 16 / 8),
    ("fededge group of 8 buffers", fold_group, 4 + 16 / 8),
    ("numpy `acc += w * x`", fold_numpy, None),
]


def measure_arrays(
    updates: NDArray[np.float32], examples: NDArray[np.int64], tri: Triad, repeats: int
) -> tuple[Timings, dict[str, int | None], float]:
    """Time and measure the memory of every method that takes decoded arrays."""
    d = updates.shape[1]
    weights = examples.astype(np.float64)
    acc = np.zeros(d)

    def reset() -> None:
        acc.fill(0.0)

    def with_threads(fold: Fold, threads: int) -> Callable[[], None]:
        def run() -> None:
            numba.set_num_threads(threads)
            fold(acc, updates, weights)
            numba.set_num_threads(1)

        return run

    def fresh(fold: Fold) -> Callable[[], object]:
        return lambda: fold(np.zeros(d), updates, weights)

    results = [([updates[i]], int(examples[i])) for i in range(updates.shape[0])]
    cases: list[Case] = [(name, reset, with_threads(fold, 1)) for name, fold, _ in OURS]
    cases.append(("fededge parallel (2 threads)", reset, with_threads(fold_parallel, 2)))
    cases.append(("Flower `aggregate`", lambda: None, lambda: aggregate(results)))
    timings = interleaved(cases, tri, repeats)
    memory: dict[str, int | None] = {name: peak_extra(fresh(fold)) for name, fold, _ in OURS}
    memory["fededge parallel (2 threads)"] = None
    memory["Flower `aggregate`"] = peak_extra(lambda: aggregate(results))
    reset()
    fold_serial(acc, updates, weights)
    flwr_err = float(np.max(np.abs(aggregate(results)[0] - acc / weights.sum()), initial=0.0))
    return timings, memory, flwr_err


def measure_inplace(fit: list[tuple[Any, Any]], tri: Triad, repeats: int) -> tuple[Timings, int]:
    """Time Flower's ``aggregate_inplace`` and, alone, its ``np.load`` decoding."""

    def decode_all() -> None:
        for _, f in fit:  # one at a time, as aggregate_inplace holds only one decoded update
            parameters_to_ndarrays(f.parameters)

    timings = interleaved(
        [
            ("Flower `aggregate_inplace`", lambda: None, lambda: aggregate_inplace(fit)),
            ("decode", lambda: None, decode_all),
        ],
        tri,
        repeats,
    )
    return timings, peak_extra(lambda: aggregate_inplace(fit))


def run_size(d: int, n: int, repeats: int) -> dict[str, Any]:
    """Measure every method at one model size; returns rows and the triad figure."""
    rng = np.random.default_rng(d)
    updates = np.empty((n, d), dtype=np.float32)
    for i in range(n):
        rng.standard_normal(d, dtype=np.float32, out=updates[i])
    examples = rng.integers(10, 1000, n)
    acc_cached = 8 * d <= l3_bytes() // 2  # leave room for the update stream
    tri = Triad(min(4 * d * n, TRIAD_MAX_BYTES))
    timings, memory, flwr_err = measure_arrays(updates, examples, tri, repeats)

    # aggregate_inplace never looks at the ClientProxy, so None stands in for it.
    status = Status(code=Code.OK, message="")
    fit: list[tuple[Any, Any]] = [
        (None, FitRes(status, ndarrays_to_parameters([updates[i]]), int(examples[i]), {}))
        for i in range(n)
    ]
    del updates  # only the serialised copies are needed from here on
    gc.collect()
    more, memory["Flower `aggregate_inplace`"] = measure_inplace(fit, tri, repeats)
    timings.update(more)
    del fit

    traffic = {name: (t if not acc_cached or t is None else 4) for name, _, t in OURS}
    rows = []
    for name, pairs in timings.items():
        if name == "decode":
            continue
        b = traffic.get(name)
        rows.append(
            {
                "name": name,
                "t": statistics.median(t for t, _ in pairs),
                # Each run is paired with the triad pass just before it; median of the ratios.
                "pct": statistics.median(4 * d * n / t / 1e9 / g for t, g in pairs),
                "traffic_pct": None
                if b is None
                else statistics.median(b * d * n / t / 1e9 / g for t, g in pairs),
                "mem": memory[name],
            }
        )
    return {
        "d": d,
        "n": n,
        "triad": statistics.median(g for pairs in timings.values() for _, g in pairs),
        "rows": rows,
        "decode_ms": statistics.median(t for t, _ in timings["decode"]) / n * 1e3,
        "acc_cached": acc_cached,
        "flwr_err": flwr_err,
    }


def table(res: dict[str, Any]) -> str:
    """Markdown table for one model size."""
    d, n, tri = res["d"], res["n"], res["triad"]
    t_flwr = next(r["t"] for r in res["rows"] if r["name"] == "Flower `aggregate`")
    lines = [
        f"**d = {d:,}, n = {n}** — triad {tri:.1f} GB/s (median); float64 accumulator "
        f"{8 * d / 2**20:.0f} MiB {'fits' if res['acc_cached'] else 'does not fit'} in L3.",
        "",
        "| method | ms/update | update GB/s | % of triad | traffic % of triad "
        "| vs Flower `aggregate` | peak extra memory |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in res["rows"]:
        ms = r["t"] / n * 1e3
        gbs = 4 * d * n / r["t"] / 1e9
        traffic = "—" if r["traffic_pct"] is None else f"{100 * r['traffic_pct']:.0f}%"
        mem = "—" if r["mem"] is None else f"{r['mem'] / 2**20:.0f} MiB"
        lines.append(
            f"| {r['name']} | {ms:.3f} | {gbs:.1f} | {100 * r['pct']:.0f}% | {traffic} "
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
        rows = {r["name"]: r for r in res["rows"]}
        best = min(("fededge serial (fused)", "fededge buffered (k=8)"), key=lambda k: rows[k]["t"])
        r = rows[best]
        speedup = rows["Flower `aggregate`"]["t"] / r["t"]
        mem_ratio = rows["Flower `aggregate`"]["mem"] / max(r["mem"], 1)
        out.append(
            f"- d = {res['d']:,}: {best} streams updates at {100 * r['pct']:.0f}% of triad "
            f"(target >= 75%: {'met' if r['pct'] >= 0.75 else 'not met'}; its memory traffic is "
            f"{100 * r['traffic_pct']:.0f}% of triad), {speedup:.1f}x Flower `aggregate` "
            f"(target >= 10x: {'met' if speedup >= 10 else 'not met'}), with "
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
    load = os.getloadavg()[0]
    md = "\n\n".join(
        [
            "## Aggregation kernels",
            f"Machine: {machine()}; load average {load:.1f} at the end of the run.",
            "Reproduce: `NUMBA_NUM_THREADS=2 python -m bench.bench_kernels` from the repository "
            "root in a venv with `fededge[aggregator]`, `flwr` and `psutil` "
            "(`pip install -e '.[bench]'`).",
            "Each method folds the same n float32 updates (weights = example counts, 10–999) "
            "into one result. Methods run round-robin, each run right after a one-thread Numba "
            "STREAM triad `a = b + s*c` pass (float64, STREAM byte counting 24 B/element, "
            f"arrays holding as many bytes as the n updates, at most {TRIAD_MAX_BYTES >> 30} "
            "GiB); figures are medians over "
            f"{args.repeats} rounds at d <= 1M and {args.repeats_large} above. *update GB/s* = "
            "bytes of float32 updates consumed per second (4 B/parameter/update); *% of triad* "
            "is the median of that rate over the triad measured just before each run. *traffic "
            "% of triad* counts instead the bytes the kernel must move from memory: the update "
            "(4 B) plus, when the float64 accumulator does not fit in L3, its read and write "
            "(16 B, divided by 8 for the buffered kernels); it can pass 100% because STREAM "
            "counting ignores the triad's write-allocate read of `a`. *Peak extra memory* is "
            "the tracemalloc peak during one whole aggregation (numpy reports its buffers to "
            "tracemalloc; the kernels allocate nothing), including the accumulator, excluding "
            "the inputs; a buffered aggregator also holds its k pending updates (k x 4d bytes), "
            "which it needs until they are folded anyway. Headline rows run on one thread; the "
            "2-thread row swings a lot on this shared 2-core host.",
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
