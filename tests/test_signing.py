"""Signed envelopes (docs/protocol.md, "Signed messages") and key files."""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given
from hypothesis import strategies as st

from fededge import keys
from fededge.errors import ConfigError, SignatureError
from fededge.protocol.signing import HEADER_BYTES, key_id, open_message, sign

DOC = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"
SEED = bytes(range(32))


def vector(name: str) -> str:
    m = re.search(rf"```vector {re.escape(name)}\n(.*?)```", DOC.read_text(), re.S)
    assert m is not None, name
    return m.group(1).strip()


def test_signed_receipt_vector() -> None:
    k = Ed25519PrivateKey.from_private_bytes(SEED)
    receipt = vector("receipt").encode()
    env = sign(receipt, "receipt", k)
    assert env == bytes.fromhex("".join(vector("signed-receipt").split()))
    assert (
        keys.public_text(k.public_key()) == "ed25519:A6EHv/POEL4dcN0Y50vAmWfk1jCbpQ1fHdyGZBJVMbg="
    )
    assert key_id(k.public_key()).hex() == "56475aa75463474c"
    opened = open_message(env, "receipt", [k.public_key()])
    assert opened.payload == receipt and opened.signer is not None


OWNER = Ed25519PrivateKey.generate()
OTHER = Ed25519PrivateKey.generate()


def test_unsigned_is_refused_with_trust_keys_and_passes_without() -> None:
    with pytest.raises(SignatureError) as e:
        open_message(b'{"v":1}', "plan", [OWNER.public_key()])
    assert e.value.reason == "unsigned"
    assert open_message(b'{"v":1}', "plan", None).payload == b'{"v":1}'


def test_wrong_key_wrong_kind_and_tampering_are_refused() -> None:
    env = sign(b"payload", "plan", OWNER)
    with pytest.raises(SignatureError) as e:
        open_message(env, "plan", [OTHER.public_key()])
    assert e.value.reason == "unknown_key"
    with pytest.raises(SignatureError) as e:
        open_message(env, "model", [OWNER.public_key()])  # signed as a plan, read as a model
    assert e.value.reason == "bad_signature"
    flipped = env[:-1] + bytes([env[-1] ^ 1])
    with pytest.raises(SignatureError) as e:
        open_message(flipped, "plan", [OWNER.public_key()])
    assert e.value.reason == "bad_signature"
    with pytest.raises(SignatureError) as e:
        open_message(env[: HEADER_BYTES - 1], "plan", [OWNER.public_key()])
    assert e.value.reason == "malformed"
    v9 = env[:4] + b"\x09" + env[5:]
    with pytest.raises(SignatureError) as e:
        open_message(v9, "plan", [OWNER.public_key()])
    assert e.value.reason == "unsupported_version"


def test_several_trusted_keys_rotation() -> None:
    env = sign(b"x", "model", OTHER)
    opened = open_message(env, "model", [OWNER.public_key(), OTHER.public_key()])
    assert opened.signer is not None and key_id(opened.signer) == key_id(OTHER.public_key())


@given(st.binary(max_size=300))
def test_random_bytes_never_verify(data: bytes) -> None:
    try:
        open_message(data, "plan", [OWNER.public_key()])
    except SignatureError:
        return
    pytest.fail("random bytes verified")


def test_key_files(tmp_path: Path) -> None:
    path = tmp_path / "owner.key"
    k = keys.generate(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert keys.public_text(keys.load_private(path).public_key()) == keys.public_text(
        k.public_key()
    )
    with pytest.raises(ConfigError, match="exists"):
        keys.generate(path)
    os.chmod(path, 0o644)
    with pytest.raises(ConfigError, match="readable by others"):
        keys.load_private(path)
    pub = tmp_path / "owner.pub"
    pub.write_text(keys.public_text(k.public_key()) + "\n")
    assert key_id(keys.load_public(str(pub))) == key_id(k.public_key())
    with pytest.raises(ConfigError, match="32 bytes"):
        keys.parse_public("ed25519:AAAA")
    with pytest.raises(ConfigError, match="expected ed25519"):
        keys.parse_public("ssh-ed25519 AAAA")
    garbage = tmp_path / "garbage.key"
    garbage.write_bytes(b"not a key")
    os.chmod(garbage, 0o600)
    with pytest.raises(ConfigError, match="not an unencrypted PEM"):
        keys.load_private(garbage)


def test_load_or_create_is_stable(tmp_path: Path) -> None:
    a = keys.load_or_create(tmp_path / "identity.key")
    b = keys.load_or_create(tmp_path / "identity.key")
    assert key_id(a.public_key()) == key_id(b.public_key())
