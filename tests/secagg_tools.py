"""Enrolling test devices in a signed roster (secure-aggregation round protocol v2)."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fededge import keys
from fededge.device.secagg_client import IDENTITY_FILE
from fededge.mqtt import MqttClient
from fededge.protocol.roster import Roster
from fededge.protocol.topics import Topics
from fededge.settings import BrokerSettings


def identity_path(state_dir: Path, device: str, task: str) -> Path:
    """Where a device keeps its identity key (the Client's state directory)."""
    return state_dir / "device" / device / task / IDENTITY_FILE


def make_identities(state_dir: Path, task: str, devices: Iterable[str]) -> dict[str, str]:
    """Create (or load) the devices' identity keys; device -> ``ed25519:...`` public text."""
    out = {}
    for d in devices:
        path = identity_path(state_dir, d, task)
        path.parent.mkdir(parents=True, exist_ok=True)
        out[d] = keys.public_text(keys.load_or_create(path).public_key())
    return out


def publish_roster(
    broker: BrokerSettings, task: str, roster: Roster, owner: Ed25519PrivateKey
) -> None:
    """Publish ``roster`` signed by ``owner``, retained, and wait for the broker."""
    client = MqttClient(broker, f"roster-{uuid.uuid4().hex[:8]}", persistent=False)
    with client:
        topic = Topics("fededge", task).roster
        client.publish(topic, roster.signed(owner), retain=True, wait=True, timeout=30)


def enroll(
    broker: BrokerSettings,
    state_dir: Path,
    task: str,
    devices: Iterable[str],
    owner: Ed25519PrivateKey | None = None,
    serial: int = 1,
    extra: Mapping[str, str] | None = None,
) -> Ed25519PrivateKey:
    """Make the devices' identity keys and publish a roster of them (plus ``extra`` device ->
    public key text); returns the owner key."""
    owner = owner or Ed25519PrivateKey.generate()
    enrolled = {**make_identities(state_dir, task, devices), **(extra or {})}
    publish_roster(broker, task, Roster(task, serial, enrolled), owner)
    return owner
