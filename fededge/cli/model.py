"""``fededge model``: build, init, pull and inspect model bundles and versions."""

from __future__ import annotations

import logging
import queue
import time
import uuid
from pathlib import Path

import click
import numpy as np

from fededge.cli.common import settings_options
from fededge.errors import ConfigError, FededgeError, ProtocolError
from fededge.protocol import Graph, ModelVersion, Plan, Topics, decode_json, decode_tensors
from fededge.protocol.vocab import NO_GRAPH
from fededge.settings import Settings

log = logging.getLogger("fededge.model")
MAX_FILE = 1 << 31


@click.group()
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
    else:
        assert weights is not None
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


def retained(settings: Settings, topic: str, wait: float = 1.5) -> bytes | None:
    """The retained payload on ``topic`` (None if there is none), via a throwaway client."""
    from fededge.mqtt import MqttClient

    client = MqttClient(settings.broker, f"fededge-cli-{uuid.uuid4().hex[:10]}", persistent=False)
    with client:  # connects, and disconnects at the end
        client.subscribe(topic, qos=1)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                msg = client.messages.get(timeout=0.1)
            except queue.Empty:
                continue
            if msg.topic == topic and msg.retain:
                return msg.payload or None
    return None


def publish_initial(
    settings: Settings, graph: Graph | None, mv: ModelVersion, plan: Plan, *, force: bool = False
) -> None:
    """Publish graph, plan and version 0 retained; refuse to replace a live task unless forced."""
    from fededge.mqtt import MqttClient

    topics = Topics(settings.topic_prefix, settings.task)
    existing = retained(settings, topics.model)
    if existing is not None and not force:
        try:
            v = ModelVersion.from_bytes(existing, max_bytes=MAX_FILE).version
            what = f"version {v}"
        except FededgeError:
            what = "an unreadable model message"
        raise ConfigError(
            f"task {settings.task!r} already has {what} on {topics.model}; use --force to replace "
            "it (stop the aggregator and remove its state directory first)"
        )
    client = MqttClient(settings.broker, f"fededge-init-{uuid.uuid4().hex[:10]}", persistent=False)
    with client:  # connects, and disconnects at the end
        if graph is not None:
            client.publish(topics.graph, graph.to_bytes(), retain=True, wait=True, timeout=30)
        client.publish(topics.plan, plan.to_bytes(), retain=True, wait=True, timeout=30)
        client.publish(topics.model, mv.to_bytes(), retain=True, wait=True, timeout=30)


@model.command("init")
@click.option("--bundle", type=click.Path(path_type=Path), help="Model bundle directory.")
@click.option("--weights", type=click.Path(path_type=Path), help="Initial weights (safetensors).")
@click.option("--plan", "plan_file", type=click.Path(path_type=Path), help="Plan JSON file.")
@click.option("--force", is_flag=True, help="Replace a task that already has a model.")
@settings_options
def init(
    settings: Settings,
    bundle: Path | None,
    weights: Path | None,
    plan_file: Path | None,
    force: bool,
) -> None:
    """Publish version 0 of a task (graph, plan and weights, all retained)."""
    graph, mv, plan = load_init_payloads(settings.task, bundle, weights, plan_file)
    publish_initial(settings, graph, mv, plan, force=force)
    n = sum(a.size for a in mv.weights.values())
    click.echo(
        f"published task {settings.task!r} version 0: {len(mv.weights)} tensors, {n} parameters, "
        f"graph {'sha256 ' + graph.sha256[:12] if graph else 'none'}"
    )


@model.command(
    "build",
    add_help_option=False,  # --help goes to the builder, which knows its own options
    context_settings={"ignore_unknown_options": True},
)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def build(args: tuple[str, ...]) -> int:
    """Build a model bundle with TensorFlow (needs the `convert` extra); --help for options."""
    try:
        from fededge.device.build import main as build_main
    except ImportError as e:
        raise ConfigError(
            f"`fededge model build` needs TensorFlow: pip install 'fededge[convert]' ({e})"
        ) from None
    return int(build_main(list(args)) or 0)
