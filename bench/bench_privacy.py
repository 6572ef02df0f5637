"""Accuracy against epsilon: central DP, local noise and distributed DP under secure aggregation.

A faithful in-process simulation (the machine is shared and loaded: 100+ MQTT clients with
LiteRT would measure the broker, not the privacy): N devices hold shards of sklearn's digits,
train a softmax-regression model with local SGD in numpy, clip their delta to C with
``fededge.device.training.clip_and_noise`` (the devices' own code path), and the server averages:

* central DP: the sum of clipped deltas plus one N(0, (zC)^2) draw (a trusted server);
* local noise: every device adds N(0, (zC)^2) itself (fededge's plaintext mode);
* distributed DP: every device encodes its clipped delta with the live secure-aggregation
  code (``fededge.secagg.quantize.FixedPoint.encode``: stochastic rounding at the round's
  ``dp_scale``, Skellam noise of standard deviation z C / sqrt(t)), and the server decodes only
  the sum modulo 2^32 (the masks cancel in it, so they are left out); t = the threshold of
  survivors, all n devices survive (so the sum carries n/t times the variance central DP adds).

Epsilon is the aggregator's accountant (fededge.aggregator.privacy.epsilon_of, RDP, q = 1) for
T versions at multiplier z: the same for all three, since each bounds one device's influence
with noise z C on what the adversary sees (local: each update, to the aggregator).

    .venv/bin/python bench/bench_privacy.py --devices 100 --out docs/privacy.png
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits

from fededge.aggregator.privacy import epsilon_of
from fededge.device.training import clip_and_noise
from fededge.secagg.quantize import FixedPoint, add_mod, dp_scale

BITS = 32


def _local_delta(w: np.ndarray, x: np.ndarray, y: np.ndarray, lr: float) -> np.ndarray:
    """One epoch of batch-size-8 SGD on softmax regression; the weight delta."""
    w0 = w
    for start in range(0, len(x), 8):
        xb, yb = x[start : start + 8], y[start : start + 8]
        logits = xb @ w
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        p[np.arange(len(yb)), yb] -= 1
        w = w - lr * xb.T @ p / len(yb)
    return np.asarray(w - w0)


def run(mode: str, z: float, versions: int, devices: int, t: int, seed: int) -> float:
    data = load_digits()
    x = np.hstack([data.data / 16.0, np.ones((len(data.data), 1))]).astype(np.float64)
    y = data.target
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(x))
    test, train = order[:360], order[360:]
    shards = np.array_split(train, devices)
    w = np.zeros((x.shape[1], 10))
    clip, server_lr = 0.5, 1.0
    d = w.size
    share = z * clip / math.sqrt(t)
    fixed = FixedPoint(BITS, clip, dp_scale(devices, clip, BITS, share), 1.0)
    for version in range(versions):
        total = np.zeros(d)
        acc = np.zeros(d + 1, dtype=np.uint32)
        for i, shard in enumerate(shards):
            raw = {"w": _local_delta(w, x[shard], y[shard], 0.5).astype(np.float32)}
            sigma = z * clip if mode == "local" else 0.0
            noised, _, _ = clip_and_noise(raw, clip, sigma, rng)
            v = noised["w"].astype(np.float64).ravel()
            if mode != "distributed":
                total += v
                continue
            key = (seed << 40) + (version << 20) + i
            add_mod(acc, fixed.encode(v, 1.0, key, noise_stddev=share, rng=rng), BITS)
        if mode == "central":
            total += rng.normal(0.0, z * clip, d)
        elif mode == "distributed":
            total, _ = fixed.decode(acc)
        w = w + server_lr * (total / devices).reshape(w.shape)
    return float(np.mean(np.argmax(x[test] @ w, 1) == y[test]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=100)
    ap.add_argument("--versions", type=int, default=20)
    ap.add_argument("--threshold", type=int, default=0, help="t (default 9/10 of devices)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None, help="write the plot here")
    a = ap.parse_args()
    t = a.threshold or (9 * a.devices) // 10
    zs = [0.5, 1.0, 2.0, 4.0, 8.0]
    rows = []
    print("| z | epsilon (delta=1e-5) | central DP | local noise | distributed DP (SecAgg) |")
    print("|---|---|---|---|---|")
    for z in zs:
        eps = epsilon_of(((z, a.versions),), 1e-5)
        accs = {
            m: float(np.mean([run(m, z, a.versions, a.devices, t, s) for s in range(a.seeds)]))
            for m in ("central", "local", "distributed")
        }
        rows.append((eps, accs))
        print(
            f"| {z:g} | {eps:.3g} | {accs['central']:.3f} | {accs['local']:.3f} | "
            f"{accs['distributed']:.3f} |",
            flush=True,
        )
    base = float(np.mean([run("none", 0.0, a.versions, a.devices, t, s) for s in range(a.seeds)]))
    print(f"no noise: {base:.3f} ({a.devices} devices, {a.versions} versions, t = {t})")
    if a.out is not None:
        import matplotlib
        import matplotlib.ticker

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for m, label in (
            ("central", "central DP"),
            ("local", "local noise"),
            ("distributed", "distributed DP under SecAgg"),
        ):
            ax.plot([r[0] for r in rows], [r[1][m] for r in rows], marker="o", label=label)
        ax.axhline(base, color="grey", ls="--", label="no noise")
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xticks([r[0] for r in rows], [f"{r[0]:.3g}" for r in rows])
        ax.set_xlabel(f"epsilon at delta=1e-5 ({a.versions} versions)")
        ax.set_ylabel("test accuracy (digits)")
        ax.set_title(f"{a.devices} simulated devices, t = {t}")
        ax.legend()
        fig.tight_layout()
        fig.savefig(a.out, dpi=100)


if __name__ == "__main__":
    main()
