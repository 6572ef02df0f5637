"""Helpers for aggregator tests: settings, a running in-process aggregator, an update sender."""

from __future__ import annotations

import queue
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from fededge.aggregator.service import Aggregator
from fededge.mqtt import Message, MqttClient
from fededge.protocol import ModelVersion, Plan, Receipt, Topics, Update, decode_json
from fededge.protocol.signing import SignedKind, open_message
from fededge.protocol.vocab import NO_GRAPH
from fededge.settings import Settings, load_settings
from fededge.tasks import publish_initial


def make_settings(
    url: str, state_dir: Path, task: str | None = None, **aggregator: Any
) -> Settings:
    agg = {"metrics": False, "status_interval": 1.0, **aggregator}
    return load_settings(
        None,
        {
            "broker": {"url": url},
            "task": task or f"t{uuid.uuid4().hex[:8]}",
            "state_dir": state_dir,
            "aggregator": agg,
        },
    )


def init_task(settings: Settings, weights: dict[str, np.ndarray], plan: Plan) -> ModelVersion:
    mv = ModelVersion(task=settings.task, version=0, weights=weights, graph_sha256=NO_GRAPH)
    publish_initial(settings, None, mv, plan)
    return mv


@contextmanager
def running_aggregator(settings: Settings) -> Iterator[Aggregator]:
    """An Aggregator started and stepping in a background thread until the block ends."""
    agg = Aggregator(settings)
    agg.start(wait_for_model=20)
    stop = threading.Event()
    errors: list[BaseException] = []

    def loop() -> None:
        try:
            agg.run(stop.is_set)
        except BaseException as e:  # surfaced by the test below, never lost
            errors.append(e)
            raise

    t = threading.Thread(target=loop, name="aggregator", daemon=True)
    t.start()
    try:
        yield agg
    finally:
        stop.set()
        t.join(10)
        agg.close()
    if errors:
        raise errors[0]


class Sender:
    """A device-side MQTT client that publishes updates and collects receipts and models."""

    def __init__(self, settings: Settings, device: str = "dev1") -> None:
        self.settings = settings
        self.device = device
        self.topics = Topics(settings.topic_prefix, settings.task)
        self.client = MqttClient(
            settings.broker, f"test-{device}-{uuid.uuid4().hex[:6]}", persistent=False
        )
        self.client.connect()
        self.client.subscribe(self.topics.receipt(device), qos=1)
        self.client.subscribe(self.topics.model, qos=1)
        self.receipts: dict[str, Receipt] = {}
        self.models: dict[int, ModelVersion] = {}
        self.raw_receipts: dict[str, bytes] = {}  # as received (signed, if the aggregator signs)
        self.raw_models: dict[int, bytes] = {}

    def update(
        self,
        delta: dict[str, np.ndarray],
        *,
        base: int = 0,
        n: int = 10,
        uid: str | None = None,
        **kw: Any,
    ) -> str:
        uid = uid or uuid.uuid4().hex[:16]
        u = Update(
            task=kw.pop("task", self.settings.task),
            device=kw.pop("device", self.device),
            update_id=uid,
            base_version=base,
            num_examples=n,
            delta=delta,
            **kw,
        )
        self.raw(u.to_bytes())
        return uid

    def raw(self, payload: bytes, device: str | None = None, qos: int = 1) -> None:
        self.client.publish(
            self.topics.update(device or self.device), payload, qos=qos, wait=True, timeout=10
        )

    def _pump(self, timeout: float) -> None:
        try:
            msg: Message = self.client.messages.get(timeout=timeout)
        except queue.Empty:
            return
        # Signed envelopes are unwrapped unverified here; tests that check signatures verify
        # the raw copies.
        if msg.topic == self.topics.model and msg.payload:
            body = open_message(msg.payload, SignedKind.MODEL, None).payload
            mv = ModelVersion.from_bytes(body, max_bytes=1 << 30)
            self.models[mv.version] = mv
            self.raw_models[mv.version] = msg.payload
        elif msg.topic == self.topics.receipt(self.device):
            r = decode_json(open_message(msg.payload, SignedKind.RECEIPT, None).payload, Receipt)
            self.receipts[r.update_id] = r
            self.raw_receipts[r.update_id] = msg.payload

    def receipt(self, uid: str, timeout: float = 20) -> Receipt:
        deadline = time.monotonic() + timeout
        while uid not in self.receipts:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no receipt for {uid}")
            self._pump(0.1)
        return self.receipts[uid]

    def model(self, version: int, timeout: float = 20) -> ModelVersion:
        deadline = time.monotonic() + timeout
        while version not in self.models:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no model version {version}")
            self._pump(0.1)
        return self.models[version]

    def close(self) -> None:
        self.client.close()
