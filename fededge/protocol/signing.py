"""Signed messages (protocol v2 envelope): Ed25519 over the exact bytes of a v1 message.

A signed message is a 77-byte header followed by the unchanged v1 payload::

    "FESG" | 0x01 | key id (8 bytes) | Ed25519 signature (64 bytes) | v1 payload

The key id is the first 8 bytes of SHA-256 of the raw 32-byte public key (it names the key, it
proves nothing). The signature covers ``b"fededge-signed-v1\\x00" + kind + b"\\x00" + payload``,
where ``kind`` is the message's role (``plan``, ``graph``, ``model``, ``receipt``, ...), so a
signature made for one role can never be replayed as another. No I/O here: keys come in as
objects (see fededge/keys.py for key files).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING

from fededge.errors import SignatureError

if TYPE_CHECKING:  # cryptography is imported when a key is used: a device without trust keys
    # in FedAvg mode never loads it (docs/benchmarks.md, device memory)
    from cryptography.hazmat.primitives.asymmetric.ed25519 import (
        Ed25519PrivateKey,
        Ed25519PublicKey,
    )

MAGIC = b"FESG"
ENVELOPE_VERSION = 1
KEY_ID_BYTES = 8
SIGNATURE_BYTES = 64
HEADER_BYTES = len(MAGIC) + 1 + KEY_ID_BYTES + SIGNATURE_BYTES
CONTEXT = b"fededge-signed-v1\x00"


class SignedKind(StrEnum):
    """The roles a signature can be made for (domain separation)."""

    PLAN = "plan"
    GRAPH = "graph"
    MODEL = "model"
    RECEIPT = "receipt"
    ROSTER = "roster"


def raw_public(key: Ed25519PublicKey) -> bytes:
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    return key.public_bytes(Encoding.Raw, PublicFormat.Raw)


def key_id(key: Ed25519PublicKey) -> bytes:
    """The 8-byte id of a public key: the first bytes of SHA-256 of its raw form."""
    return hashlib.sha256(raw_public(key)).digest()[:KEY_ID_BYTES]


def signed_data(kind: str, payload: bytes) -> bytes:
    """The exact bytes a signature covers."""
    return CONTEXT + kind.encode("ascii") + b"\x00" + payload


def sign(payload: bytes, kind: str, key: Ed25519PrivateKey) -> bytes:
    """Wrap ``payload`` (a complete v1 message) in a signed envelope for ``kind``."""
    sig = key.sign(signed_data(kind, payload))
    kid = key_id(key.public_key())
    return MAGIC + bytes([ENVELOPE_VERSION]) + kid + sig + payload


def is_signed(payload: bytes) -> bool:
    """Whether ``payload`` starts like a signed envelope (v1 messages never do)."""
    return payload[: len(MAGIC)] == MAGIC


@dataclass(frozen=True)
class Opened:
    """A message taken out of its envelope.

    ``signer`` is the trusted key that verified it, or None for an unsigned message (or a
    signed one read without trusted keys: then nothing was verified).
    """

    payload: bytes
    signer: Ed25519PublicKey | None
    key_id: bytes | None


def open_message(data: bytes, kind: str, trusted: Iterable[Ed25519PublicKey] | None) -> Opened:
    """Verify and unwrap ``data``.

    With ``trusted`` keys (non-empty), an unsigned message, a signature by another key or a
    wrong signature raises :class:`SignatureError` (reason ``unsigned``, ``unknown_key`` or
    ``bad_signature``). Without trusted keys, a signed message is unwrapped unverified and an
    unsigned one passes as it is (the caller trusts the broker and should say so).
    """
    keys = list(trusted or [])
    if not is_signed(data):
        if keys:
            raise SignatureError(f"unsigned {kind} message", reason="unsigned")
        return Opened(data, None, None)
    if len(data) < HEADER_BYTES:
        raise SignatureError(f"signed {kind} envelope truncated ({len(data)} bytes)",
                             reason="malformed")  # fmt: skip
    if data[len(MAGIC)] != ENVELOPE_VERSION:
        raise SignatureError(
            f"signed {kind} envelope version {data[len(MAGIC)]} is not {ENVELOPE_VERSION}",
            reason="unsupported_version",
        )
    kid = data[len(MAGIC) + 1 : len(MAGIC) + 1 + KEY_ID_BYTES]
    sig = data[len(MAGIC) + 1 + KEY_ID_BYTES : HEADER_BYTES]
    payload = data[HEADER_BYTES:]
    if not keys:
        return Opened(payload, None, kid)
    candidates = [k for k in keys if key_id(k) == kid]
    if not candidates:
        raise SignatureError(
            f"{kind} message signed by key id {kid.hex()}, which is not trusted",
            reason="unknown_key",
        )
    from cryptography.exceptions import InvalidSignature

    for k in candidates:
        try:
            k.verify(sig, signed_data(kind, payload))
        except InvalidSignature:
            continue
        return Opened(payload, k, kid)
    raise SignatureError(f"{kind} message has a wrong signature (key id {kid.hex()})",
                         reason="bad_signature")  # fmt: skip
