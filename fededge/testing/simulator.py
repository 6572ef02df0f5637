"""Thousands of lightweight protocol-level devices in one process, for load tests and accounting.

A :class:`FleetSimulator` plays ``devices`` device identities against a real broker and a real
aggregator: each publishes real update messages (docs/protocol.md) on its own topic
``{prefix}/{task}/updates/{device}`` at QoS 1, tracks its receipts and, like a device's outbox,
sends the *same* update again when no receipt came within ``receipt_timeout``. Nothing is
trained: the deltas are synthetic (a seeded random vector inside the clip norm) or come from a
``make_delta`` function you pass (numpy code, e.g. one step of a linear model on local data).

Design: a device is a few fields (:class:`SimDevice`), not a thread or a connection. The
identities are spread over ``connections`` MQTT connections (fededge's ``MqttClient``, one paho
network thread each); a connection subscribes to exactly its devices' receipt topics (one
filter per device, sent in SUBSCRIBEs of a thousand), so no receipt is delivered twice, and the
first connection also follows the retained model (base versions and tensor shapes come from
it, as on a device). One driver loop, on the caller's thread, takes receipts, sends due updates
(at most ``max_outstanding`` without a receipt, fleet-wide) and resends overdue ones. A device
keeps no payload: a resend rebuilds the same bytes from a seed, so memory is a few hundred bytes
per device whatever the model size.

Limits: a broker with a per-device ACL (each device may publish only on its own topic, checked
against its credentials) needs one connection per device, which this design does not do; a
connection publishing for many devices is one client to the broker, so per-client quotas and
the broker's in-flight window apply to all its devices together; receipts are parsed but their
signatures are not verified; devices do not train, take part in secure-aggregation rounds or
publish their status.
"""

from __future__ import annotations

import dataclasses
import math
import queue
import time
import uuid
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from fededge.errors import ProtocolError, SignatureError
from fededge.mqtt import Message, MqttClient
from fededge.protocol import ModelVersion, Receipt, Topics, Update, decode_json
from fededge.protocol.messages import Weights
from fededge.protocol.signing import SignedKind, open_message
from fededge.settings import BrokerSettings

__all__ = ["FleetSimulator", "SimDevice", "SimStats", "synthetic_delta"]

#: ``make_delta(device, update_id, model, rng)``: the weight delta a device sends.
DeltaFn = Callable[[str, str, ModelVersion, np.random.Generator], Weights]

SUBSCRIBE_BATCH = 1000  # receipt filters per SUBSCRIBE packet


def synthetic_delta(norm: float) -> DeltaFn:
    """Deltas of L2 norm ``norm`` in a random direction, shaped like the model's tensors."""

    def make(_device: str, _uid: str, model: ModelVersion, rng: np.random.Generator) -> Weights:
        parts = {k: rng.standard_normal(v.size) for k, v in model.weights.items()}
        total = math.sqrt(sum(float(p @ p) for p in parts.values())) or 1.0
        return {
            k: (p * (norm / total)).astype(np.float32).reshape(model.weights[k].shape)
            for k, p in parts.items()
        }

    return make


@dataclass
class SimDevice:
    """One simulated device: what it sent, what is still unanswered and what came back."""

    name: str
    conn: int  # index of the connection that carries it
    created: int = 0  # updates made so far (ids are {name}-u{n})
    # update id -> (base version, time of the last send); a receipt of any status settles it
    outstanding: dict[str, tuple[int, float]] = field(default_factory=dict)
    accepted: set[str] = field(default_factory=set)
    receipts: Counter[str] = field(default_factory=Counter)  # by status


@dataclass
class SimStats:
    """The fleet's accounting; ``lost`` and ``double_accepted`` must be 0 for exactly-once."""

    devices: int = 0
    created: int = 0  # distinct updates
    sent: int = 0  # publications, resends and deliberate duplicates included
    resent: int = 0  # after a receipt timeout
    duplicates_sent: int = 0  # deliberate second copies (``duplicate_every``)
    accepted: int = 0  # distinct updates with an accepted receipt
    double_accepted: int = 0  # accepted receipts for an update already accepted: a bug
    receipts: dict[str, int] = field(default_factory=dict)  # by status
    rejected: dict[str, int] = field(default_factory=dict)  # by reason
    lost: int = 0  # created but never settled by a receipt
    unknown_receipts: int = 0  # for an update nobody sent (or not a receipt at all)
    seconds: float = 0.0

    @property
    def updates_per_second(self) -> float:
        return self.accepted / self.seconds if self.seconds > 0 else 0.0


class FleetSimulator:
    """``devices`` simulated devices over ``connections`` MQTT connections (see module doc)."""

    def __init__(
        self,
        broker: BrokerSettings,
        task: str,
        devices: int,
        *,
        topic_prefix: str = "fededge",
        connections: int = 2,
        name: str | None = None,
        receipt_timeout: float = 30.0,
        max_outstanding: int = 1000,
        make_delta: DeltaFn | None = None,
        num_examples: int = 32,
        duplicate_every: int = 0,
        seed: int = 0,
    ) -> None:
        if devices < 1 or connections < 1:
            raise ValueError(
                f"need devices >= 1 and connections >= 1, got {devices}, {connections}"
            )
        self.broker = broker
        self.topics = Topics(topic_prefix, task)
        self.receipt_timeout = receipt_timeout
        self.max_outstanding = max_outstanding
        self.make_delta = make_delta or synthetic_delta(0.5)
        self.num_examples = num_examples
        self.duplicate_every = duplicate_every
        self.seed = seed
        self.name = name or f"sim{uuid.uuid4().hex[:6]}"
        k = min(connections, devices)
        self.devices = [SimDevice(f"{self.name}-d{i}", i % k) for i in range(devices)]
        self._by_name = {d.name: d for d in self.devices}
        self.clients = [
            MqttClient(
                broker, f"{self.name}-c{c}", persistent=True, max_inbox=100_000, name="simulator"
            )
            for c in range(k)
        ]
        self.model: ModelVersion | None = None
        self.stats = SimStats(devices=devices)
        self._outstanding = 0
        self._next = 0  # round-robin position for sending
        self._resend_at = 0.0  # when to look for overdue updates next

    # -- lifecycle --------------------------------------------------------------------------
    def start(self, timeout: float = 30.0) -> None:
        """Connect, subscribe every device to its receipts, and wait for the retained model."""
        for c, client in enumerate(self.clients):
            client.connect()
            mine = [self.topics.receipt(d.name) for d in self.devices if d.conn == c]
            for i in range(0, len(mine), SUBSCRIBE_BATCH):
                client.subscribe_all(mine[i : i + SUBSCRIBE_BATCH], qos=1)
        self.clients[0].subscribe(self.topics.model, qos=1)
        deadline = time.monotonic() + timeout
        while self.model is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no model on {self.topics.model} within {timeout:g} s")
            self._drain(0.1)

    def close(self) -> None:
        for client in self.clients:
            client.close()

    def __enter__(self) -> FleetSimulator:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the run ----------------------------------------------------------------------------
    def run(self, updates_per_device: int, timeout: float = 600.0) -> SimStats:
        """Send ``updates_per_device`` updates from every device; return once all are settled.

        Raises TimeoutError (with the accounting so far) if they are not within ``timeout``.
        """
        target = self.stats.created + updates_per_device * len(self.devices)
        t0 = time.monotonic()
        deadline = t0 + timeout
        while self.stats.created < target or self._outstanding:
            now = time.monotonic()
            if now > deadline:
                raise TimeoutError(f"fleet not settled within {timeout:g} s: {self.report()}")
            sent = self._send_due(now, target)
            if now >= self._resend_at:  # a scan of every device: not on every turn
                self._resend_overdue(now)
                self._resend_at = now + min(1.0, self.receipt_timeout / 4)
            self._drain(0.0 if sent else 0.01)
        self.stats.seconds += time.monotonic() - t0
        return self.report()

    def poll(self) -> bool:
        """Handle the messages waiting (receipts, new models) without sending; always True."""
        self._drain(0.0)
        return True

    def report(self) -> SimStats:
        """The accounting now (a copy)."""
        s = dataclasses.replace(self.stats)
        s.receipts = dict(sum((d.receipts for d in self.devices), Counter()))
        s.rejected = dict(self.stats.rejected)
        s.lost = sum(len(d.outstanding) for d in self.devices)
        return s

    # -- sending ----------------------------------------------------------------------------
    def _send_due(self, now: float, target: int) -> int:
        """Send new updates from devices with none in flight; return how many were sent."""
        n = len(self.devices)
        per_device = math.ceil(target / n)
        budget = self.max_outstanding - self._outstanding
        scanned = sent = 0
        while budget > 0 and self.stats.created < target and scanned < n:
            d = self.devices[self._next]
            self._next = (self._next + 1) % n
            scanned += 1
            # One update in flight per device, like a device with a small outbox.
            if d.outstanding or d.created >= per_device:
                continue
            assert self.model is not None
            uid = f"{d.name}-u{d.created}"
            d.created += 1
            self.stats.created += 1
            d.outstanding[uid] = (self.model.version, now)
            self._outstanding += 1
            budget -= 1
            sent += 1
            payload = self._payload(d, uid, self.model.version)
            self._publish(d, payload)
            if self.duplicate_every and self.stats.created % self.duplicate_every == 0:
                self.stats.duplicates_sent += 1
                self._publish(d, payload)
        return sent

    def _resend_overdue(self, now: float) -> None:
        if self._outstanding == 0:
            return
        for d in self.devices:
            for uid, (base, sent_at) in list(d.outstanding.items()):
                if now - sent_at > self.receipt_timeout:
                    d.outstanding[uid] = (base, now)
                    self.stats.resent += 1
                    self._publish(d, self._payload(d, uid, base))

    def _payload(self, d: SimDevice, uid: str, base: int) -> bytes:
        """The update's bytes, the same every time (a resend is the same update)."""
        assert self.model is not None
        rng = np.random.default_rng([self.seed, zlib.crc32(uid.encode())])
        delta = self.make_delta(d.name, uid, self.model, rng)
        return Update(
            task=self.topics.task,
            device=d.name,
            update_id=uid,
            base_version=base,
            num_examples=self.num_examples,
            delta=delta,
        ).to_bytes()

    def _publish(self, d: SimDevice, payload: bytes) -> None:
        self.stats.sent += 1
        self.clients[d.conn].publish(self.topics.update(d.name), payload, qos=1)

    # -- receiving --------------------------------------------------------------------------
    def _drain(self, timeout: float) -> None:
        """Handle every message waiting; wait up to ``timeout`` for the first one."""
        got = False
        for client in self.clients:
            while True:
                try:
                    msg = client.messages.get(timeout=timeout if not got else 0.0)
                except queue.Empty:
                    break
                got = True
                self._handle(msg)
            timeout = 0.0

    def _handle(self, msg: Message) -> None:
        if msg.topic == self.topics.model:
            if msg.payload:
                self._on_model(msg.payload)
            return
        name = self.topics.device_of(msg.topic, "receipts")
        d = self._by_name.get(name) if name is not None else None
        try:
            body = open_message(msg.payload, SignedKind.RECEIPT, None).payload
            r = decode_json(body, Receipt)
        except (ProtocolError, SignatureError):
            r = None
        if d is None or r is None or r.device != d.name:
            self.stats.unknown_receipts += 1
            return
        d.receipts[r.status] += 1
        if r.status == "accepted":
            if r.update_id in d.accepted:
                self.stats.double_accepted += 1
            else:
                d.accepted.add(r.update_id)
                self.stats.accepted += 1
        elif r.status == "rejected":
            self.stats.rejected[r.reason or "?"] = self.stats.rejected.get(r.reason or "?", 0) + 1
        if d.outstanding.pop(r.update_id, None) is not None:
            self._outstanding -= 1
        elif r.update_id not in d.accepted and r.status != "duplicate":
            self.stats.unknown_receipts += 1

    def _on_model(self, payload: bytes) -> None:
        try:
            body = open_message(payload, SignedKind.MODEL, None).payload
            mv = ModelVersion.from_bytes(body, max_bytes=len(body))
        except (ProtocolError, SignatureError):
            return
        if self.model is None or mv.version > self.model.version:
            self.model = mv
