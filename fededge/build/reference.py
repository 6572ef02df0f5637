"""A plain numpy MLP (forward, backward, SGD step): the reference the LiteRT MLP is checked against.

Used by the tests and by bench/bench_train.py; it mirrors the ``mlp`` graph of
:mod:`fededge.build.builder` exactly, including the ReLU-as-``maximum(h, 0)`` subgradient of 1
at 0.
"""

from __future__ import annotations

import numpy as np

MLP_NAMES = ("dense1_kernel", "dense1_bias", "dense2_kernel", "dense2_bias")


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    out: np.ndarray = e / e.sum(axis=1, keepdims=True)
    return out


def mlp_forward(x: np.ndarray, w: dict[str, np.ndarray]) -> np.ndarray:
    """Class probabilities of the reference MLP."""
    h = np.maximum(x @ w["dense1_kernel"] + w["dense1_bias"], 0.0)
    return _softmax(h @ w["dense2_kernel"] + w["dense2_bias"])


def mlp_train_step(
    x: np.ndarray, y: np.ndarray, lr: float, w: dict[str, np.ndarray]
) -> tuple[float, dict[str, np.ndarray]]:
    """One SGD step on mean cross-entropy; returns (loss before the step, new weights)."""
    n = len(x)
    pre = x @ w["dense1_kernel"] + w["dense1_bias"]
    h = np.maximum(pre, 0.0)
    p = _softmax(h @ w["dense2_kernel"] + w["dense2_bias"])
    rows = np.arange(n)
    loss = float(-np.mean(np.log(p[rows, y])))
    dlogits = p.copy()
    dlogits[rows, y] -= 1.0
    dlogits /= n
    dh = (dlogits @ w["dense2_kernel"].T) * (pre >= 0.0)  # Maximum's gradient picks x at ties
    grads = {
        "dense2_kernel": h.T @ dlogits,
        "dense2_bias": dlogits.sum(axis=0),
        "dense1_kernel": x.T @ dh,
        "dense1_bias": dh.sum(axis=0),
    }
    return loss, {k: (w[k] - lr * grads[k]).astype(w[k].dtype) for k in MLP_NAMES}
