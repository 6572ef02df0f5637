"""Keras 3 models -> bundles: every supported layer converts with builtin ops only, LiteRT's train
steps equal TensorFlow's (the builder's check, on by default), frozen layers stay in the graph."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tensorflow", reason="needs TensorFlow (the convert extra)")

import keras

from fededge.build.from_keras import build_bundle
from fededge.cli import main
from fededge.device.bundle import SPEC_FILE, load_bundle
from fededge.device.runtime import ModelRuntime
from fededge.errors import ModelError

pytestmark = pytest.mark.tf
L = keras.layers


def _seq(shape: tuple[int, ...], *layers: object, name: str = "m") -> keras.Model:
    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input(shape), *layers], name=name)


MODELS: dict[str, tuple[Callable[[], keras.Model], str, str | None]] = {
    "mlp_classification": (
        lambda: _seq((12,), L.Dense(16, activation="relu"), L.Dense(4, activation="softmax")),
        "classification",
        None,
    ),
    "cnn2d_multilabel": (
        lambda: _seq(
            (8, 8, 2),
            L.Conv2D(4, 3, padding="same", activation="relu"),
            L.MaxPooling2D(),
            L.DepthwiseConv2D(3, padding="valid", activation="relu6"),
            L.BatchNormalization(),
            L.Flatten(),
            L.Dropout(0.3),
            L.Dense(3),
        ),
        "multilabel",
        None,
    ),
    "cnn2d_strided_avgpool": (
        lambda: _seq(
            (9, 9, 1),
            L.Conv2D(3, 3, strides=2, padding="same", activation="tanh"),
            L.AveragePooling2D(2),
            L.GlobalAveragePooling2D(),
            L.Dense(2),
        ),
        "classification",
        None,
    ),
    "conv1d_regression_huber": (
        lambda: _seq(
            (16, 2),
            L.Conv1D(4, 5, strides=2, padding="same", activation="elu"),
            L.AveragePooling1D(2),
            L.Conv1D(4, 3, padding="causal"),
            L.LeakyReLU(),
            L.GlobalMaxPooling1D(),
            L.Dense(2),
        ),
        "regression",
        "huber",
    ),
    "conv1d_maxpool_reshape_mae": (
        lambda: _seq(
            (12, 1),
            L.Conv1D(3, 3, padding="valid", activation="sigmoid"),
            L.MaxPooling1D(2),
            L.Reshape((15,)),
            L.Dense(12),
            L.Reshape((12, 1)),
        ),
        "regression",
        "mae",
    ),
    "embedding_binary": (
        lambda: _seq(
            (6,),
            L.Embedding(20, 4),
            L.GlobalAveragePooling1D(),
            L.Dense(8),
            L.Activation("silu"),
            L.Dense(1, activation="sigmoid"),
        ),
        "binary",
        None,
    ),
    "dense_activations": (
        lambda: _seq(
            (5,),
            L.Dense(6, activation="softplus"),
            L.ELU(),
            L.Dense(6),
            L.ReLU(),
            L.Dense(3),
            L.Softmax(),
        ),
        "classification",
        None,
    ),
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_builds_and_checks(name: str, tmp_path: Path) -> None:
    make, task, loss = MODELS[name]
    built = build_bundle(make(), task, loss=loss, output=tmp_path / name, batch_size=8)
    assert built.check is not None
    assert built.check["max_difference"] <= 1e-5
    assert built.check["loss_after"] < built.check["loss_first"]
    assert built.check["keras_infer_difference"] <= 1e-4
    b = load_bundle(tmp_path / name)
    assert b.spec.format_version == 2 and b.spec.task.type == task
    # A partial batch of another size trains too (dynamic batch).
    rt = ModelRuntime.from_bundle(b)
    rng = np.random.default_rng(1)
    x = rng.random((3, *b.spec.input_shape), dtype=np.float32)
    if name == "embedding_binary":
        x = np.floor(x * 20)
    if b.spec.task.integer_labels:
        y = rng.integers(0, b.spec.num_classes, 3)
    else:
        y = rng.integers(0, 2, (3, *b.spec.task.label_shape)).astype(np.float32)
    loss_value, new = rt.train_step(x, y, 0.1, b.weights)
    assert np.isfinite(loss_value) and set(new) == set(b.weights)
    assert set(rt.metrics(x, y, b.weights)) == set(b.spec.metric_names)


def test_transfer_frozen_features_only_head_travels(tmp_path: Path) -> None:
    base = keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            L.Conv2D(4, 3, padding="same", activation="relu"),
            L.MaxPooling2D(),
            L.Flatten(),
        ],
        name="features",
    )
    base.trainable = False
    model = keras.Sequential([base, L.Dense(5, activation="softmax", name="head")])
    built = build_bundle(model, "classification", output=tmp_path / "t")
    assert built.check is not None and built.check["max_difference"] <= 1e-5
    assert sorted(built.weights) == ["head_bias", "head_kernel"]
    assert built.frozen_parameters == 3 * 3 * 1 * 4 + 4
    spec = json.loads((tmp_path / "t" / SPEC_FILE).read_text())
    assert spec["frozen_parameters"] == 40 and len(spec["weights"]) == 2
    # --trainable picks layers by name instead of Keras's flags.
    model2 = _seq((6,), L.Dense(4, name="a"), L.Dense(3, name="b"))
    b2 = build_bundle(model2, "classification", trainable=["b"])
    assert sorted(b2.weights) == ["b_bias", "b_kernel"] and b2.frozen_parameters == 28


def test_normalization_inside_the_graph(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(100.0, 20.0, (64, 3)).astype(np.float32)
    y = rng.normal(size=(64, 1)).astype(np.float32)
    mean, std = x.mean(0), x.std(0)
    model = _seq((3,), L.Dense(4, activation="relu"), L.Dense(1))
    built = build_bundle(model, "regression", normalization=(mean, std), sample=(x, y))
    assert built.spec["task"]["normalization"]["mean"] == pytest.approx(mean.tolist())
    assert built.check is not None and built.check["keras_infer_difference"] <= 1e-4


def test_unconvertible_gradient_names_layer_and_op() -> None:
    import tensorflow as tf

    model = _seq((4,), L.Dense(3), L.Lambda(lambda t: tf.nn.relu(t), name="raw_relu"), L.Dense(2))
    with pytest.raises(ModelError, match=r"layer 'raw_relu' \(Lambda\).*ReluGrad"):
        build_bundle(model, "classification", check=False)


def test_unsupported_layers_and_heads_fail_naming_the_layer() -> None:
    with pytest.raises(ModelError, match=r"layer 'lstm' \(LSTM\): not supported"):
        build_bundle(_seq((5, 3), L.LSTM(4, name="lstm"), L.Dense(2)), "classification")
    with pytest.raises(ModelError, match=r"layer 'out'.*ends in softmax or linear"):
        build_bundle(_seq((5,), L.Dense(3, activation="sigmoid", name="out")), "classification")
    with pytest.raises(ModelError, match=r"dilation"):
        build_bundle(_seq((9, 9, 1), L.Conv2D(2, 3, dilation_rate=2), L.Flatten(),
                          L.Dense(2)), "classification")  # fmt: skip
    with pytest.raises(ModelError, match="does not fit a regression task"):
        build_bundle(_seq((5,), L.Dense(1)), "regression", loss="binary_crossentropy")


def test_cli_build_keras_with_sample_and_inspect(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = _seq((6,), L.Dense(8, activation="relu", name="hidden"), L.Dense(4, name="out"))
    path = tmp_path / "m.keras"
    model.save(path)
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "s.npz", x=rng.random((40, 6)), y=rng.integers(0, 2, (40, 4)))
    out = tmp_path / "bundle"
    rc = main([
        "model", "build", "--keras", str(path), "--task", "multilabel", "--batch-size", "16",
        "--sample", str(tmp_path / "s.npz"), "--trainable", "out", "-o", str(out),
    ])  # fmt: skip
    assert rc == 0
    text = capsys.readouterr().out
    assert "check: 5 LiteRT train steps == TensorFlow's" in text
    assert "frozen in the graph" in text
    b = load_bundle(out)
    assert b.spec.batch_size == 16 and b.spec.weight_names == ["out_kernel", "out_bias"]
    assert main(["model", "inspect", str(out)]) == 0
    assert "multilabel (outputs [4]" in capsys.readouterr().out
    assert main(["model", "build", "--keras", str(path), "-o", str(out)]) != 0
