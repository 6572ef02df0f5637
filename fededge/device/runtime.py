"""The LiteRT runtime wrapper: run a bundle's stateless train/infer/eval signatures on arrays.

``ai-edge-litert`` is used when installed, ``tflite-runtime`` (>= 2.14, numpy < 2) otherwise.

Threading: a LiteRT interpreter must never be invoked from two threads at once. A
:class:`ModelRuntime` therefore owns two interpreters, one for ``infer`` and one for
``train``/``eval``, each behind its own lock: predictions keep flowing while a training run is in
progress, and concurrent calls of the same kind queue on that lock.

Batches: every graph has a dynamic batch dimension; a call with a batch of another size resizes
the interpreter's inputs (one cheap re-allocation), so a partial last batch trains on exactly its
own examples (see docs/decisions.md).

A ModelRuntime trusts its graph: validate graphs from disk or the network first with
:func:`~fededge.device.bundle.load_bundle` or :meth:`~fededge.device.bundle.Bundle.from_bytes`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np

from fededge.device.spec import BundleSpec, check_labels, parse_spec
from fededge.errors import ModelError

try:
    from ai_edge_litert.interpreter import Interpreter as _Interpreter

    RUNTIME_NAME = "ai-edge-litert"
except ImportError:  # pragma: no cover - exercised in the tflite-runtime CI environment
    try:
        from tflite_runtime.interpreter import Interpreter as _Interpreter

        RUNTIME_NAME = "tflite-runtime"
    except ImportError:
        _Interpreter = None
        RUNTIME_NAME = "none"

# Bound on examples per interpreter call in evaluate/infer, so memory stays small on devices.
EVAL_CHUNK = 1024


def _interpreter(graph: bytes, num_threads: int) -> Any:
    if _Interpreter is None:
        raise ModelError(
            "no LiteRT runtime installed: install ai-edge-litert (pip install 'fededge[device]') "
            "or tflite-runtime"
        )
    try:
        return _Interpreter(model_content=graph, num_threads=num_threads)
    except (ValueError, RuntimeError, TypeError) as e:
        raise ModelError(f"the runtime cannot load the graph: {e}") from None


def _expect(where: str, details: dict[str, Any], name: str, shape: list[int], dtype: type) -> None:
    """Check one signature tensor; ``-1`` in ``shape`` means a dynamic (batch) dimension."""
    if name not in details:
        raise ModelError(f"{where}: no tensor named {name!r} (has {sorted(details)})")
    d = details[name]
    got = [int(v) for v in d.get("shape_signature", d["shape"])]
    if got != shape:
        raise ModelError(f"{where}: tensor {name!r} has shape {got}, spec implies {shape}")
    if np.dtype(d["dtype"]) != np.dtype(dtype):
        raise ModelError(
            f"{where}: tensor {name!r} has dtype {np.dtype(d['dtype'])}, expected {np.dtype(dtype)}"
        )


def check_signatures(graph: bytes, spec: BundleSpec) -> None:
    """Load ``graph`` in the runtime and check its signatures against ``spec``."""
    interp = _interpreter(graph, 1)
    try:
        present = interp.get_signature_list()
    except (ValueError, RuntimeError) as e:
        raise ModelError(f"the graph's signatures cannot be read: {e}") from None
    x = [-1, *spec.input_shape]
    y = [-1, *spec.task.label_shape]
    out = [-1, *spec.task.output_shape]
    weights = {w.name: list(w.shape) for w in spec.weights}
    metrics: dict[str, list[int]] = {m: [] for m in spec.metric_names}
    wanted: dict[str, tuple[dict[str, list[int]], dict[str, list[int]]]] = {
        "train": ({"x": x, "y": y, "lr": [], **weights}, {"loss": [], **weights}),
        "infer": ({"x": x, **weights}, {spec.task.output_name: out}),
        "eval": ({"x": x, "y": y, **weights}, metrics),
    }
    y_dtype = np.int32 if spec.task.integer_labels else np.float32
    for sig in spec.signatures:
        where = f"signature {sig!r}"
        if sig not in present:
            raise ModelError(f"{where} is in the spec but not in the graph (has {sorted(present)})")
        inputs, outputs = wanted[sig]
        if sorted(present[sig]["inputs"]) != sorted(inputs):
            raise ModelError(
                f"{where}: inputs {sorted(present[sig]['inputs'])}, spec implies {sorted(inputs)}"
            )
        if sorted(present[sig]["outputs"]) != sorted(outputs):
            raise ModelError(
                f"{where}: outputs {sorted(present[sig]['outputs'])}, "
                f"spec implies {sorted(outputs)}"
            )
        try:
            runner = interp.get_signature_runner(sig)
            in_details, out_details = runner.get_input_details(), runner.get_output_details()
        except (ValueError, RuntimeError) as e:
            raise ModelError(f"{where}: cannot be prepared by the runtime: {e}") from None
        for name, shape in inputs.items():
            dtype = y_dtype if name == "y" else np.float32
            _expect(where, in_details, name, shape, dtype)
        for name, shape in outputs.items():
            # Output shapes of dynamic-batch graphs may be reported resolved or as -1.
            d = out_details[name]
            got = [int(v) for v in d.get("shape_signature", d["shape"])]
            if len(got) != len(shape) or any(
                g != s and s != -1 for g, s in zip(got, shape, strict=True)
            ):
                raise ModelError(f"{where}: output {name!r} has shape {got}, spec implies {shape}")


# (spec, graph) pairs that passed an isolated probe in this process, by the sha256 of the spec
# (which holds the graph's sha256): probing costs ~0.3 s.
_PROBED: set[str] = set()
_PROBED_LOCK = threading.Lock()
_PROBE_OK, _PROBE_BAD = 0, 3
_PROBE_CODE = "import sys; from fededge.device.runtime import _probe_main; sys.exit(_probe_main())"
_PROBE_ENV = frozenset({"PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR", "PYTHONPATH",
                        "PYTHONHOME", "LD_LIBRARY_PATH", "SYSTEMROOT"})  # fmt: skip


def probe_graph(graph: bytes, spec: BundleSpec, timeout: float = 60.0) -> None:
    """Check ``graph`` against ``spec`` and run each signature once, in a child process.

    tflite-runtime 2.14 builds interpreters without verifying the flatbuffer, so a damaged graph
    can crash the whole process (measured: a truncated graph segfaults it). The child takes that
    risk instead; a crash or a failed check becomes a ModelError here.
    """
    spec_json = json.dumps(spec.to_json(), sort_keys=True).encode()
    key = hashlib.sha256(spec_json).hexdigest()
    with _PROBED_LOCK:
        if key in _PROBED:
            return
    payload = len(spec_json).to_bytes(4, "little") + spec_json + graph
    src_root = str(Path(__file__).resolve().parents[2])
    # Only what starting Python needs: never the broker password (FEDEDGE_BROKER__PASSWORD),
    # $CREDENTIALS_DIRECTORY or systemd's NOTIFY_SOCKET; the graph it loads is untrusted.
    env = {k: v for k, v in os.environ.items() if k in _PROBE_ENV}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src_root, env.get("PYTHONPATH")) if p)
    try:
        r = subprocess.run(
            [sys.executable, "-c", _PROBE_CODE], input=payload, capture_output=True,
            timeout=timeout, env=env, check=False,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        raise ModelError(
            f"the runtime did not finish loading the graph within {timeout} s"
        ) from None
    except OSError as e:
        raise ModelError(f"cannot start the graph probe: {e}") from None
    if r.returncode == _PROBE_BAD:
        raise ModelError(r.stdout.decode(errors="replace").strip())
    if r.returncode < 0:
        raise ModelError(
            f"the runtime crashed (signal {-r.returncode}) loading or running the graph"
        )
    if r.returncode != _PROBE_OK:
        tail = r.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
        raise ModelError(f"the graph probe failed (exit {r.returncode}): {tail[0]}")
    with _PROBED_LOCK:
        _PROBED.add(key)


def _probe_main() -> int:
    """Child side of :func:`probe_graph`: read spec + graph from stdin, check, run once."""
    data = sys.stdin.buffer.read()
    n = int.from_bytes(data[:4], "little")
    try:
        spec = parse_spec(data[4 : 4 + n])
        graph = data[4 + n :]
        check_signatures(graph, spec)
        rt = ModelRuntime(graph, spec)
        x = np.zeros((1, *spec.input_shape), np.float32)
        y = np.zeros(
            (1, *spec.task.label_shape), np.int32 if spec.task.integer_labels else np.float32
        )
        w = {ws.name: np.zeros(ws.shape, np.float32) for ws in spec.weights}
        rt.train_step(x, y, 0.01, w)
        rt.infer(x, w)
        rt.metrics(x, y, w)
    except ModelError as e:
        print(e)
        return _PROBE_BAD
    return _PROBE_OK


class _Slot:
    """One interpreter with its lock and signature runners."""

    def __init__(self, graph: bytes, num_threads: int, signatures: tuple[str, ...]) -> None:
        self.lock = threading.Lock()
        self.interp = _interpreter(graph, num_threads)
        try:
            self.runners = {s: self.interp.get_signature_runner(s) for s in signatures}
        except (ValueError, RuntimeError) as e:
            raise ModelError(f"the runtime cannot prepare signatures {signatures}: {e}") from None

    def run(self, sig: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with self.lock:
            try:
                out: dict[str, np.ndarray] = self.runners[sig](**inputs)
            except (ValueError, RuntimeError) as e:
                raise ModelError(f"signature {sig!r} failed in the runtime: {e}") from None
        return out


class ModelRuntime:
    """Runs a bundle's graph: train steps, predictions and evaluation on numpy arrays."""

    def __init__(
        self, graph: bytes | str | Path, spec: BundleSpec, *, num_threads: int = 1
    ) -> None:
        if isinstance(graph, (str, Path)):
            path = Path(graph)
            try:
                graph = path.read_bytes()
            except OSError as e:
                raise ModelError(f"cannot read graph {path}: {e.strerror}") from None
        self.spec = spec
        self.graph_sha256 = spec.graph_sha256
        self._names = spec.weight_names
        self._shapes = {w.name: w.shape for w in spec.weights}
        self._x_size = math.prod(spec.input_shape)
        train_sigs = tuple(s for s in ("train", "eval") if s in spec.signatures)
        self._train = _Slot(graph, num_threads, train_sigs)
        self._infer = _Slot(graph, num_threads, ("infer",))

    @classmethod
    def from_bundle(cls, bundle: Any, *, num_threads: int = 1) -> ModelRuntime:
        """A runtime for a loaded :class:`~fededge.device.bundle.Bundle`."""
        return cls(bundle.graph, bundle.spec, num_threads=num_threads)

    def _x(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        shape = self.spec.input_shape
        if x.ndim == 2 and x.shape[1] == self._x_size and len(shape) > 1:
            x = x.reshape(-1, *shape)  # flat feature rows are accepted for image models
        if x.shape[1:] != shape or x.shape[0] == 0:
            raise ValueError(
                f"x has shape {list(x.shape)}, expected [batch>0, {', '.join(map(str, shape))}]"
            )
        return np.ascontiguousarray(x)

    def _y(self, y: np.ndarray, n: int) -> np.ndarray:
        return check_labels(np.asarray(y), n, self.spec)

    def _w(self, weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = {}
        for name in self._names:
            if name not in weights:
                raise ValueError(f"weight {name!r} missing")
            arr = np.ascontiguousarray(weights[name], dtype=np.float32)
            if arr.shape != self._shapes[name]:
                raise ValueError(
                    f"weight {name!r} has shape {list(arr.shape)}, "
                    f"expected {list(self._shapes[name])}"
                )
            out[name] = arr
        return out

    def train_step(
        self, x: np.ndarray, y: np.ndarray, lr: float, weights: dict[str, np.ndarray]
    ) -> tuple[float, dict[str, np.ndarray]]:
        """One SGD step on batch (x, y); returns the batch loss before the step and new weights."""
        xb = self._x(x)
        inputs = {
            "x": xb,
            "y": self._y(y, len(xb)),
            "lr": np.array(lr, np.float32),
            **self._w(weights),
        }
        out = self._train.run("train", inputs)
        return float(out["loss"]), {n: out[n] for n in self._names}

    def infer(self, x: np.ndarray, weights: dict[str, np.ndarray]) -> np.ndarray:
        """The model's outputs: class probabilities ``[batch, num_classes]`` for classification,
        sigmoid probabilities for binary and multi-label tasks, predictions for regression."""
        xb, w = self._x(x), self._w(weights)
        name = self.spec.task.output_name
        parts = [
            self._infer.run("infer", {"x": xb[i : i + EVAL_CHUNK], **w})[name]
            for i in range(0, len(xb), EVAL_CHUNK)
        ]
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def metrics(
        self, x: np.ndarray, y: np.ndarray, weights: dict[str, np.ndarray]
    ) -> dict[str, float]:
        """``loss`` and the task's metrics (``spec.metric_names``) of ``weights`` on (x, y)."""
        xb = self._x(x)
        yb, w = self._y(y, len(xb)), self._w(weights)
        names = self.spec.metric_names
        sums = dict.fromkeys(names, 0.0)
        for i in range(0, len(xb), EVAL_CHUNK):
            xs, ys = xb[i : i + EVAL_CHUNK], yb[i : i + EVAL_CHUNK]
            if "eval" in self.spec.signatures:
                out = self._train.run("eval", {"x": xs, "y": ys, **w})
                part = {m: float(out[m]) for m in names}
            else:
                part = _metrics_from_outputs(
                    self.spec, self._infer.run("infer", {"x": xs, **w}), ys
                )
            for m in names:
                sums[m] += part[m] * len(xs)
        return {m: v / len(xb) for m, v in sums.items()}

    def evaluate(
        self, x: np.ndarray, y: np.ndarray, weights: dict[str, np.ndarray]
    ) -> tuple[float, float]:
        """Mean loss and accuracy of ``weights`` on (x, y) (tasks that have an accuracy)."""
        m = self.metrics(x, y, weights)
        if "accuracy" not in m:
            raise ModelError(f"a {self.spec.task.type} task has no accuracy; use metrics()")
        return m["loss"], m["accuracy"]


def _metrics_from_outputs(
    spec: BundleSpec, out: dict[str, np.ndarray], y: np.ndarray
) -> dict[str, float]:
    """Loss and metrics from ``infer``'s outputs, for graphs without an ``eval`` signature."""
    task = spec.task
    if task.type == "regression":
        err = out["outputs"].reshape(len(y), -1) - y.reshape(len(y), -1)
        mse, mae = float(np.mean(err**2)), float(np.mean(np.abs(err)))
        loss = {"mse": mse, "mae": mae}.get(task.loss)
        if loss is None:  # huber, delta 1
            a = np.abs(err)
            loss = float(np.mean(np.where(a <= 1, 0.5 * err**2, a - 0.5)))
        return {"loss": loss, "mse": mse, "mae": mae}
    probs = out["probs"]
    if task.type == "classification":
        p = np.clip(probs[np.arange(len(y)), y], 1e-12, 1.0)
        return {
            "loss": float(-np.mean(np.log(p))),
            "accuracy": float(np.mean(np.argmax(probs, axis=1) == y)),
        }
    p = np.clip(probs.reshape(y.shape), 1e-7, 1 - 1e-7)
    bce = float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))
    hit = (p > 0.5) == (y > 0.5)
    res = {"loss": bce, "accuracy": float(np.mean(hit))}
    if task.type == "multilabel":
        res["exact_match"] = float(np.mean(np.all(hit, axis=1)))
    return res
