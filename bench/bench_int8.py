"""Fused int8 dequantise-accumulate against the float32 fold (issue 13).

    NUMBA_NUM_THREADS=1 python -m bench.bench_int8 --d 1000000 --n 64 --repeats 15

Folds the same n updates of d parameters into a float64 accumulator, as float32 rows
(``kernels.accumulate_group``, 8 rows per pass) and as int8 rows with one scale per tensor or
per block of 256 (``kernels.dequant_accumulate_i8_group``, 16 rows per pass, terms summed in
float32 then added to the float64 accumulator; no float32 copy of an update).
Methods run interleaved; each repeat's int8/f32 ratio is against the same repeat's baseline;
the median of the repeats is printed (updates per second and the ratio).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fededge.aggregator import kernels


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d", type=int, default=1_000_000)
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    rng = np.random.default_rng(a.seed)
    f32 = [rng.normal(size=a.d).astype(np.float32) for _ in range(a.n)]
    q8 = [rng.integers(-127, 128, size=a.d, dtype=np.int8) for _ in range(a.n)]
    per_tensor = [np.array([0.01], np.float32) for _ in range(a.n)]
    nblk = -(-a.d // 256)
    per_block = [rng.random(nblk, dtype=np.float32) for _ in range(a.n)]
    w = np.ones(a.n)
    acc = np.zeros(a.d)
    methods: dict[str, Callable[[], None]] = {
        "f32": lambda: kernels.accumulate_group(acc, f32, w),
        "int8/tensor": lambda: kernels.dequant_accumulate_i8_group(acc, q8, per_tensor, a.d, w),
        "int8/block256": lambda: kernels.dequant_accumulate_i8_group(acc, q8, per_block, 256, w),
    }
    for fn in methods.values():  # compile and warm caches
        fn()
    times: dict[str, list[float]] = {k: [] for k in methods}
    for _ in range(a.repeats):
        for name, fn in methods.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    print(f"d={a.d} n={a.n} repeats={a.repeats} (median; ratio vs the same repeat's f32)")
    print("| method | updates/s | bytes/update | x f32 |")
    print("|---|---:|---:|---:|")
    for name, ts in times.items():
        ratio = statistics.median(f / t for f, t in zip(times["f32"], ts, strict=True))
        nbytes = a.d * (4 if name == "f32" else 1)
        print(f"| {name} | {a.n / statistics.median(ts):,.0f} | {nbytes:,} | {ratio:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
