"""Model bundles: a LiteRT graph, its initial weights and a spec, loaded and fully validated.

A bundle is a directory with three files (layout in docs/decisions.md):

- ``model.tflite``: a stateless graph with signatures ``train``, ``infer`` and ``eval``;
- ``weights.safetensors``: the initial float32 weights, by name;
- ``spec.json``: format and version, input shape, classes, batch size, the weights (names,
  shapes, dtypes in signature order), the signatures present and the graph's sha256.

Everything here may come from the network (the graph is published once per task), so every
check fails with a :class:`~fededge.errors.ModelError` naming what is wrong, never another error.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
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


def save_weights(weights: dict[str, np.ndarray]) -> bytes:
    """Serialise named float32 weights as safetensors bytes."""
    from safetensors.numpy import save

    return save({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in weights.items()})


def parse_weights(raw: bytes, spec: BundleSpec, what: str = WEIGHTS_FILE) -> dict[str, np.ndarray]:
    """Decode safetensors bytes and check they hold exactly the spec's weights, all finite."""
    from safetensors import SafetensorError
    from safetensors.numpy import load

    if len(raw) > MAX_WEIGHTS_BYTES:
        raise ModelError(f"{what}: {len(raw)} bytes, more than {MAX_WEIGHTS_BYTES}")
    try:
        loaded = load(raw)
    except (SafetensorError, ValueError, TypeError, OverflowError, KeyError) as e:
        raise ModelError(f"{what}: not a valid safetensors file ({e})") from None
    expected = spec.weight_names
    if set(loaded) != set(expected):
        missing = sorted(set(expected) - set(loaded))
        extra = sorted(set(loaded) - set(expected))
        raise ModelError(f"{what}: missing weights {missing}, unexpected weights {extra}")
    out: dict[str, np.ndarray] = {}
    for w in spec.weights:
        arr = loaded[w.name]
        if arr.dtype != np.dtype(w.dtype):
            raise ModelError(
                f"{what}: weight {w.name!r} has dtype {arr.dtype}, spec says {w.dtype}"
            )
        if tuple(arr.shape) != w.shape:
            raise ModelError(
                f"{what}: weight {w.name!r} has shape {list(arr.shape)}, spec says {list(w.shape)}"
            )
        if not np.all(np.isfinite(arr)):
            raise ModelError(f"{what}: weight {w.name!r} has non-finite values")
        arr = np.array(arr, copy=True, order="C")
        arr.setflags(write=False)  # shared initial weights: nobody may train them in place
        out[w.name] = arr
    return out


@dataclass(frozen=True, eq=False)  # arrays have no truth value: compare specs, not bundles
class Bundle:
    """A validated model bundle: graph bytes, spec and initial weights."""

    graph: bytes
    spec: BundleSpec
    weights: dict[str, np.ndarray]
    path: Path | None = None

    @property
    def graph_sha256(self) -> str:
        """sha256 (hex) of the graph bytes, the identity of the graph in model versions."""
        return self.spec.graph_sha256

    @classmethod
    def from_bytes(
        cls,
        graph: bytes,
        spec: bytes | str | dict[str, Any],
        weights: bytes,
        *,
        isolate: bool = True,
    ) -> Bundle:
        """Validate a bundle given as bytes (e.g. received over MQTT) and return it.

        ``isolate`` (default) first loads and runs the graph in a child process, so a graph that
        crashes the runtime fails with a ModelError instead of killing this process.
        """
        parsed = parse_spec(spec)
        validate_graph(graph, parsed, isolate=isolate)
        return cls(graph, parsed, parse_weights(weights, parsed))


def validate_graph(graph: bytes, spec: BundleSpec, *, isolate: bool = True) -> None:
    """Check the graph's sha256 against the spec, then that the runtime loads it as specified."""
    digest = hashlib.sha256(graph).hexdigest()
    if digest != spec.graph_sha256:
        raise ModelError(
            f"{GRAPH_FILE}: sha256 {digest} does not match spec graph_sha256 {spec.graph_sha256}"
        )
    check_flatbuffer(graph)
    from fededge.device.runtime import check_signatures, probe_graph

    if isolate:
        probe_graph(graph, spec)
    else:
        check_signatures(graph, spec)


def load_bundle(path: str | Path, *, isolate: bool = True) -> Bundle:
    """Load and validate the bundle directory ``path``; raise ModelError saying what is wrong.

    ``isolate``: see :meth:`Bundle.from_bytes`.
    """
    root = Path(path)
    if not root.is_dir():
        raise ModelError(f"bundle {root}: not a directory")
    raw: dict[str, bytes] = {}
    for name, limit in ((SPEC_FILE, MAX_SPEC_BYTES), (GRAPH_FILE, MAX_GRAPH_BYTES),
                        (WEIGHTS_FILE, MAX_WEIGHTS_BYTES)):  # fmt: skip
        f = root / name
        try:
            if f.stat().st_size > limit:
                raise ModelError(f"bundle {root}: {name} is larger than {limit} bytes")
            raw[name] = f.read_bytes()
        except FileNotFoundError:
            raise ModelError(f"bundle {root}: {name} is missing") from None
        except OSError as e:
            raise ModelError(f"bundle {root}: cannot read {name} ({e.strerror})") from None
    try:
        b = Bundle.from_bytes(raw[GRAPH_FILE], raw[SPEC_FILE], raw[WEIGHTS_FILE], isolate=isolate)
    except ModelError as e:
        raise ModelError(f"bundle {root}: {e}") from None
    return Bundle(b.graph, b.spec, b.weights, root)


def shipped_bundle_path(name: str) -> Path:
    """Directory of a bundle shipped inside the package (``digits_mlp``, ``digits_cnn``)."""
    p = Path(__file__).resolve().parent.parent / "models" / name
    if not p.is_dir():
        raise ModelError(f"no shipped bundle named {name!r} (looked in {p})")
    return p
