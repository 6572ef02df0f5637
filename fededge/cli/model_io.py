"""``fededge model pull`` and ``fededge model inspect``: fetch a version as a bundle, look inside.

``pull`` turns the retained graph and a model version into a bundle directory that
``load_bundle`` accepts, plus a ``version.json``; ``inspect`` describes a bundle directory, a
``.tflite``, a safetensors file (weights or a saved model/update/graph message) or a JSON message.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import click
import numpy as np
from rich.padding import Padding
from rich.table import Table
from rich.text import Text

from fededge.aggregator.store import stored_version_path
from fededge.cli.common import quiet_transport, settings_options
from fededge.cli.render import MAX_MESSAGE, console, finite, fmt_time, human_bytes
from fededge.device.bundle import (
    GRAPH_FILE,
    SPEC_FILE,
    WEIGHTS_FILE,
    BundleSpec,
    load_bundle,
    parse_spec,
    parse_weights,
)
from fededge.device.trust import TrustRules
from fededge.errors import FededgeError, ModelError, ProtocolError
from fededge.fsio import atomic_write
from fededge.mqtt import read_retained
from fededge.protocol import (
    AggregatorStatus,
    DeviceStatus,
    Graph,
    ModelVersion,
    Plan,
    Receipt,
    Topics,
    Update,
    VersionMetrics,
    decode_json,
    decode_tensors,
)
from fededge.protocol.signing import SignedKind
from fededge.protocol.vocab import NO_GRAPH
from fededge.settings import Settings

VERSION_FILE = "version.json"
_JSON_KINDS: dict[str, Any] = {
    "plan": Plan,
    "receipt": Receipt,
    "device_status": DeviceStatus,
    "aggregator_status": AggregatorStatus,
    "version_metrics": VersionMetrics,
}


# --- pull -------------------------------------------------------------------------------------


def fetch_retained(settings: Settings, wait: float) -> tuple[bytes | None, Graph | None]:
    """The retained model payload and graph of the task (None where nothing is retained)."""
    topics = Topics(settings.topic_prefix, settings.task)
    held = read_retained(
        settings.broker, [topics.model, topics.graph], wait=wait, required=[topics.model]
    )
    # Verified when the settings name trust keys (trust.owner_key, trust.aggregator_key).
    rules = TrustRules.from_settings(settings)
    model = held.get(topics.model)
    if model:
        model = rules.open(SignedKind.MODEL, model)
    graph_bytes = held.get(topics.graph)
    if model is not None and graph_bytes is None and _needs_graph(model):
        # The model names a graph that was not in yet: wait for it (or for ``wait``).
        graph_bytes = read_retained(
            settings.broker, [topics.graph], wait=wait, required=[topics.graph]
        ).get(topics.graph)
    graph = None
    if graph_bytes:
        graph_bytes = rules.open(SignedKind.GRAPH, graph_bytes)
    if graph_bytes is not None:
        try:
            graph = Graph.from_bytes(graph_bytes, max_bytes=MAX_MESSAGE)
        except ProtocolError as e:
            raise FededgeError(f"the retained graph on {topics.graph} is invalid: {e}") from None
    return model, graph


def _needs_graph(model: bytes) -> bool:
    try:
        return ModelVersion.from_bytes(model, max_bytes=MAX_MESSAGE).graph_sha256 != NO_GRAPH
    except ProtocolError:
        return False  # pull_version reports the invalid message


def _from_state_dir(settings: Settings, version: int, latest: int | None) -> bytes:
    path = stored_version_path(settings.state_dir, settings.task, version)
    try:
        return path.read_bytes()
    except FileNotFoundError:
        on_broker = f"only the latest version ({latest})" if latest is not None else "no model"
        raise FededgeError(
            f"version {version} of task {settings.task!r} is not available: the broker holds "
            f"{on_broker}, and {path} does not exist (give --state-dir of the aggregator, "
            "which keeps its last versions on disk)"
        ) from None
    except OSError as e:
        raise FededgeError(f"cannot read {path}: {e.strerror}") from None


def pull_version(
    settings: Settings, version: int | None, out_dir: Path, wait: float
) -> dict[str, Any]:
    """Write a version as a bundle directory (graph, weights, spec, version.json)."""
    payload, graph = fetch_retained(settings, wait)
    latest = ModelVersion.from_bytes(payload, max_bytes=MAX_MESSAGE) if payload else None
    source = "broker"
    if version is None or (latest is not None and version == latest.version):
        if payload is None:
            raise FededgeError(
                f"task {settings.task!r} has no model on {settings.broker.url} "
                "(check --task/--prefix or run `fededge model init`)"
            )
        data = payload
    else:
        data = _from_state_dir(settings, version, latest.version if latest else None)
        source = "state_dir"
    try:
        mv = ModelVersion.from_bytes(data, max_bytes=MAX_MESSAGE)
    except ProtocolError as e:
        raise FededgeError(f"version message of task {settings.task!r} is invalid: {e}") from None
    if mv.task != settings.task or (version is not None and mv.version != version):
        raise FededgeError(
            f"expected version {version} of task {settings.task!r}, got "
            f"version {mv.version} of task {mv.task!r}"
        )
    files: list[str] = []
    out_dir.mkdir(parents=True, exist_ok=True)
    if mv.graph_sha256 != NO_GRAPH:
        if graph is None:
            raise FededgeError(
                f"version {mv.version} needs graph {mv.graph_sha256[:12]} but no graph is "
                f"retained on {Topics(settings.topic_prefix, settings.task).graph}"
            )
        if graph.sha256 != mv.graph_sha256:
            raise FededgeError(
                f"version {mv.version} was trained with graph {mv.graph_sha256[:12]}, but the "
                f"retained graph is {graph.sha256[:12]}"
            )
        try:
            spec = parse_spec(graph.spec)
            parse_weights(data, spec, what=f"version {mv.version}")
        except ModelError as e:
            raise FededgeError(f"the pulled version does not form a valid bundle: {e}") from None
        atomic_write(out_dir / GRAPH_FILE, graph.tflite)
        spec_text = json.dumps(graph.spec, indent=2, sort_keys=True) + "\n"
        atomic_write(out_dir / SPEC_FILE, spec_text.encode())
        files += [GRAPH_FILE, SPEC_FILE]
    # The version message itself, byte for byte: a safetensors file whose metadata says which
    # version it is; bundles and `model init --weights` read only its tensors.
    atomic_write(out_dir / WEIGHTS_FILE, data)
    info = {
        "task": mv.task,
        "version": mv.version,
        "parent": mv.parent,
        "time": mv.time,
        "graph_sha256": mv.graph_sha256,
        "updates": mv.updates,
        "examples": mv.examples,
        "sha256": hashlib.sha256(data).hexdigest(),
        "source": source,
        "broker": settings.broker.url,
    }
    atomic_write(
        out_dir / VERSION_FILE, (json.dumps(info, indent=2, sort_keys=True) + "\n").encode()
    )
    files += [WEIGHTS_FILE, VERSION_FILE]
    return {**info, "files": sorted(files), "directory": str(out_dir)}


@click.command("pull")
@click.option("--version", "version", type=click.IntRange(0), help="Version (default: latest).")
@click.option(
    "-o",
    "--output",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Bundle directory to write.",
)
@click.option(
    "--wait",
    type=click.FloatRange(0.1, 600),
    default=5.0,
    show_default=True,
    help="Longest wait for the broker's retained messages, s.",
)
@settings_options
def pull(settings: Settings, version: int | None, out_dir: Path, wait: float) -> int:
    """Fetch a version (graph, weights, spec) into a bundle directory."""
    quiet_transport(settings)
    info = pull_version(settings, version, out_dir, wait)
    bundle = "a bundle" if GRAPH_FILE in info["files"] else "weights only (task has no graph)"
    click.echo(
        f"pulled task {info['task']!r} version {info['version']} from {info['source']} into "
        f"{out_dir}: {bundle}: {', '.join(info['files'])}"
    )
    return 0


# --- inspect ----------------------------------------------------------------------------------


def tflite_signatures(graph: bytes) -> dict[str, Any] | str:
    """Signatures of a graph as the runtime sees them, or why they cannot be read."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        try:
            from tflite_runtime.interpreter import Interpreter
        except ImportError:
            return "no LiteRT runtime installed"
    try:
        it = Interpreter(model_content=graph)
        out: dict[str, Any] = {}
        for name in sorted(it.get_signature_list()):
            runner = it.get_signature_runner(name)

            def io(details: dict[str, Any]) -> dict[str, str]:
                # shape_signature keeps the dynamic batch dimension as -1.
                return {
                    k: f"{np.dtype(d['dtype']).name}{[int(s) for s in d['shape_signature']]}"
                    for k, d in sorted(details.items())
                }

            out[name] = {
                "inputs": io(runner.get_input_details()),
                "outputs": io(runner.get_output_details()),
            }
        return out
    except (ValueError, RuntimeError, TypeError) as e:
        return f"the runtime cannot load the graph: {e}"


def tensor_table(tensors: dict[str, np.ndarray], norms: bool = True) -> list[dict[str, Any]]:
    """Per tensor: name, dtype, shape, element count and (for floats) L2 norm, min and max."""
    rows = []
    for name, arr in tensors.items():
        row: dict[str, Any] = {
            "name": name,
            "dtype": str(arr.dtype),
            "shape": list(arr.shape),
            "size": int(arr.size),
        }
        if norms and arr.dtype.kind == "f" and arr.size:
            a = arr.astype(np.float64)
            row |= {
                "norm": finite(float(np.linalg.norm(a))),
                "min": finite(float(a.min())),
                "max": finite(float(a.max())),
                "finite": bool(np.isfinite(a).all()),
            }
        rows.append(row)
    return rows


def _graph_info(graph: bytes) -> dict[str, Any]:
    return {
        "bytes": len(graph),
        "sha256": hashlib.sha256(graph).hexdigest(),
        "signatures": tflite_signatures(graph),
    }


def task_summary(spec: BundleSpec) -> str:
    """One line: what the bundle predicts, its labels, loss and the metrics ``eval`` returns."""
    t = spec.task
    what = f"{t.num_classes} classes" if t.num_classes else f"outputs {list(t.output_shape)}"
    norm = ", inputs normalised in the graph" if t.normalization else ""
    return (
        f"{t.type} ({what}; labels {t.label_dtype} {list(t.label_shape)} per example; "
        f"loss {t.loss}; eval: {', '.join(spec.metric_names)}; format {spec.format_version}{norm})"
    )


def inspect_bundle(root: Path) -> dict[str, Any]:
    """Describe a bundle directory and say whether `load_bundle` accepts it."""
    info: dict[str, Any] = {"kind": "bundle", "path": str(root)}
    try:
        spec = parse_spec((root / SPEC_FILE).read_bytes())
        info["task"] = task_summary(spec)
        info["spec"] = spec.to_json()
    except (OSError, ModelError) as e:
        info["spec_error"] = str(e)
    graph_path = root / GRAPH_FILE
    if graph_path.is_file():
        info["graph"] = _graph_info(graph_path.read_bytes())
    weights_path = root / WEIGHTS_FILE
    if weights_path.is_file():
        info["weights"] = inspect_bytes(weights_path.read_bytes(), weights_path)
    if (root / VERSION_FILE).is_file():
        try:
            info["version"] = json.loads((root / VERSION_FILE).read_text())
        except (OSError, ValueError) as e:
            info["version"] = f"unreadable: {e}"
    try:
        b = load_bundle(root)
        info["valid"] = True
        info["parameters"] = b.spec.num_parameters
    except ModelError as e:
        info["valid"] = False
        info["error"] = str(e)
    return info


def _safetensors_info(data: bytes) -> dict[str, Any]:
    try:
        p = decode_tensors(data, max_bytes=MAX_MESSAGE)
        tensors, meta = p.tensors, p.metadata
    except ProtocolError as strict:
        # Not one of the wire dtypes (e.g. float16): the library still reads it.
        from safetensors import SafetensorError
        from safetensors.numpy import load

        try:
            tensors, meta = load(data), {}
        except (SafetensorError, ValueError, TypeError) as e:
            raise ModelError(f"not a valid safetensors file: {strict} ({e})") from None
    info: dict[str, Any] = {"kind": "safetensors", "bytes": len(data), "metadata": meta}
    kind = meta.get("kind")
    try:
        if kind == "model":
            mv = ModelVersion.from_bytes(data, max_bytes=MAX_MESSAGE)
            info["kind"] = "model"
            info["message"] = {
                "task": mv.task,
                "version": mv.version,
                "parent": mv.parent,
                "graph_sha256": mv.graph_sha256,
                "updates": mv.updates,
                "examples": mv.examples,
                "time": mv.time,
            }
        elif kind == "update":
            u = Update.from_bytes(data, max_bytes=MAX_MESSAGE)
            info["kind"] = "update"
            info["message"] = {
                "task": u.task,
                "device": u.device,
                "update_id": u.update_id,
                "base_version": u.base_version,
                "num_examples": u.num_examples,
                "train_loss": u.train_loss,
                "eval_loss": u.eval_loss,
                "eval_accuracy": u.eval_accuracy,
            }
        elif kind == "graph":
            g = Graph.from_bytes(data, max_bytes=MAX_MESSAGE)
            info["kind"] = "graph"
            info["message"] = {"task": g.task, "spec": g.spec}
            info["graph"] = _graph_info(g.tflite)
            info["metadata"] = {k: v for k, v in meta.items() if k != "spec"}
            return info
    except ProtocolError as e:
        info["message_error"] = str(e)
    info["tensors"] = tensor_table(tensors)
    info["parameters"] = int(sum(a.size for a in tensors.values()))
    return info


def inspect_bytes(data: bytes, path: Path) -> dict[str, Any]:
    """Describe one file by its content: .tflite, safetensors (maybe a message) or JSON."""
    if len(data) >= 8 and data[4:8] == b"TFL3":
        return {"kind": "tflite", "path": str(path), **_graph_info(data)}
    if data.lstrip()[:1] == b"{":
        try:
            obj = json.loads(data)
        except (ValueError, RecursionError) as e:
            raise ModelError(f"{path}: looks like JSON but is not valid: {e}") from None
        if isinstance(obj, dict) and obj.get("format") == "fededge-bundle":
            return {"kind": "spec", "path": str(path), "spec": parse_spec(obj).to_json()}
        model = _JSON_KINDS.get(obj.get("kind", "")) if isinstance(obj, dict) else None
        if model is None:
            return {"kind": "json", "path": str(path), "content": obj}
        try:
            msg = decode_json(data, model)
            return {"kind": obj["kind"], "path": str(path), "message": msg.model_dump()}
        except ProtocolError as e:
            return {"kind": obj["kind"], "path": str(path), "content": obj, "message_error": str(e)}
    try:
        return {**_safetensors_info(data), "path": str(path)}
    except ModelError as e:
        raise ModelError(f"{path}: not a bundle, .tflite, safetensors or JSON file ({e})") from None


def _print_info(info: dict[str, Any], indent: str = "") -> None:
    out = console()
    for key, value in info.items():
        if key == "tensors":
            table = Table(box=None, pad_edge=False, header_style="bold")
            for col in ("name", "dtype", "shape", "size", "norm", "min", "max"):
                table.add_column(
                    col, justify="right" if col in ("size", "norm", "min", "max") else "left"
                )
            for r in value:
                table.add_row(
                    r["name"],
                    r["dtype"],
                    str(r["shape"]),
                    str(r["size"]),
                    *(("-" if r.get(c) is None else f"{r[c]:.6g}") for c in ("norm", "min", "max")),
                )
            out.print(Text(f"{indent}tensors ({len(value)})", "bold"))
            out.print(Padding(table, (0, 0, 0, len(indent)), expand=False))
        elif isinstance(value, dict) and key not in ("metadata", "inputs", "outputs"):
            out.print(Text(f"{indent}{key}", "bold"))
            _print_info(value, indent + "  ")
        else:
            if key == "time" and isinstance(value, float):
                text = fmt_time(value)
            elif key == "bytes" and isinstance(value, int):
                text = f"{value} ({human_bytes(value)})"
            elif key == "valid":
                text = "yes" if value else "NO"
            else:
                text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
            style = (
                "red" if key in ("error", "spec_error", "message_error") or value is False else ""
            )
            out.print(Text.assemble((f"{indent}{key}: ", "bold"), (str(text), style)))


@click.command("inspect")
@click.argument("path", type=click.Path(exists=True, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def inspect(path: Path, as_json: bool) -> int:
    """Describe PATH: a bundle dir, .tflite, safetensors (weights, message) or JSON file."""
    if path.is_dir():
        info = inspect_bundle(path)
    else:
        try:
            if path.stat().st_size > MAX_MESSAGE:
                raise ModelError(f"{path}: larger than {human_bytes(MAX_MESSAGE)}")
            data = path.read_bytes()
        except OSError as e:
            raise ModelError(f"{path}: cannot read: {e.strerror}") from None
        info = inspect_bytes(data, path)
    if as_json:
        click.echo(json.dumps(info, sort_keys=True, default=str))
    else:
        _print_info(info)
    return 0 if info.get("valid", True) else 1
