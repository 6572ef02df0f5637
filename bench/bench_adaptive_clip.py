"""Adaptive clipping against fixed clips at the same epsilon, distributed DP under SecAgg.

The simulation of bench_privacy.py (100 devices holding shards of sklearn's digits, softmax
regression, one local epoch per version), in fededge's secure mode only: every device clips with
``fededge.device.training.clip_and_noise``, encodes with the live secure-aggregation encoder
(``FixedPoint.encode``: the round's ``dp_scale``, Skellam noise z C / sqrt(t)), and the server
decodes only the sum. With adaptive clipping the device appends its bit as the extra masked
entry (``fededge.protocol.clipping.with_bit_entry``), the round's clip is C sqrt(1.1), and the
server reads the unclipped fraction from the sum and moves C with ``adapt_clip``, exactly as
the aggregator does. Fixed clips run at multiplier z; adaptive runs at z sqrt(1.1), which the
accountant charges at z: the same epsilon for both.

    .venv/bin/python bench/bench_adaptive_clip.py --devices 100 --versions 20 --seeds 5
"""

from __future__ import annotations

import argparse
import math

import numpy as np
from bench_privacy import _local_delta
from sklearn.datasets import load_digits

from fededge.aggregator.privacy import accounted_multiplier, epsilon_of
from fededge.device.training import clip_and_noise
from fededge.protocol import Plan
from fededge.protocol.clipping import (
    adapt_clip,
    bit_entry_scale,
    round_clip,
    unclipped_fraction,
    with_bit_entry,
)
from fededge.secagg.quantize import FixedPoint, add_mod, dp_scale

BITS = 32


def run(
    c0: float, gamma: float | None, z: float, versions: int, devices: int, t: int, seed: int
) -> tuple[float, float]:
    """Test accuracy after ``versions`` versions and the last clip."""
    data = load_digits()
    x = np.hstack([data.data / 16.0, np.ones((len(data.data), 1))]).astype(np.float64)
    y = data.target
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(x))
    test, train = order[:360], order[360:]
    shards = np.array_split(train, devices)
    w = np.zeros((x.shape[1], 10))
    plan = Plan(clip_norm=c0, noise_multiplier=z, target_unclipped_quantile=gamma)
    clip, d = c0, w.size
    extra = 1 if gamma is not None else 0
    for version in range(versions):
        rc = round_clip(plan, clip)
        share = z * clip / math.sqrt(t)
        fixed = FixedPoint(BITS, rc, dp_scale(devices, rc, BITS, share), 1.0)
        acc = np.zeros(d + 1 + extra, dtype=np.uint32)
        for i, shard in enumerate(shards):
            raw = {"w": _local_delta(w, x[shard], y[shard], 0.5).astype(np.float32)}
            clipped, norm, _ = clip_and_noise(raw, clip, 0.0, rng)
            v = clipped["w"].ravel()
            if gamma is not None:
                v = with_bit_entry(v, clip, norm <= clip)
            key = (seed << 40) + (version << 20) + i
            add_mod(acc, fixed.encode(v, 1.0, key, noise_stddev=share, rng=rng), BITS)
        total, sum_w = fixed.decode(acc)
        if gamma is not None:
            b = unclipped_fraction(float(total[-1]) / bit_entry_scale(clip), sum_w)
            total = total[:-1]
            clip = adapt_clip(clip, b, gamma)
        w = w + (total / devices).reshape(w.shape)
    return float(np.mean(np.argmax(x[test] @ w, 1) == y[test])), clip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=100)
    ap.add_argument("--versions", type=int, default=20)
    ap.add_argument("--threshold", type=int, default=0, help="t (default 9/10 of devices)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--z", type=float, default=2.0, help="multiplier charged per version")
    ap.add_argument("--gamma", type=float, default=0.5, help="target unclipped quantile")
    a = ap.parse_args()
    t = a.threshold or (9 * a.devices) // 10
    za = a.z * math.sqrt(1.1)  # adaptive: charged at za / sqrt(1.1) = z
    check = Plan(noise_multiplier=za, target_unclipped_quantile=a.gamma)
    assert abs(accounted_multiplier(check) - a.z) < 1e-9
    eps = epsilon_of(((a.z, a.versions),), 1e-5)
    print(f"epsilon = {eps:.3g} at delta = 1e-5 for {a.versions} versions (both columns); "
          f"{a.devices} devices, t = {t}, gamma = {a.gamma}, {a.seeds} seeds")  # fmt: skip
    print("| starting C | fixed C | adaptive (last C) |")
    print("|---|---|---|")
    for c0 in (0.02, 0.1, 0.5, 2.0, 10.0):
        fixed = [run(c0, None, a.z, a.versions, a.devices, t, s)[0] for s in range(a.seeds)]
        ada = [run(c0, a.gamma, za, a.versions, a.devices, t, s) for s in range(a.seeds)]
        print(
            f"| {c0:g} | {np.mean(fixed):.3f} | {np.mean([r[0] for r in ada]):.3f} "
            f"({np.median([r[1] for r in ada]):.3g}) |",
            flush=True,
        )


if __name__ == "__main__":
    main()
