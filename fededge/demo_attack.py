"""Byzantine devices for ``fededge demo --byzantine-fraction``: sign-flipped, norm-bounded updates.

A demonstration of the poisoning threat that plan ``robust`` defends against
(docs/security.md): each attacker trains honestly on its own share of the data, then sends
the opposite of its delta scaled up to the plan's clip norm, the largest update the
aggregator accepts, or (``scale``) to that multiple of its honest delta's norm, capped at the
clip norm: an attacker that stays below a ``robust_zeroing`` threshold. They are plain MQTT publishers of the demo harness, not device daemons:
a compromised device can send any bytes, so there is nothing of the device code to reuse.
"""

from __future__ import annotations

import logging
import queue
import secrets
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from fededge.device.training import global_norm, local_update
from fededge.protocol import ModelVersion, Plan, Topics, Update
from fededge.protocol.encoding import encode_delta
from fededge.protocol.rotation import rotate_for

log = logging.getLogger(__name__)


def sign_flip(delta: dict[str, np.ndarray], bound: float) -> dict[str, np.ndarray]:
    """``-delta`` scaled to L2 norm just below ``bound`` (zeros stay zeros)."""
    norm = global_norm(delta)
    scale = 0.0 if norm == 0 else bound * (1 - 1e-6) / norm
    return {k: (-scale * v.astype(np.float64)).astype(np.float32) for k, v in delta.items()}


class SignFlipAttackers:
    """Devices ``names`` that answer every model version with a sign-flipped update."""

    def __init__(
        self,
        settings: Any,
        plan: Plan,
        runtime: Any,
        names: Sequence[str],
        parts: Sequence[tuple[np.ndarray, np.ndarray]],
        seed: int,
        scale: float | None = None,
    ) -> None:
        from fededge.mqtt import MqttClient

        self.plan, self.runtime, self.names, self.parts = plan, runtime, list(names), parts
        self.topics = Topics(settings.topic_prefix, settings.task)
        self.client = MqttClient(
            settings.broker, f"fededge-byzantine-{secrets.token_hex(4)}", persistent=False
        )
        self.rng = np.random.default_rng(seed)
        self.scale = scale
        self._versions: queue.Queue[ModelVersion | None] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="byzantine", daemon=True)
        self.sent = 0

    def start(self) -> None:
        self.client.connect()
        self._thread.start()

    def on_version(self, model: ModelVersion) -> None:
        self._versions.put(model)

    def _loop(self) -> None:
        while (model := self._versions.get()) is not None:
            for name, (x, y) in zip(self.names, self.parts, strict=True):
                try:
                    self._attack(model, name, x, y)
                except Exception:  # a demo helper: log and keep attacking
                    log.exception("byzantine device %s failed on version %d", name, model.version)

    def _attack(self, model: ModelVersion, name: str, x: np.ndarray, y: np.ndarray) -> None:
        p = self.plan
        n = min(len(x), p.examples_per_update)
        idx = self.rng.choice(len(x), size=n, replace=False)
        lu = local_update(
            self.runtime, model.weights, x[idx], y[idx], epochs=p.epochs,
            batch_size=p.batch_size, learning_rate=p.learning_rate, clip_norm=None,
            noise_stddev=0.0, rng=self.rng,
        )  # fmt: skip
        bound = p.clip_norm
        if self.scale is not None:
            bound = min(bound, self.scale * global_norm(lu.delta))
        flipped = rotate_for(p, model, sign_flip(lu.delta, bound))  # as devices do
        delta = encode_delta(flipped, p.update_encoding, p.update_block, self.rng)
        update = Update(
            task=model.task, device=name, update_id=f"byz-{model.version}-{secrets.token_hex(4)}",
            base_version=model.version, num_examples=p.examples_per_update, delta=delta,
            encoding=p.update_encoding, block=p.update_block, rotation=p.update_rotation,
        )  # fmt: skip
        self.client.publish(self.topics.update(name), update.to_bytes(), qos=1, wait=False)
        self.sent += 1

    def close(self) -> None:
        self._versions.put(None)
        self._thread.join(30)
        self.client.close()
