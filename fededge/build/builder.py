"""Build model bundles (graph + initial weights + spec) with TensorFlow, at build time only.

Run as ``fededge model build --model mlp -o DIR`` (needs the ``convert`` extra).
The graphs are stateless: weights go in and come out as arrays, and only builtin TFLite ops are
used, so any LiteRT or tflite-runtime >= 2.14 can train them. See docs/decisions.md.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fededge.device.bundle import (
    FORMAT_NAME,
    GRAPH_FILE,
    SPEC_FILE,
    WEIGHTS_FILE,
    save_weights,
)
from fededge.errors import ModelError

NUM_CLASSES = 10
DEFAULT_BATCH = 32
IMAGE = 8  # digits are 8x8 pixels


@dataclass(frozen=True)
class _Arch:
    """What differs between shipped architectures: input shape and weight layout."""

    bundle_name: str
    input_shape: tuple[int, ...]
    weights: tuple[tuple[str, tuple[int, ...]], ...]


ARCHS: dict[str, _Arch] = {
    "mlp": _Arch(
        "digits_mlp",
        (64,),
        (
            ("dense1_kernel", (64, 32)),
            ("dense1_bias", (32,)),
            ("dense2_kernel", (32, NUM_CLASSES)),
            ("dense2_bias", (NUM_CLASSES,)),
        ),
    ),
    "cnn": _Arch(
        "digits_cnn",
        (IMAGE, IMAGE, 1),
        (
            ("conv_kernel", (9, 8)),  # 3x3x1 patches -> 8 channels, im2col layout
            ("conv_bias", (8,)),
            ("dense1_kernel", (16 * 8, 32)),
            ("dense1_bias", (32,)),
            ("dense2_kernel", (32, NUM_CLASSES)),
            ("dense2_bias", (NUM_CLASSES,)),
        ),
    ),
}


def initial_weights(model: str, seed: int = 0) -> dict[str, np.ndarray]:
    """Glorot-uniform kernels and zero biases from a numpy seed (independent of TF's RNG)."""
    arch = ARCHS[model]
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for name, shape in arch.weights:
        if name.endswith("_bias"):
            out[name] = np.zeros(shape, np.float32)
        else:
            limit = np.sqrt(6.0 / (shape[0] + shape[1]))
            out[name] = rng.uniform(-limit, limit, size=shape).astype(np.float32)
    return out


def _patch_matrix() -> np.ndarray:
    """0/1 matrix mapping a flat 8x8 image to 3x3 SAME patches, positions grouped for pooling.

    Output column ``(k * 16 + p) * 9 + t`` holds tap ``t`` of the conv position that is offset
    ``k`` (of the 2x2 pool window) inside pooled cell ``p``; so after the conv the tensor
    reshapes to ``[B, 4, 16, C]`` and 2x2 max pooling is an elementwise max over axis 1.
    Gathering with a matmul keeps conv and pool gradients to MatMul/Maximum (builtin ops).
    """
    g = np.zeros((IMAGE * IMAGE, 4 * 16 * 9), np.float32)
    for k, (dy, dx) in enumerate(((0, 0), (0, 1), (1, 0), (1, 1))):
        for p in range(16):
            row, col = 2 * (p // 4) + dy, 2 * (p % 4) + dx
            for t in range(9):
                r, c = row + t // 3 - 1, col + t % 3 - 1
                if 0 <= r < IMAGE and 0 <= c < IMAGE:
                    g[r * IMAGE + c, (k * 16 + p) * 9 + t] = 1.0
    return g


def _make_module(model: str) -> Any:
    """A tf.Module whose train/infer/eval functions are the bundle's signatures."""
    import tensorflow as tf

    arch = ARCHS[model]
    names = [n for n, _ in arch.weights]
    x_spec = tf.TensorSpec([None, *arch.input_shape], tf.float32, name="x")
    y_spec = tf.TensorSpec([None], tf.int32, name="y")
    lr_spec = tf.TensorSpec([], tf.float32, name="lr")
    w_specs = [tf.TensorSpec(shape, tf.float32, name=n) for n, shape in arch.weights]
    patches = tf.constant(_patch_matrix()) if model == "cnn" else None

    def relu(h: Any) -> Any:
        # tf.nn.relu's gradient (ReluGrad) is not a builtin op; Maximum's gradient is.
        return tf.maximum(h, 0.0)

    @tf.custom_gradient  # type: ignore[untyped-decorator]  # tf has no type stubs
    def pool_max(a: Any, b: Any) -> Any:
        # Maximum's own gradient needs BroadcastGradientArgs (a Flex op) when the batch is dynamic.
        take_a = tf.greater_equal(a, b)

        def grad(g: Any) -> tuple[Any, Any]:
            zero = tf.zeros_like(g)
            return tf.where(take_a, g, zero), tf.where(take_a, zero, g)

        return tf.maximum(a, b), grad

    def logits_of(x: Any, w: Sequence[Any]) -> Any:
        if model == "mlp":
            h = relu(tf.matmul(x, w[0]) + w[1])
            return tf.matmul(h, w[2]) + w[3]
        flat = tf.reshape(x, [-1, IMAGE * IMAGE])
        cols = tf.reshape(tf.matmul(flat, patches), [-1, 9])
        conv = relu(tf.matmul(cols, w[0]) + w[1])
        a, b, c, d = tf.unstack(tf.reshape(conv, [-1, 4, 16, 8]), axis=1)
        pooled = tf.reshape(pool_max(pool_max(a, b), pool_max(c, d)), [-1, 16 * 8])
        h = relu(tf.matmul(pooled, w[2]) + w[3])
        return tf.matmul(h, w[4]) + w[5]

    def loss_of(logits: Any, y: Any) -> Any:
        # The fused op keeps the batch dimension dynamic; a hand-written log-softmax did not.
        onehot = tf.one_hot(y, NUM_CLASSES, dtype=tf.float32)
        return tf.reduce_mean(tf.nn.softmax_cross_entropy_with_logits(onehot, logits))

    class Digits(tf.Module):  # type: ignore[misc]  # tf has no type stubs
        @tf.function(input_signature=[x_spec, y_spec, lr_spec, *w_specs])  # type: ignore[untyped-decorator]
        def train(self, x: Any, y: Any, lr: Any, *w: Any) -> dict[str, Any]:
            with tf.GradientTape() as tape:
                tape.watch(w)
                loss = loss_of(logits_of(x, w), y)
            grads = tape.gradient(loss, w)
            out = {"loss": loss}
            for n, wi, gi in zip(names, w, grads, strict=True):
                out[n] = wi - lr * gi
            return out

        @tf.function(input_signature=[x_spec, *w_specs])  # type: ignore[untyped-decorator]
        def infer(self, x: Any, *w: Any) -> dict[str, Any]:
            return {"probs": tf.nn.softmax(logits_of(x, w))}

        @tf.function(input_signature=[x_spec, y_spec, *w_specs])  # type: ignore[untyped-decorator]
        def eval(self, x: Any, y: Any, *w: Any) -> dict[str, Any]:
            logits = logits_of(x, w)
            correct = tf.cast(
                tf.equal(tf.argmax(logits, axis=1, output_type=tf.int32), y), tf.float32
            )
            return {"loss": loss_of(logits, y), "accuracy": tf.reduce_mean(correct)}

    return Digits()


def convert(module: Any) -> bytes:
    """Convert the module's three signatures to a .tflite flatbuffer with builtin ops only."""
    import tensorflow as tf

    with tempfile.TemporaryDirectory() as tmp:
        sigs = {"train": module.train, "infer": module.infer, "eval": module.eval}
        tf.saved_model.save(module, tmp, signatures=sigs)
        conv = tf.lite.TFLiteConverter.from_saved_model(tmp, signature_keys=list(sigs))
        conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        graph: bytes = conv.convert()
    return graph


def build_bundle(model: str, out_dir: Path, seed: int = 0) -> Path:
    """Build bundle ``model`` ('mlp' or 'cnn') into ``out_dir`` and return that directory."""
    if model not in ARCHS:
        raise ValueError(f"unknown model {model!r}; expected one of {sorted(ARCHS)}")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        import tensorflow as tf
    except ImportError:
        raise ModelError(
            "building bundles needs TensorFlow: pip install 'fededge[convert]'"
        ) from None

    arch = ARCHS[model]
    graph = convert(_make_module(model))
    weights = initial_weights(model, seed)
    spec = {
        "format": FORMAT_NAME,
        "format_version": 1,  # the digits bundles stay version 1 (classification)
        "model": arch.bundle_name,
        "input_shape": list(arch.input_shape),
        "input_dtype": "float32",
        "label_dtype": "int32",
        "num_classes": NUM_CLASSES,
        "batch_size": DEFAULT_BATCH,
        "weights": [
            {"name": n, "shape": list(shape), "dtype": "float32"} for n, shape in arch.weights
        ],
        "signatures": ["eval", "infer", "train"],
        "graph_sha256": hashlib.sha256(graph).hexdigest(),
        "seed": seed,
        "built_with": f"tensorflow {tf.__version__}",
    }
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / GRAPH_FILE).write_bytes(graph)
    (out_dir / WEIGHTS_FILE).write_bytes(save_weights(weights))
    (out_dir / SPEC_FILE).write_text(json.dumps(spec, indent=2, sort_keys=True) + "\n")
    return out_dir


def tf_train_step(
    model: str, x: np.ndarray, y: np.ndarray, lr: float, weights: dict[str, np.ndarray]
) -> tuple[float, dict[str, np.ndarray]]:
    """One eager TensorFlow train step of the same function the graph was converted from."""
    names = [n for n, _ in ARCHS[model].weights]
    out = _make_module(model).train(
        x.astype(np.float32), y.astype(np.int32), np.float32(lr), *[weights[n] for n in names]
    )
    return float(out["loss"].numpy()), {n: out[n].numpy() for n in names}
