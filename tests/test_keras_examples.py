"""The examples' Keras models build into checked bundles equal in layout to the prebuilt ones
(the prebuilt bundles themselves are exercised without TensorFlow in test_bundle_v2.py and
test_demo.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("tensorflow", reason="needs TensorFlow (the convert extra)")

from fededge.demo_examples import EXAMPLES, build_example
from fededge.device.bundle import load_bundle, shipped_bundle_path

pytestmark = pytest.mark.tf


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_example_builds_checked_like_the_prebuilt_bundle(name: str, tmp_path: Path) -> None:
    built = build_example(name, tmp_path / name)
    assert built.check is not None
    assert built.check["max_difference"] <= 1e-5
    assert built.check["loss_after"] < built.check["loss_first"]
    fresh = load_bundle(tmp_path / name).spec
    shipped = load_bundle(shipped_bundle_path(name)).spec
    assert fresh.task == shipped.task
    assert fresh.weights == shipped.weights and fresh.input_shape == shipped.input_shape
    if name == "transfer_digits":
        assert fresh.weight_names == ["head_kernel", "head_bias"]
        assert built.frozen_parameters == 1248
