"""The fleet simulator against the private Mosquitto and a real aggregator: exactly-once accounting."""

from __future__ import annotations

import numpy as np
from aggtools import init_task, make_settings, running_aggregator

from fededge.protocol import ModelVersion, Plan
from fededge.protocol.messages import Weights
from fededge.testing import wait_until
from fededge.testing.simulator import FleetSimulator

DEVICES = 300
EACH = 2
PER_VERSION = 100


def test_every_update_gets_exactly_one_accepted_receipt(broker, tmp_path) -> None:
    s = make_settings(broker.url, tmp_path / "state")
    plan = Plan(
        min_updates_per_version=PER_VERSION,
        max_updates_per_device=EACH,
        max_staleness=1000,  # updates in flight while a version completes stay valid
        clip_norm=1.0,
    )
    init_task(s, {"w": np.zeros(64, np.float32), "b": np.zeros(4, np.float32)}, plan)
    with running_aggregator(s) as agg:
        folded: list[int] = []  # updates in each version, as the aggregator published it
        agg.on_new_version(lambda model, _old, _new: folded.append(model.updates))
        sim = FleetSimulator(
            broker.settings(),
            s.task,
            DEVICES,
            connections=3,
            max_outstanding=200,
            # A receipt timeout far above any delivery here: every resend would be a test bug
            # rather than load, and the duplicate count below stays exact.
            receipt_timeout=600,
            duplicate_every=7,  # a second copy of every 7th update, as after a lost PUBACK
        )
        with sim:
            stats = sim.run(EACH, timeout=600)
            # run() returns once every update is settled; answers to second copies may follow.
            dups = stats.duplicates_sent + stats.resent
            wait_until(lambda: sim.poll() and sim.report().receipts.get("duplicate") == dups,
                       what=f"{dups} duplicate receipts")  # fmt: skip
            stats = sim.report()
        total = DEVICES * EACH
        assert stats.created == total
        assert stats.accepted == total and stats.double_accepted == 0 and stats.lost == 0
        assert stats.rejected == {} and stats.unknown_receipts == 0
        # Each deliberate second copy was answered "duplicate", exactly once (waited above).
        assert stats.duplicates_sent == total // 7
        assert stats.receipts["accepted"] == total
        # The aggregator counted each update once: in versions and in the pending one.
        wait_until(lambda: agg.accepted_total == total, what="the aggregator's total")
        assert agg.pending is not None and agg.version is not None
        # (A version takes whole groups, so it may hold more than min_updates_per_version.)
        assert len(folded) == agg.version and min(folded) >= PER_VERSION
        assert sum(folded) + agg.pending.sums.count == total
        assert agg.rejected_total == 0


def test_numpy_computed_updates_and_model_tracking(broker, tmp_path) -> None:
    """Deltas from a numpy function of the current model; base versions follow the model."""
    s = make_settings(broker.url, tmp_path / "state")
    plan = Plan(min_updates_per_version=10, max_updates_per_device=5, max_staleness=1000)
    init_task(s, {"w": np.zeros(8, np.float32)}, plan)
    target = np.linspace(-1, 1, 8).astype(np.float32)

    def step(_d: str, _u: str, model: ModelVersion, rng: np.random.Generator) -> Weights:
        # One gradient step of 0.5 * |w - target|^2 with a little noise, clipped to norm 1.
        g = (target - model.weights["w"]) * 0.1 + rng.normal(0, 0.01, 8).astype(np.float32)
        n = float(np.linalg.norm(g))
        return {"w": (g / max(1.0, n)).astype(np.float32)}

    with running_aggregator(s) as agg:
        with FleetSimulator(broker.settings(), s.task, 20, make_delta=step, connections=1) as sim:
            stats = sim.run(3, timeout=600)
            assert stats.accepted == 60 and stats.lost == 0 and stats.double_accepted == 0
            wait_until(lambda: agg.accepted_total == 60, what="the aggregator's total")
            v = agg.version
            assert v is not None and v >= 1
            wait_until(lambda: sim.poll() and sim.model is not None and sim.model.version == v,
                       what=f"the simulator to see version {v}")  # fmt: skip
        assert sim.model is not None
        # The model moved towards the target that the numpy "training" pulls to.
        assert float(np.linalg.norm(sim.model.weights["w"] - target)) < float(
            np.linalg.norm(target)
        )
