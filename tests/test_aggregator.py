"""The aggregator against a real Mosquitto: exact weights, validation, receipts, durability."""

from __future__ import annotations

import numpy as np
import pytest

from aggtools import Sender, init_task, make_settings, running_aggregator
from fededge.protocol import Plan

pytestmark = pytest.mark.broker


def _weights() -> dict[str, np.ndarray]:
    return {"b": np.arange(3, dtype=np.float32), "w": np.ones((2, 3), dtype=np.float32)}


def test_exact_weighted_mean(broker, tmp_path) -> None:
    s = make_settings(broker.url, tmp_path)
    plan = Plan(min_updates_per_version=3, clip_norm=100.0, server_learning_rate=0.5,
                max_examples_weight=40)
    base = init_task(s, _weights(), plan)
    rng = np.random.default_rng(0)
    deltas = [{k: rng.normal(size=v.shape).astype(np.float32) for k, v in base.weights.items()}
              for _ in range(3)]
    counts = [10, 30, 100]  # the last is capped at 40 examples
    with running_aggregator(s):
        dev = Sender(s)
        uids = [dev.update(d, n=n) for d, n in zip(deltas, counts, strict=True)]
        receipts = [dev.receipt(u) for u in uids]
        assert [r.status for r in receipts] == ["accepted"] * 3
        assert all(r.pending == 1 for r in receipts)
        v1 = dev.model(1)
        dev.close()
    w = np.array([10, 30, 40], dtype=np.float64)
    for name, b in base.weights.items():
        mean = sum(wi * d[name].astype(np.float64) for wi, d in zip(w, deltas, strict=True)) / w.sum()
        expected = (b.astype(np.float64) + 0.5 * mean).astype(np.float32)
        np.testing.assert_array_equal(v1.weights[name], expected)
    assert v1.parent == 0 and v1.updates == 3 and v1.examples == 140
