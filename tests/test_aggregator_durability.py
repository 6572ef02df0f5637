"""kill -9 of the aggregator process: acknowledged updates survive, none is counted twice."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from aggtools import Sender, init_task, make_settings

from fededge.testing import wait_until

pytestmark = pytest.mark.broker


def _start(tmp_path: Path, url: str, task: str, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "FEDEDGE_AGGREGATOR__METRICS": "false"}
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fededge.cli",
            "aggregator",
            "--broker",
            url,
            "--task",
            task,
            "--state-dir",
            str(tmp_path / "state"),
            "--wait-for-model",
            "30",
            "--log-level",
            "debug",
        ],
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        env=env,
    )


def _wait_ready(proc: subprocess.Popen[bytes], log: Path, count: int, timeout: float = 60) -> None:
    def ready() -> bool:
        assert proc.poll() is None, log.read_text()[-3000:]
        return log.read_text().count("aggregator ready") >= count

    try:
        wait_until(ready, timeout, f"aggregator ready x{count}", interval=0.1)
    except TimeoutError:
        raise AssertionError(log.read_text()[-3000:]) from None


def test_kill_9_keeps_exactly_the_acknowledged_updates(broker, tmp_path) -> None:
    from fededge.protocol import Plan

    s = make_settings(broker.url, tmp_path / "state", checkpoint_every=3, checkpoint_min_bytes=0)
    d = 50_000
    init_task(
        s,
        {"w": np.zeros(d, np.float32)},
        Plan(
            min_updates_per_version=11,
            clip_norm=1e9,
            max_examples_weight=1000,
            max_updates_per_device=10,
        ),
    )
    log = tmp_path / "aggregator.log"
    proc = _start(tmp_path, broker.url, s.task, log)
    _wait_ready(proc, log, 1)  # its first start creates its persistent session
    dev = Sender(s)
    # Update i is the constant vector i with weight i: integer sums in float64 are exact.
    uids = {}
    try:
        for i in range(1, 8):
            uids[i] = dev.update({"w": np.full(d, float(i), np.float32)}, n=i, uid=f"u{i}")
        for i in range(1, 8):
            assert dev.receipt(uids[i], timeout=60).status == "accepted"
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        # While it is down: one new update and resends of two acknowledged ones (a device
        # that never got its receipt resends with the same id).
        uids[8] = dev.update({"w": np.full(d, 8.0, np.float32)}, n=8, uid="u8")
        for i in (3, 5):
            del dev.receipts[uids[i]]
            dev.update({"w": np.full(d, float(i), np.float32)}, n=i, uid=uids[i])
        proc = _start(tmp_path, broker.url, s.task, log)
        assert dev.receipt(uids[8], timeout=60).status == "accepted"
        assert dev.receipt(uids[3]).status == "duplicate"
        assert dev.receipt(uids[5]).status == "duplicate"
        for i in (9, 10):
            uids[i] = dev.update({"w": np.full(d, float(i), np.float32)}, n=i, uid=f"u{i}")
            assert dev.receipt(uids[i]).status == "accepted"
        # The quota (max_updates_per_device = 10) was rebuilt from checkpoint and WAL: an
        # 11th update of this device is refused, another device's completes the version.
        r = dev.receipt(dev.update({"w": np.full(d, 99.0, np.float32)}, n=5, uid="u99"))
        assert (r.status, r.reason) == ("rejected", "device_quota")
        other = Sender(s, "dev2")
        uids[11] = other.update({"w": np.full(d, 11.0, np.float32)}, n=11, uid="u11")
        assert other.receipt(uids[11]).status == "accepted"
        other.close()
        v1 = dev.model(1, timeout=60)
    finally:
        dev.close()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
    weights = np.arange(1, 12, dtype=np.float64)
    expected = float((weights * weights).sum() / weights.sum())  # sum(i * i) / sum(i)
    np.testing.assert_array_equal(v1.weights["w"], np.full(d, expected, np.float32))
    assert v1.updates == 11 and v1.examples == int(weights.sum())
    assert proc.returncode == 0, log.read_text()[-3000:]
    assert "replayed from the WAL" in log.read_text()


def test_kill_9_keeps_the_adaptive_clipping_bits(broker, tmp_path) -> None:
    """The noised bits of acknowledged updates survive kill -9 (checkpoint + WAL) exactly once:
    the clip published after the restart is the one of all six bits."""
    from test_clipping import ref_clip

    from fededge.protocol import Plan

    s = make_settings(broker.url, tmp_path / "state", checkpoint_every=3, checkpoint_min_bytes=0)
    d = 1000
    plan = Plan(min_updates_per_version=6, clip_norm=1.0, target_unclipped_quantile=0.5,
                max_updates_per_device=10)  # fmt: skip
    init_task(s, {"w": np.zeros(d, np.float32)}, plan)
    log = tmp_path / "aggregator.log"
    proc = _start(tmp_path, broker.url, s.task, log)
    _wait_ready(proc, log, 1)
    dev = Sender(s)
    delta = {"w": np.full(d, 1e-3, np.float32)}
    bits = [0.5, -0.5, 0.25, -0.375, 0.125, -0.5]  # dyadic: their sum is exact in any order
    try:
        for i in range(4):  # a checkpoint after the third, the fourth in the WAL
            uid = dev.update(delta, uid=f"u{i}", unclipped=bits[i])
            assert dev.receipt(uid, timeout=60).status == "accepted"
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        proc = _start(tmp_path, broker.url, s.task, log)
        del dev.receipts["u3"]  # a resend of an acknowledged update is not counted again
        assert dev.receipt(dev.update(delta, uid="u3", unclipped=bits[3]), 60).status == (
            "duplicate"
        )
        for i in (4, 5):
            assert dev.receipt(dev.update(delta, uid=f"u{i}", unclipped=bits[i])).status == (
                "accepted"
            )
        v1 = dev.model(1, timeout=60)
    finally:
        dev.close()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
    assert v1.updates == 6
    assert v1.clip == pytest.approx(ref_clip(1.0, 0.5 + sum(bits) / 6, 0.5), rel=1e-12)
    assert "replayed from the WAL" in log.read_text()
