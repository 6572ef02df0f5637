"""``fededge model``: build, init, pull and inspect model bundles and versions."""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path

import click
import numpy as np

from fededge.build.builder import ARCHS
from fededge.cli.common import LazyGroup, settings_options
from fededge.device.bundle import GRAPH_FILE
from fededge.errors import ConfigError, ProtocolError
from fededge.protocol import Graph, ModelVersion, Plan, decode_json, decode_tensors
from fededge.protocol.vocab import NO_GRAPH
from fededge.settings import Settings
from fededge.tasks import publish_initial

log = logging.getLogger("fededge.model")
MAX_FILE = 1 << 31


@click.group(
    cls=LazyGroup,
    lazy={"inspect": "fededge.cli.model_io:inspect", "pull": "fededge.cli.model_io:pull"},
)
def model() -> None:
    """Build, publish, fetch and inspect models."""


def load_init_payloads(
    task: str, bundle: Path | None, weights: Path | None, plan_file: Path | None
) -> tuple[Graph | None, ModelVersion, Plan]:
    """Read and validate what `model init` publishes; every problem is a ConfigError."""
    if (bundle is None) == (weights is None):
        raise ConfigError("give exactly one of --bundle DIR or --weights FILE.safetensors")
    graph: Graph | None = None
    if bundle is not None:
        from fededge.device.bundle import load_bundle

        b = load_bundle(bundle)
        graph = Graph(task=task, tflite=b.graph, spec=b.spec.to_json())
        tensors = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in b.weights.items()}
    elif weights is not None:
        try:
            payload = decode_tensors(weights.read_bytes(), max_bytes=MAX_FILE)
        except OSError as e:
            raise ConfigError(f"--weights {weights}: cannot read: {e.strerror}") from None
        except ProtocolError as e:
            raise ConfigError(f"--weights {weights}: not a valid safetensors file: {e}") from None
        tensors = {}
        for name, arr in payload.tensors.items():
            if arr.dtype != np.float32:
                raise ConfigError(
                    f"--weights {weights}: tensor {name!r} is {arr.dtype}, not float32"
                )
            if not np.all(np.isfinite(arr)):
                raise ConfigError(f"--weights {weights}: tensor {name!r} has NaN or Inf")
            tensors[name] = np.array(arr)
        if not tensors:
            raise ConfigError(f"--weights {weights}: file holds no tensors")
    plan = Plan()
    if plan_file is not None:
        try:
            plan = decode_json(plan_file.read_bytes(), Plan)
        except OSError as e:
            raise ConfigError(f"--plan {plan_file}: cannot read: {e.strerror}") from None
        except ProtocolError as e:
            raise ConfigError(f"--plan {plan_file}: {e}") from None
    mv = ModelVersion(
        task=task,
        version=0,
        weights=tensors,
        graph_sha256=graph.sha256 if graph else NO_GRAPH,
        time=time.time(),
    )
    return graph, mv, plan


@model.command("init")
@click.option("--bundle", type=click.Path(path_type=Path), help="Model bundle directory.")
@click.option("--weights", type=click.Path(path_type=Path), help="Initial weights (safetensors).")
@click.option("--plan", "plan_file", type=click.Path(path_type=Path), help="Plan JSON file.")
@click.option(
    "--force",
    is_flag=True,
    help="Reset a task that already has a model (stop its aggregator and remove its state first).",
)
@click.option(
    "--sign-key",
    type=click.Path(dir_okay=False, path_type=Path),
    help="The model owner's private key (fededge keys generate): sign graph, plan and model.",
)
@settings_options
def init(
    settings: Settings,
    bundle: Path | None,
    weights: Path | None,
    plan_file: Path | None,
    force: bool,
    sign_key: Path | None,
) -> None:
    """Publish version 0 of a task (graph, plan and weights, all retained)."""
    from fededge.keys import load_private

    key = load_private(sign_key, "--sign-key") if sign_key is not None else None
    graph, mv, plan = load_init_payloads(settings.task, bundle, weights, plan_file)
    publish_initial(settings, graph, mv, plan, force=force, sign_key=key)
    n = sum(a.size for a in mv.weights.values())
    click.echo(
        f"published task {settings.task!r} version 0: {len(mv.weights)} tensors, {n} parameters, "
        f"graph {'sha256 ' + graph.sha256[:12] if graph else 'none'}"
    )


@model.command("build")
@click.option(
    "--model",
    "arch",
    type=click.Choice(sorted(ARCHS)),
    help="A shipped digits architecture to build (or give --keras).",
)
@click.option(
    "--keras",
    "keras_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="A Keras 3 model file (.keras) to turn into a bundle.",
)
@click.option(
    "--task",
    type=click.Choice(["classification", "binary", "multilabel", "regression"]),
    help="What the --keras model predicts (required with --keras).",
)
@click.option("--loss", help="Loss (default per task: sparse_categorical_crossentropy, "
              "binary_crossentropy, or mse; regression also takes mae, huber).")  # fmt: skip
@click.option(
    "--trainable",
    multiple=True,
    metavar="LAYER",
    help="Train only these layers (repeat); the others are frozen into the graph. "
    "Default: Keras's own trainable flags.",
)
@click.option(
    "--batch-size", type=click.IntRange(1, 65536), default=32, show_default=True,
    help="The bundle's batch size.",
)  # fmt: skip
@click.option(
    "--check/--no-check",
    default=True,
    show_default=True,
    help="Run a few LiteRT train steps against TensorFlow's (1e-5) and require the loss to fall.",
)
@click.option(
    "--sample",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Check on this data (.npz with arrays x and y) instead of random data.",
)
@click.option("--check-lr", type=click.FloatRange(0, min_open=True), default=0.05,
              show_default=True, help="Learning rate of the check's train steps.")  # fmt: skip
@click.option(
    "--normalize",
    "normalize_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Standardise inputs inside the graph with the per-feature mean/std of x in this .npz.",
)
@click.option("--name", help="The bundle's model name (default: the Keras model's).")
@click.option(
    "-o",
    "--output",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Bundle directory to (over)write.",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the initial weights.")
def build(
    arch: str | None,
    keras_path: Path | None,
    task: str | None,
    loss: str | None,
    trainable: tuple[str, ...],
    batch_size: int,
    check: bool,
    sample: Path | None,
    check_lr: float,
    normalize_path: Path | None,
    name: str | None,
    out_dir: Path,
    seed: int,
) -> int:
    """Build a model bundle (graph, initial weights, spec) with TensorFlow (the `convert` extra).

    Either a shipped digits architecture (--model) or any Keras 3 model of supported layers
    (--keras FILE --task TASK); see docs/models.md.
    """
    if (arch is None) == (keras_path is None):
        raise ConfigError("give exactly one of --model NAME or --keras FILE")
    if keras_path is None:
        from fededge.build.builder import build_bundle

        try:
            out = build_bundle(arch or "", out_dir, seed)
        except ImportError as e:
            raise ConfigError(
                f"`fededge model build` needs TensorFlow: pip install 'fededge[convert]' ({e})"
            ) from None
        digest = hashlib.sha256((out / GRAPH_FILE).read_bytes()).hexdigest()
        click.echo(f"built {arch} bundle in {out} (graph sha256 {digest})")
        return 0
    if task is None:
        raise ConfigError("--keras needs --task classification|binary|multilabel|regression")
    from fededge.build.from_keras import build_bundle as build_keras

    data = _npz(sample, "--sample", ("x", "y")) if sample else None
    norm = None
    if normalize_path is not None:
        x = _npz(normalize_path, "--normalize", ("x",))[0].astype(np.float64)
        norm = (x.mean(axis=0), np.maximum(x.std(axis=0), 1e-6))
    built = build_keras(
        keras_path, task, output=out_dir, loss=loss, trainable=list(trainable) or None,
        batch_size=batch_size, name=name, normalization=norm, check=check,
        sample=(data[0], data[1]) if data else None, check_lr=check_lr, seed=seed,
    )  # fmt: skip
    n = sum(w.size for w in built.weights.values())
    click.echo(
        f"built {built.spec['model']} ({task}, loss {built.spec['task']['loss']}) in {out_dir}: "
        f"{n} trainable parameters travel, {built.frozen_parameters} frozen in the graph "
        f"(graph sha256 {built.spec['graph_sha256']})"
    )
    if built.check is not None:
        c = built.check
        click.echo(
            f"check: {c['steps']} LiteRT train steps == TensorFlow's (max difference "
            f"{c['max_difference']:.1e}); loss {c['loss_first']:.4f} -> {c['loss_after']:.4f}"
        )
    return 0


def _npz(path: Path, option: str, keys: tuple[str, ...]) -> list[np.ndarray]:
    try:
        with np.load(path) as z:
            missing = [k for k in keys if k not in z]
            if missing:
                raise ConfigError(f"{option} {path}: no array named {missing[0]!r}")
            return [np.asarray(z[k]) for k in keys]
    except (OSError, ValueError) as e:
        raise ConfigError(f"{option} {path}: not a readable .npz file ({e})") from None
