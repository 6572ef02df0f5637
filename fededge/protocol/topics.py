"""MQTT topic names of protocol v1: one place builds and parses them."""

from __future__ import annotations

from dataclasses import dataclass

from fededge.settings import check_name


@dataclass(frozen=True)
class Topics:
    """The topics of one task under one prefix (``{prefix}/{task}/...``)."""

    prefix: str
    task: str

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
    def aggregator_status(self) -> str:
        return f"{self.base}/aggregator/status"

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

    # Secure aggregation rounds.
    def round(self, round_id: str) -> str:
        return f"{self.base}/rounds/{round_id}"

    @property
    def all_filter(self) -> str:
        return f"{self.base}/#"

    def device_of(self, topic: str, kind: str) -> str | None:
        """The device name in ``{base}/{kind}/{device}[/...]``, or None if it does not match."""
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
