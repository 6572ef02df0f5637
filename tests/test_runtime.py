"""The LiteRT wrapper against the numpy reference MLP: train steps, inference, evaluation."""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest

from fededge.build.reference import mlp_forward, mlp_train_step
from fededge.device.bundle import Bundle, load_bundle, shipped_bundle_path
from fededge.device.runtime import EVAL_CHUNK, RUNTIME_NAME, ModelRuntime


@pytest.fixture(scope="module")
def mlp() -> Bundle:
    return load_bundle(shipped_bundle_path("digits_mlp"))


@pytest.fixture(scope="module")
def cnn() -> Bundle:
    return load_bundle(shipped_bundle_path("digits_cnn"))


def _batch(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.random((n, 64), dtype=np.float32), rng.integers(0, 10, n).astype(np.int32)


def test_runtime_name() -> None:
    # CI's tflite-runtime environment sets this, so the fallback is known to be the one tested.
    expected = os.environ.get("FEDEDGE_EXPECT_RUNTIME")
    if expected:
        assert expected == RUNTIME_NAME
    else:
        assert RUNTIME_NAME in ("ai-edge-litert", "tflite-runtime")


@pytest.mark.parametrize("n", [1, 7, 32, 100])
def test_train_step_matches_numpy(mlp: Bundle, n: int) -> None:
    rt = ModelRuntime.from_bundle(mlp)
    x, y = _batch(n)
    w = mlp.weights
    for step in range(3):  # several steps, so the comparison covers trained weights too
        loss, new = rt.train_step(x, y, 0.5, w)
        ref_loss, ref = mlp_train_step(
            x.astype(np.float64), y, 0.5, {k: v.astype(np.float64) for k, v in w.items()}
        )
        assert loss == pytest.approx(ref_loss, abs=1e-5), step
        for k in ref:
            np.testing.assert_allclose(new[k], ref[k], atol=1e-5, rtol=0)
            assert new[k].dtype == np.float32
        w = new


def test_results_are_owned_copies(mlp: Bundle) -> None:
    """Outputs survive later calls; bundle weights are read-only."""
    rt = ModelRuntime.from_bundle(mlp)
    x, y = _batch(8)
    _, first = rt.train_step(x, y, 0.1, mlp.weights)
    kept = {k: v.copy() for k, v in first.items()}
    rt.train_step(x * 2, y, 0.5, mlp.weights)
    for k in kept:
        np.testing.assert_array_equal(first[k], kept[k])
    with pytest.raises(ValueError, match="read-only"):
        mlp.weights["dense1_bias"][0] = 1.0


def test_infer_matches_numpy(mlp: Bundle) -> None:
    rt = ModelRuntime.from_bundle(mlp)
    x, _ = _batch(50)
    probs = rt.infer(x, mlp.weights)
    assert probs.shape == (50, 10)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(probs, mlp_forward(x, mlp.weights), atol=1e-6)


def test_infer_large_input_is_chunked(mlp: Bundle) -> None:
    rt = ModelRuntime.from_bundle(mlp)
    x, _ = _batch(EVAL_CHUNK * 2 + 3)
    np.testing.assert_allclose(rt.infer(x, mlp.weights), mlp_forward(x, mlp.weights), atol=1e-6)


def test_evaluate_matches_numpy(mlp: Bundle) -> None:
    rt = ModelRuntime.from_bundle(mlp)
    x, y = _batch(EVAL_CHUNK + 77, seed=3)
    loss, acc = rt.evaluate(x, y, mlp.weights)
    p = mlp_forward(x.astype(np.float64), mlp.weights)
    assert loss == pytest.approx(-np.mean(np.log(p[np.arange(len(y)), y])), abs=1e-5)
    assert acc == pytest.approx(np.mean(p.argmax(axis=1) == y), abs=1e-9)


def test_partial_batch_trains_on_its_own_examples(mlp: Bundle) -> None:
    """Policy: a batch smaller than spec.batch_size resizes the graph; no padding, no dropping."""
    rt = ModelRuntime.from_bundle(mlp)
    x, y = _batch(mlp.spec.batch_size + 5)
    full = rt.train_step(x[:32], y[:32], 0.1, mlp.weights)
    part = rt.train_step(x[32:], y[32:], 0.1, mlp.weights)  # 5 examples
    again = rt.train_step(x[:32], y[:32], 0.1, mlp.weights)  # back to 32 after a resize
    ref = mlp_train_step(x[32:], y[32:], 0.1, mlp.weights)
    assert part[0] == pytest.approx(ref[0], abs=1e-5)
    for k in ref[1]:
        np.testing.assert_allclose(part[1][k], ref[1][k], atol=1e-5)
        np.testing.assert_array_equal(full[1][k], again[1][k])


def test_cnn_accepts_flat_and_image_input(cnn: Bundle) -> None:
    rt = ModelRuntime.from_bundle(cnn)
    x, y = _batch(9)
    p_flat = rt.infer(x, cnn.weights)
    p_img = rt.infer(x.reshape(-1, 8, 8, 1), cnn.weights)
    np.testing.assert_array_equal(p_flat, p_img)
    assert p_flat.shape == (9, 10)
    loss, new = rt.train_step(x, y, 0.1, cnn.weights)
    assert np.isfinite(loss)
    assert {k: v.shape for k, v in new.items()} == {k: v.shape for k, v in cnn.weights.items()}


def test_bad_arguments_raise_value_error(mlp: Bundle) -> None:
    rt = ModelRuntime.from_bundle(mlp)
    x, y = _batch(4)
    with pytest.raises(ValueError, match="x has shape"):
        rt.infer(x[:, :63], mlp.weights)
    with pytest.raises(ValueError, match="x has shape"):
        rt.infer(x[:0], mlp.weights)
    with pytest.raises(ValueError, match="labels must lie"):
        rt.train_step(x, y + 10, 0.1, mlp.weights)
    with pytest.raises(ValueError, match="integer labels"):
        rt.train_step(x, y[:3], 0.1, mlp.weights)
    with pytest.raises(ValueError, match="weight 'dense1_bias' missing"):
        rt.infer(x, {k: v for k, v in mlp.weights.items() if k != "dense1_bias"})
    with pytest.raises(ValueError, match="has shape"):
        rt.infer(x, {**mlp.weights, "dense2_bias": np.zeros(3, np.float32)})


def test_inference_runs_beside_training(mlp: Bundle) -> None:
    """Training and inference use separate interpreters, so they may run in two threads."""
    rt = ModelRuntime.from_bundle(mlp)
    x, y = _batch(64)
    expected = mlp_forward(x, mlp.weights)
    errors: list[str] = []
    stop = threading.Event()

    def train() -> None:
        w = mlp.weights
        while not stop.is_set():
            _, w = rt.train_step(x, y, 0.01, w)

    def predict() -> None:
        for _ in range(300):
            if not np.allclose(rt.infer(x, mlp.weights), expected, atol=1e-6):
                errors.append("inference result changed while training ran")

    threads = [
        threading.Thread(target=train),
        threading.Thread(target=predict),
        threading.Thread(target=predict),
    ]
    for t in threads:
        t.start()
    threads[1].join()
    threads[2].join()
    stop.set()
    threads[0].join()
    assert not errors
