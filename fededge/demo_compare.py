"""Run an example of examples/: ``examples/NAME.py build|demo|compare``.

``compare`` measures the federated metric (``fededge demo --example NAME`` on its defaults)
against centralised training of the same model on the same data (docs/benchmarks.md).
"""

from __future__ import annotations

from typing import Any

from fededge.demo_examples import build_example, centralised, get_example


def compare(
    name: str, *, devices: int = 10, seed: int = 0, central_epochs: int | None = None
) -> dict[str, Any]:
    """Federated (``fededge demo --example``, defaults) vs centralised training, same model and
    data: the primary metric of each and their relative difference."""
    from fededge.demo import DemoConfig, run_demo
    from fededge.device.bundle import load_bundle, shipped_bundle_path
    from fededge.device.runtime import ModelRuntime

    ex = get_example(name)
    cfg = DemoConfig(
        devices=devices, versions=ex.versions, example=name, learning_rate=ex.learning_rate,
        epochs=ex.epochs, examples_per_update=ex.examples_per_update, seed=seed,
    )  # fmt: skip
    summary = run_demo(cfg)
    fed = summary.versions[-1].metrics
    b = load_bundle(shipped_bundle_path(name))
    rt = ModelRuntime.from_bundle(b)
    central_epochs = central_epochs or ex.central_epochs
    cen = centralised(ex, rt, b.weights, ex.data(seed), central_epochs, seed)
    m = b.spec.task.primary_metric
    return {
        "example": name, "metric": m, "federated": fed, "centralised": cen,
        "relative_difference": abs(fed[m] - cen[m]) / abs(cen[m]),
        "versions": ex.versions, "devices": devices, "central_epochs": central_epochs,
    }  # fmt: skip


def main(name: str, argv: list[str]) -> int:
    """``examples/NAME.py build|demo|compare``."""
    import json
    import sys
    from pathlib import Path

    cmd = argv[0] if argv else "demo"
    if cmd == "build":
        out = Path(argv[1]) if len(argv) > 1 else Path(__file__).parent / "models" / name
        built = build_example(name, out)
        print(f"built {name} into {out}; check: {built.check}")
    elif cmd == "compare":
        print(json.dumps(compare(name), indent=2))
    elif cmd == "demo":
        from fededge.cli import main as cli

        return cli(["demo", "--example", name, *argv[1:]])
    else:
        print(f"usage: {sys.argv[0]} build [DIR] | demo [demo options] | compare", file=sys.stderr)
        return 2
    return 0
