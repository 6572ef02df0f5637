"""A bundle's spec (``spec.json``): shapes, weights, signatures and the graph's hash, parsed.

No LiteRT here: the runtime (fededge/device/runtime.py) and the bundle loader
(fededge/device/bundle.py) both build on it, so neither imports the other in a cycle.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from fededge.errors import ModelError

FORMAT_NAME = "fededge-bundle"
FORMAT_VERSION = 1
GRAPH_FILE = "model.tflite"
WEIGHTS_FILE = "weights.safetensors"
SPEC_FILE = "spec.json"
REQUIRED_SIGNATURES = ("infer", "train")
KNOWN_SIGNATURES = ("eval", "infer", "train")
MAX_GRAPH_BYTES = 64 * 1024 * 1024
MAX_SPEC_BYTES = 1024 * 1024
MAX_WEIGHTS_BYTES = 256 * 1024 * 1024
_DTYPES = {"float32": np.float32}
_LABEL_DTYPES = {"int32": np.int32}


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
    num_classes: int
    batch_size: int
    weights: tuple[WeightSpec, ...]
    signatures: tuple[str, ...]
    graph_sha256: str
    extra: dict[str, Any]

    @property
    def weight_names(self) -> list[str]:
        """Weight names in signature order."""
        return [w.name for w in self.weights]

    @property
    def num_parameters(self) -> int:
        """Total number of weight elements."""
        return sum(w.size for w in self.weights)

    def to_json(self) -> dict[str, Any]:
        """The JSON object this spec was parsed from (canonical field names)."""
        return {
            **self.extra,
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "model": self.model,
            "input_shape": list(self.input_shape),
            "input_dtype": self.input_dtype,
            "label_dtype": self.label_dtype,
            "num_classes": self.num_classes,
            "batch_size": self.batch_size,
            "weights": [
                {"name": w.name, "shape": list(w.shape), "dtype": w.dtype} for w in self.weights
            ],
            "signatures": list(self.signatures),
            "graph_sha256": self.graph_sha256,
        }


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
    if version != FORMAT_VERSION:
        raise ModelError(
            f"{where}: format_version {version!r} is not supported (this fededge reads "
            f"{FORMAT_VERSION})"
        )
    model = _field(obj, "model", str, where)
    input_shape = _dims(
        _field(obj, "input_shape", list, where), f"{where} input_shape", allow_empty=False
    )
    input_dtype = _field(obj, "input_dtype", str, where)
    if input_dtype not in _DTYPES:
        raise ModelError(f"{where}: input_dtype {input_dtype!r} is not one of {sorted(_DTYPES)}")
    label_dtype = obj.get("label_dtype", "int32")
    if label_dtype not in _LABEL_DTYPES:
        raise ModelError(
            f"{where}: label_dtype {label_dtype!r} is not one of {sorted(_LABEL_DTYPES)}"
        )
    num_classes = _field(obj, "num_classes", int, where)
    if not 2 <= num_classes <= 1 << 16:
        raise ModelError(f"{where}: num_classes {num_classes} out of range [2, 65536]")
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
        if not name or name in seen or name in ("x", "y", "lr", "loss", "probs", "accuracy"):
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
    known = {"format", "format_version", "model", "input_shape", "input_dtype", "label_dtype",
             "num_classes", "batch_size", "weights", "signatures", "graph_sha256"}  # fmt: skip
    extra = {k: v for k, v in obj.items() if k not in known}
    return BundleSpec(
        model, input_shape, input_dtype, label_dtype, num_classes, batch_size,
        tuple(weights), tuple(sorted(signatures)), sha, extra,
    )  # fmt: skip


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
