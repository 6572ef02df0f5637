"""Any Keras 3 model of supported layers -> a stateless, trainable fededge bundle (format 2).

``build_bundle(model, task="regression", ...)`` (and ``fededge model build --keras``) walks the
model's layers, writes each as TensorFlow ops with hand-written gradients
(:mod:`fededge.build.layers`), adds the task's loss and metrics, generates the ``train``,
``infer`` and ``eval`` signatures with the weights as inputs and outputs, converts them with
builtin ops only, and checks the result: LiteRT's predictions equal Keras's, and a few LiteRT
train steps equal TensorFlow's (1e-5) while the loss falls. See docs/models.md.

Frozen layers (Keras ``trainable=False``, or not named in ``trainable=[...]``) stay inside the
graph as constants: only trainable weights are signature inputs, travel and get aggregated.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fededge.device.spec import (
    FORMAT_NAME,
    FORMAT_VERSION,
    GRAPH_FILE,
    RESERVED_NAMES,
    SPEC_FILE,
    TASK_LOSSES,
    TASK_METRICS,
    TASK_TYPES,
    WEIGHTS_FILE,
    TaskSpec,
    parse_spec,
)
from fededge.errors import ModelError

DEFAULT_LOSS = {
    "classification": "sparse_categorical_crossentropy",
    "binary": "binary_crossentropy",
    "multilabel": "binary_crossentropy",
    "regression": "mse",
}
_LOSS_ALIASES = {
    "mean_squared_error": "mse",
    "mean_absolute_error": "mae",
    "crossentropy": None,
    "categorical_crossentropy": "sparse_categorical_crossentropy",
}
SUPPORTED_LAYERS = (
    "Dense, Conv1D, Conv2D, DepthwiseConv2D, MaxPooling1D/2D, AveragePooling1D/2D, "
    "GlobalAveragePooling1D/2D, GlobalMaxPooling1D/2D, Flatten, Reshape, Dropout, "
    "SpatialDropout1D/2D, GaussianNoise, BatchNormalization (frozen), Normalization, "
    "Activation, ReLU, LeakyReLU, ELU, Softmax, Embedding (first layer), InputLayer"
)


@dataclass(frozen=True)
class Built:
    """What :func:`build_bundle` made: the bundle's parts, and the check's figures."""

    graph: bytes
    spec: dict[str, Any]
    weights: dict[str, np.ndarray]
    frozen_parameters: int
    check: dict[str, Any] | None
    path: Path | None


def _safe(name: str) -> str:
    s = re.sub(r"[^A-Za-z0-9_]", "_", name).strip("_") or "w"
    return s if s[0].isalpha() else "w_" + s


def _identity(h: Any, get: Any) -> Any:
    return h


def _flatten(h: Any, get: Any) -> Any:
    import tensorflow as tf

    return tf.reshape(h, [-1, int(np.prod(h.shape[1:]))])


def _reshape(h: Any, get: Any, target: list[int]) -> Any:
    import tensorflow as tf

    return tf.reshape(h, [-1, *target])


def _global_pool(h: Any, get: Any, mode: str) -> Any:
    from fededge.build import layers as L

    return L.global_pool(h, mode)


def _affine(h: Any, get: Any, scale: np.ndarray, shift: np.ndarray) -> Any:
    import tensorflow as tf

    from fededge.build import layers as L

    return L.channel_affine(h, tf.constant(scale), tf.constant(shift))


def _embedding(h: Any, get: Any, name: str) -> Any:
    from fededge.build import layers as L

    return L.embedding(h, get(name))


def _keras_call(h: Any, get: Any, layer: Any) -> Any:
    return layer(h)


# --- layers -> steps ---------------------------------------------------------------------------


def _flatten_layers(model: Any, trainable: bool = True) -> list[tuple[Any, bool]]:
    """The model's layers in order, nested models expanded; each with its effective trainability."""
    out: list[tuple[Any, bool]] = []
    for layer in model.layers:
        t = trainable and bool(layer.trainable)
        if hasattr(layer, "layers") and layer.__class__.__name__ in ("Sequential", "Functional"):
            out.extend(_flatten_layers(layer, t))
        else:
            out.append((layer, t))
    return out


def _translate(
    model: Any, trainable: Sequence[str] | None
) -> tuple[list[Any], list[Any], tuple[int, ...]]:
    """(steps, weights, input shape) of a chain-of-layers Keras model."""
    import tensorflow as tf

    from fededge.build import layers as L

    shape = model.inputs[0].shape if getattr(model, "inputs", None) else None
    if shape is None or any(d is None for d in shape[1:]):
        raise ModelError(f"the model needs a fixed input shape (got {shape}); add keras.Input")
    input_shape = tuple(int(d) for d in shape[1:])
    flat = _flatten_layers(model)
    names = [layer.name for layer, _ in flat]
    if trainable is not None:
        unknown = sorted(set(trainable) - set(names))
        if unknown:
            raise ModelError(f"--trainable names unknown layers {unknown}; the model has {names}")
    steps: list[Any] = []
    weights: list[Any] = []
    used: set[str] = set(RESERVED_NAMES)

    def add_weight(layer: Any, var: Any, trains: bool) -> str:
        base = _safe(f"{layer.name}_{var.name}")
        name, i = base, 1
        while name in used:
            i += 1
            name = f"{base}_{i}"
        used.add(name)
        weights.append(L.Weight(name, np.asarray(var.numpy(), np.float32), trains, var.path))
        return name

    for idx, (layer, keras_trainable) in enumerate(flat):
        kind = layer.__class__.__name__
        where = f"layer {layer.name!r} ({kind})"
        trains = keras_trainable if trainable is None else layer.name in trainable
        cfg = layer.get_config()
        if kind == "InputLayer":
            continue
        act_name = "linear"
        if "activation" in cfg:
            a = layer.activation
            act_name = getattr(a, "__name__", str(a))
        if kind == "Dense":
            k = add_weight(layer, layer.kernel, trains)
            b = add_weight(layer, layer.bias, trains) if layer.use_bias else None

            def dense_fn(h: Any, get: Any, k: str = k, b: str | None = b) -> Any:
                y = L.dense(h, get(k))
                return L.bias_add(y, get(b)) if b else y

            steps.append(L.Step(layer.name, kind, dense_fn, [k, b] if b else [k], act_name))
        elif kind in ("Conv1D", "Conv2D", "DepthwiseConv2D"):
            if any(d != 1 for d in cfg.get("dilation_rate", (1,))) or cfg.get("groups", 1) != 1:
                raise ModelError(f"{where}: dilation and groups are not supported")
            if cfg.get("data_format", "channels_last") != "channels_last":
                raise ModelError(f"{where}: only channels_last is supported")
            pad = cfg["padding"]
            if pad not in ("valid", "same", "causal"):
                raise ModelError(f"{where}: padding {pad!r} is not supported")
            var = layer.kernel
            k = add_weight(layer, var, trains)
            b = add_weight(layer, layer.bias, trains) if layer.use_bias else None
            strides = tuple(cfg["strides"])
            ksize = tuple(int(d) for d in var.shape[:-2])

            def conv_fn(
                h: Any, get: Any, k: str = k, b: str | None = b, kind: str = kind,
                strides: tuple[int, ...] = strides, pad: str = pad, ksize: tuple[int, ...] = ksize,
            ) -> Any:  # fmt: skip
                kern = get(k)
                if kind == "Conv1D":
                    steps_len, ch = int(h.shape[1]), int(h.shape[2])
                    if pad == "causal":
                        h = tf.pad(h, [[0, 0], [ksize[0] - 1, 0], [0, 0]])
                        steps_len += ksize[0] - 1
                    h4 = tf.reshape(h, [-1, 1, steps_len, ch])
                    k4 = tf.reshape(kern, [1, *[int(d) for d in kern.shape]])
                    y = L.conv2d(h4, k4, (1, strides[0]), "valid" if pad == "causal" else pad)
                    y = tf.reshape(y, [-1, int(y.shape[2]), int(y.shape[3])])
                else:
                    if kind == "DepthwiseConv2D":
                        kern = L.depthwise_kernel(kern)
                    y = L.conv2d(h, kern, (strides[0], strides[1]), pad)
                return L.bias_add(y, get(b)) if b else y

            steps.append(L.Step(layer.name, kind, conv_fn, [k, b] if b else [k], act_name))
        elif kind in ("MaxPooling1D", "MaxPooling2D", "AveragePooling1D", "AveragePooling2D"):
            pool = tuple(cfg["pool_size"])
            strides = tuple(cfg["strides"] or pool)
            if strides != pool:
                raise ModelError(f"{where}: strides {strides} != pool_size {pool} not supported")
            if cfg.get("data_format", "channels_last") != "channels_last":
                raise ModelError(f"{where}: only channels_last is supported")
            mode = "max" if kind.startswith("Max") else "avg"
            if cfg["padding"] == "same":
                dims = input_shape if not steps else None
                del dims  # checked against the actual shape below
            one_d = kind.endswith("1D")

            def pool_fn(h: Any, get: Any, pool: tuple[int, ...] = pool, mode: str = mode,
                   one_d: bool = one_d, padding: str = cfg["padding"], where: str = where) -> Any:  # fmt: skip
                spatial = [int(d) for d in h.shape[1:-1]]
                if padding == "same" and any(s % p for s, p in zip(spatial, pool, strict=True)):
                    raise ModelError(
                        f"{where}: 'same' padding of {spatial} by {pool} not supported"
                    )
                if one_d:
                    h4 = tf.reshape(h, [-1, 1, spatial[0], int(h.shape[-1])])
                    y = L.pool2d(h4, 1, pool[0], mode)
                    return tf.reshape(y, [-1, int(y.shape[2]), int(y.shape[3])])
                return L.pool2d(h, pool[0], pool[1], mode)

            steps.append(L.Step(layer.name, kind, pool_fn))
        elif kind.startswith("Global") and "Pooling" in kind:
            if cfg.get("keepdims"):
                raise ModelError(f"{where}: keepdims=True is not supported")
            mode = "max" if "Max" in kind else "avg"
            steps.append(L.Step(layer.name, kind, functools.partial(_global_pool, mode=mode)))
        elif kind == "Flatten":
            steps.append(L.Step(layer.name, kind, _flatten))
        elif kind == "Reshape":
            target = [int(d) for d in cfg["target_shape"]]
            if len(target) > 3:
                raise ModelError(f"{where}: tensors above 4-D crash tflite-runtime 2.14")
            steps.append(L.Step(layer.name, kind, functools.partial(_reshape, target=target)))
        elif kind in ("Dropout", "SpatialDropout1D", "SpatialDropout2D", "GaussianNoise",
                      "GaussianDropout", "ActivityRegularization"):  # fmt: skip
            steps.append(L.Step(layer.name, kind, _identity))  # inference mode
        elif kind in ("BatchNormalization", "Normalization"):
            if kind == "BatchNormalization":
                if cfg["axis"] not in (-1, len(layer.input.shape) - 1, [-1]):
                    raise ModelError(f"{where}: only the last axis is supported")
                mean = layer.moving_mean.numpy()
                var = layer.moving_variance.numpy()
                gamma = layer.gamma.numpy() if layer.scale else np.ones_like(mean)
                beta = layer.beta.numpy() if layer.center else np.zeros_like(mean)
                inv = gamma / np.sqrt(var + cfg["epsilon"])
                scale, shift = inv, beta - mean * inv
            else:
                mean = np.asarray(layer.mean).reshape(-1)
                std = np.sqrt(np.maximum(np.asarray(layer.variance).reshape(-1), 1e-7))
                if cfg.get("invert"):
                    raise ModelError(f"{where}: invert=True is not supported")
                scale, shift = 1.0 / std, -mean / std
            sc = np.asarray(scale, np.float32)
            sh = np.asarray(shift, np.float32)
            steps.append(L.Step(layer.name, kind, functools.partial(_affine, scale=sc, shift=sh)))
        elif kind in ("Activation", "ReLU", "LeakyReLU", "ELU", "Softmax"):
            alpha = 0.0
            if kind == "Activation":
                act_name = act_name
            elif kind == "ReLU":
                mv, ns, th = (
                    cfg.get("max_value"),
                    cfg.get("negative_slope", 0),
                    cfg.get("threshold", 0),
                )
                if th or ns:
                    raise ModelError(f"{where}: negative_slope/threshold are not supported")
                act_name = "relu6" if mv == 6 else "relu" if mv is None else ""
                if not act_name:
                    raise ModelError(f"{where}: max_value {mv} is not supported")
            elif kind == "LeakyReLU":
                act_name, alpha = (
                    "leaky_relu",
                    float(cfg.get("negative_slope", cfg.get("alpha", 0.3))),
                )
            elif kind == "ELU":
                act_name, alpha = "elu", float(cfg.get("alpha", 1.0))
            else:
                if cfg.get("axis", -1) not in (-1, [-1]):
                    raise ModelError(f"{where}: softmax over another axis than the last")
                act_name = "softmax"
            L.activation(act_name, where, alpha)  # unsupported ones fail here, naming the layer
            steps.append(L.Step(layer.name, kind, _identity, [], act_name, act_alpha=alpha))
            continue
        elif kind == "Embedding":
            if idx > 1 or steps:
                raise ModelError(f"{where}: an Embedding must be the model's first layer")
            if cfg.get("mask_zero"):
                raise ModelError(f"{where}: mask_zero=True is not supported")
            e = add_weight(layer, layer.embeddings, trains)
            steps.append(L.Step(layer.name, kind, functools.partial(_embedding, name=e), [e]))
        elif not layer.weights:
            # No translation: run the Keras layer itself and let TensorFlow differentiate it. If a
            # gradient has no builtin op, the build fails naming this layer and the op.
            steps.append(
                L.Step(layer.name, kind, functools.partial(_keras_call, layer=layer), fallback=True)
            )
        else:
            raise ModelError(f"{where}: not supported; supported layers: {SUPPORTED_LAYERS}")
        if act_name != "linear" and kind != "Activation":
            L.activation(act_name, where)  # unsupported activations fail here, naming the layer
    return steps, weights, input_shape


# --- the module ---------------------------------------------------------------------------------


def _head(task: str, steps: list[Any]) -> str:
    """Strip the final softmax/sigmoid of a classifier (the loss works on logits); return what
    ``infer`` applies to the logits."""
    last = steps[-1]
    if task == "regression":
        return "none"
    want = "softmax" if task == "classification" else "sigmoid"
    if last.activation in (want, "linear"):
        last.activation = "linear"
        return want
    raise ModelError(
        f"layer {last.layer!r}: a {task} model ends in {want} or linear (logits), "
        f"not {last.activation!r}"
    )


def _make_module(
    steps: list[Any], weights: list[Any], input_shape: tuple[int, ...], task: TaskSpec,
    head: str, normalization: tuple[np.ndarray, np.ndarray] | None,
) -> Any:  # fmt: skip
    import tensorflow as tf

    from fededge.build import layers as L

    train_w = [w for w in weights if w.trainable]
    names = [w.name for w in train_w]
    frozen = {w.name: tf.constant(w.value) for w in weights if not w.trainable}
    x_spec = tf.TensorSpec([None, *input_shape], tf.float32, name="x")
    y_dtype = tf.int32 if task.integer_labels else tf.float32
    y_spec = tf.TensorSpec([None, *task.label_shape], y_dtype, name="y")
    lr_spec = tf.TensorSpec([], tf.float32, name="lr")
    w_specs = [tf.TensorSpec(w.value.shape, tf.float32, name=w.name) for w in train_w]
    acts = {}
    for s in steps:
        default = {"elu": 1.0, "leaky_relu": 0.2}.get(s.activation, 0.0)  # Keras's defaults
        acts[s.layer] = L.activation(s.activation, s.layer, s.act_alpha or default)
    if normalization is not None:
        n_mean = tf.constant(np.broadcast_to(normalization[0], input_shape).astype(np.float32))
        n_inv = tf.constant(
            (1.0 / np.broadcast_to(normalization[1], input_shape)).astype(np.float32)
        )

    def forward(x: Any, w: Sequence[Any]) -> Any:
        wmap = dict(zip(names, w, strict=True))

        def get(n: str) -> Any:
            return wmap[n] if n in wmap else frozen[n]

        h = x
        if normalization is not None:
            h = (h - n_mean) * n_inv  # constants only: no gradient is taken through x
        for s in steps:
            h = acts[s.layer](s.fn(h, get))
        return h

    def loss_of(z: Any, y: Any) -> Any:
        @tf.custom_gradient  # type: ignore[untyped-decorator]
        def loss(z: Any) -> Any:
            zf = tf.reshape(z, [tf.shape(z)[0], -1])
            count = tf.cast(tf.reduce_prod(tf.shape(zf)), tf.float32)
            rows = tf.cast(tf.shape(zf)[0], tf.float32)
            if task.type == "classification":
                hot = tf.one_hot(y, task.num_classes, dtype=tf.float32)
                value = tf.reduce_mean(tf.nn.softmax_cross_entropy_with_logits(hot, zf))
                d = (tf.nn.softmax(zf) - hot) / rows
            else:
                yf = tf.reshape(y, tf.shape(zf))
                if task.type in ("binary", "multilabel"):
                    per = tf.nn.relu(zf) - zf * yf + tf.math.log1p(tf.exp(-tf.abs(zf)))
                    d = (tf.sigmoid(zf) - yf) / count
                else:
                    e = zf - yf
                    if task.loss == "mse":
                        per, d = e * e, 2.0 * e / count
                    elif task.loss == "mae":
                        per, d = tf.abs(e), tf.sign(e) / count
                    else:  # huber, delta 1 (Keras's default)
                        a = tf.abs(e)
                        per = tf.where(a <= 1.0, 0.5 * e * e, a - 0.5)
                        d = tf.clip_by_value(e, -1.0, 1.0) / count
                value = tf.reduce_sum(per) / count

            def grad(g: Any) -> Any:
                return tf.reshape(g * d, tf.shape(z))

            return value, grad

        return loss(z)

    def metrics_of(z: Any, y: Any) -> dict[str, Any]:
        out = {"loss": loss_of(z, y)}
        zf = tf.reshape(z, [tf.shape(z)[0], -1])
        if task.type == "classification":
            hit = tf.equal(tf.argmax(zf, axis=1, output_type=tf.int32), y)
            out["accuracy"] = tf.reduce_mean(tf.cast(hit, tf.float32))
        elif task.type in ("binary", "multilabel"):
            yf = tf.reshape(y, tf.shape(zf))
            hit = tf.cast(tf.equal(zf > 0.0, yf > 0.5), tf.float32)
            out["accuracy"] = tf.reduce_mean(hit)
            if task.type == "multilabel":
                out["exact_match"] = tf.reduce_mean(tf.reduce_min(hit, axis=1))
        else:
            e = zf - tf.reshape(y, tf.shape(zf))
            out["mse"] = tf.reduce_mean(e * e)
            out["mae"] = tf.reduce_mean(tf.abs(e))
        return out

    out_name = task.output_name

    class Model(tf.Module):  # type: ignore[misc]
        @tf.function(input_signature=[x_spec, y_spec, lr_spec, *w_specs])  # type: ignore[untyped-decorator]
        def train(self, x: Any, y: Any, lr: Any, *w: Any) -> dict[str, Any]:
            with tf.GradientTape() as tape:
                tape.watch(w)
                loss = loss_of(forward(x, w), y)
            grads = tape.gradient(loss, w)
            out = {"loss": loss}
            for n, wi, gi in zip(names, w, grads, strict=True):
                out[n] = wi - lr * gi
            return out

        @tf.function(input_signature=[x_spec, *w_specs])  # type: ignore[untyped-decorator]
        def infer(self, x: Any, *w: Any) -> dict[str, Any]:
            z = forward(x, w)
            if head == "softmax":
                z = tf.nn.softmax(z)
            elif head == "sigmoid":
                z = tf.sigmoid(z)
            return {out_name: z}

        @tf.function(input_signature=[x_spec, y_spec, *w_specs])  # type: ignore[untyped-decorator]
        def eval(self, x: Any, y: Any, *w: Any) -> dict[str, Any]:
            return metrics_of(forward(x, w), y)

    return Model()


def _convert(module: Any, what: str) -> bytes:
    import tensorflow as tf

    with tempfile.TemporaryDirectory() as tmp:
        sigs = {s: getattr(module, s) for s in ("train", "infer", "eval")}
        tf.saved_model.save(module, tmp, signatures=sigs)
        conv = tf.lite.TFLiteConverter.from_saved_model(tmp, signature_keys=list(sigs))
        conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        try:
            graph: bytes = conv.convert()
        except Exception as e:  # the converter raises ConverterError and others
            ops = sorted(set(re.findall(r"'tf\.(\w+)'|tf\.(\w+)", str(e)) and [
                a or b for a, b in re.findall(r"'tf\.(\w+)'|tf\.(\w+)", str(e))]))  # fmt: skip
            raise _ConvertError(what, ops, str(e)) from None
    return graph


class _ConvertError(Exception):
    def __init__(self, what: str, ops: list[str], detail: str) -> None:
        super().__init__(f"{what}: ops without a builtin LiteRT kernel: {ops or detail[-400:]}")
        self.ops = ops


def _one_layer_module(s: Any, ws: list[str], sig: list[Any]) -> Any:
    import tensorflow as tf

    def train(x: Any, *w: Any) -> dict[str, Any]:
        with tf.GradientTape() as tape:
            tape.watch(x)
            tape.watch(w)
            m = dict(zip(ws, w, strict=True))
            y = tf.reduce_sum(s.fn(x, m.__getitem__))
        gs = tape.gradient(y, [x, *w])
        return {"g": tf.add_n([tf.reduce_sum(g) for g in gs])}

    one = tf.Module()
    one.train = tf.function(train, input_signature=sig)
    return one


def _locate(steps: list[Any], input_shape: tuple[int, ...], weights: list[Any]) -> str:
    """Convert each layer's training graph alone; name the first layer whose gradient fails."""
    import tensorflow as tf

    wvals = {w.name: w.value for w in weights}
    h = tf.zeros([2, *input_shape])
    for s in steps:
        shape = [int(d) for d in h.shape[1:]]
        ws = [n for n in s.weights]

        sig = [tf.TensorSpec([None, *shape], tf.float32, name="x")] + [
            tf.TensorSpec(wvals[n].shape, tf.float32, name=n) for n in ws
        ]
        one = _one_layer_module(s, ws, sig)
        with tempfile.TemporaryDirectory() as tmp:
            tf.saved_model.save(one, tmp, signatures={"train": one.train})
            conv = tf.lite.TFLiteConverter.from_saved_model(tmp, signature_keys=["train"])
            conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
            try:
                conv.convert()
            except Exception as e:
                found = [a or b for a, b in re.findall(r"'tf\.(\w+)'|tf\.(\w+)", str(e))]
                ops = sorted(set(found)) or ["(see the converter's message)"]
                return f"layer {s.layer!r} ({s.kind}): its gradient needs {', '.join(ops)}"
        h = s.fn(h, lambda n: tf.constant(wvals[n]))
    return "no single layer fails on its own"


# --- check ---------------------------------------------------------------------------------------


def _random_data(
    steps: list[Any], weights: list[Any], input_shape: tuple[int, ...], task: TaskSpec, n: int,
    seed: int,
) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    rng = np.random.default_rng(seed)
    if steps and steps[0].kind == "Embedding":
        vocab = next(w.value.shape[0] for w in weights if w.name == steps[0].weights[0])
        x = rng.integers(0, vocab, (n, *input_shape)).astype(np.float32)
    else:
        x = rng.random((n, *input_shape), dtype=np.float32)
    if task.type == "classification":
        y: np.ndarray = rng.integers(0, task.num_classes or 2, n).astype(np.int32)
    elif task.type in ("binary", "multilabel"):
        y = rng.integers(0, 2, (n, *task.label_shape)).astype(np.float32)
    else:
        y = rng.random((n, *task.label_shape), dtype=np.float32)
    return x, y


def check_bundle(
    graph: bytes, spec_json: dict[str, Any], init: dict[str, np.ndarray], module: Any,
    x: np.ndarray, y: np.ndarray, *, lr: float, steps: int = 5, tol: float = 1e-5,
    keras_model: Any = None, raw_x: np.ndarray | None = None,
) -> dict[str, Any]:  # fmt: skip
    """LiteRT vs TensorFlow: ``steps`` train steps on (x, y) agree to ``tol`` and the loss falls.

    Also checks ``infer`` against the Keras model's own predictions when ``keras_model`` is given.
    Returns the figures; raises ModelError on any disagreement.
    """
    from fededge.device.runtime import ModelRuntime

    spec = parse_spec(spec_json)
    rt = ModelRuntime(graph, spec)
    names = spec.weight_names
    w_rt = {k: v.copy() for k, v in init.items()}
    w_tf = {k: v.copy() for k, v in init.items()}
    losses: list[float] = []
    worst = 0.0
    for i in range(steps):
        loss, w_rt = rt.train_step(x, y, lr, w_rt)
        out = module.train(x, y, np.float32(lr), *[w_tf[n] for n in names])
        tf_loss = float(out["loss"].numpy())
        w_tf = {n: out[n].numpy() for n in names}
        diffs = [abs(loss - tf_loss) / (1.0 + abs(tf_loss))] + [
            float(np.max(np.abs(w_rt[n] - w_tf[n]) / (1.0 + np.abs(w_tf[n])))) for n in names
        ]
        worst = max(worst, *diffs)
        if max(diffs) > tol:
            raise ModelError(
                f"check: LiteRT's train step {i + 1} differs from TensorFlow's by {max(diffs):.2e} "
                f"(> {tol}; loss {loss:.6f} vs {tf_loss:.6f})"
            )
        losses.append(loss)
    final = rt.metrics(x, y, w_rt)["loss"]
    if not final < losses[0]:
        raise ModelError(
            f"check: the loss did not fall in {steps} steps at lr {lr} ({losses[0]:.6f} -> "
            f"{final:.6f}); try another --check-lr or --sample data"
        )
    result: dict[str, Any] = {"steps": steps, "lr": lr, "max_difference": worst,
                              "loss_first": losses[0], "loss_after": final}  # fmt: skip
    if keras_model is not None:
        ref = np.asarray(keras_model(raw_x if raw_x is not None else x, training=False))
        got = rt.infer(x, init)
        diff = float(np.max(np.abs(ref.reshape(got.shape) - got)))
        result["keras_infer_difference"] = diff
        if diff > 1e-4:
            raise ModelError(
                f"check: LiteRT's predictions differ from Keras's by {diff:.2e}: is the model a "
                f"plain chain of layers (no branches, no custom call)?"
            )
    return result


# --- the API -------------------------------------------------------------------------------------


def load_keras(path: str | Path) -> Any:
    """Load a ``.keras`` (or ``.h5``) model file without compiling it."""
    import keras

    try:
        return keras.saving.load_model(str(path), compile=False)
    except (OSError, ValueError, TypeError) as e:
        raise ModelError(f"cannot load Keras model {path}: {e}") from None


def build_bundle(
    model: Any,
    task: str,
    *,
    output: str | Path | None = None,
    loss: str | None = None,
    trainable: Sequence[str] | None = None,
    batch_size: int = 32,
    name: str | None = None,
    normalization: tuple[Any, Any] | None = None,
    check: bool = True,
    sample: tuple[np.ndarray, np.ndarray] | None = None,
    check_lr: float = 0.05,
    check_steps: int = 5,
    seed: int = 0,
) -> Built:
    """Turn a Keras 3 model (object or ``.keras`` path) into a fededge bundle (format 2).

    ``task``: classification (int class ids, softmax), binary (0/1, one sigmoid output),
    multilabel (multi-hot, sigmoid outputs) or regression (float targets shaped like the output).
    ``loss`` defaults per task (see ``TASK_LOSSES``). ``trainable``: names of the layers that
    train; default: Keras's own ``trainable`` flags. ``normalization``: (mean, std) applied to raw
    inputs inside the graph. ``check`` (default): LiteRT vs TensorFlow on ``sample`` or random
    data. Writes the bundle to ``output`` when given. Raises ModelError naming what fails.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        import tensorflow as tf
    except ImportError:
        raise ModelError(
            "building bundles needs TensorFlow: pip install 'fededge[convert]'"
        ) from None
    if isinstance(model, (str, Path)):
        model = load_keras(model)
    if task not in TASK_TYPES:
        raise ModelError(f"task {task!r} is not one of {list(TASK_TYPES)}")
    loss = _LOSS_ALIASES.get(loss, loss) if loss else DEFAULT_LOSS[task]
    if loss not in TASK_LOSSES[task]:
        raise ModelError(
            f"loss {loss!r} does not fit a {task} task (use {list(TASK_LOSSES[task])})"
        )
    if not 1 <= batch_size <= 1 << 16:
        raise ModelError(f"batch size {batch_size} out of range [1, 65536]")

    steps, weights, input_shape = _translate(model, trainable)
    if not steps:
        raise ModelError("the model has no layers")
    head = _head(task, steps)
    out_shape = tuple(int(d) for d in model.outputs[0].shape[1:])
    if len(input_shape) > 3 or len(out_shape) > 3:
        raise ModelError("inputs and outputs have at most 3 dimensions per example (4-D tensors)")
    if task == "classification":
        if len(out_shape) != 1 or out_shape[0] < 2:
            raise ModelError(f"a classification model outputs [num_classes], not {list(out_shape)}")
        t = TaskSpec(task, "int32", (), out_shape, loss, TASK_METRICS[task], out_shape[0])
    elif task == "binary":
        if out_shape != (1,):
            raise ModelError(f"a binary model has one output unit, not {list(out_shape)}")
        t = TaskSpec(task, "float32", (), out_shape, loss, TASK_METRICS[task])
    elif task == "multilabel":
        if len(out_shape) != 1:
            raise ModelError(f"a multilabel model outputs [labels], not {list(out_shape)}")
        t = TaskSpec(task, "float32", out_shape, out_shape, loss, TASK_METRICS[task])
    else:
        t = TaskSpec(task, "float32", out_shape, out_shape, loss, TASK_METRICS[task])
    norm = None
    if normalization is not None:
        mean = np.asarray(normalization[0], np.float32)
        std = np.asarray(normalization[1], np.float32)
        try:
            np.broadcast_to(mean, input_shape), np.broadcast_to(std, input_shape)
        except ValueError:
            raise ModelError(f"normalization mean/std do not fit the input {input_shape}") from None
        if np.any(std <= 0) or not np.all(np.isfinite(mean)):
            raise ModelError("normalization std must be > 0 and mean finite")
        norm = (mean, std)
        t = TaskSpec(t.type, t.label_dtype, t.label_shape, t.output_shape, t.loss, t.metrics,
                     t.num_classes, {"mean": mean.tolist(), "std": std.tolist()})  # fmt: skip
    trainable_w = [w for w in weights if w.trainable]
    if not trainable_w:
        raise ModelError("no trainable weights: every layer is frozen")

    module = _make_module(steps, weights, input_shape, t, head, norm)
    try:
        graph = _convert(module, "the training graph")
    except _ConvertError as e:
        raise ModelError(f"{e}; {_locate(steps, input_shape, weights)}") from None
    init = {w.name: w.value for w in trainable_w}
    frozen = int(sum(w.value.size for w in weights if not w.trainable))
    spec = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "model": name or _safe(model.name),
        "input_shape": list(input_shape),
        "input_dtype": "float32",
        "task": t.to_json(),
        "batch_size": batch_size,
        "weights": [
            {"name": w.name, "shape": list(w.value.shape), "dtype": "float32"} for w in trainable_w
        ],
        "signatures": ["eval", "infer", "train"],
        "graph_sha256": hashlib.sha256(graph).hexdigest(),
        "frozen_parameters": frozen,
        "layers": [{"name": s.layer, "kind": s.kind} for s in steps],
        "built_with": f"tensorflow {tf.__version__}",
    }
    parse_spec(spec)  # what the devices will check
    result = None
    if check:
        if sample is not None:
            x = np.asarray(sample[0], np.float32)[:batch_size]
            y = np.asarray(sample[1])[:batch_size]
            y = y.astype(np.int32 if t.integer_labels else np.float32)
            y = y.reshape(len(y), *t.label_shape)
        else:
            x, y = _random_data(steps, weights, input_shape, t, min(batch_size, 16), seed)
        result = check_bundle(
            graph, spec, init, module, x, y, lr=check_lr, steps=check_steps,
            keras_model=_keras_head(model, head),
            raw_x=None if norm is None else (x - norm[0]) / norm[1],  # Keras sees normalised x
        )  # fmt: skip
    path = None
    if output is not None:
        path = write_bundle(Path(output), graph, spec, init)
    return Built(graph, spec, init, frozen, result, path)


def _keras_head(model: Any, head: str) -> Any:
    """The Keras model as the bundle's ``infer`` sees it (a logits output gets its head)."""
    import keras

    last = model.layers[-1]
    act = getattr(getattr(last, "activation", None), "__name__", None)
    if head == "none" or act in ("softmax", "sigmoid") or last.__class__.__name__ in (
        "Softmax", "Activation"
    ):  # fmt: skip
        return model
    fn = keras.activations.softmax if head == "softmax" else keras.activations.sigmoid
    return lambda x, training=False: fn(model(x, training=training))


def write_bundle(
    out: Path, graph: bytes, spec: dict[str, Any], weights: dict[str, np.ndarray]
) -> Path:
    """Write the three bundle files into ``out`` (created if needed)."""
    from fededge.device.bundle import save_weights

    out.mkdir(parents=True, exist_ok=True)
    (out / GRAPH_FILE).write_bytes(graph)
    (out / WEIGHTS_FILE).write_bytes(save_weights(weights))
    (out / SPEC_FILE).write_text(json.dumps(spec, indent=2, sort_keys=True) + "\n")
    return out
