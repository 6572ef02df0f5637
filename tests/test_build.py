"""Building bundles with TensorFlow: LiteRT's train step equals TensorFlow's, builds are stable."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tensorflow", reason="needs TensorFlow (the convert extra)")

from fededge.build.builder import build_bundle, initial_weights, tf_train_step
from fededge.cli import main
from fededge.device.bundle import GRAPH_FILE, load_bundle, shipped_bundle_path
from fededge.device.runtime import ModelRuntime

pytestmark = pytest.mark.tf


@pytest.fixture(scope="module")
def built_mlp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_bundle("mlp", tmp_path_factory.mktemp("mlp") / "digits_mlp", seed=0)


def test_litert_train_step_equals_tensorflow(built_mlp: Path) -> None:
    b = load_bundle(built_mlp)
    rt = ModelRuntime.from_bundle(b)
    rng = np.random.default_rng(0)
    w = b.weights
    for n in (32, 5):  # a full and a partial batch
        x = rng.random((n, 64), dtype=np.float32)
        y = rng.integers(0, 10, n).astype(np.int32)
        loss, new = rt.train_step(x, y, 0.2, w)
        tf_loss, tf_new = tf_train_step("mlp", x, y, 0.2, w)
        assert loss == pytest.approx(tf_loss, abs=1e-5)
        for k in tf_new:
            np.testing.assert_allclose(new[k], tf_new[k], atol=1e-5, rtol=0)
        w = new


def test_rebuild_matches_shipped_bundle(built_mlp: Path) -> None:
    """The shipped bundle is what scripts/build_models.sh makes (byte-identical per TF version)."""
    import tensorflow as tf

    shipped = shipped_bundle_path("digits_mlp")
    built_with = load_bundle(shipped).spec.extra.get("built_with")
    if built_with != f"tensorflow {tf.__version__}":
        pytest.skip(f"shipped bundle was built with {built_with}, this is TF {tf.__version__}")
    for name in ("weights.safetensors", GRAPH_FILE):
        assert (
            hashlib.sha256((built_mlp / name).read_bytes()).hexdigest()
            == hashlib.sha256((shipped / name).read_bytes()).hexdigest()
        ), name


def test_initial_weights_depend_on_seed_only() -> None:
    a, b, c = initial_weights("cnn", 1), initial_weights("cnn", 1), initial_weights("cnn", 2)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert not np.array_equal(a["conv_kernel"], c["conv_kernel"])


def test_cli_builds_cnn(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cnn"
    assert main(["model", "build", "--model", "cnn", "-o", str(out), "--seed", "3"]) == 0
    b = load_bundle(out)
    assert b.spec.input_shape == (8, 8, 1) and b.spec.extra["seed"] == 3
    assert "graph sha256" in capsys.readouterr().out
    rt = ModelRuntime.from_bundle(b)
    x = np.random.default_rng(0).random((4, 8, 8, 1), dtype=np.float32)
    y = np.arange(4, dtype=np.int32)
    loss, new = rt.train_step(x, y, 0.1, b.weights)
    tf_loss, tf_new = tf_train_step("cnn", x, y, 0.1, b.weights)
    assert loss == pytest.approx(tf_loss, abs=1e-5)
    for k in tf_new:
        np.testing.assert_allclose(new[k], tf_new[k], atol=1e-5, rtol=0)


def test_unknown_model(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown model"):
        build_bundle("resnet", tmp_path)
