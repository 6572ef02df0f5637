"""What the device core asks its driver to do: the effects of an event (see fededge/device/core.py).

The core decides, the driver (fededge/device/client.py) does: it publishes, writes state files,
notifies ``on_new_version`` callbacks and wakes the trainer. Database writes are not effects: the
core makes them itself, inside the transactions that make its decisions durable (see core.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from fededge.protocol import ModelVersion


@dataclass(frozen=True)
class Publish:
    """Publish ``payload`` on ``topic``."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = False


@dataclass(frozen=True)
class Persist:
    """Write the state file ``name`` (in the device's state directory) atomically, with fsync."""

    name: str
    data: bytes


@dataclass(frozen=True)
class Adopted:
    """A model version became current: notify waiters and ``on_new_version`` callbacks."""

    model: ModelVersion
    old_version: int | None


@dataclass(frozen=True)
class WakeTrainer:
    """Something may have become trainable: run the training decision again."""


Effect = Publish | Persist | Adopted | WakeTrainer
