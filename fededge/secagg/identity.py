"""Identity signatures of round protocol v2: signed advertisements and the consistency check.

Each device signs with its long-term Ed25519 identity key (fededge/keys.py), whose public half
the model owner lists in the signed roster (fededge/protocol/roster.py). The signed bytes are
length-prefixed fields (2-byte big-endian lengths) after a domain tag, and both kinds bind the
SHA-256 of the round's exact ``config`` bytes, so a signature is valid for one round, one
cohort and one set of parameters only (a replay into another round, or a config shown to some
devices and not others, fails verification):

    advertise:    "fededge-secagg-v2" | "advertise" | SHA-256(config) | round | device
                  | enc_key (32 bytes) | mask_key (32 bytes)
    consistency:  "fededge-secagg-v2" | "consistency" | SHA-256(config) | round
                  | number of survivors (4 bytes, big-endian) | survivor ids (sorted)

Pure functions: keys come in as objects.
"""

from __future__ import annotations

import functools
import hashlib
import struct
from collections.abc import Mapping, Sequence

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fededge.secagg.messages import RoundConfig

DOMAIN = b"fededge-secagg-v2"
Roster = Mapping[str, Ed25519PublicKey]
"""Device id -> identity public key, as the model owner enrolled them."""


def _lp(data: bytes) -> bytes:
    return struct.pack(">H", len(data)) + data


@functools.lru_cache(maxsize=16)  # a round's config is hashed for every signature
def config_digest(config: RoundConfig) -> bytes:
    """SHA-256 of the config's canonical JSON bytes (what the aggregator published)."""
    return hashlib.sha256(config.to_json()).digest()


@functools.lru_cache(maxsize=16)  # the same for every advertisement of a round
def _head(config: RoundConfig, kind: bytes) -> bytes:
    return _lp(DOMAIN) + _lp(kind) + config_digest(config) + _lp(config.round_id.encode())


def advertise_data(config: RoundConfig, device: str, enc_key: bytes, mask_key: bytes) -> bytes:
    """The bytes a device signs when it advertises its two public keys."""
    return _head(config, b"advertise") + _lp(device.encode()) + enc_key + mask_key


def consistency_data(config: RoundConfig, survivors: Sequence[str]) -> bytes:
    """The bytes a survivor signs for the survivor set (sorted ids)."""
    members = sorted(survivors)
    body = struct.pack(">I", len(members)) + b"".join(_lp(m.encode()) for m in members)
    return _head(config, b"consistency") + body


def sign(key: Ed25519PrivateKey, data: bytes) -> bytes:
    """An Ed25519 signature (64 bytes)."""
    return key.sign(data)


def verify(key: Ed25519PublicKey | None, signature: bytes, data: bytes) -> bool:
    """Whether ``signature`` is ``key``'s over ``data`` (False for no key)."""
    if key is None:
        return False
    try:
        key.verify(signature, data)
    except InvalidSignature:
        return False
    return True


def valid_signers(
    roster: Roster,
    signatures: Mapping[str, bytes],
    data: bytes,
    allowed: Sequence[str],
    need: int | None = None,
) -> set[str]:
    """The devices of ``allowed`` whose signature in ``signatures`` verifies over ``data``.

    With ``need``, stops as soon as that many verified (a device needs t, not all n).
    """
    ok, found = set(allowed), set[str]()
    if need is not None and need <= 0:
        return found
    for d in sorted(signatures):
        if d in ok and verify(roster.get(d), signatures[d], data):
            found.add(d)
            if need is not None and len(found) >= need:
                break
    return found
