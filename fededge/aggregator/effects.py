"""What the aggregator core asks its driver to do: the effects of handling one event.

The core (fededge/aggregator/core.py) never touches the network or a clock; it returns these,
in the order they must happen, and the driver (fededge/aggregator/service.py) carries them out.
"""

from __future__ import annotations

from dataclasses import dataclass

from fededge.protocol import ModelVersion


@dataclass(frozen=True)
class Incoming:
    """A message as the core sees it: topic, payload and the driver's handle to acknowledge.

    ``prepared``: what ``codec.prepare_update(payload)`` gave for this very payload, if the
    driver ran it ahead (on the network thread, while the payload was in the cache); the core
    uses it instead of parsing and measuring the update again, and decides as without it.
    """

    topic: str
    payload: bytes
    handle: object = None
    qos: int = 1
    prepared: object = None


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


# A frozen dataclass's __init__ sets each field through object.__setattr__; the aggregator
# builds a receipt and an acknowledgement per update, so these fill __dict__ at once (the same
# objects: equal, hashable and immutable as the constructors' own).
_new = object.__new__


def incoming(
    topic: str, payload: bytes, handle: object, qos: int, prepared: object = None
) -> Incoming:
    """``Incoming(topic, payload, handle, qos, prepared)``, built faster."""
    m = _new(Incoming)
    m.__dict__.update(topic=topic, payload=payload, handle=handle, qos=qos, prepared=prepared)
    return m


def publish(topic: str, payload: bytes) -> Publish:
    """``Publish(topic, payload)``, built faster (QoS 1, not retained)."""
    p = _new(Publish)
    p.__dict__.update(topic=topic, payload=payload, qos=1, retain=False)
    return p


def ack(handle: object) -> Ack:
    """``Ack(handle)``, built faster."""
    a = _new(Ack)
    a.__dict__["handle"] = handle
    return a
