"""What the randomized Hadamard rotation buys int8 updates, and what it costs (issue 13).

    NUMBA_NUM_THREADS=1 .venv/bin/python -m bench.bench_rotation

Relative L2 error ``||decode(encode(x)) - x|| / ||x||`` of one int8 encoding (one scale per
tensor, and per 256) with and without rotation, for Gaussian deltas and heavy-tailed ones
(Student t, 2 degrees of freedom: a few large coordinates set the scale), median of 5 draws;
then the time of one rotation (numpy, what a device runs) and one unrotation (Numba, what the
aggregator runs once per version), median of 5.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fededge.aggregator.rotated import Rotation
from fededge.protocol import rotation as R
from fededge.protocol.encoding import decode_delta, encode_delta


def _error(x: np.ndarray, block: int, rotate: bool, rng: np.random.Generator) -> float:
    s = R.seed("bench", 0, int(rng.integers(1 << 30)))
    t = R.rotate_delta({"x": x}, s) if rotate else {"x": x}
    dec = decode_delta(encode_delta(t, "int8", block, rng), "int8", block)
    y = dec[R.ROTATED] if rotate else dec["x"]
    back = R.unrotate(y, s, x.size) if rotate else y
    return float(np.linalg.norm(back - x) / np.linalg.norm(x))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[2410, 1_000_000])
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args(argv)
    rng = np.random.default_rng(0)
    print("| d | delta | block | int8 error | rotated int8 error |")
    print("|---:|---|---:|---:|---:|")
    for d in a.sizes:
        for kind in ("gaussian", "student-t2"):
            for block in (0, 256):
                errs: dict[bool, list[float]] = {False: [], True: []}
                for _ in range(a.repeats):
                    x = rng.normal(size=d) if kind == "gaussian" else rng.standard_t(2, size=d)
                    x = x.astype(np.float32)
                    for rot in (False, True):
                        errs[rot].append(_error(x, block, rot, rng))
                print(f"| {d:,} | {kind} | {block or 'tensor'} | "
                      f"{statistics.median(errs[False]):.4f} | "
                      f"{statistics.median(errs[True]):.4f} |")  # fmt: skip
    print()
    print("| d | P | rotate (numpy, device) ms | unrotate (Numba, aggregator) ms |")
    print("|---:|---:|---:|---:|")
    for d in a.sizes:
        x = rng.normal(size=d)
        s = R.seed("bench", 0, 1)
        rot = Rotation(s, d)
        rot.unrotate(rot.rotate(x))  # compile
        tr, tu = [], []
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            y = R.rotate(x, s)
            tr.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            rot.unrotate(y)
            tu.append(time.perf_counter() - t0)
        print(f"| {d:,} | {R.padded_size(d):,} | {1e3 * statistics.median(tr):.1f} | "
              f"{1e3 * statistics.median(tu):.1f} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
