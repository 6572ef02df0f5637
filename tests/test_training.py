"""On-device training: loss goes down on digits, clip/noise maths, partial batches, partitions."""

from __future__ import annotations

import numpy as np
import pytest

from fededge.build.reference import mlp_train_step
from fededge.device.bundle import Bundle, load_bundle, shipped_bundle_path
from fededge.device.datasets import dirichlet_partition, load_digits, train_test_split
from fededge.device.runtime import ModelRuntime
from fededge.device.training import LocalUpdate, clip_and_noise, global_norm, local_update


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    return load_digits()


def _bundle(name: str) -> Bundle:
    return load_bundle(shipped_bundle_path(name))


@pytest.mark.parametrize(
    ("name", "epochs", "lr", "min_acc"),
    [("digits_mlp", 3, 0.1, 0.85), ("digits_cnn", 5, 0.05, 0.8)],
)
def test_training_lowers_loss_on_digits(
    name: str, epochs: int, lr: float, min_acc: float, digits: tuple[np.ndarray, np.ndarray]
) -> None:
    b = _bundle(name)
    rt = ModelRuntime.from_bundle(b)
    x_tr, y_tr, x_te, y_te = train_test_split(*digits, 0.25, np.random.default_rng(0))
    before_loss, before_acc = rt.evaluate(x_te, y_te, b.weights)
    up = local_update(
        rt, b.weights, x_tr, y_tr, epochs=epochs, batch_size=32, learning_rate=lr,
        clip_norm=None, noise_stddev=0.0, rng=np.random.default_rng(1), evaluate_first=True,
    )  # fmt: skip
    trained = {k: b.weights[k] + up.delta[k] for k in b.weights}
    after_loss, after_acc = rt.evaluate(x_te, y_te, trained)
    assert up.num_examples == len(x_tr)
    assert up.eval_loss == pytest.approx(rt.evaluate(x_tr, y_tr, b.weights)[0])
    assert up.train_loss < up.eval_loss  # type: ignore[operator]
    assert after_loss < before_loss / 2
    assert after_acc > min_acc > 0.5 > before_acc
    assert up.clip_scale == 1.0


def test_partial_batch_policy_matches_numpy_loop(digits: tuple[np.ndarray, np.ndarray]) -> None:
    """50 examples at batch 32: one batch of 32, then one of 18, each a mean over its own size."""
    b = _bundle("digits_mlp")
    x, y = digits[0][:50], digits[1][:50]
    up = local_update(
        ModelRuntime.from_bundle(b), b.weights, x, y, epochs=2, batch_size=32,
        learning_rate=0.3, clip_norm=None, noise_stddev=0.0, rng=np.random.default_rng(5),
    )  # fmt: skip
    rng = np.random.default_rng(5)
    w = {k: v.astype(np.float64) for k, v in b.weights.items()}
    for _ in range(2):
        order = rng.permutation(50)
        losses = []
        for start in (0, 32):
            idx = order[start : start + 32]
            loss, w = mlp_train_step(x[idx].astype(np.float64), y[idx], 0.3, w)
            losses.append(loss * len(idx))
    for k in w:
        np.testing.assert_allclose(up.delta[k], w[k] - b.weights[k], atol=2e-5)
    assert up.train_loss == pytest.approx(sum(losses) / 50, abs=1e-5)


def test_local_update_is_reproducible(digits: tuple[np.ndarray, np.ndarray]) -> None:
    b = _bundle("digits_mlp")
    rt = ModelRuntime.from_bundle(b)

    def run() -> LocalUpdate:
        return local_update(
            rt, b.weights, *digits, epochs=1, batch_size=16, learning_rate=0.1, clip_norm=0.5,
            noise_stddev=0.01, rng=np.random.default_rng(9),
        )  # fmt: skip

    a, c = run(), run()
    for k in a.delta:
        np.testing.assert_array_equal(a.delta[k], c.delta[k])
        assert a.delta[k].dtype == np.float32
    assert a.delta_norm > 0.5 and a.clip_scale == pytest.approx(0.5 / a.delta_norm)


def _delta(seed: int, scale: float) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "a": rng.normal(0, scale, (30, 20)).astype(np.float32),
        "b": rng.normal(0, scale, 7).astype(np.float32),
    }


@pytest.mark.parametrize("clip", [0.01, 0.5, 1.0, 3.0, 1e6])
def test_clip_bounds_global_norm(clip: float) -> None:
    d = _delta(0, 0.1)
    out, norm, scale = clip_and_noise(d, clip, 0.0, np.random.default_rng(0))
    assert norm == pytest.approx(global_norm(d))
    assert global_norm(out) <= clip  # exactly, after float32 rounding
    if norm <= clip:
        assert scale == 1.0
        for k in d:
            np.testing.assert_array_equal(out[k], d[k])
    else:
        assert global_norm(out) == pytest.approx(clip, rel=1e-6)
        for k in d:  # direction is kept: one scale for every tensor
            np.testing.assert_allclose(out[k], d[k] * scale, rtol=1e-6, atol=1e-9)


def test_clip_bound_holds_after_rounding() -> None:
    rng = np.random.default_rng(7)
    for _ in range(200):
        d = {"w": rng.normal(0, 1, rng.integers(1, 300)).astype(np.float32)}
        clip = float(rng.uniform(0.01, 5))
        out, _, _ = clip_and_noise(d, clip, 0.0, rng)
        assert global_norm(out) <= clip


def test_clip_none_and_bad_values() -> None:
    d = _delta(1, 10.0)
    out, norm, scale = clip_and_noise(d, None, 0.0, np.random.default_rng(0))
    assert scale == 1.0 and global_norm(out) == pytest.approx(norm)
    with pytest.raises(ValueError, match="clip_norm"):
        clip_and_noise(d, 0.0, 0.0, np.random.default_rng(0))
    with pytest.raises(ValueError, match="noise_stddev"):
        clip_and_noise(d, 1.0, -1.0, np.random.default_rng(0))


def test_noise_statistics() -> None:
    zero = {"w": np.zeros((400, 250), np.float32), "b": np.zeros(10, np.float32)}
    out, _, _ = clip_and_noise(zero, 1.0, 0.05, np.random.default_rng(123))
    noise = out["w"].ravel()
    assert abs(noise.mean()) < 4 * 0.05 / np.sqrt(noise.size)
    assert noise.std() == pytest.approx(0.05, rel=0.01)
    again, _, _ = clip_and_noise(zero, 1.0, 0.05, np.random.default_rng(123))
    np.testing.assert_array_equal(out["w"], again["w"])
    # Noise is added after clipping: a huge delta clipped to 1 keeps norm ≈ sqrt(1 + σ²·d).
    big = {"w": np.full((400, 250), 100.0, np.float32)}
    noisy, _, _ = clip_and_noise(big, 1.0, 0.05, np.random.default_rng(1))
    assert global_norm(noisy) == pytest.approx(np.sqrt(1 + 0.05**2 * 100_000), rel=0.01)


def test_local_update_rejects_bad_arguments(digits: tuple[np.ndarray, np.ndarray]) -> None:
    b = _bundle("digits_mlp")
    rt = ModelRuntime.from_bundle(b)

    def run(x: np.ndarray, y: np.ndarray, batch_size: int) -> None:
        local_update(
            rt, b.weights, x, y, epochs=1, batch_size=batch_size, learning_rate=0.1,
            clip_norm=1.0, noise_stddev=0.0, rng=np.random.default_rng(0),
        )  # fmt: skip

    with pytest.raises(ValueError, match="non-empty"):
        run(digits[0][:0], digits[1][:0], 8)
    with pytest.raises(ValueError, match="batch_size"):
        run(*digits, 0)


def test_load_digits(digits: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = digits
    assert x.shape == (1797, 64) and x.dtype == np.float32
    assert y.shape == (1797,) and y.dtype == np.int32
    assert x.min() == 0.0 and x.max() == 1.0
    assert set(np.unique(y)) == set(range(10))


@pytest.mark.parametrize(("n_parts", "alpha"), [(1, 1.0), (5, 0.1), (5, 0.5), (10, 100.0)])
def test_dirichlet_partition_covers_everything(
    n_parts: int, alpha: float, digits: tuple[np.ndarray, np.ndarray]
) -> None:
    y = digits[1]
    parts = dirichlet_partition(y, n_parts, alpha, np.random.default_rng(0), min_size=10)
    assert len(parts) == n_parts
    allidx = np.concatenate(parts)
    assert len(allidx) == len(y) and len(np.unique(allidx)) == len(y)
    assert min(len(p) for p in parts) >= 10
    again = dirichlet_partition(y, n_parts, alpha, np.random.default_rng(0), min_size=10)
    for p, q in zip(parts, again, strict=True):
        np.testing.assert_array_equal(p, q)


def test_dirichlet_small_alpha_is_skewed(digits: tuple[np.ndarray, np.ndarray]) -> None:
    y = digits[1]

    def top_share(alpha: float) -> float:
        parts = dirichlet_partition(y, 5, alpha, np.random.default_rng(3))
        return float(np.mean([np.bincount(y[p], minlength=10).max() / len(p) for p in parts]))

    assert top_share(0.1) > 0.4 > 0.15 > top_share(1000.0)


def test_dirichlet_rejects_impossible() -> None:
    with pytest.raises(ValueError):
        dirichlet_partition(np.zeros(5, np.int32), 10, 1.0, np.random.default_rng(0), min_size=1)
    with pytest.raises(ValueError, match="alpha"):
        dirichlet_partition(np.zeros(50, np.int32), 2, 0.0, np.random.default_rng(0))
