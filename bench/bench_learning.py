"""Learning per version and per byte on the demo task (issue 13): optimizers, encodings, robust.

    .venv/bin/python -m bench.bench_learning --dir /tmp/learning --plot docs/learning.png
    .venv/bin/python -m bench.bench_learning --dir /tmp/learning --groups robust --seeds 0,1,2 \
        --robust-plot docs/robust.png
    .venv/bin/python -m bench.bench_learning --dir /tmp/learning --groups example

Runs ``fededge demo`` (10 devices, digits MLP, seed 0, 40 versions) once per configuration
below, unless its JSON summary already exists in ``--dir``; prints the versions to 0.90
held-out accuracy and the accuracy after 40 versions of each, and plots accuracy per version.
``robust``: 20% of the devices sign-flip their updates at the clip norm, with and without a
robust statistic, for each of ``--seeds`` (median reported). ``example``: the optimizers and
encodings on the your-own-model example diabetes_regression (versions to MSE <= 0.55).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

# (label, demo flags): server optimizers at the learning rates tuned by a small sweep, then the
# update encodings with the default optimizer.
OPTIMIZERS = [
    ("sgd lr=1", ["--server-optimizer", "sgd", "--server-lr", "1.0"]),
    ("sgd lr=2", ["--server-optimizer", "sgd", "--server-lr", "2.0"]),
    ("sgd lr=4", ["--server-optimizer", "sgd", "--server-lr", "4.0"]),
    ("avgm lr=0.3", ["--server-optimizer", "avgm", "--server-lr", "0.3"]),
    ("avgm lr=0.5", ["--server-optimizer", "avgm", "--server-lr", "0.5"]),
    ("avgm lr=1", ["--server-optimizer", "avgm", "--server-lr", "1.0"]),
    ("avgm lr=2", ["--server-optimizer", "avgm", "--server-lr", "2.0"]),
    ("avgm lr=4", ["--server-optimizer", "avgm", "--server-lr", "4.0"]),
    ("adam lr=0.003", ["--server-optimizer", "adam", "--server-lr", "0.003"]),
    ("adam lr=0.01", ["--server-optimizer", "adam", "--server-lr", "0.01"]),
    ("adam lr=0.03", ["--server-optimizer", "adam", "--server-lr", "0.03"]),
    ("adam lr=0.1", ["--server-optimizer", "adam", "--server-lr", "0.1"]),
    ("adam lr=0.3", ["--server-optimizer", "adam", "--server-lr", "0.3"]),
    ("yogi lr=0.01", ["--server-optimizer", "yogi", "--server-lr", "0.01"]),
    ("yogi lr=0.03", ["--server-optimizer", "yogi", "--server-lr", "0.03"]),
    ("yogi lr=0.1", ["--server-optimizer", "yogi", "--server-lr", "0.1"]),
    ("yogi lr=0.3", ["--server-optimizer", "yogi", "--server-lr", "0.3"]),
    ("adagrad lr=0.03", ["--server-optimizer", "adagrad", "--server-lr", "0.03"]),
    ("adagrad lr=0.1", ["--server-optimizer", "adagrad", "--server-lr", "0.1"]),
    ("adagrad lr=0.3", ["--server-optimizer", "adagrad", "--server-lr", "0.3"]),
    ("adagrad lr=1", ["--server-optimizer", "adagrad", "--server-lr", "1.0"]),
    ("adagrad lr=3", ["--server-optimizer", "adagrad", "--server-lr", "3.0"]),
]
ENCODINGS = [
    ("f32", ["--update-encoding", "f32"]),
    ("f16", ["--update-encoding", "f16"]),
    ("int8", ["--update-encoding", "int8"]),
    ("f32 rotated", ["--update-encoding", "f32", "--update-rotation", "hadamard"]),
    ("f16 rotated", ["--update-encoding", "f16", "--update-rotation", "hadamard"]),
    ("int8 rotated", ["--update-encoding", "int8", "--update-rotation", "hadamard"]),
    ("int8 + f16 model", ["--update-encoding", "int8", "--model-encoding", "f16"]),
    ("int8 rotated + f16 model",
     ["--update-encoding", "int8", "--update-rotation", "hadamard", "--model-encoding", "f16"]),
]  # fmt: skip


def wire_bytes(label: str) -> tuple[int, int]:
    """(bytes of one update, bytes of one model version) of the demo's digits MLP under the
    configuration ``label``: the safetensors messages as sent (sizes do not depend on values)."""
    import numpy as np

    from fededge.device.bundle import load_bundle, shipped_bundle_path
    from fededge.protocol import ModelVersion, Update
    from fededge.protocol.encoding import encode_delta
    from fededge.protocol.rotation import rotate_delta, seed

    weights = load_bundle(shipped_bundle_path("digits_mlp")).weights
    enc = label.split()[0]
    rotation = "hadamard" if "rotated" in label else "none"
    delta = {k: np.full(v.shape, 0.01, np.float32) for k, v in weights.items()}
    if rotation == "hadamard":
        delta = rotate_delta(delta, seed("digits-demo-000000", 0, 12))
    u = Update(task="digits-demo-000000", device="dev-07", update_id="0" * 32, base_version=12,
               num_examples=32, delta=encode_delta(delta, enc, 0), encoding=enc,
               rotation=rotation, train_loss=0.1, eval_loss=0.1, eval_accuracy=0.9)  # fmt: skip
    mv = ModelVersion(task="digits-demo-000000", version=12, weights=dict(weights),
                      graph_sha256="0" * 64, parent=11, updates=5, examples=160, time=1.7e9,
                      encoding="f16" if "f16 model" in label else "f32")  # fmt: skip
    return len(u.to_bytes()), len(mv.to_bytes())


# 20% of 10 devices (2) send sign-flipped updates at the clip norm (fededge/demo_attack.py).
BYZ = ["--byzantine-fraction", "0.2"]
TRIM2 = ["--robust", "trimmed_mean", "--robust-beta", "0.2"]
ROBUST = [
    ("honest, mean", []),
    ("honest, trimmed_mean b=0.2", ["--robust", "trimmed_mean", "--robust-beta", "0.2"]),
    ("honest, median", ["--robust", "median"]),
    ("20% byzantine, mean", BYZ),
    ("20% byzantine, mean + zeroing 2", [*BYZ, "--robust-zeroing", "2"]),
    (
        "20% byzantine, trimmed_mean b=0.1",
        [*BYZ, "--robust", "trimmed_mean", "--robust-beta", "0.1"],
    ),
    (
        "20% byzantine, trimmed_mean b=0.2",
        [*BYZ, "--robust", "trimmed_mean", "--robust-beta", "0.2"],
    ),
    ("20% byzantine, median", [*BYZ, "--robust", "median"]),
    # Attackers at 1.5x their honest norm: under a zeroing threshold of 2x the median norm.
    ("20% byzantine x1.5, mean", [*BYZ, "--byzantine-scale", "1.5"]),
    (
        "20% byzantine x1.5, mean + zeroing 2",
        [*BYZ, "--byzantine-scale", "1.5", "--robust-zeroing", "2"],
    ),
    (
        "20% byzantine x1.5, trimmed_mean b=0.2",
        [*BYZ, "--byzantine-scale", "1.5", "--robust", "trimmed_mean", "--robust-beta", "0.2"],
    ),
    # Both defences together.
    ("honest, trimmed_mean b=0.2 + zeroing 2", [*TRIM2, "--robust-zeroing", "2"]),
    ("20% byzantine, trimmed_mean b=0.2 + zeroing 2", [*BYZ, *TRIM2, "--robust-zeroing", "2"]),
    (
        "20% byzantine x1.5, trimmed_mean b=0.2 + zeroing 2",
        [*BYZ, "--byzantine-scale", "1.5", *TRIM2, "--robust-zeroing", "2"],
    ),
]
# The your-own-model example: a smaller sweep around the digits' tuned learning rates.
EXAMPLE = "diabetes_regression"
EXAMPLE_TARGET = 0.55  # MSE of the standardised target (centralised: 0.5425)
EXAMPLE_OPTIMIZERS = [
    (f"{o} lr={lr:g}", ["--server-optimizer", o, "--server-lr", str(lr)])
    for o, lrs in (
        ("sgd", (0.5, 1.0, 2.0)),  # 4 diverges (NaN losses: no version completes)
        ("avgm", (0.3, 0.5, 1.0)),
        ("adam", (0.01, 0.03, 0.1)),
        ("yogi", (0.01, 0.03, 0.1)),
        ("adagrad", (0.1, 0.3, 1.0)),
    )
    for lr in lrs
]


def _name(label: str) -> str:
    return label.replace(" ", "_").replace("=", "").replace(",", "").replace("%", "pct") + ".json"


def run(directory: Path, label: str, flags: list[str], versions: int, seed: int) -> dict[str, Any]:
    path = directory / _name(label)
    if not path.exists():
        cmd = [sys.executable, "-m", "fededge.cli", "demo", "--versions", str(versions),
               "--seed", str(seed), "--json", str(path), *flags]  # fmt: skip
        subprocess.run(cmd, check=True, cwd=directory, stdout=subprocess.DEVNULL)
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def try_run(
    directory: Path, label: str, flags: list[str], versions: int, seed: int
) -> dict[str, Any] | None:
    """``run``, or None if the demo failed or ran past 400 s (a diverged configuration whose
    devices send NaN losses, which the aggregator rejects, so no version completes)."""
    failed = directory / (_name(label) + ".failed")
    if failed.exists():
        return None
    path = directory / _name(label)
    if not path.exists():
        cmd = [sys.executable, "-m", "fededge.cli", "demo", "--versions", str(versions),
               "--seed", str(seed), "--json", str(path), *flags]  # fmt: skip
        try:
            subprocess.run(cmd, check=True, cwd=directory, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, timeout=400)  # fmt: skip
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
            failed.touch()
            return None
    return run(directory, label, flags, versions, seed)


def first_at(summary: dict[str, Any], target: float) -> int | None:
    return next((r["version"] for r in summary["versions"] if r["accuracy"] >= target), None)


def first_below(summary: dict[str, Any], metric: str, target: float) -> int | None:
    return next((r["version"] for r in summary["versions"] if r["metrics"][metric] <= target), None)


def robust_table(directory: Path, versions: int, seeds: list[int], plot: Path | None) -> None:
    """Accuracy after ``versions`` per configuration: the median over seeds, and each seed."""
    import statistics

    print(f"| configuration | accuracy after {versions} (median) | per seed | versions to 0.90 |")
    print("|---|---:|---|---|")
    for label, flags in ROBUST:
        runs = [run(directory, f"{label} seed{s}", flags, versions, s) for s in seeds]
        acc = [r["final_accuracy"] for r in runs]
        firsts = [first_at(r, 0.90) for r in runs]
        print(f"| {label} | {statistics.median(acc):.3f} | "
              f"{' '.join(f'{a:.3f}' for a in acc)} | "
              f"{' '.join(str(f) if f is not None else '-' for f in firsts)} |")  # fmt: skip
    if plot is not None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        shown = {"honest, mean", "20% byzantine, mean", "20% byzantine, trimmed_mean b=0.1",
                 "20% byzantine, trimmed_mean b=0.2", "20% byzantine, median",
                 "20% byzantine, mean + zeroing 2", "20% byzantine x1.5, mean",
                 "20% byzantine x1.5, trimmed_mean b=0.2 + zeroing 2"}  # fmt: skip
        for label, flags in ROBUST:
            if label not in shown:
                continue
            v = run(directory, f"{label} seed{seeds[0]}", flags, versions, seeds[0])["versions"]
            ax.plot([r["version"] for r in v], [r["accuracy"] for r in v], label=label)
        ax.axhline(0.90, color="grey", lw=0.5)
        ax.set(xlabel="version", ylabel="held-out accuracy", ylim=(0, 1),
               title=f"2 of 10 devices send sign-flipped updates (seed {seeds[0]})")  # fmt: skip
        ax.legend(loc="lower right", fontsize=8)
        fig.tight_layout()
        fig.savefig(plot, dpi=100)


def update_bytes(example: str, encoding: str) -> int:
    """Bytes of one update message of ``example``'s model in ``encoding`` (demo-like metadata)."""
    import numpy as np

    from fededge.device.bundle import load_bundle, shipped_bundle_path
    from fededge.protocol import Update
    from fededge.protocol.encoding import encode_delta

    bundle = load_bundle(shipped_bundle_path(example))
    rng = np.random.default_rng(0)
    delta = {n: rng.normal(scale=0.01, size=np.shape(w)).astype(np.float32)
             for n, w in bundle.weights.items()}  # fmt: skip
    u = Update(task=f"{example.replace('_', '-')}-demo-abcdef", device="dev-00",
               update_id="0123456789abcdef", base_version=12, num_examples=32,
               delta=encode_delta(delta, encoding, 0, rng), train_loss=0.5, eval_loss=0.5,
               eval_accuracy=0.5, encoding=encoding)  # fmt: skip
    return len(u.to_bytes())


def example_tables(directory: Path, versions: int, seed: int) -> None:
    ex = ["--example", EXAMPLE]
    print(f"| {EXAMPLE} | versions to MSE <= {EXAMPLE_TARGET} | best MSE (version) | "
          f"MSE after {versions} | bytes per update |")  # fmt: skip
    print("|---|---:|---:|---:|---:|")
    encodings = [(lbl, f) for lbl, f in ENCODINGS if lbl in ("f32", "f16", "int8")]
    for label, flags in EXAMPLE_OPTIMIZERS + encodings:
        s = try_run(directory, f"{EXAMPLE} {label}", [*ex, *flags], versions, seed)
        size = str(update_bytes(EXAMPLE, label)) if (label, flags) in encodings else ""
        if s is None:
            print(f"| {label} | failed (diverged) | - | - | {size} |")
            continue
        first = first_below(s, "mse", EXAMPLE_TARGET)
        best = min(s["versions"], key=lambda r: r["metrics"]["mse"])
        print(f"| {label} | {first if first is not None else f'> {versions}'} | "
              f"{best['metrics']['mse']:.4f} ({best['version']}) | {s['final_metric']:.4f} | "
              f"{size} |")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", type=Path, required=True, help="where the demo JSON summaries go")
    p.add_argument("--plot", type=Path, help="write the accuracy-per-version plot here (PNG)")
    p.add_argument("--versions", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only-encodings", action="store_true", help="skip the optimizer runs")
    p.add_argument("--seeds", default="0,1,2", help="robust group: seeds, comma-separated")
    p.add_argument("--robust-plot", type=Path, help="robust group: plot (PNG) of the first seed")
    p.add_argument("--groups", default="learning", help="learning, robust, example (comma list)")
    a = p.parse_args(argv)
    if a.only_encodings:
        OPTIMIZERS.clear()
    a.dir.mkdir(parents=True, exist_ok=True)
    groups = set(a.groups.split(","))
    if "robust" in groups:
        robust_table(a.dir, a.versions, [int(x) for x in a.seeds.split(",")], a.robust_plot)
    if "example" in groups:
        example_tables(a.dir, a.versions, a.seed)
    if "learning" not in groups:
        return 0
    results: dict[str, dict[str, Any]] = {}
    for group in (OPTIMIZERS, ENCODINGS):
        if group is ENCODINGS:
            f32_update = wire_bytes("f32")[0]
            print("| configuration | versions to 0.90 | accuracy after 40 | final loss "
                  "| bytes/update | x f32 | bytes/model version |")  # fmt: skip
            print("|---|---:|---:|---:|---:|---:|---:|")
        else:
            print("| configuration | versions to 0.90 | accuracy after 40 |")
            print("|---|---:|---:|")
        for label, flags in group:
            s = results[label] = run(a.dir, label, flags, a.versions, a.seed)
            first = first_at(s, 0.90)
            row = f"| {label} | {first if first is not None else '> 40'} | "
            row += f"{s['final_accuracy']:.3f} |"
            if group is ENCODINGS:
                ub, mb = wire_bytes(label)
                loss = s["versions"][-1]["loss"]
                row += f" {loss:.5f} | {ub:,} | {ub / f32_update:.3f} | {mb:,} |"
            print(row)
        print()
    if a.plot is not None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
        best: dict[str, str] = {}
        for label, _ in OPTIMIZERS:  # the tuned (fastest to 0.90) setting of each optimizer
            opt = label.split()[0]
            f = first_at(results[label], 0.90) or 10**9
            if opt not in best or f < (first_at(results[best[opt]], 0.90) or 10**9):
                best[opt] = label
        for ax, labels, title in (
            (axes[0], list(best.values()), "server optimizers (tuned lr)"),
            (axes[1], [lbl for lbl, _ in ENCODINGS[:6]], "update encodings (sgd)"),
        ):
            for label in labels:
                v = results[label]["versions"]
                ax.plot([r["version"] for r in v], [r["accuracy"] for r in v], label=label)
            ax.axhline(0.90, color="grey", lw=0.5)
            ax.set_title(title)
            ax.set_xlabel("version")
            ax.legend(loc="lower right")
        axes[0].set_ylabel("held-out accuracy")
        fig.tight_layout()
        fig.savefig(a.plot, dpi=100)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
