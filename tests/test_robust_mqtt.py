"""Robust aggregation through a real aggregator and a private Mosquitto: poisoned updates, kill -9."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aggtools import Sender, init_task, make_settings, running_aggregator
from test_aggregator_durability import _start, _wait_ready

from fededge.protocol import Plan, Update

pytestmark = pytest.mark.broker

D = 1000
HONEST, BYZANTINE = 8, 2
CLIP = 10.0


def _fleet_updates(task: str) -> tuple[list[Update], np.ndarray]:
    """8 honest updates around a common direction, 2 sign-flipped ones at the norm bound."""
    rng = np.random.default_rng(13)
    mu = np.full(D, 0.01)
    honest = [mu + rng.normal(scale=0.002, size=D) for _ in range(HONEST)]
    flipped = -mu / np.linalg.norm(mu) * CLIP * (1 - 1e-6)  # huge, but within the bound
    deltas = honest + [flipped] * BYZANTINE
    updates = [
        Update(
            task=task,
            device=f"dev{i}",
            update_id=f"u{i}",
            base_version=0,
            num_examples=10,
            delta={"w": d.astype(np.float32)},
        )
        for i, d in enumerate(deltas)
    ]
    return updates, np.mean([h.astype(np.float32) for h in honest], axis=0)


@pytest.mark.parametrize("stat", ["none", "trimmed_mean", "median"])
def test_poisoned_version_stays_near_the_honest_mean_only_with_a_robust_statistic(
    broker: Any, tmp_path: Path, stat: str
) -> None:
    s = make_settings(broker.url, tmp_path / "state")
    plan = Plan(min_updates_per_version=HONEST + BYZANTINE, clip_norm=CLIP, robust=stat,
                robust_beta=0.2, max_examples_weight=10)  # fmt: skip
    init_task(s, {"w": np.zeros(D, np.float32)}, plan)
    updates, honest_mean = _fleet_updates(s.task)
    with running_aggregator(s):
        dev = Sender(s, "observer")
        try:
            for u in updates:
                dev.raw(u.to_bytes(), device=u.device)
            v1 = dev.model(1, timeout=60)
        finally:
            dev.close()
    error = float(np.linalg.norm(v1.weights["w"] - honest_mean) / np.linalg.norm(honest_mean))
    assert v1.updates == HONEST + BYZANTINE
    if stat == "none":
        assert error > 2.0  # the mean is dragged to the attackers' side
    else:
        assert error < 0.1


def test_kill_9_mid_version_gives_the_same_robust_version(broker: Any, tmp_path: Path) -> None:
    """A real aggregator process with trimmed_mean, killed with SIGKILL with updates of the
    pending version in its (rolled) WAL segments: the version after the restart is exactly the
    trimmed mean of all of them."""
    k = 7
    plan = Plan(min_updates_per_version=k, clip_norm=1e9, robust="trimmed_mean", robust_beta=0.2,
                max_examples_weight=1000)  # fmt: skip
    s = make_settings(broker.url, tmp_path / "state", checkpoint_every=2)
    init_task(s, {"w": np.zeros(D, np.float32)}, plan)
    rng = np.random.default_rng(3)
    # Integer values: sums are exact in float64, so the expected version is exact.
    values = [rng.integers(-50, 50, size=D).astype(np.float32) for _ in range(k)]
    log = tmp_path / "aggregator.log"
    proc = _start(tmp_path, broker.url, s.task, log)
    _wait_ready(proc, log, 1)
    senders = [Sender(s, f"dev{i}") for i in range(k)]
    try:
        for i, (dev, x) in enumerate(zip(senders, values, strict=True)):
            if i == 5:  # 5 acknowledged, in 3 segments: kill -9 and restart
                proc.send_signal(signal.SIGKILL)
                proc.wait(10)
                proc = _start(tmp_path, broker.url, s.task, log)
            uid = dev.update({"w": x}, n=1 + i, uid=f"u{i}")
            assert dev.receipt(uid, timeout=60).status == "accepted"
        v1 = senders[0].model(1, timeout=60)
    finally:
        for dev in senders:
            dev.close()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
    trim = 1  # floor(0.2 * 7)
    want = np.sort(np.stack(values).astype(np.float64), axis=0)[trim : k - trim].mean(axis=0)
    np.testing.assert_array_equal(v1.weights["w"], want.astype(np.float32))
    text = log.read_text()
    assert "5 replayed from the WAL" in text
    assert "trimmed_mean over 7 updates (0 zeroed, 1 trimmed at each end)" in text


def test_demo_with_a_byzantine_device_and_trimmed_mean_on_mosquitto(
    broker: Any, tmp_path: Path, caplog: Any
) -> None:
    """The demo's --byzantine-fraction and --robust flags on Mosquitto: 1 of 5 devices
    sign-flips its updates, each version takes all 5, and the aggregator trims 1 at each end."""
    import logging

    from fededge.demo import DemoConfig, run_demo

    caplog.set_level(logging.INFO, logger="fededge.aggregator.robust")
    cfg = DemoConfig(devices=5, versions=3, broker=broker.url, min_updates_per_version=5,
                     robust="trimmed_mean", robust_beta=0.2, byzantine_fraction=0.2,
                     out_dir=tmp_path)  # fmt: skip
    summary = run_demo(cfg)
    assert [r.version for r in summary.versions] == [0, 1, 2, 3]
    assert all(r.updates == 5 for r in summary.versions[1:])
    # Each version holds one update of each device, the attacker's too (validated like any).
    assert caplog.text.count("trimmed_mean over 5 updates (0 zeroed, 1 trimmed at each end)") >= 3
