"""Differential privacy end to end: real Mosquitto, the real aggregator, real device clients
(LiteRT training, the daemon's training and secure-aggregation code paths)."""

from __future__ import annotations

import math
import queue
import uuid
from pathlib import Path
from typing import Any

import pytest
from aggtools import make_settings, running_aggregator
from devtools import (
    DIGITS_PLAN,
    cycle,
    device_settings,
    digits_split,
    mlp_bundle,
    new_task,
    publish_task,
    wait_until,
)
from test_clipping import ref_clip
from test_secagg_mqtt import feed, fleet, sa_plan

from fededge.aggregator.privacy import accounted_multiplier, epsilon_of
from fededge.device.client import Client
from fededge.mqtt import Message, MqttClient
from fededge.protocol import ModelVersion, Topics, VersionMetrics, decode_json
from fededge.protocol.signing import SignedKind, open_message
from fededge.settings import Settings

pytestmark = pytest.mark.broker


class Watcher:
    """Collects the published model versions and version metrics of a task."""

    def __init__(self, settings: Settings) -> None:
        self.topics = Topics(settings.topic_prefix, settings.task)
        self.client = MqttClient(settings.broker, f"w-{uuid.uuid4().hex[:8]}", persistent=False)
        self.client.connect()
        self.client.subscribe(self.topics.model, qos=1)
        self.client.subscribe(f"{settings.topic_prefix}/{settings.task}/versions/+/metrics", qos=1)
        self.models: dict[int, ModelVersion] = {}
        self.metrics: dict[int, VersionMetrics] = {}

    def _pump(self) -> None:
        try:
            while True:
                msg: Message = self.client.messages.get(timeout=0.05)
                if not msg.payload:
                    continue
                if msg.topic == self.topics.model:
                    body = open_message(msg.payload, SignedKind.MODEL, None).payload
                    mv = ModelVersion.from_bytes(body, max_bytes=1 << 30)
                    self.models[mv.version] = mv
                else:
                    vm = decode_json(msg.payload, VersionMetrics)
                    self.metrics[vm.version] = vm
        except queue.Empty:
            return

    def version(self, v: int, timeout: float = 60) -> tuple[ModelVersion, VersionMetrics]:
        def seen() -> bool:
            self._pump()
            return v in self.models and v in self.metrics

        wait_until(seen, timeout, f"model and metrics of version {v}")
        return self.models[v], self.metrics[v]

    def close(self) -> None:
        self.client.close()


def test_adaptive_clip_rises_toward_the_target_quantile(broker: Any, tmp_path: Path) -> None:
    """Three devices whose deltas are all far above C: every version the aggregator sees a
    noised unclipped fraction near 0 < gamma and publishes a larger clip, which the devices
    then clip and size their noise at (the update norms follow the published clip)."""
    task = new_task()
    gamma, z, c0 = 0.9, 0.05, 0.02
    plan = DIGITS_PLAN.model_copy(update={
        "min_updates_per_version": 3, "clip_norm": c0, "noise_multiplier": z,
        "target_unclipped_quantile": gamma, "max_staleness": 0,
    })  # fmt: skip
    s = make_settings(broker.url, tmp_path / "agg", task=task)
    base = publish_task(s, plan)
    d = sum(int(w.size) for w in base.weights.values())
    parts, _, _ = digits_split(3)
    watcher = Watcher(s)
    clients = [Client(device_settings(broker.url, tmp_path / "dev", task, f"d{i}"),
                      bundle=mlp_bundle()) for i in range(3)]  # fmt: skip
    clips = [c0]
    try:
        with running_aggregator(s) as agg:
            for c in clients:
                c.start()
            for v in range(4):
                for c in clients:
                    assert c.wait_for_version(v, 30), f"{c.device_id} never saw version {v}"
                for c, part in zip(clients, parts, strict=True):
                    c.fit(*cycle(part, v * 32, plan.examples_per_update))
                mv, vm = watcher.version(v + 1)
                assert mv.clip is not None and vm.clip == mv.clip and vm.unclipped is not None
                # The device clipped at the clip published with version v and added
                # N(0, (z C)^2) per coordinate: norm ~ C sqrt(1 + z^2 d) (chi, within 5 %).
                assert vm.mean_update_norm == pytest.approx(
                    clips[-1] * math.sqrt(1 + z * z * d), rel=0.05
                )
                assert abs(vm.unclipped) < 0.5  # 0 (all clipped) plus noise sigma_b / sqrt(3)
                assert mv.clip == pytest.approx(ref_clip(clips[-1], vm.unclipped, gamma))
                assert mv.clip > clips[-1]
                clips.append(mv.clip)
            print("published clips", clips)
            assert agg.rejected_total == 0
            assert clips[-1] > c0 * math.exp(0.2 * 4 * (gamma - 0.5))
    finally:
        for c in clients:
            c.close()
        watcher.close()


def test_dp_secure_rounds_publish_their_epsilon_and_clip(broker: Any, tmp_path: Path) -> None:
    """A DP plan (z > 0) under secure aggregation, with adaptive clipping: two real secure
    rounds (Skellam shares, the bit as one more masked entry); each version carries epsilon
    = privacy.epsilon_of for the plan after t versions, and the clip moved by the bits."""
    task = new_task()
    gamma, z = 0.5, 0.5
    plan = sa_plan(cohort_size=5, min_cohort=4, threshold=3, checkin_window=60.0)
    plan = plan.model_copy(update={"noise_multiplier": z, "clip_norm": 0.05,
                                   "target_unclipped_quantile": gamma})  # fmt: skip
    s = make_settings(broker.url, tmp_path / "agg", task=task)
    publish_task(s, plan)
    parts, _, _ = digits_split(5)
    watcher = Watcher(s)
    try:
        with running_aggregator(s) as agg, fleet(broker.url, tmp_path, task, {}, 5) as f:
            clip = plan.clip_norm
            for v in range(2):
                wait_until(lambda: all(c.version == v for c in f.clients.values()), 30,  # noqa: B023
                           f"version {v}")  # fmt: skip
                feed(f, parts)
                mv, vm = watcher.version(v + 1)
                assert mv.updates == 5 and vm.updates == 5
                zeff = accounted_multiplier(plan)
                assert zeff == pytest.approx(z / math.sqrt(1.1))
                assert vm.epsilon == pytest.approx(epsilon_of(((zeff, v + 1),), plan.delta))
                assert vm.delta == plan.delta
                assert vm.unclipped is not None and mv.clip is not None
                assert mv.clip == pytest.approx(ref_clip(clip, vm.unclipped, gamma))
                print(f"version {v + 1}: epsilon={vm.epsilon} unclipped={vm.unclipped} clip={clip}")
                clip = mv.clip
            assert agg.rounds.rounds_done == 2 and agg.rounds.rounds_aborted == 0
            st = agg.core.status("online", 0.0)
            assert st.epsilon == pytest.approx(epsilon_of(((zeff, 2),), plan.delta))
    finally:
        watcher.close()
