"""The example models of ``examples/``: their data, their Keras models, their federated defaults.

``fededge demo --example NAME`` trains the prebuilt bundle ``fededge/models/NAME`` on the data
below (numpy and scikit-learn only: no TensorFlow). ``examples/NAME.py build`` rebuilds the
bundle from :func:`keras_model` (needs TensorFlow); ``examples/NAME.py compare`` measures the
federated metric against centralised training of the same model on the same data.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fededge.errors import ConfigError

# Diabetes target (disease progression) standardised with these fixed constants.
DIABETES_MEAN, DIABETES_STD = 152.0, 77.0
TRACE = 32  # samples per sensor trace


@dataclass(frozen=True)
class Data:
    """Train/test split and the key the non-IID Dirichlet split groups training examples by."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    groups: np.ndarray  # one small integer per training example
    x_detect: np.ndarray | None = None  # the anomaly example's detection set ...
    anomalous: np.ndarray | None = None  # ... and which of its traces are anomalies


@dataclass(frozen=True)
class Example:
    """One example: what ``demo --example`` and ``examples/NAME.py`` need."""

    name: str
    description: str
    task: str
    data: Callable[[int], Data]
    versions: int
    learning_rate: float
    epochs: int = 5
    examples_per_update: int = 32
    batch_size: int = 16
    central_epochs: int = 60  # the centralised baseline of `compare` (trained to convergence)
    build_options: dict[str, Any] = field(default_factory=dict)


def _split(
    x: np.ndarray, y: np.ndarray, groups: np.ndarray, seed: int, test: float = 0.2
) -> tuple[np.ndarray, ...]:
    order = np.random.default_rng(seed).permutation(len(x))
    cut = len(x) - round(len(x) * test)
    tr, te = order[:cut], order[cut:]
    return x[tr], y[tr], x[te], y[te], groups[tr], te


def diabetes(seed: int = 0) -> Data:
    """scikit-learn's diabetes data: 10 raw features (normalised inside the graph), 442 people."""
    from sklearn.datasets import load_diabetes

    d = load_diabetes(scaled=False)
    x = d.data.astype(np.float32)
    y = ((d.target - DIABETES_MEAN) / DIABETES_STD).astype(np.float32).reshape(-1, 1)
    # Non-IID: devices see different ranges of disease progression (quintiles of the target).
    groups = np.searchsorted(np.quantile(y[:, 0], [0.2, 0.4, 0.6, 0.8]), y[:, 0])
    xtr, ytr, xte, yte, gtr, _ = _split(x, y, groups, seed)
    return Data(xtr, ytr, xte, yte, gtr)


def sensor_traces(
    n: int, rng: np.random.Generator, anomalous: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic vibration traces [n, 32, 1]: a sine of one of five device-typical frequencies
    plus noise; anomalous ones carry a spike, a level shift or a burst of noise. Returns
    (traces, frequency bin)."""
    t = np.arange(TRACE, dtype=np.float64)
    fbin = rng.integers(0, 5, n)
    freq = (0.04 + 0.02 * fbin + rng.uniform(0, 0.005, n))[:, None]
    x = np.sin(2 * np.pi * freq * t + rng.uniform(0, 2 * np.pi, (n, 1)))
    x += rng.normal(0, 0.05, (n, TRACE))
    if anomalous is not None:
        for i in np.flatnonzero(anomalous):
            kind, at = rng.integers(0, 3), rng.integers(4, TRACE - 8)
            if kind == 0:
                x[i, at : at + 2] += rng.choice([-1, 1]) * rng.uniform(0.8, 1.5)
            elif kind == 1:
                x[i, at:] += rng.choice([-1, 1]) * rng.uniform(0.5, 1.0)
            else:
                x[i, at : at + 8] += rng.normal(0, 0.5, 8)
    return x.astype(np.float32).reshape(n, TRACE, 1), fbin


def sensor(seed: int = 0) -> Data:
    """Normal traces to train on and to measure the reconstruction MSE (the autoencoder's target
    is its input), and a detection set with 10% anomalies for the AUC."""
    rng = np.random.default_rng(1000 + seed)
    xtr, gtr = sensor_traces(2400, rng)
    xte, _ = sensor_traces(400, rng)
    anomalous = rng.random(500) < 0.1
    xdet, _ = sensor_traces(500, rng, anomalous)
    return Data(xtr, xtr.copy(), xte, xte.copy(), gtr, xdet, anomalous)


def multilabel(seed: int = 0) -> Data:
    """scikit-learn's synthetic multi-label data: 20 count features, 5 labels (2 per example on
    average); raw count features, standardised inside the graph."""
    from sklearn.datasets import make_multilabel_classification

    x, y = make_multilabel_classification(
        n_samples=2000, n_features=20, n_classes=5, n_labels=2, random_state=seed
    )
    x = x.astype(np.float32)  # raw counts: the graph standardises them
    y = y.astype(np.float32)
    groups = (y[:, 0] * 2 + y[:, 1]).astype(np.int64)  # non-IID by the first two labels
    xtr, ytr, xte, yte, gtr, _ = _split(x, y, groups, seed)
    return Data(xtr, ytr, xte, yte, gtr)


def transfer(seed: int = 0) -> Data:
    """Digits (8x8x1): the frozen conv features were pretrained on digits 0-4 only; the fleet
    trains the head on all ten."""
    from fededge.device.datasets import load_digits

    x, y = load_digits()
    x = x.reshape(-1, 8, 8, 1)
    xtr, ytr, xte, yte, gtr, _ = _split(x, y, y, seed)
    return Data(xtr, ytr, xte, yte, gtr)


EXAMPLES: dict[str, Example] = {
    e.name: e
    for e in (
        Example(
            "diabetes_regression",
            "diabetes progression, MLP regression (MSE)",
            "regression",
            diabetes,
            versions=40,
            learning_rate=0.05,
        ),
        Example(
            "sensor_autoencoder",
            "1-D conv autoencoder of sensor traces (MSE, AUC)",
            "regression",
            sensor,
            versions=300,
            learning_rate=0.2,
            epochs=10,
            examples_per_update=64,
            central_epochs=100,
        ),
        Example(
            "multilabel",
            "multi-label MLP, 5 labels (per-label accuracy)",
            "multilabel",
            multilabel,
            versions=30,
            learning_rate=0.2,
            central_epochs=20,
        ),
        Example(
            "transfer_digits",
            "frozen conv features + trainable head (accuracy)",
            "classification",
            transfer,
            versions=40,
            learning_rate=0.1,
        ),
    )
}


def get_example(name: str) -> Example:
    if name not in EXAMPLES:
        raise ConfigError(f"no example named {name!r}; examples: {sorted(EXAMPLES)}")
    return EXAMPLES[name]


def auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U, ties counted half)."""
    from scipy.stats import rankdata

    pos = np.asarray(positive, bool)
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    ranks = rankdata(scores)
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def extra_metrics(
    ex: Example, data: Data, runtime: Any, weights: dict[str, np.ndarray]
) -> dict[str, float]:
    """Metrics beyond the graph's: the anomaly example's detection AUC."""
    if data.x_detect is None or data.anomalous is None:
        return {}
    recon = runtime.infer(data.x_detect, weights)
    err = np.mean((recon.reshape(len(recon), -1) - data.x_detect.reshape(len(recon), -1)) ** 2, 1)
    return {"auc": auc(err, data.anomalous)}


def centralised(
    ex: Example,
    runtime: Any,
    weights: dict[str, np.ndarray],
    data: Data,
    epochs: int,
    seed: int = 0,
) -> dict[str, float]:
    """Train ``weights`` on all training data in one place (same graph, SGD, lr, batch size)."""
    rng = np.random.default_rng(seed)
    w = {k: np.array(v) for k, v in weights.items()}
    n = len(data.x_train)
    for _ in range(epochs):
        order = rng.permutation(n)
        for s in range(0, n, ex.batch_size):
            idx = order[s : s + ex.batch_size]
            _, w = runtime.train_step(data.x_train[idx], data.y_train[idx], ex.learning_rate, w)
    out: dict[str, float] = runtime.metrics(data.x_test, data.y_test, w)
    out.update(extra_metrics(ex, data, runtime, w))
    return out


# --- Keras models (build time only) ------------------------------------------------------------


def keras_model(name: str, data: Data | None = None) -> Any:
    """The example's Keras model (transfer_digits: with its conv base pretrained and frozen)."""
    import keras

    keras.utils.set_random_seed(0)
    L = keras.layers
    if name == "diabetes_regression":
        return keras.Sequential(
            [
                keras.Input((10,)),
                L.Dense(16, activation="relu", name="hidden"),
                L.Dense(1, name="out"),
            ],
            name="diabetes",
        )
    if name == "sensor_autoencoder":
        return keras.Sequential(
            [
                keras.Input((TRACE, 1)),
                L.Conv1D(16, 5, padding="same", activation="relu", name="conv1"),
                L.MaxPooling1D(2, name="pool1"),
                L.Conv1D(16, 3, padding="same", activation="relu", name="conv2"),
                L.MaxPooling1D(2, name="pool2"),
                L.Flatten(name="flatten"),
                L.Dense(16, activation="relu", name="bottleneck"),
                L.Dense(TRACE, name="decode"),
                L.Reshape((TRACE, 1), name="trace"),
            ],
            name="sensor_autoencoder",
        )
    if name == "multilabel":
        return keras.Sequential(
            [
                keras.Input((20,)),
                L.Dense(32, activation="relu", name="hidden"),
                L.Dense(5, activation="sigmoid", name="labels"),
            ],
            name="multilabel",
        )
    if name == "transfer_digits":
        base = keras.Sequential(
            [
                keras.Input((8, 8, 1)),
                L.Conv2D(8, 3, padding="same", activation="relu", name="conv1"),
                L.MaxPooling2D(2, name="pool1"),
                L.Conv2D(16, 3, padding="same", activation="relu", name="conv2"),
                L.MaxPooling2D(2, name="pool2"),
                L.Flatten(name="flatten"),
            ],
            name="features",
        )
        data = data or transfer(0)
        # Pretrain the features on digits 0-4 (a stand-in for a model trained elsewhere).
        pre = keras.Sequential([base, L.Dense(5, activation="softmax", name="pretrain_head")])
        pre.compile(keras.optimizers.Adam(0.01), "sparse_categorical_crossentropy")
        keep = data.y_train < 5
        pre.fit(data.x_train[keep], data.y_train[keep], epochs=15, batch_size=32, verbose=0)
        base.trainable = False
        return keras.Sequential(
            [base, L.Dense(10, activation="softmax", name="head")], name="transfer_digits"
        )
    raise ConfigError(f"no example named {name!r}")


def build_example(name: str, output: Any) -> Any:
    """Build example ``name``'s bundle into ``output`` with the checked builder (TensorFlow)."""
    from fededge.build.from_keras import build_bundle

    ex = get_example(name)
    data = ex.data(0)
    model = keras_model(name, data)
    norm = None
    if name in ("diabetes_regression", "multilabel"):  # raw features, standardised in-graph
        norm = (data.x_train.mean(axis=0), data.x_train.std(axis=0))
    return build_bundle(
        model, ex.task, output=output, name=name, normalization=norm, batch_size=ex.batch_size,
        sample=(data.x_train[: ex.batch_size], data.y_train[: ex.batch_size]), check_lr=ex.learning_rate,
    )  # fmt: skip
