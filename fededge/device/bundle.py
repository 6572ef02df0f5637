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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fededge.device.runtime import check_signatures, probe_graph
from fededge.device.spec import (
    FORMAT_NAME,
    FORMAT_VERSION,
    GRAPH_FILE,
    KNOWN_SIGNATURES,
    MAX_GRAPH_BYTES,
    MAX_SPEC_BYTES,
    MAX_WEIGHTS_BYTES,
    REQUIRED_SIGNATURES,
    SPEC_FILE,
    WEIGHTS_FILE,
    BundleSpec,
    WeightSpec,
    check_flatbuffer,
    parse_spec,
)
from fededge.errors import ModelError

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "GRAPH_FILE",
    "KNOWN_SIGNATURES",
    "MAX_GRAPH_BYTES",
    "MAX_SPEC_BYTES",
    "MAX_WEIGHTS_BYTES",
    "REQUIRED_SIGNATURES",
    "SPEC_FILE",
    "WEIGHTS_FILE",
    "Bundle",
    "BundleSpec",
    "WeightSpec",
    "check_flatbuffer",
    "load_bundle",
    "parse_spec",
    "parse_weights",
    "save_weights",
    "shipped_bundle_path",
    "validate_graph",
]


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
