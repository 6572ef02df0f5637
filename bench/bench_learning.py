"""Learning per version and per byte on the demo task (issue 13): server optimizers, encodings.

    .venv/bin/python -m bench.bench_learning --dir /tmp/learning --plot docs/learning.png

Runs ``fededge demo`` (10 devices, digits MLP, seed 0, 40 versions) once per configuration
below, unless its JSON summary already exists in ``--dir``; prints the versions to 0.90
held-out accuracy and the accuracy after 40 versions of each, and plots accuracy per version.
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


def _name(label: str) -> str:
    return label.replace(" ", "_").replace("=", "") + ".json"


def run(directory: Path, label: str, flags: list[str], versions: int, seed: int) -> dict[str, Any]:
    path = directory / _name(label)
    if not path.exists():
        cmd = [sys.executable, "-m", "fededge.cli", "demo", "--versions", str(versions),
               "--seed", str(seed), "--json", str(path), *flags]  # fmt: skip
        subprocess.run(cmd, check=True, cwd=directory, stdout=subprocess.DEVNULL)
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def first_at(summary: dict[str, Any], target: float) -> int | None:
    return next((r["version"] for r in summary["versions"] if r["accuracy"] >= target), None)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", type=Path, required=True, help="where the demo JSON summaries go")
    p.add_argument("--plot", type=Path, help="write the accuracy-per-version plot here (PNG)")
    p.add_argument("--versions", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only-encodings", action="store_true", help="skip the optimizer runs")
    a = p.parse_args(argv)
    if a.only_encodings:
        OPTIMIZERS.clear()
    a.dir.mkdir(parents=True, exist_ok=True)
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
