"""What the aggregator core asks its driver to do: the effects of handling one event.

The core (fededge/aggregator/core.py) never touches the network or a clock; it returns these,
in the order they must happen, and the driver (fededge/aggregator/service.py) carries them out.
"""

from __future__ import annotations

from dataclasses import dataclass

from fededge.protocol import ModelVersion


@dataclass(frozen=True)
class Incoming:
    """A message as the core sees it: topic, payload and the driver's handle to acknowledge."""

    topic: str
    payload: bytes
    handle: object = None
    qos: int = 1


@dataclass(frozen=True)
class Publish:
    """Publish ``payload`` on ``topic``."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = False


@dataclass(frozen=True)
class Ack:
    """Acknowledge the MQTT message behind ``handle`` (after its receipt, never before)."""

    handle: object


@dataclass(frozen=True)
class NewVersion:
    """A version is durable and announced: run the ``on_new_version`` callbacks."""

    model: ModelVersion
    old: int
    new: int


Effect = Publish | Ack | NewVersion
