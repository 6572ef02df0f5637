"""Bundle loading: the shipped bundles load, and every kind of damage gives a ModelError."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fededge.device.bundle import (
    GRAPH_FILE,
    SPEC_FILE,
    WEIGHTS_FILE,
    Bundle,
    load_bundle,
    parse_spec,
    save_weights,
    shipped_bundle_path,
)
from fededge.errors import ModelError

MLP = shipped_bundle_path("digits_mlp")


@pytest.fixture
def bundle_dir(tmp_path: Path) -> Path:
    dst = tmp_path / "b"
    shutil.copytree(MLP, dst)
    return dst


def _spec(d: Path) -> dict:  # type: ignore[type-arg]
    return json.loads((d / SPEC_FILE).read_text())  # type: ignore[no-any-return]


def _write_graph(d: Path, graph: bytes, *, fix_sha: bool = True) -> None:
    """Replace the graph; with fix_sha the spec follows, so the damage reaches the runtime."""
    (d / GRAPH_FILE).write_bytes(graph)
    if fix_sha:
        spec = _spec(d)
        spec["graph_sha256"] = hashlib.sha256(graph).hexdigest()
        (d / SPEC_FILE).write_text(json.dumps(spec))


@pytest.mark.parametrize("name", ["digits_mlp", "digits_cnn"])
def test_shipped_bundles_load(name: str) -> None:
    b = load_bundle(shipped_bundle_path(name))
    assert b.graph_sha256 == hashlib.sha256(b.graph).hexdigest()
    assert b.spec.num_classes == 10
    assert list(b.weights) == b.spec.weight_names
    for w in b.spec.weights:
        assert b.weights[w.name].shape == w.shape
        assert b.weights[w.name].dtype == np.float32
    assert set(b.spec.signatures) == {"train", "infer", "eval"}


def test_from_bytes_matches_directory() -> None:
    b = Bundle.from_bytes(
        (MLP / GRAPH_FILE).read_bytes(), (MLP / SPEC_FILE).read_bytes(),
        (MLP / WEIGHTS_FILE).read_bytes(),
    )  # fmt: skip
    assert b.spec == load_bundle(MLP).spec
    assert b.path is None


@pytest.mark.parametrize("missing", [GRAPH_FILE, WEIGHTS_FILE, SPEC_FILE])
def test_missing_file(bundle_dir: Path, missing: str) -> None:
    (bundle_dir / missing).unlink()
    with pytest.raises(ModelError, match=f"{missing} is missing"):
        load_bundle(bundle_dir)


def test_not_a_directory(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="not a directory"):
        load_bundle(tmp_path / "nope")


@pytest.mark.parametrize("fraction", [0.0, 0.01, 0.3, 0.5, 0.9, 0.999])
def test_truncated_graph(bundle_dir: Path, fraction: float) -> None:
    graph = (bundle_dir / GRAPH_FILE).read_bytes()
    _write_graph(bundle_dir, graph[: int(len(graph) * fraction)])
    with pytest.raises(ModelError, match=GRAPH_FILE + "|graph"):
        load_bundle(bundle_dir)


def test_random_bytes_graph(bundle_dir: Path) -> None:
    _write_graph(bundle_dir, np.random.default_rng(1).bytes(20_000))
    with pytest.raises(ModelError, match="not a TFLite flatbuffer"):
        load_bundle(bundle_dir)


def test_random_bytes_with_identifier(bundle_dir: Path) -> None:
    junk = bytearray(np.random.default_rng(2).bytes(20_000))
    junk[0:8] = b"\x20\x00\x00\x00TFL3"
    _write_graph(bundle_dir, bytes(junk))
    with pytest.raises(ModelError, match=r"runtime cannot load|runtime crashed"):
        load_bundle(bundle_dir)


def test_sha_mismatch(bundle_dir: Path) -> None:
    graph = bytearray((bundle_dir / GRAPH_FILE).read_bytes())
    graph[-1] ^= 0xFF
    _write_graph(bundle_dir, bytes(graph), fix_sha=False)
    with pytest.raises(ModelError, match="does not match spec graph_sha256"):
        load_bundle(bundle_dir)


def test_missing_signature_in_graph(bundle_dir: Path) -> None:
    # Rename the flatbuffer strings "train" (length-prefixed, NUL-terminated: the signature key
    # and its subgraph's name) to "trajn"; tensor names like "train_x:0" are left alone.
    graph = (bundle_dir / GRAPH_FILE).read_bytes()
    key = b"\x05\x00\x00\x00train\x00"
    assert graph.count(key) >= 1
    _write_graph(bundle_dir, graph.replace(key, b"\x05\x00\x00\x00trajn\x00"))
    with pytest.raises(ModelError, match="signature 'train' is in the spec but not in the graph"):
        load_bundle(bundle_dir)


def test_spec_shapes_disagree_with_graph(bundle_dir: Path) -> None:
    spec = _spec(bundle_dir)
    spec["input_shape"] = [63]
    (bundle_dir / SPEC_FILE).write_text(json.dumps(spec))
    with pytest.raises(
        ModelError, match=r"tensor 'x' has shape \[-1, 64\], spec implies \[-1, 63\]"
    ):
        load_bundle(bundle_dir)


def test_spec_weight_names_disagree_with_graph(bundle_dir: Path) -> None:
    spec = _spec(bundle_dir)
    spec["weights"][0]["name"] = "renamed"
    (bundle_dir / SPEC_FILE).write_text(json.dumps(spec))
    with pytest.raises(ModelError, match=r"inputs .* spec implies"):
        load_bundle(bundle_dir)


def _weights(d: Path) -> dict[str, np.ndarray]:
    return dict(load_bundle(MLP).weights)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda w: w.update(dense1_bias=np.zeros(31, np.float32)),
            "shape \\[31\\], spec says \\[32\\]",
        ),
        (lambda w: w.pop("dense2_bias"), "missing weights \\['dense2_bias'\\]"),
        (lambda w: w.update(extra=np.zeros(3, np.float32)), "unexpected weights \\['extra'\\]"),
        (lambda w: w.update(dense2_bias=np.full(10, np.nan, np.float32)), "non-finite"),
    ],
)
def test_bad_weights(bundle_dir: Path, change, message: str) -> None:
    w = _weights(bundle_dir)
    change(w)
    (bundle_dir / WEIGHTS_FILE).write_bytes(save_weights(w))
    with pytest.raises(ModelError, match=message):
        load_bundle(bundle_dir)


def test_weights_wrong_dtype(bundle_dir: Path) -> None:
    from safetensors.numpy import save

    w = {k: v.astype(np.float64) for k, v in _weights(bundle_dir).items()}
    (bundle_dir / WEIGHTS_FILE).write_bytes(save(w))
    with pytest.raises(ModelError, match="dtype float64, spec says float32"):
        load_bundle(bundle_dir)


@pytest.mark.parametrize("cut", [0, 7, 100, -5])
def test_weights_corrupt(bundle_dir: Path, cut: int) -> None:
    raw = (bundle_dir / WEIGHTS_FILE).read_bytes()
    (bundle_dir / WEIGHTS_FILE).write_bytes(raw[:cut])
    with pytest.raises(ModelError, match="not a valid safetensors file"):
        load_bundle(bundle_dir)


GOOD = json.loads((MLP / SPEC_FILE).read_text())


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"format": "other"}, "format is 'other'"),
        ({"format_version": 3}, "format_version 3 is not supported"),
        ({"format_version": 2}, "missing field .task."),
        ({"num_classes": True}, "'num_classes' = True is not of the expected type"),
        ({"batch_size": 0}, "batch_size 0 out of range"),
        ({"input_shape": [8, 8, 1, 1, 1]}, "at most 4 dimensions"),
        ({"input_shape": [-1]}, "bad dimension -1"),
        ({"input_dtype": "uint8"}, "input_dtype 'uint8'"),
        ({"signatures": ["infer"]}, "lack required 'train'"),
        ({"signatures": ["infer", "train", "fit"]}, "unknown signatures \\['fit'\\]"),
        ({"graph_sha256": "abc"}, "not 64 lowercase hex"),
        ({"weights": []}, "weights list is empty"),
        ({"weights": [{"name": "x", "shape": [1], "dtype": "float32"}]}, "reserved"),
        ({"weights": [{"name": "a", "shape": [1], "dtype": "int8"}]}, "dtype 'int8'"),
    ],
)
def test_bad_spec(edit: dict, message: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(ModelError, match=message):
        parse_spec(json.dumps({**GOOD, **edit}))


@pytest.mark.parametrize("raw", [b"", b"{", b"[]", b"\xff\xfe", b"null"])
def test_spec_not_json_object(raw: bytes) -> None:
    with pytest.raises(ModelError, match=SPEC_FILE):
        parse_spec(raw)


def test_spec_missing_field() -> None:
    spec = dict(GOOD)
    del spec["num_classes"]
    with pytest.raises(ModelError, match="missing field 'num_classes'"):
        parse_spec(spec)


def test_spec_roundtrip() -> None:
    spec = parse_spec(GOOD)
    assert parse_spec(spec.to_json()) == spec


FUZZ = """
import hashlib, json, sys
import numpy as np
from fededge.device.bundle import Bundle, shipped_bundle_path
from fededge.device.runtime import ModelRuntime
from fededge.errors import ModelError
d = shipped_bundle_path("digits_mlp")
g = (d / "model.tflite").read_bytes()
spec = json.loads((d / "spec.json").read_text())
w = (d / "weights.safetensors").read_bytes()
rng = np.random.default_rng(int(sys.argv[1]))
x = rng.random((5, 64), dtype=np.float32); y = np.arange(5, dtype=np.int32)
for i in range(int(sys.argv[2])):
    if i % 2:
        b = g[: int(rng.integers(0, len(g)))]
    else:
        a = bytearray(g)
        for _ in range(int(rng.integers(1, 4))):
            a[int(rng.integers(0, len(a)))] = int(rng.integers(0, 256))
        b = bytes(a)
    spec["graph_sha256"] = hashlib.sha256(b).hexdigest()
    try:
        bundle = Bundle.from_bytes(b, json.dumps(spec), w)
        rt = ModelRuntime.from_bundle(bundle)
        rt.train_step(x, y, 0.1, bundle.weights)
        rt.infer(x, bundle.weights)
    except ModelError:
        pass
print("survived")
"""


def test_damaged_graphs_never_crash_the_process() -> None:
    # tflite-runtime 2.14 segfaults on a truncated graph unless it is probed in a child process
    # first (load_bundle's default). This test runs in a subprocess, so a segfault fails it
    # instead of killing pytest; any exception other than ModelError fails it too.
    r = subprocess.run(
        [sys.executable, "-c", FUZZ, "7", "24"], capture_output=True, text=True, timeout=240
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "survived" in r.stdout
