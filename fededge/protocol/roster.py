"""The roster: the model owner's signed list of enrolled devices and their identity keys.

Published retained on ``{prefix}/{task}/roster`` inside the signed envelope
(fededge/protocol/signing.py, kind ``roster``). Its payload is one JSON object, written with
sorted keys and no spaces (so equal rosters are equal bytes)::

    {"devices":{"pi-1":"ed25519:<base64>",...},"kind":"roster","serial":3,"task":"digits","v":1}

``serial`` grows with every change; a device keeps the highest serial it has seen and refuses a
lower one (a replayed old roster could re-enroll a removed device) or a different roster with
the same serial. Devices accept a secure-aggregation neighbour only if its round advertisement
verifies with the key listed here (docs/protocol.md, secure aggregation v2).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fededge.errors import ConfigError, ProtocolError
from fededge.keys import load_public, parse_public
from fededge.protocol.signing import SignedKind, open_message, sign
from fededge.protocol.vocab import NAME_PATTERN, is_name

if TYPE_CHECKING:  # cryptography is imported where a key is used
    from cryptography.hazmat.primitives.asymmetric.ed25519 import (
        Ed25519PrivateKey,
        Ed25519PublicKey,
    )

ROSTER_VERSION = 1
MAX_ROSTER_BYTES = 4 << 20
MAX_DEVICES = 20_000
MAX_SERIAL = (1 << 53) - 1  # exact in every JSON reader


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise ProtocolError("roster: duplicate field in JSON object")
    return result


@dataclass(frozen=True)
class Roster:
    """Enrolled devices of one task: device id -> ``ed25519:<base64>`` public key text."""

    task: str
    serial: int
    devices: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not is_name(self.task):
            raise ProtocolError(f"roster: field 'task' must match {NAME_PATTERN}")
        s = self.serial
        if not isinstance(s, int) or isinstance(s, bool) or not 0 <= s <= MAX_SERIAL:
            raise ProtocolError(f"roster: field 'serial' must be an integer in 0..{MAX_SERIAL}")
        if not isinstance(self.devices, Mapping) or len(self.devices) > MAX_DEVICES:
            raise ProtocolError(f"roster: field 'devices' must map at most {MAX_DEVICES} ids")
        for name, key in self.devices.items():
            if not is_name(name):
                raise ProtocolError(f"roster: device id {name!r} must match {NAME_PATTERN}")
            if not isinstance(key, str):
                raise ProtocolError(f"roster: key of {name!r} must be ed25519:<base64> text")
            try:
                parse_public(key, f"roster key of {name!r}")
            except ConfigError as e:
                raise ProtocolError(str(e)) from None
        if len(set(self.devices.values())) != len(self.devices):
            # One device could then sign as the other (and answer for it in rounds).
            raise ProtocolError("roster: two devices are enrolled with the same identity key")
        object.__setattr__(self, "devices", dict(sorted(self.devices.items())))

    def to_bytes(self) -> bytes:
        """The canonical JSON payload (sorted keys, compact, ASCII)."""
        body = {"v": ROSTER_VERSION, "kind": "roster", "task": self.task, "serial": self.serial,
                "devices": dict(self.devices)}  # fmt: skip
        return json.dumps(body, sort_keys=True, separators=(",", ":")).encode("ascii")

    @classmethod
    def from_bytes(cls, data: bytes) -> Roster:
        """Strictly decode a payload; ProtocolError naming the problem."""
        if len(data) > MAX_ROSTER_BYTES:
            raise ProtocolError(f"roster of {len(data)} bytes exceeds {MAX_ROSTER_BYTES}")
        try:
            obj = json.loads(data, object_pairs_hook=_no_duplicates)
        except (ValueError, RecursionError) as e:
            raise ProtocolError(f"roster: not valid JSON: {e}") from None
        if not isinstance(obj, dict):
            raise ProtocolError("roster: expected a JSON object")
        if set(obj) != {"v", "kind", "task", "serial", "devices"}:
            raise ProtocolError(
                f"roster: fields must be v, kind, task, serial, devices: {sorted(obj)}"
            )
        if obj["v"] != ROSTER_VERSION or isinstance(obj["v"], bool) or obj["kind"] != "roster":
            raise ProtocolError(f"roster: unsupported version/kind {obj['v']!r}/{obj['kind']!r}")
        if not isinstance(obj["devices"], dict):
            raise ProtocolError("roster: field 'devices' must be an object")
        return cls(obj["task"], obj["serial"], obj["devices"])

    def signed(self, key: Ed25519PrivateKey) -> bytes:
        """The retained message: the payload in a signed envelope of kind ``roster``."""
        return sign(self.to_bytes(), SignedKind.ROSTER, key)

    def public_keys(self) -> dict[str, Ed25519PublicKey]:
        """Device id -> parsed identity public key."""
        return {n: parse_public(k) for n, k in self.devices.items()}

    def with_device(self, name: str, key: str) -> Roster:
        """A copy with ``name`` enrolled under ``key`` and the serial bumped."""
        return Roster(self.task, self.serial + 1, {**self.devices, name: key})

    def without_device(self, name: str) -> Roster:
        """A copy without ``name`` and the serial bumped."""
        return Roster(self.task, self.serial + 1,
                      {n: k for n, k in self.devices.items() if n != name})  # fmt: skip


def open_roster(data: bytes, trusted: list[Ed25519PublicKey] | None) -> Roster:
    """Verify (with the owner's keys, if any) and decode a retained roster message.

    SignatureError if the owner's signature is missing or wrong while keys are trusted;
    ProtocolError if the payload is malformed.
    """
    return Roster.from_bytes(open_message(data, SignedKind.ROSTER, trusted).payload)


def trusted_keys(value: str | None, what: str = "trust.owner_key") -> list[Ed25519PublicKey]:
    """The public keys of a trust setting (text or file path, comma-separated for rotation)."""
    if not value:
        return []
    return [load_public(part.strip(), what) for part in value.split(",") if part.strip()]
