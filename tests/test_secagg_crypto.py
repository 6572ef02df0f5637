"""SecAgg+ primitives: key agreement, derivation, share encryption, Shamir sharing, mask PRG."""

from __future__ import annotations

import contextlib
import itertools
import struct

import numpy as np
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fededge.errors import SecAggError
from fededge.secagg import crypto


@pytest.fixture
def rng() -> crypto.RandomSource:
    return crypto.deterministic_random(b"crypto tests")


def test_key_agreement_is_symmetric_and_keys_are_bound(rng: crypto.RandomSource) -> None:
    a, b, c = (crypto.generate_keypair(rng) for _ in range(3))
    ab = crypto.agree(a.private, b.public)
    assert ab == crypto.agree(b.private, a.public) != crypto.agree(a.private, c.public)
    # Direction, round and parties all change the share key; the pair seed is symmetric.
    k = crypto.share_key(ab, "r1", "a", "b")
    assert k != crypto.share_key(ab, "r1", "b", "a")
    assert k != crypto.share_key(ab, "r2", "a", "b")
    assert len(k) == 32
    assert crypto.pair_seed(ab, "r1", "a", "b") == crypto.pair_seed(ab, "r1", "b", "a")
    assert crypto.pair_seed(ab, "r1", "a", "b") != crypto.pair_seed(ab, "r2", "a", "b")
    # Length-prefixed contexts: ("ab", "c") and ("a", "bc") must not collide.
    assert crypto.share_key(ab, "r", "ab", "c") != crypto.share_key(ab, "r", "a", "bc")


def test_hkdf_and_contexts_match_the_reference_construction() -> None:
    """The HMAC-based HKDF is cryptography's HKDF-SHA256 (no salt); contexts are the
    length-prefixed fields of docs/protocol.md, as struct-packed."""
    for secret, info, length in itertools.product(
        (b"", bytes(32), bytes(range(32)) * 3), (b"", b"info", bytes(300)), (1, 16, 32, 33, 64, 100)
    ):
        ref = HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=info).derive(secret)
        assert crypto._hkdf(secret, info, length) == ref
    fields = [b"fededge-secagg-v1", b"share-aad", b"r1", b"dev-a", "é".encode()]
    packed = b"".join(struct.pack(">H", len(f)) + f for f in fields)
    assert crypto._context(b"share-aad", "r1", "dev-a", "é") == packed


def test_agree_rejects_bad_public_keys(rng: crypto.RandomSource) -> None:
    a = crypto.generate_keypair(rng)
    with pytest.raises(SecAggError, match="32 bytes"):
        crypto.agree(a.private, b"short")
    with pytest.raises(SecAggError, match="key agreement"):
        crypto.agree(a.private, bytes(32))  # a low-order point gives the all-zero secret


def test_bundle_encryption_binds_round_and_parties(rng: crypto.RandomSource) -> None:
    key = rng(32)
    ct = crypto.encrypt_bundle(key, "r1", "a", "b", b"secret shares", rng)
    assert crypto.decrypt_bundle(key, "r1", "a", "b", ct) == b"secret shares"
    for args in [("r2", "a", "b"), ("r1", "b", "a"), ("r1", "a", "c")]:
        with pytest.raises(SecAggError, match="authentication"):
            crypto.decrypt_bundle(key, *args, ct)
    flipped = bytearray(ct)
    flipped[20] ^= 1
    with pytest.raises(SecAggError, match="authentication"):
        crypto.decrypt_bundle(key, "r1", "a", "b", bytes(flipped))
    with pytest.raises(SecAggError, match="too short"):
        crypto.decrypt_bundle(key, "r1", "a", "b", ct[:20])


def test_shamir_any_threshold_subset_recovers(rng: crypto.RandomSource) -> None:
    secret = rng(32)
    xs = [3, 5, 8, 9, 12, 40]
    shares = crypto.split_secret(secret, xs, 3, rng)
    assert all(len(s) == crypto.SHARE_BYTES for s in shares)
    for subset in itertools.combinations(shares, 3):
        assert crypto.combine_shares(subset) == secret
    assert crypto.combine_shares(shares) == secret  # more than t points: same polynomial
    for pair in itertools.combinations(shares, 2):  # t - 1 shares say nothing useful
        with contextlib.suppress(SecAggError):  # out of range: also not the secret
            assert crypto.combine_shares(pair) != secret


def test_shamir_rejects_bad_input(rng: crypto.RandomSource) -> None:
    with pytest.raises(SecAggError):
        crypto.split_secret(b"short", [1, 2], 2, rng)
    with pytest.raises(SecAggError):
        crypto.split_secret(bytes(32), [1, 2], 3, rng)
    with pytest.raises(SecAggError):
        crypto.split_secret(bytes(32), [1, 1], 2, rng)
    shares = crypto.split_secret(bytes(32), [1, 2], 2, rng)
    with pytest.raises(SecAggError, match="distinct"):
        crypto.combine_shares([shares[0], shares[0]])
    with pytest.raises(SecAggError):
        crypto.decode_share(b"\x00\x00" + bytes(66))  # x = 0 is the secret itself
    with pytest.raises(SecAggError):
        crypto.decode_share(b"\x00\x01" + b"\xff" * 66)  # y >= p


def test_mask_prg_is_aes_ctr_little_endian_words() -> None:
    seed = bytes(range(32))
    words = crypto.expand_mask(seed, 1001)
    stream = Cipher(algorithms.AES(seed[:16]), modes.CTR(seed[16:])).encryptor().update(bytes(4004))
    np.testing.assert_array_equal(words, np.frombuffer(stream, dtype="<u4"))
    prg = crypto.MaskPRG(1001)
    np.testing.assert_array_equal(prg.expand(seed), words)  # reusing the buffer gives the same
    np.testing.assert_array_equal(prg.expand(seed), words)
    assert not np.array_equal(prg.expand(bytes(32)), words)
    with pytest.raises(SecAggError):
        prg.expand(b"short")
    with pytest.raises(ValueError):
        crypto.MaskPRG(0)


def test_deterministic_random_is_reproducible() -> None:
    a, b = crypto.deterministic_random(b"x"), crypto.deterministic_random(b"x")
    assert a(10) + a(7) == b(17)
    assert crypto.deterministic_random(b"y")(17) != crypto.deterministic_random(b"x")(17)
    assert len(crypto.system_random(5)) == 5
