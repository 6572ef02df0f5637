"""Format 2 bundles (task section) without TensorFlow: the prebuilt example bundles load, train
and evaluate by their task's metrics; version 1 specs serialise exactly as before; float and
multi-hot labels go through the runtime and the example store."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fededge.demo_examples import EXAMPLES, auc
from fededge.device.bundle import SPEC_FILE, load_bundle, parse_spec, shipped_bundle_path
from fededge.device.examples import ExampleStore, StateDb, validate_examples
from fededge.device.runtime import ModelRuntime
from fededge.errors import InputError, ModelError

TASKS = {
    "diabetes_regression": ("regression", ("loss", "mse", "mae")),
    "sensor_autoencoder": ("regression", ("loss", "mse", "mae")),
    "multilabel": ("multilabel", ("loss", "accuracy", "exact_match")),
    "transfer_digits": ("classification", ("loss", "accuracy")),
}


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_example_bundles_load_train_and_evaluate(name: str) -> None:
    b = load_bundle(shipped_bundle_path(name))
    kind, metrics = TASKS[name]
    assert b.spec.format_version == 2 and b.spec.task.type == kind
    assert b.spec.metric_names == metrics
    data = EXAMPLES[name].data(0)
    rt = ModelRuntime.from_bundle(b)
    x, y = data.x_train[:64], data.y_train[:64]
    before = rt.metrics(x, y, b.weights)
    assert set(before) == set(metrics)
    w = b.weights
    for _ in range(20):
        _, w = rt.train_step(x, y, EXAMPLES[name].learning_rate, w)
    assert rt.metrics(x, y, w)["loss"] < before["loss"]
    out = rt.infer(data.x_test[:5], w)
    assert out.shape == (5, *b.spec.task.output_shape)


def test_v1_spec_serialises_unchanged_and_v2_round_trips() -> None:
    for name in ("digits_mlp", "digits_cnn"):
        raw = json.loads((shipped_bundle_path(name) / SPEC_FILE).read_text())
        spec = parse_spec(raw)
        assert spec.format_version == 1 and spec.task.type == "classification"
        assert json.dumps(spec.to_json(), sort_keys=True) == json.dumps(raw, sort_keys=True)
    raw2 = json.loads((shipped_bundle_path("multilabel") / SPEC_FILE).read_text())
    assert parse_spec(raw2).to_json() == raw2


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"type": "ranking"}, "type 'ranking'"),
        ({"loss": "mse"}, "loss 'mse'"),
        ({"label_dtype": "int32"}, "label_dtype of a multilabel task must be float32"),
        ({"metrics": ["accuracy"]}, "metrics"),
        ({"label_shape": [3]}, "label_shape == output_shape"),
        ({"normalization": {"mean": 1}}, "normalization"),
    ],
)
def test_bad_task_sections(edit: dict, message: str) -> None:  # type: ignore[type-arg]
    raw = json.loads((shipped_bundle_path("multilabel") / SPEC_FILE).read_text())
    raw["task"].update(edit)
    with pytest.raises(ModelError, match=message):
        parse_spec(raw)


def test_float_and_multi_hot_labels_validated_per_spec() -> None:
    ml = load_bundle(shipped_bundle_path("multilabel")).spec
    x = np.zeros((2, 20)).tolist()
    _, ya = validate_examples(x, [[1, 0, 0, 1, 0], [0, 0, 0, 0, 1]], ml.input_shape, ml)
    assert ya.dtype == np.float32 and ya.shape == (2, 5)
    with pytest.raises(InputError, match="shape") as e:
        validate_examples(x, [1, 0], ml.input_shape, ml)
    assert e.value.reason == "bad_shape"
    with pytest.raises(InputError, match=r"lie in \[0, 1\]") as e:
        validate_examples(x, [[2, 0, 0, 0, 0]] * 2, ml.input_shape, ml)
    assert e.value.reason == "bad_label"
    reg = load_bundle(shipped_bundle_path("diabetes_regression")).spec
    _, yr = validate_examples(np.zeros((3, 10)), [0.5, -1.25, 3], reg.input_shape, reg)
    assert yr.shape == (3, 1) and yr[1, 0] == np.float32(-1.25)
    with pytest.raises(InputError, match="NaN"):
        validate_examples(np.zeros((1, 10)), [float("nan")], reg.input_shape, reg)
    with pytest.raises(InputError, match="numbers"):
        validate_examples(np.zeros((1, 10)), ["a"], reg.input_shape, reg)


def test_store_keeps_float_labels(tmp_path) -> None:
    store = ExampleStore(StateDb(tmp_path / "s.db"), max_examples=100, max_age=1e9)
    y = np.array([[1, 0, 1], [0, 1, 0]], np.float32)
    store.add(np.ones((2, 4), np.float32), y)
    batch = store.take(2, (4,))
    assert batch is not None
    np.testing.assert_array_equal(batch.y, y)
    assert batch.y.dtype == np.float32
    store.add(np.ones((1, 4), np.float32), np.array([0.25], np.float32))
    store.mark_used(batch.ids)
    one = store.take(1, (4,))
    assert one is not None and one.y.tolist() == [[0.25]]


def test_runtime_labels_per_task() -> None:
    b = load_bundle(shipped_bundle_path("diabetes_regression"))
    rt = ModelRuntime.from_bundle(b)
    x = np.zeros((2, 10), np.float32)
    loss_flat, _ = rt.train_step(x, np.array([0.5, 1.0]), 0.01, b.weights)
    loss_col, _ = rt.train_step(x, np.array([[0.5], [1.0]]), 0.01, b.weights)
    assert loss_flat == loss_col
    with pytest.raises(ValueError, match="shape"):
        rt.train_step(x, np.zeros(3), 0.01, b.weights)
    with pytest.raises(ModelError, match="no accuracy"):
        rt.evaluate(x, np.zeros(2), b.weights)


def test_auc() -> None:
    assert auc(np.array([0.1, 0.2, 0.9, 0.8]), np.array([0, 0, 1, 1])) == 1.0
    assert auc(np.array([1.0, 1.0]), np.array([0, 1])) == 0.5


@pytest.mark.broker
@pytest.mark.parametrize("name", ["multilabel", "diabetes_regression"])
def test_local_api_takes_labels_as_the_spec_says(broker, tmp_path, name: str) -> None:
    """Multi-hot and float labels through the local API into the device's store; wrong ones
    are refused with the reason; /predict gives the task's outputs."""
    from devtools import DIGITS_PLAN, call, device_settings, new_task, publish_task

    from fededge.device.api import ApiServer
    from fededge.device.client import Client

    b = load_bundle(shipped_bundle_path(name))
    s = device_settings(broker.url, tmp_path, new_task(), "labels")
    publish_task(s, DIGITS_PLAN.model_copy(update={"examples_per_update": 1000}), b)
    client = Client(s, bundle=b)
    client.start()
    server = ApiServer(client, tmp_path / "api.sock", max_request_bytes=64 * 1024)
    server.start()
    try:
        assert client.wait_for_version(0, 20)
        data = EXAMPLES[name].data(0)
        x = data.x_train[:3].tolist()
        y = data.y_train[:3].tolist()
        code, body = call(server.path, "POST", "/examples", {"x": x, "y": y})
        assert code == 200 and body["added"] == 3, body
        bad = [[2.0] * 5] * 3 if name == "multilabel" else [[1.0, 2.0]] * 3
        code, body = call(server.path, "POST", "/examples", {"x": x, "y": bad})
        assert code == 400 and body["error"] in ("bad_label", "bad_shape"), body
        code, body = call(server.path, "POST", "/predict", {"x": x})
        assert code == 200
        name_out = b.spec.task.output_name
        assert name_out == ("outputs" if name == "diabetes_regression" else "probs")
        assert np.asarray(body[name_out]).shape == (3, *b.spec.task.output_shape)
        assert body["probs"] == body[name_out]  # "probs": deprecated alias for regression
        batch = client.examples.take(3, b.spec.input_shape)
        assert batch is not None
        np.testing.assert_allclose(batch.y.reshape(3, -1), np.asarray(y, np.float32).reshape(3, -1))
    finally:
        server.close()
        client.close()
