"""MQTT topic names of protocol v1: one place builds and parses them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from fededge.protocol.vocab import check_name, is_name

CHECKIN = "checkin"
TO = "to"
#: Round messages the aggregator sends to every device on ``rounds/{round}/{type}``.
ROUND_BROADCASTS = frozenset({"config", "survivors", "unmask_request", "status"})
#: Round messages the aggregator sends to one device on ``rounds/{round}/to/{device}``.
ROUND_ADDRESSED = frozenset({"keys", "relay"})


@dataclass(frozen=True)
class RoundTopic:
    """A parsed ``rounds/...`` topic: its kind, round id, message type and device."""

    kind: Literal["checkin", "broadcast", "stage", "to"]
    round_id: str | None  # None for check-ins
    type: str  # checkin, to, or the stage/broadcast message type
    device: str | None  # None for broadcasts


@dataclass(frozen=True)
class Topics:
    """The topics of one task under one prefix (``{prefix}/{task}/...``)."""

    prefix: str
    task: str
    # device_of(topic, "updates"), memoised: not part of the value (no compare, hash, repr)
    _update_devices: dict[str, str | None] = field(
        default_factory=dict, init=False, repr=False, compare=False, hash=False
    )

    def __post_init__(self) -> None:
        check_name(self.task, "task")

    @property
    def base(self) -> str:
        return f"{self.prefix}/{self.task}"

    # Retained, published by the aggregator (or `fededge model init`).
    @property
    def model(self) -> str:
        return f"{self.base}/model"

    @property
    def plan(self) -> str:
        return f"{self.base}/plan"

    @property
    def graph(self) -> str:
        return f"{self.base}/graph"

    @property
    def roster(self) -> str:
        """Retained, the model owner's signed roster of device identity keys."""
        return f"{self.base}/roster"

    @property
    def aggregator_status(self) -> str:
        return f"{self.base}/aggregator/status"

    def aggregator_lease(self, role: str) -> str:
        """Retained, the claim of one aggregator process to ``role``; its Last Will clears it."""
        return f"{self.base}/aggregator/lease/{check_name(role, 'role')}"

    # Sharded aggregation: workers to the coordinator and back (docs/protocol.md).
    def partial(self, worker: str) -> str:
        return f"{self.base}/aggregator/partials/{check_name(worker, 'worker')}"

    @property
    def partials_filter(self) -> str:
        return f"{self.base}/aggregator/partials/+"

    def batch_ack(self, worker: str) -> str:
        return f"{self.base}/aggregator/acks/{check_name(worker, 'worker')}"

    def shared_updates_filter(self, group: str) -> str:
        """The MQTT 5 shared subscription through which shard workers split the updates."""
        return f"$share/{check_name(group, 'group')}/{self.updates_filter}"

    def version_metrics(self, version: int) -> str:
        return f"{self.base}/versions/{version}/metrics"

    @property
    def version_metrics_filter(self) -> str:
        return f"{self.base}/versions/+/metrics"

    # Device to aggregator.
    def update(self, device: str) -> str:
        return f"{self.base}/updates/{check_name(device, 'device')}"

    @property
    def updates_filter(self) -> str:
        return f"{self.base}/updates/+"

    # Aggregator to device.
    def receipt(self, device: str) -> str:
        return f"{self.base}/receipts/{check_name(device, 'device')}"

    # Retained, device with a Last Will.
    def device_status(self, device: str) -> str:
        return f"{self.base}/devices/{check_name(device, 'device')}/status"

    @property
    def device_status_filter(self) -> str:
        return f"{self.base}/devices/+/status"

    # Secure aggregation rounds (docs/protocol.md, "Secure aggregation rounds").
    @property
    def rounds_base(self) -> str:
        return f"{self.base}/rounds"

    def round(self, round_id: str) -> str:
        if round_id == CHECKIN:
            raise ValueError(f"round id {CHECKIN!r} is reserved for check-ins")
        return f"{self.rounds_base}/{check_name(round_id, 'round')}"

    def checkin(self, device: str) -> str:
        """Device to aggregator: ``rounds/checkin/{device}``."""
        return f"{self.rounds_base}/{CHECKIN}/{check_name(device, 'device')}"

    @property
    def checkin_filter(self) -> str:
        return f"{self.rounds_base}/{CHECKIN}/+"

    def round_broadcast(self, round_id: str, kind: str) -> str:
        """Aggregator to all: ``rounds/{round}/{kind}`` (config, unmask_request, status)."""
        return f"{self.round(round_id)}/{kind}"

    def round_broadcast_filter(self, kind: str) -> str:
        return f"{self.rounds_base}/+/{kind}"

    def round_stage(self, round_id: str, kind: str, device: str) -> str:
        """Device to aggregator: ``rounds/{round}/{kind}/{device}`` (advertise, share ...)."""
        return f"{self.round(round_id)}/{kind}/{check_name(device, 'device')}"

    def round_stage_filter(self, kind: str) -> str:
        return f"{self.rounds_base}/+/{kind}/+"

    def round_to(self, round_id: str, device: str) -> str:
        """Aggregator to one device: ``rounds/{round}/to/{device}``."""
        return f"{self.round(round_id)}/{TO}/{check_name(device, 'device')}"

    def round_to_filter(self, device: str) -> str:
        return f"{self.rounds_base}/+/{TO}/{check_name(device, 'device')}"

    def parse_round(self, topic: str) -> RoundTopic | None:
        """What a ``rounds/...`` topic is, or None if it is none of the round topics."""
        head = f"{self.rounds_base}/"
        if not topic.startswith(head):
            return None
        parts = topic[len(head) :].split("/")
        if not all(is_name(p) for p in parts):
            return None
        if len(parts) == 2 and parts[0] == CHECKIN:
            return RoundTopic("checkin", None, CHECKIN, parts[1])
        if parts[0] == CHECKIN:
            return None  # "checkin" is never a round id
        if len(parts) == 2:
            return RoundTopic("broadcast", parts[0], parts[1], None)
        if len(parts) == 3 and parts[1] == TO:
            return RoundTopic("to", parts[0], TO, parts[2])
        if len(parts) == 3:
            return RoundTopic("stage", parts[0], parts[1], parts[2])
        return None

    @property
    def all_filter(self) -> str:
        return f"{self.base}/#"

    def device_of(self, topic: str, kind: str) -> str | None:
        """The device name in ``{base}/{kind}/{device}[/...]``, or None if it does not match."""
        if kind == "updates":  # twice per update on the aggregator's hot path: memoised
            memo = self._update_devices
            try:
                return memo[topic]
            except KeyError:
                pass
            device = self._device_of(topic, kind)
            if len(memo) >= 65536:  # bounded: topics come from the network
                memo.clear()
            memo[topic] = device
            return device
        return self._device_of(topic, kind)

    def _device_of(self, topic: str, kind: str) -> str | None:
        head = f"{self.base}/{kind}/"
        if not topic.startswith(head):
            return None
        rest = topic[len(head) :].split("/")
        try:
            return check_name(rest[0], "device")
        except ValueError:
            return None

    def version_of_metrics(self, topic: str) -> int | None:
        head = f"{self.base}/versions/"
        if not (topic.startswith(head) and topic.endswith("/metrics")):
            return None
        middle = topic[len(head) : -len("/metrics")]
        return int(middle) if middle.isdigit() and len(middle) < 19 else None
