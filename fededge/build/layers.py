"""Keras layers as TensorFlow ops whose gradients convert to builtin LiteRT ops.

Each supported Keras layer becomes a :class:`Step`: a function of the activations and the
layer's weights written with ``tf.custom_gradient``, so the training graph contains only the
forward ops and the backward ops written here — never TensorFlow's registered gradients that have
no builtin LiteRT kernel (``ReluGrad``, ``BroadcastGradientArgs`` between two dynamic-batch
tensors, ``StridedSliceGrad``, ``Conv2DBackpropFilter``, ``MaxPoolGrad``, ...). Tensors stay at
most 4-D (tflite-runtime 2.14 crashes above that). TensorFlow (the convert extra) is imported when
a function here is called, never at import time.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fededge.errors import ModelError

Tensor = Any
Get = Callable[[str], Tensor]


@dataclass
class Weight:
    """One Keras weight: its bundle name, initial value, and whether it trains (travels)."""

    name: str
    value: np.ndarray
    trainable: bool
    path: str


@dataclass
class Step:
    """One layer as a function ``fn(h, get) -> h`` (``get`` returns a weight by bundle name)."""

    layer: str
    kind: str
    fn: Callable[[Tensor, Get], Tensor]
    weights: list[str] = field(default_factory=list)
    activation: str = "linear"  # the step's own final activation (the head may strip it)
    fallback: bool = False  # run through Keras itself, differentiated by TensorFlow
    act_alpha: float = 0.0  # the slope/alpha of a LeakyReLU/ELU layer (0: Keras's default)


# --- elementwise and activations --------------------------------------------------------------


def _act_fn(name: str, alpha: float = 0.0) -> Callable[[Tensor], Tensor] | None:
    """An activation with a hand-written gradient, or None if unsupported."""
    import tensorflow as tf

    def make(
        fwd: Callable[[Tensor], Tensor], dfn: Callable[[Tensor, Tensor, Tensor], Tensor]
    ) -> Any:
        @tf.custom_gradient  # type: ignore[untyped-decorator]
        def act(x: Tensor) -> Any:
            y = fwd(x)
            return y, lambda g: dfn(g, x, y)

        return act

    zero = 0.0
    table: dict[str, Any] = {
        "linear": None,
        "relu": (tf.nn.relu, lambda g, x, y: tf.where(x > zero, g, tf.zeros_like(g))),
        "relu6": (
            tf.nn.relu6,
            lambda g, x, y: tf.where(tf.logical_and(x > zero, x < 6.0), g, tf.zeros_like(g)),
        ),
        "leaky_relu": (
            lambda x: tf.where(x > zero, x, alpha * x),
            lambda g, x, y: tf.where(x > zero, g, alpha * g),
        ),
        "elu": (
            lambda x: tf.where(x > zero, x, alpha * (tf.exp(tf.minimum(x, zero)) - 1.0)),
            lambda g, x, y: tf.where(x > zero, g, g * (y + alpha)),
        ),
        "sigmoid": (tf.sigmoid, lambda g, x, y: g * y * (1.0 - y)),
        "tanh": (tf.tanh, lambda g, x, y: g * (1.0 - y * y)),
        "softplus": (tf.nn.softplus, lambda g, x, y: g * tf.sigmoid(x)),
        "silu": (
            lambda x: x * tf.sigmoid(x),
            lambda g, x, y: g * (tf.sigmoid(x) * (1.0 + x * (1.0 - tf.sigmoid(x)))),
        ),
        "softmax": (
            lambda x: tf.nn.softmax(x, axis=-1),
            lambda g, x, y: y * (g - tf.reduce_sum(g * y, axis=-1, keepdims=True)),
        ),
    }
    table["swish"] = table["silu"]
    if name not in table:
        return None
    if table[name] is None:
        return lambda x: x
    return make(*table[name])  # type: ignore[no-any-return]


def activation(name: str, where: str, alpha: float = 0.0) -> Callable[[Tensor], Tensor]:
    fn = _act_fn(name, alpha)
    if fn is None:
        raise ModelError(f"{where}: activation {name!r} is not supported")
    return fn


def channel_affine(x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """``x * scale + shift`` over the last axis, with reductions as its weight gradients."""
    import tensorflow as tf

    @tf.custom_gradient  # type: ignore[untyped-decorator]
    def f(x: Tensor, scale: Tensor, shift: Tensor) -> Any:
        axes = list(range(len(x.shape) - 1))

        def grad(g: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            return g * scale, tf.reduce_sum(g * x, axis=axes), tf.reduce_sum(g, axis=axes)

        return x * scale + shift, grad

    return f(x, scale, shift)


def bias_add(x: Tensor, b: Tensor) -> Tensor:
    import tensorflow as tf

    @tf.custom_gradient  # type: ignore[untyped-decorator]
    def f(x: Tensor, b: Tensor) -> Any:
        axes = list(range(len(x.shape) - 1))
        return x + b, lambda g: (g, tf.reduce_sum(g, axis=axes))

    return f(x, b)


def matmul(x: Tensor, k: Tensor) -> Tensor:
    """``x @ k`` for a 2-D ``x``."""
    import tensorflow as tf

    @tf.custom_gradient  # type: ignore[untyped-decorator]
    def f(x: Tensor, k: Tensor) -> Any:

        def grad(g: Tensor) -> tuple[Tensor, Tensor]:
            return tf.matmul(g, k, transpose_b=True), tf.matmul(x, g, transpose_a=True)

        return tf.matmul(x, k), grad

    return f(x, k)


def dense(x: Tensor, k: Tensor) -> Tensor:
    import tensorflow as tf

    shape = x.shape[1:]
    if len(shape) == 1:
        return matmul(x, k)
    flat = tf.reshape(x, [-1, int(shape[-1])])
    return tf.reshape(matmul(flat, k), [-1, *[int(d) for d in shape[:-1]], int(k.shape[-1])])


# --- convolution and pooling ------------------------------------------------------------------


def _same_pads(size: int, k: int, s: int) -> tuple[int, int, int]:
    out = math.ceil(size / s)
    total = max((out - 1) * s + k - size, 0)
    return out, total // 2, total - total // 2


def conv2d(x: Tensor, k: Tensor, strides: tuple[int, int], padding: str) -> Tensor:
    """2-D convolution (NHWC, kernel HWIO): forward CONV_2D; backward TRANSPOSE_CONV for the
    input and one MatMul per kernel tap for the kernel (no Conv2DBackpropFilter)."""
    import tensorflow as tf

    _, h, w, c = (int(d) if d is not None else -1 for d in x.shape)
    kh, kw, _, f = (int(d) for d in k.shape)
    sh, sw = strides
    if padding == "same":
        oh, pt, pb = _same_pads(h, kh, sh)
        ow, pl, pr = _same_pads(w, kw, sw)
    else:
        oh, ow = (h - kh) // sh + 1, (w - kw) // sw + 1
        pt = pb = pl = pr = 0
    pad = padding.upper()

    @tf.custom_gradient  # type: ignore[untyped-decorator]
    def conv(x: Tensor, k: Tensor) -> Any:
        y = tf.nn.conv2d(x, k, strides=[1, sh, sw, 1], padding=pad)

        def grad(g: Tensor) -> tuple[Tensor, Tensor]:
            dx = tf.nn.conv2d_transpose(
                g, k, output_shape=tf.shape(x), strides=[1, sh, sw, 1], padding=pad
            )
            xp = tf.pad(x, [[0, 0], [pt, pb], [pl, pr], [0, 0]]) if pt + pb + pl + pr else x
            g2 = tf.reshape(g, [-1, f])
            taps = []
            for i in range(kh):
                for j in range(kw):
                    t = xp[:, i : i + (oh - 1) * sh + 1 : sh, j : j + (ow - 1) * sw + 1 : sw, :]
                    taps.append(tf.matmul(tf.reshape(t, [-1, c]), g2, transpose_a=True))
            dk = tf.reshape(tf.stack(taps), [kh, kw, c, f])
            return dx, dk

        return y, grad

    return conv(x, k)


def depthwise_kernel(k: Tensor) -> Tensor:
    """A depthwise kernel [kh, kw, C, M] as the block-diagonal full kernel [kh, kw, C, C*M]."""
    import tensorflow as tf

    kh, kw, c, m = (int(d) for d in k.shape)
    eye = tf.constant(np.eye(c, dtype=np.float32).reshape(1, c, c, 1))
    full = tf.reshape(k, [kh * kw, c, 1, m]) * eye  # static shapes only: builtin gradients
    return tf.reshape(full, [kh, kw, c, c * m])


def pool2d(x: Tensor, ph: int, pw: int, kind: str) -> Tensor:
    """Non-overlapping max/avg pooling (stride == pool size, VALID) with a reshape-based
    backward: the window taps are slices of one reshape, and the gradient is their inverse."""
    import tensorflow as tf

    h, w, c = (int(d) for d in x.shape[1:])
    oh, ow = h // ph, w // pw
    if oh == 0 or ow == 0:
        raise ModelError(f"pooling {ph}x{pw} of a {h}x{w} input leaves nothing")

    def taps(t: Tensor) -> list[Tensor]:
        r = tf.reshape(t[:, : oh * ph, : ow * pw, :], [-1, ph, ow, pw * c])
        return [r[:, di, :, dj * c : (dj + 1) * c] for di in range(ph) for dj in range(pw)]

    def untaps(parts: list[Tensor]) -> Tensor:
        rows = [tf.concat(parts[di * pw : (di + 1) * pw], axis=-1) for di in range(ph)]
        full = tf.reshape(tf.stack(rows, axis=1), [-1, oh * ph, ow * pw, c])
        if oh * ph != h or ow * pw != w:
            full = tf.pad(full, [[0, 0], [0, h - oh * ph], [0, w - ow * pw], [0, 0]])
        return full

    @tf.custom_gradient  # type: ignore[untyped-decorator]
    def pool(x: Tensor) -> Any:
        ts = taps(x)
        if kind == "max":
            out = ts[0]
            for t in ts[1:]:
                out = tf.maximum(out, t)
        else:
            out = tf.add_n(ts) / float(len(ts))

        def grad(g: Tensor) -> Tensor:
            g3 = tf.reshape(g, [-1, ow, c])
            if kind == "avg":
                return untaps([g3 / float(len(ts))] * len(ts))
            zero = tf.zeros_like(g3)
            taken = tf.zeros_like(g3, dtype=tf.bool)
            parts = []
            for t in ts:  # the first maximum of a window takes the gradient, as TensorFlow's
                hit = tf.logical_and(tf.equal(t, out), tf.logical_not(taken))
                taken = tf.logical_or(taken, hit)
                parts.append(tf.where(hit, g3, zero))
            return untaps(parts)

        return tf.reshape(out, [-1, oh, ow, c]), grad

    return pool(x)


def global_pool(x: Tensor, kind: str) -> Tensor:
    """Mean or max over all but the batch and channel axes."""
    import tensorflow as tf

    axes = list(range(1, len(x.shape) - 1))
    n = float(math.prod(int(d) for d in x.shape[1:-1]))
    c = int(x.shape[-1])
    keep = [-1] + [1] * len(axes) + [c]

    @tf.custom_gradient  # type: ignore[untyped-decorator]
    def gp(x: Tensor) -> Any:
        if kind == "avg":
            y = tf.reduce_mean(x, axis=axes)
            return y, lambda g: tf.zeros_like(x) + tf.reshape(g, keep) / n
        y = tf.reduce_max(x, axis=axes)

        def grad(g: Tensor) -> Tensor:
            hit = tf.cast(tf.equal(x, tf.reshape(y, keep)), tf.float32)
            cnt = tf.reduce_sum(hit, axis=axes, keepdims=True)
            return hit * tf.reshape(g, keep) / cnt

        return y, grad

    return gp(x)


def embedding(ids: Tensor, table: Tensor) -> Tensor:
    """Lookup of float-coded ids (the bundle's input is float32) with a one-hot MatMul gradient."""
    import tensorflow as tf

    vocab, dim = (int(d) for d in table.shape)
    seq = [int(d) for d in ids.shape[1:]]

    @tf.custom_gradient  # type: ignore[untyped-decorator]
    def emb(ids: Tensor, table: Tensor) -> Any:
        idx = tf.cast(ids, tf.int32)
        y = tf.gather(table, idx)

        def grad(g: Tensor) -> tuple[Tensor, Tensor]:
            hot = tf.one_hot(tf.reshape(idx, [-1]), vocab, dtype=tf.float32)
            dt = tf.matmul(hot, tf.reshape(g, [-1, dim]), transpose_a=True)
            return tf.zeros_like(ids), dt

        return y, grad

    out = emb(ids, table)
    return tf.reshape(out, [-1, *seq, dim])
