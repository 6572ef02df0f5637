"""``fededge demo``: run broker, aggregator and simulated devices on this machine."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import click

from fededge.logs import setup_logging


@click.command()
@click.option(
    "--devices",
    default=10,
    show_default=True,
    type=click.IntRange(1, 200),
    help="Simulated devices, each with its own non-IID share of the data.",
)
@click.option(
    "--versions",
    type=click.IntRange(1, 10_000),
    help="Stop after this many model versions [default: 40, or the example's].",
)
@click.option(
    "--example",
    help="Run an example model of examples/ instead of the digits: diabetes_regression, "
    "sensor_autoencoder, multilabel, transfer_digits (prebuilt bundles; no TensorFlow).",
)
@click.option(
    "--model",
    type=click.Choice(["mlp", "cnn"]),
    default="mlp",
    show_default=True,
    help="Shipped model bundle to train (digits_mlp or digits_cnn).",
)
@click.option(
    "--noise",
    default=0.0,
    show_default=True,
    type=click.FloatRange(0),
    help="Gaussian noise stddev added to each clipped update.",
)
@click.option(
    "--dp-epsilon",
    type=click.FloatRange(0, min_open=True),
    default=None,
    help="Privacy budget at delta=1e-5 for all versions: the noise multiplier is sized for it, "
    "and each version shows the epsilon spent (docs/privacy.md).",
)
@click.option(
    "--clip",
    default=5.0,
    show_default=True,
    type=click.FloatRange(0, min_open=True),
    help="L2 clip norm of an update.",
)
@click.option(
    "--target-unclipped-quantile",
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    default=None,
    help="Adaptive clipping: --clip is where the clip starts; each version moves it toward "
    "this quantile of the update norms and shows it (docs/privacy.md).",
)
@click.option(
    "--alpha",
    default=0.5,
    show_default=True,
    type=click.FloatRange(0, min_open=True),
    help="Dirichlet concentration of the non-IID split (smaller = more skewed).",
)
@click.option(
    "--seed",
    default=0,
    show_default=True,
    type=int,
    help="Seed of the data split, the partitions and the devices' noise.",
)
@click.option(
    "--server-optimizer",
    default="sgd",
    show_default=True,
    type=click.Choice(["sgd", "avgm", "adam", "yogi", "adagrad"]),
    help="Server optimizer applied to each version's mean update (plan server_optimizer).",
)
@click.option(
    "--server-lr",
    default=1.0,
    show_default=True,
    type=click.FloatRange(0, 100, min_open=True),
    help="Server learning rate (plan server_learning_rate).",
)
@click.option(
    "--update-encoding",
    default="f32",
    show_default=True,
    type=click.Choice(["f32", "f16", "int8"]),
    help="How devices encode their updates (plan update_encoding).",
)
@click.option(
    "--update-block",
    default=0,
    show_default=True,
    type=click.IntRange(0),
    help="int8: elements per scale (0: one scale per tensor).",
)
@click.option("--broker", help="Use this broker (mqtt://host:port) instead of an embedded one.")
@click.option(
    "--mqtt-version",
    type=click.Choice(["3.1.1", "5"]),
    help="MQTT protocol with --broker (the embedded broker speaks 3.1.1).",
)
@click.option(
    "-o",
    "--output",
    "out_dir",
    default=Path("demo-out"),
    show_default=True,
    type=click.Path(path_type=Path),
    help="Where the plot goes.",
)
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="Write a JSON summary.")
@click.option(
    "--secure-aggregation",
    is_flag=True,
    help="Synchronous SecAgg+ rounds over all devices: the aggregator only sees sums.",
)
@click.option(
    "--log-level",
    default="warning",
    show_default=True,
    type=click.Choice(["debug", "info", "warning", "error"]),
    help="Log level of the aggregator and devices.",
)
def demo(log_level: str, out_dir: Path, json_path: Path | None, **kw: object) -> int:
    """Federated learning on one machine: devices learn digits together, data stays local."""
    from rich.console import Console
    from rich.table import Table

    from fededge.demo import DemoConfig, VersionRow, run_demo, run_task, write_outputs

    setup_logging(log_level)
    if kw["versions"] is None:
        kw.pop("versions")
    example = kw.get("example")
    if example is not None:
        from fededge.demo_examples import get_example

        ex = get_example(str(example))
        kw.setdefault("versions", ex.versions)
        kw.update(
            learning_rate=ex.learning_rate,
            epochs=ex.epochs,
            examples_per_update=ex.examples_per_update,
        )
    cfg = DemoConfig(out_dir=out_dir, json_path=json_path, **kw)  # type: ignore[arg-type]
    cfg = dataclasses.replace(cfg, task=run_task(cfg))
    console = Console(highlight=False)
    where = cfg.broker or "an embedded broker (amqtt)"
    what = f"{cfg.model}, non-IID digits" if example is None else f"{example}, non-IID"
    console.print(
        f"[bold]fededge demo[/]: {cfg.devices} devices ({what}, "
        f"alpha={cfg.alpha}) on {where}, task {cfg.task}, until version {cfg.versions}"
    )
    t0 = time.monotonic()
    if example is None:
        console.print(" version  updates  held-out accuracy    loss   seconds")

        def show(r: VersionRow) -> None:
            bar = "█" * round(r.accuracy * 20)
            console.print(
                f" {r.version:7d}  {r.updates:7d}  {r.accuracy:8.3f} {bar:<20s} {r.loss:6.3f} "
                f"{r.seconds:8.2f}"
                + (f"  epsilon={r.epsilon:.3g}" if r.epsilon is not None else "")
                + (f"  clip={r.clip:.3g}" if r.clip is not None else "")
            )
    else:
        header: list[str] = []

        def show(r: VersionRow) -> None:
            names = [k for k in r.metrics if k != "loss"]
            if not header:
                header.extend(names)
                cols = "".join(f"{n:>11s}" for n in names)
                console.print(f" version  updates{cols}     loss  seconds   (held-out)")
            vals = "".join(f"{r.metrics[n]:11.4f}" for n in header)
            console.print(f" {r.version:7d}  {r.updates:7d}{vals} {r.loss:7.4f} {r.seconds:8.2f}")

    summary = run_demo(cfg, show)
    png = write_outputs(summary, cfg)
    table = Table(show_header=False, box=None)
    if example is None:
        table.add_row("final held-out accuracy", f"[bold]{summary.final_accuracy:.3f}[/]")
    else:
        final = summary.versions[-1].metrics
        for k, v in final.items():
            style = "bold" if k == summary.metric else ""
            table.add_row(f"final held-out {k}", f"[{style}]{v:.4f}[/]" if style else f"{v:.4f}")
    table.add_row("versions", str(summary.versions[-1].version))
    table.add_row("wall time", f"{time.monotonic() - t0:.1f} s")
    table.add_row("plot", str(png))
    if json_path:
        table.add_row("summary", str(json_path))
    console.print(table)
    return 0
