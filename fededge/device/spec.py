"""A bundle's spec (``spec.json``): shapes, weights, signatures and the graph's hash, parsed.

No LiteRT here: the runtime (fededge/device/runtime.py) and the bundle loader
(fededge/device/bundle.py) both build on it, so neither imports the other in a cycle.
"""

from __future__ import annotations

import dataclasses
import json
import math
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from fededge.errors import ModelError

FORMAT_NAME = "fededge-bundle"
FORMAT_VERSION = 2  # what the builder writes; version 1 bundles (classification only) still load
READ_VERSIONS = (1, 2)
GRAPH_FILE = "model.tflite"
WEIGHTS_FILE = "weights.safetensors"
SPEC_FILE = "spec.json"
REQUIRED_SIGNATURES = ("infer", "train")
KNOWN_SIGNATURES = ("eval", "infer", "train")
MAX_GRAPH_BYTES = 64 * 1024 * 1024
MAX_SPEC_BYTES = 1024 * 1024
MAX_WEIGHTS_BYTES = 256 * 1024 * 1024
_DTYPES = {"float32": np.float32}
_LABEL_DTYPES = {"int32": np.int32, "float32": np.float32}
TASK_TYPES = ("classification", "binary", "multilabel", "regression")
# The losses each task type may use (the builder writes the gradient of each; see docs/models.md).
TASK_LOSSES: dict[str, tuple[str, ...]] = {
    "classification": ("sparse_categorical_crossentropy",),
    "binary": ("binary_crossentropy",),
    "multilabel": ("binary_crossentropy",),
    "regression": ("mse", "mae", "huber"),
}
# The metrics ``eval`` returns besides ``loss``, and the one the demo and docs report.
TASK_METRICS: dict[str, tuple[str, ...]] = {
    "classification": ("accuracy",),
    "binary": ("accuracy",),
    "multilabel": ("accuracy", "exact_match"),
    "regression": ("mse", "mae"),
}
PRIMARY_METRIC = {
    "classification": "accuracy",
    "binary": "accuracy",
    "multilabel": "accuracy",
    "regression": "mse",
}
HIGHER_IS_BETTER = {"accuracy": True, "exact_match": True, "mse": False, "mae": False}
RESERVED_NAMES = (
    "x",
    "y",
    "lr",
    "loss",
    "probs",
    "outputs",
    "accuracy",
    "exact_match",
    "mse",
    "mae",
)


@dataclass(frozen=True)
class TaskSpec:
    """What the model predicts and how it is trained and scored (the spec's ``task`` section).

    - ``classification``: ``y`` int32 class ids ``[n]``; ``infer`` returns ``probs`` ``[n, K]``.
    - ``binary``: ``y`` float32 0/1 ``[n]``; ``infer`` returns ``probs`` ``[n, 1]``.
    - ``multilabel``: ``y`` float32 multi-hot ``[n, L]``; ``infer`` returns ``probs`` ``[n, L]``.
    - ``regression``: ``y`` float32 ``[n, *label_shape]``; ``infer`` returns ``outputs``.
    """

    type: str
    label_dtype: str
    label_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    loss: str
    metrics: tuple[str, ...]
    num_classes: int | None = None
    normalization: dict[str, Any] | None = None

    @property
    def output_name(self) -> str:
        """Name of ``infer``'s output tensor."""
        return "outputs" if self.type == "regression" else "probs"

    @property
    def primary_metric(self) -> str:
        """The metric the demo prints and the benchmarks compare."""
        return PRIMARY_METRIC[self.type]

    @property
    def integer_labels(self) -> bool:
        """True when labels are class ids (int32), False when they are floats."""
        return self.label_dtype == "int32"

    def to_json(self) -> dict[str, Any]:
        """The ``task`` object of a version-2 spec."""
        out: dict[str, Any] = {
            "type": self.type,
            "label_dtype": self.label_dtype,
            "label_shape": list(self.label_shape),
            "output_shape": list(self.output_shape),
            "loss": self.loss,
            "metrics": list(self.metrics),
        }
        if self.num_classes is not None:
            out["num_classes"] = self.num_classes
        if self.normalization is not None:
            out["normalization"] = self.normalization
        return out


def classification_task(num_classes: int) -> TaskSpec:
    """The task every version-1 bundle has: sparse softmax classification."""
    return TaskSpec(
        "classification", "int32", (), (num_classes,), "sparse_categorical_crossentropy",
        ("accuracy",), num_classes,
    )  # fmt: skip


@dataclass(frozen=True)
class WeightSpec:
    """Name, shape and dtype of one weight tensor, as the graph's signatures expect it."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def size(self) -> int:
        """Number of elements."""
        return math.prod(self.shape)


@dataclass(frozen=True)
class BundleSpec:
    """The parsed, validated ``spec.json`` of a bundle."""

    model: str
    input_shape: tuple[int, ...]
    input_dtype: str
    label_dtype: str
    num_classes: int  # classes of a classification task; 0 for the other task types
    batch_size: int
    weights: tuple[WeightSpec, ...]
    signatures: tuple[str, ...]
    graph_sha256: str
    extra: dict[str, Any]
    task: TaskSpec = dataclasses.field(default_factory=lambda: classification_task(2))
    format_version: int = 1

    @property
    def weight_names(self) -> list[str]:
        """Weight names in signature order."""
        return [w.name for w in self.weights]

    @property
    def num_parameters(self) -> int:
        """Total number of weight elements."""
        return sum(w.size for w in self.weights)

    @property
    def metric_names(self) -> tuple[str, ...]:
        """What ``eval`` returns: ``loss`` first, then the task's metrics."""
        return ("loss", *self.task.metrics)

    def to_json(self) -> dict[str, Any]:
        """The JSON object this spec was parsed from (canonical field names).

        A version-1 spec gives exactly its version-1 fields, so the graph message of a v1
        bundle is byte-for-byte what it always was.
        """
        out: dict[str, Any] = {
            **self.extra,
            "format": FORMAT_NAME,
            "format_version": self.format_version,
            "model": self.model,
            "input_shape": list(self.input_shape),
            "input_dtype": self.input_dtype,
        }
        if self.format_version == 1:
            out["label_dtype"] = self.label_dtype
            out["num_classes"] = self.num_classes
        else:
            out["task"] = self.task.to_json()
        out.update({
            "batch_size": self.batch_size,
            "weights": [
                {"name": w.name, "shape": list(w.shape), "dtype": w.dtype} for w in self.weights
            ],
            "signatures": list(self.signatures),
            "graph_sha256": self.graph_sha256,
        })  # fmt: skip
        return out


def _field(obj: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if key not in obj:
        raise ModelError(f"{where}: missing field {key!r}")
    value = obj[key]
    # bool is an int in Python; a spec saying `true` for a count is wrong, not 1.
    if (isinstance(value, bool) and kind is not bool) or not isinstance(value, kind):
        raise ModelError(f"{where}: field {key!r} = {value!r} is not of the expected type")
    return value


def _dims(value: Any, where: str, *, allow_empty: bool) -> tuple[int, ...]:
    if not isinstance(value, list) or (not value and not allow_empty) or len(value) > 4:
        raise ModelError(f"{where}: shape {value!r} must be a list of at most 4 dimensions")
    for d in value:
        if isinstance(d, bool) or not isinstance(d, int) or not 0 < d <= 1 << 24:
            raise ModelError(f"{where}: shape {value!r} has a bad dimension {d!r}")
    return tuple(value)


def parse_spec(raw: bytes | str | dict[str, Any]) -> BundleSpec:
    """Parse and check a spec (JSON bytes/text or an already-decoded object)."""
    where = SPEC_FILE
    if isinstance(raw, (bytes, str)):
        if len(raw) > MAX_SPEC_BYTES:
            raise ModelError(f"{where}: {len(raw)} bytes, more than {MAX_SPEC_BYTES}")
        try:
            obj = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise ModelError(f"{where}: not valid JSON ({e})") from None
    else:
        obj = raw
    if not isinstance(obj, dict):
        raise ModelError(f"{where}: top level must be a JSON object")
    if obj.get("format") != FORMAT_NAME:
        raise ModelError(f"{where}: format is {obj.get('format')!r}, expected {FORMAT_NAME!r}")
    version = obj.get("format_version")
    if isinstance(version, bool) or version not in READ_VERSIONS:
        raise ModelError(
            f"{where}: format_version {version!r} is not supported (this fededge reads "
            f"{', '.join(map(str, READ_VERSIONS))})"
        )
    model = _field(obj, "model", str, where)
    input_shape = _dims(
        _field(obj, "input_shape", list, where), f"{where} input_shape", allow_empty=False
    )
    input_dtype = _field(obj, "input_dtype", str, where)
    if input_dtype not in _DTYPES:
        raise ModelError(f"{where}: input_dtype {input_dtype!r} is not one of {sorted(_DTYPES)}")
    if version == 1:
        label_dtype = obj.get("label_dtype", "int32")
        if label_dtype != "int32":
            raise ModelError(
                f"{where}: label_dtype {label_dtype!r} of a version 1 spec is not int32"
            )
        num_classes = _field(obj, "num_classes", int, where)
        if not 2 <= num_classes <= 1 << 16:
            raise ModelError(f"{where}: num_classes {num_classes} out of range [2, 65536]")
        task = classification_task(num_classes)
    else:
        task = parse_task(_field(obj, "task", dict, where), f"{where} task")
        label_dtype = task.label_dtype
        num_classes = task.num_classes or 0
    batch_size = _field(obj, "batch_size", int, where)
    if not 1 <= batch_size <= 1 << 16:
        raise ModelError(f"{where}: batch_size {batch_size} out of range [1, 65536]")
    weights = []
    seen: set[str] = set()
    raw_weights = _field(obj, "weights", list, where)
    if not raw_weights:
        raise ModelError(f"{where}: weights list is empty")
    for i, w in enumerate(raw_weights):
        wwhere = f"{where} weights[{i}]"
        if not isinstance(w, dict):
            raise ModelError(f"{wwhere}: must be an object")
        name = _field(w, "name", str, wwhere)
        if not name or name in seen or name in RESERVED_NAMES:
            raise ModelError(f"{wwhere}: name {name!r} is empty, duplicated or reserved")
        seen.add(name)
        dtype = _field(w, "dtype", str, wwhere)
        if dtype not in _DTYPES:
            raise ModelError(f"{wwhere}: dtype {dtype!r} is not one of {sorted(_DTYPES)}")
        shape = _dims(_field(w, "shape", list, wwhere), f"{wwhere} ({name})", allow_empty=True)
        weights.append(WeightSpec(name, shape, dtype))
    signatures = _field(obj, "signatures", list, where)
    for s in REQUIRED_SIGNATURES:
        if s not in signatures:
            raise ModelError(f"{where}: signatures {signatures!r} lack required {s!r}")
    unknown = [s for s in signatures if s not in KNOWN_SIGNATURES]
    if unknown:
        raise ModelError(f"{where}: unknown signatures {unknown!r}")
    sha = _field(obj, "graph_sha256", str, where)
    if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
        raise ModelError(f"{where}: graph_sha256 {sha!r} is not 64 lowercase hex digits")
    known = {"format", "format_version", "model", "input_shape", "input_dtype", "batch_size",
             "weights", "signatures", "graph_sha256"}  # fmt: skip
    known |= {"label_dtype", "num_classes"} if version == 1 else {"task"}
    extra = {k: v for k, v in obj.items() if k not in known}
    return BundleSpec(
        model, input_shape, input_dtype, label_dtype, num_classes, batch_size,
        tuple(weights), tuple(sorted(signatures)), sha, extra, task, version,
    )  # fmt: skip


def parse_task(obj: dict[str, Any], where: str = "task") -> TaskSpec:
    """Parse and check the ``task`` section of a version-2 spec."""
    kind = _field(obj, "type", str, where)
    if kind not in TASK_TYPES:
        raise ModelError(f"{where}: type {kind!r} is not one of {list(TASK_TYPES)}")
    label_dtype = _field(obj, "label_dtype", str, where)
    want_dtype = "int32" if kind == "classification" else "float32"
    if label_dtype != want_dtype:
        raise ModelError(f"{where}: label_dtype of a {kind} task must be {want_dtype}")
    label_shape = _dims(_field(obj, "label_shape", list, where), f"{where} label_shape",
                        allow_empty=True)  # fmt: skip
    output_shape = _dims(_field(obj, "output_shape", list, where), f"{where} output_shape",
                         allow_empty=False)  # fmt: skip
    if len(label_shape) > 3 or len(output_shape) > 3:
        raise ModelError(f"{where}: labels and outputs have at most 3 dimensions per example")
    loss = _field(obj, "loss", str, where)
    if loss not in TASK_LOSSES[kind]:
        raise ModelError(f"{where}: loss {loss!r} is not one of {list(TASK_LOSSES[kind])}")
    metrics = _field(obj, "metrics", list, where)
    if list(metrics) != list(TASK_METRICS[kind]):
        raise ModelError(f"{where}: metrics {metrics!r} of a {kind} task must be "
                         f"{list(TASK_METRICS[kind])}")  # fmt: skip
    num_classes = None
    if kind == "classification":
        num_classes = _field(obj, "num_classes", int, where)
        if not 2 <= num_classes <= 1 << 16:
            raise ModelError(f"{where}: num_classes {num_classes} out of range [2, 65536]")
        if label_shape != () or output_shape != (num_classes,):
            raise ModelError(f"{where}: a classification task has label_shape [] and "
                             f"output_shape [num_classes]")  # fmt: skip
    elif kind == "binary":
        if label_shape != () or output_shape != (1,):
            raise ModelError(f"{where}: a binary task has label_shape [] and output_shape [1]")
    elif kind == "multilabel":
        if len(label_shape) != 1 or output_shape != label_shape:
            raise ModelError(f"{where}: a multilabel task has label_shape == output_shape == [L]")
    elif output_shape != label_shape:
        raise ModelError(f"{where}: a regression task's label_shape must equal output_shape")
    norm = obj.get("normalization")
    if norm is not None and not (
        isinstance(norm, dict) and isinstance(norm.get("mean"), list)
        and isinstance(norm.get("std"), list)
    ):  # fmt: skip
        raise ModelError(f"{where}: normalization must be {{'mean': [...], 'std': [...]}}")
    return TaskSpec(kind, label_dtype, label_shape, output_shape, loss, tuple(metrics),
                    num_classes, norm)  # fmt: skip


def check_flatbuffer(graph: bytes) -> None:
    """Cheap structural checks before a graph reaches the interpreter's own verifier."""
    if len(graph) > MAX_GRAPH_BYTES:
        raise ModelError(f"{GRAPH_FILE}: {len(graph)} bytes, more than {MAX_GRAPH_BYTES}")
    if len(graph) < 16 or graph[4:8] != b"TFL3":
        raise ModelError(f"{GRAPH_FILE}: not a TFLite flatbuffer (no TFL3 identifier)")
    (root,) = struct.unpack_from("<I", graph, 0)
    if root < 8 or root + 4 > len(graph):
        raise ModelError(
            f"{GRAPH_FILE}: root table offset {root} outside the {len(graph)}-byte file"
        )


def check_labels(y: np.ndarray, n: int, spec: BundleSpec) -> np.ndarray:
    """``n`` labels as the graph's ``y`` wants them, or ValueError saying what is wrong.

    Class ids for classification; floats (0/1 for binary, multi-hot for multi-label) for the
    others. A regression or multi-label target of one value may come as ``[n]``.
    """
    task = spec.task
    if task.integer_labels:
        if y.shape != (n,) or not np.issubdtype(y.dtype, np.integer):
            raise ValueError(
                f"y must be {n} integer labels, got {y.dtype} of shape {list(y.shape)}"
            )
        if n and (y.min() < 0 or y.max() >= spec.num_classes):
            raise ValueError(f"labels must lie in [0, {spec.num_classes})")
        return np.ascontiguousarray(y, dtype=np.int32)
    shape = (n, *task.label_shape)
    if y.dtype.kind not in "fiub" or (y.dtype == np.bool_ and task.type == "regression"):
        raise ValueError(f"y must be numbers, got {y.dtype}")
    if y.shape != shape and y.size == math.prod(shape) and y.ndim >= 1 and len(y) == n:
        y = y.reshape(shape)  # [n] for [n, 1], or flat rows
    if y.shape != shape:
        raise ValueError(f"y has shape {list(y.shape)}, expected {list(shape)}")
    yf = np.ascontiguousarray(y, dtype=np.float32)
    if not np.all(np.isfinite(yf)):
        raise ValueError("y contains NaN or Inf (or values too large for float32)")
    if task.type in ("binary", "multilabel") and n and (yf.min() < 0 or yf.max() > 1):
        raise ValueError(f"{task.type} labels must lie in [0, 1]")
    return yf
