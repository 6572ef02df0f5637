"""Round protocol v2 and roster test vectors (docs/protocol.md), checked byte for byte.

Identity keys of the vectors: Ed25519 private key = SHA-256("vector-" + name) for the devices
``dev-a``... and the owner (``owner``); X25519 keys of ``dev-a``'s advertisement: bytes 0..31
(enc_key) and 32..63 (mask_key). Ed25519 signatures are deterministic.
"""

from __future__ import annotations

import hashlib

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fededge.keys import public_text
from fededge.protocol.roster import Roster, open_roster
from fededge.secagg import identity
from fededge.secagg.messages import (
    AdvertiseKeys,
    ConsistencyCheck,
    RoundConfig,
    SurvivorSet,
    UnmaskRequest,
    decode_json,
)

CONFIG = b'{"bits":32,"clip":1.0,"cohort":["dev-a","dev-b","dev-c","dev-d"],"max_weight":100.0,"neighbours":3,"round_id":"r42","scale":536870909.0,"threshold":3,"timeout_s":60.0,"type":"config","v":2,"vector_length":3}'
CONFIG_SHA256 = "078b0cd43cca53c3dc05c7ababa602e0f1e929ec90e084274f7ef3dd257bbb27"
ADVERTISE_DATA = "0011666564656467652d7365636167672d76320009616476657274697365078b0cd43cca53c3dc05c7ababa602e0f1e929ec90e084274f7ef3dd257bbb27000372343200056465762d61000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f202122232425262728292a2b2c2d2e2f303132333435363738393a3b3c3d3e3f"
ADVERTISE = b'{"device":"dev-a","enc_key":"AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=","mask_key":"ICEiIyQlJicoKSorLC0uLzAxMjM0NTY3ODk6Ozw9Pj8=","round_id":"r42","signature":"QpaiJJuEScDBJfnIh7GBWH46JeKs8rGGQEmh/HM6N4LRKmEmAK+EfAQ6mgM5SOEdrg4w371lEdPE1T7YPPHKBg==","type":"advertise","v":2}'
SURVIVORS = b'{"round_id":"r42","survivors":["dev-a","dev-b","dev-c"],"type":"survivors","v":2}'
CONSISTENCY_DATA = "0011666564656467652d7365636167672d7632000b636f6e73697374656e6379078b0cd43cca53c3dc05c7ababa602e0f1e929ec90e084274f7ef3dd257bbb2700037234320000000300056465762d6100056465762d6200056465762d63"
CONSISTENCY = b'{"device":"dev-a","round_id":"r42","signature":"Y798DMU8/KQUhbmHkdsxTqOQqbdoUAcKnqqlXeqVkzUYVhVbq7bk/5ql2pRKkxZZB1oikPm8qsEdIEqgCTykBQ==","type":"consistency","v":2}'
UNMASK_REQUEST = b'{"round_id":"r42","signatures":{"dev-a":"Y798DMU8/KQUhbmHkdsxTqOQqbdoUAcKnqqlXeqVkzUYVhVbq7bk/5ql2pRKkxZZB1oikPm8qsEdIEqgCTykBQ==","dev-b":"f9Wv35JPBAHCMHsO9rgvIF30QOZuVyPRyXkau5MR5xVpvdkH96DKHbmbdekUB9k101HMPqUIXdHRZz9tcUZlBw==","dev-c":"bS9PRIOAceX1EXzK1GId4yeFc1HjC+vKf8KIhSNoRFjebH0BpnmZDLUb2byXJ9yHL6N2P9bSBLJDzbGzSdYxDA=="},"survivors":["dev-a","dev-b","dev-c"],"type":"unmask_request","v":2}'
ROSTER = b'{"devices":{"dev-a":"ed25519:oh5fWyFzeZ2H0M0xkjFx09DUN1mPZMcG1iHZ3ekdt00=","dev-b":"ed25519:1tPGtpNC/5qkUW/avAV7+yPSMt8Mocoet7/U9t6iKdo=","dev-c":"ed25519:S8SJgLl+ZosN7ud3A2gp1sPDSzpeSxuT00BoV1LpyQ4=","dev-d":"ed25519:RGum/vgj6zmb01D1GciwzDIGnEIzShS6SUc6wyJov1E="},"kind":"roster","serial":3,"task":"digits","v":1}'
ROSTER_HEADER = "4645534701be36cfce2a6301f7cc8a12ee800514f7ceb638bd0e33b020aa38c473d1be5d674a114692a29a5af52ed78227e14e4a8265c038d1bd69112fa797f39c8dce82e335cd1e8506fc5d0f"


def key(name: str) -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(hashlib.sha256(b"vector-" + name.encode()).digest())


def test_round_v2_vectors() -> None:
    cfg = RoundConfig.from_json(CONFIG)
    assert cfg.to_json() == CONFIG
    assert identity.config_digest(cfg).hex() == CONFIG_SHA256
    enc, mask = bytes(range(32)), bytes(range(32, 64))
    data = identity.advertise_data(cfg, "dev-a", enc, mask)
    assert data.hex() == ADVERTISE_DATA
    adv = AdvertiseKeys("r42", "dev-a", enc, mask, identity.sign(key("dev-a"), data))
    assert adv.to_json() == ADVERTISE and decode_json(ADVERTISE) == adv
    assert identity.verify(key("dev-a").public_key(), adv.signature, data)
    survivors = ("dev-a", "dev-b", "dev-c")
    assert SurvivorSet("r42", survivors).to_json() == SURVIVORS
    cdata = identity.consistency_data(cfg, survivors)
    assert cdata.hex() == CONSISTENCY_DATA
    sigs = {d: identity.sign(key(d), cdata) for d in survivors}
    assert ConsistencyCheck("r42", "dev-a", sigs["dev-a"]).to_json() == CONSISTENCY
    assert UnmaskRequest("r42", survivors, sigs).to_json() == UNMASK_REQUEST
    roster = {d: key(d).public_key() for d in survivors}
    assert identity.valid_signers(roster, sigs, cdata, survivors) == set(survivors)


def test_roster_vector() -> None:
    devices = {d: public_text(key(d).public_key()) for d in ("dev-a", "dev-b", "dev-c", "dev-d")}
    roster = Roster("digits", 3, devices)
    assert roster.to_bytes() == ROSTER
    signed = roster.signed(key("owner"))
    assert signed[:77].hex() == ROSTER_HEADER and signed[77:] == ROSTER
    assert open_roster(signed, [key("owner").public_key()]) == roster
