"""Cryptographic primitives of SecAgg+: key agreement, key derivation, share encryption, Shamir
sharing and the mask PRG, all from `cryptography`, with randomness passed in."""

from __future__ import annotations

import hmac
import math
import os
import struct
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from fededge.errors import SecAggError

RandomSource = Callable[[int], bytes]
"""A source of random bytes: ``rng(n)`` returns ``n`` bytes (``os.urandom`` in production)."""

KEY_BYTES = 32
SEED_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
# Shamir field: the Mersenne prime 2^521 - 1 holds a whole 32-byte secret in one element, so a
# share is one field element; splitting secrets over a smaller field would only add code.
PRIME = (1 << 521) - 1
FIELD_BYTES = 66
SHARE_BYTES = 2 + FIELD_BYTES
_DOMAIN = b"fededge-secagg-v1"


def system_random(n: int) -> bytes:
    """The production random source: the kernel CSPRNG."""
    return os.urandom(n)


def deterministic_random(seed: bytes) -> RandomSource:
    """A reproducible random source (AES-CTR keystream of ``seed``), for tests only."""
    key = _hkdf(seed, b"test-rng", 32)
    encryptor = Cipher(algorithms.AES(key[:16]), modes.CTR(key[16:])).encryptor()

    def draw(n: int) -> bytes:
        return encryptor.update(bytes(n))

    return draw


@dataclass(frozen=True)
class KeyPair:
    """An X25519 key pair as raw 32-byte strings."""

    private: bytes
    public: bytes


def generate_keypair(rng: RandomSource) -> KeyPair:
    """A fresh X25519 key pair drawn from ``rng``."""
    private = rng(KEY_BYTES)
    return KeyPair(private, public_key_of(private))


def public_key_of(private: bytes) -> bytes:
    """The X25519 public key of a raw 32-byte private key."""
    if len(private) != KEY_BYTES:
        raise SecAggError(f"private key must be {KEY_BYTES} bytes, got {len(private)}")
    return X25519PrivateKey.from_private_bytes(private).public_key().public_bytes_raw()


class KeyAgreement:
    """X25519 agreements of one private key with many peers (parses the private key once)."""

    def __init__(self, private: bytes) -> None:
        if len(private) != KEY_BYTES:
            raise SecAggError(f"private key must be {KEY_BYTES} bytes, got {len(private)}")
        self._key = X25519PrivateKey.from_private_bytes(private)

    @property
    def public(self) -> bytes:
        """The raw 32-byte public key of this agreement's private key."""
        return self._key.public_key().public_bytes_raw()

    def with_peer(self, peer_public: bytes) -> bytes:
        """The shared secret with ``peer_public``; rejects malformed and low-order points."""
        if len(peer_public) != KEY_BYTES:
            raise SecAggError(f"public key must be {KEY_BYTES} bytes, got {len(peer_public)}")
        try:
            return self._key.exchange(X25519PublicKey.from_public_bytes(peer_public))
        except ValueError as exc:  # cryptography refuses an all-zero (low-order) result
            raise SecAggError(f"key agreement failed: {exc}") from exc


def generate_agreement(rng: RandomSource) -> tuple[KeyPair, KeyAgreement]:
    """A fresh X25519 key pair (drawn as :func:`generate_keypair` draws it) and its agreement
    object: the private key is parsed (and its public key computed) once."""
    private = rng(KEY_BYTES)
    agreement = KeyAgreement(private)
    return KeyPair(private, agreement.public), agreement


def agree(private: bytes, peer_public: bytes) -> bytes:
    """The X25519 shared secret of ``private`` and ``peer_public``; rejects low-order points."""
    return KeyAgreement(private).with_peer(peer_public)


_NO_SALT = bytes(32)  # RFC 5869: no salt is HashLen zero bytes


def _hkdf(secret: bytes, info: bytes, length: int) -> bytes:
    """HKDF-SHA256 (RFC 5869) without salt, by one-shot HMACs (a few times cheaper per call than
    building cryptography's HKDF object; tests/test_secagg_crypto.py checks both agree)."""
    if not 0 < length <= 255 * 32:
        raise ValueError(f"HKDF-SHA256 cannot derive {length} bytes")
    prk = hmac.digest(_NO_SALT, secret, "sha256")
    block, out = b"", b""
    for i in range(1, -(-length // 32) + 1):
        block = hmac.digest(prk, block + info + bytes((i,)), "sha256")
        out += block
    return out[:length]


def _lp(field: bytes) -> bytes:
    return len(field).to_bytes(2, "big") + field


_DOMAIN_LP = _lp(_DOMAIN)


def _context(purpose: bytes, round_id: str, *parties: str) -> bytes:
    """An unambiguous HKDF info / AAD string: length-prefixed fields after a domain tag."""
    return _DOMAIN_LP + _lp(purpose) + b"".join(_lp(f.encode()) for f in (round_id, *parties))


def share_key(shared: bytes, round_id: str, sender: str, recipient: str) -> bytes:
    """The AES-256-GCM key for shares sent from ``sender`` to ``recipient`` in one round."""
    return _hkdf(shared, _context(b"share-enc", round_id, sender, recipient), KEY_BYTES)


def pair_seed(shared: bytes, round_id: str, a: str, b: str) -> bytes:
    """The pairwise mask seed of devices ``a`` and ``b`` (symmetric in a and b)."""
    lo, hi = sorted((a, b))
    return _hkdf(shared, _context(b"pair-mask", round_id, lo, hi), SEED_BYTES)


def encrypt_bundle(
    key: bytes, round_id: str, sender: str, recipient: str, plaintext: bytes, rng: RandomSource
) -> bytes:
    """``nonce || AES-GCM(plaintext)`` with (round, from, to) bound as associated data."""
    nonce = rng(NONCE_BYTES)
    aad = _context(b"share-aad", round_id, sender, recipient)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, aad)


def decrypt_bundle(
    key: bytes, round_id: str, sender: str, recipient: str, ciphertext: bytes
) -> bytes:
    """Inverse of :func:`encrypt_bundle`; a wrong key, context or any altered byte raises."""
    if len(ciphertext) < NONCE_BYTES + TAG_BYTES:
        raise SecAggError(f"ciphertext from {sender!r} too short ({len(ciphertext)} bytes)")
    aad = _context(b"share-aad", round_id, sender, recipient)
    try:
        return AESGCM(key).decrypt(ciphertext[:NONCE_BYTES], ciphertext[NONCE_BYTES:], aad)
    except InvalidTag as exc:
        raise SecAggError(
            f"ciphertext from {sender!r} to {recipient!r} fails authentication"
        ) from exc


def _random_field_element(rng: RandomSource) -> int:
    # Rejection sampling keeps coefficients exactly uniform (a reduction mod p would bias them).
    while True:
        value = int.from_bytes(rng(FIELD_BYTES), "big") & PRIME
        if value < PRIME:
            return value


def encode_share(x: int, y: int) -> bytes:
    """A share as 2 bytes of x then 66 bytes of y, big-endian."""
    return struct.pack(">H", x) + y.to_bytes(FIELD_BYTES, "big")


def decode_share(data: bytes) -> tuple[int, int]:
    """Inverse of :func:`encode_share`, with range checks."""
    if len(data) != SHARE_BYTES:
        raise SecAggError(f"a share must be {SHARE_BYTES} bytes, got {len(data)}")
    x = struct.unpack(">H", data[:2])[0]
    y = int.from_bytes(data[2:], "big")
    if x == 0 or y >= PRIME:
        raise SecAggError("share out of range")
    return x, y


def split_secret(
    secret: bytes, xs: Sequence[int], threshold: int, rng: RandomSource
) -> list[bytes]:
    """Shamir shares of a 32-byte ``secret`` at the points ``xs``; any ``threshold`` recover it."""
    if len(secret) != SEED_BYTES:
        raise SecAggError(f"secret must be {SEED_BYTES} bytes")
    if not 1 <= threshold <= len(xs):
        raise SecAggError(f"threshold {threshold} impossible with {len(xs)} shares")
    if len(set(xs)) != len(xs) or any(not 0 < x < 1 << 16 for x in xs):
        raise SecAggError("share points must be distinct and in 1..65535")
    coefficients = [int.from_bytes(secret, "big")]
    coefficients += [_random_field_element(rng) for _ in range(threshold - 1)]
    shares = []
    for x in xs:
        y = 0
        for c in reversed(coefficients):  # Horner
            y = (y * x + c) % PRIME
        shares.append(encode_share(x, y))
    return shares


def combine_shares(shares: Sequence[bytes]) -> bytes:
    """The 32-byte secret from shares (Lagrange interpolation at 0); at least threshold of them."""
    points = [decode_share(s) for s in shares]
    xs = [x for x, _ in points]
    if not points or len(set(xs)) != len(xs):
        raise SecAggError("need at least one share, with distinct points")
    # Lagrange at 0: secret = sum_i y_i * P / (x_i * prod_{j != i} (x_j - x_i)), P = prod x_j.
    # The products are of small integers, so exact; one modular inversion serves all terms
    # (batch inversion), since an inversion costs as much as dozens of multiplications.
    product = math.prod(xs)
    dens = [xi * math.prod(xj - xi for xj in xs if xj != xi) % PRIME for xi in xs]
    prefix = [1]
    for den in dens:
        prefix.append(prefix[-1] * den % PRIME)
    inverse = pow(prefix[-1], -1, PRIME)
    secret = 0
    for i in range(len(points) - 1, -1, -1):
        inv_den = inverse * prefix[i] % PRIME  # = 1 / dens[i]
        inverse = inverse * dens[i] % PRIME
        secret += points[i][1] * inv_den
    secret = secret * product % PRIME
    if secret >= 1 << (8 * SEED_BYTES):
        raise SecAggError("shares are inconsistent (reconstruction out of range)")
    return secret.to_bytes(SEED_BYTES, "big")


# keystream = AES-CTR of zeros; a small block stays in cache (a memoryview: slicing is free)
_ZEROS = memoryview(bytes(1 << 18))


class MaskPRG:
    """Expands 32-byte seeds into uint32 mask words with AES-128-CTR, reusing one buffer.

    Key = seed[:16], initial counter block = seed[16:]. The keystream is written straight into
    the preallocated buffer with ``update_into`` (cryptography's fast path; ``update`` on large
    buffers is several times slower), encrypting one cached block of zeros per chunk.
    Not thread-safe: one instance per thread.
    """

    def __init__(self, n_words: int) -> None:
        if n_words <= 0:
            raise ValueError(f"n_words must be positive, got {n_words}")
        self.n_words = n_words
        # update_into wants room for one extra block after each chunk; the tail is never read.
        self._buffer = np.zeros(n_words + 4, dtype=np.uint32)
        self._bytes = self._buffer.data.cast("B")

    def expand(self, seed: bytes) -> npt.NDArray[np.uint32]:
        """The mask of ``seed``: ``n_words`` uniform words, a view valid until the next call."""
        if len(seed) != SEED_BYTES:
            raise SecAggError(f"seed must be {SEED_BYTES} bytes, got {len(seed)}")
        encryptor = Cipher(algorithms.AES(seed[:16]), modes.CTR(seed[16:])).encryptor()
        n_bytes, chunk = 4 * self.n_words, len(_ZEROS)
        for offset in range(0, n_bytes, chunk):
            size = min(chunk, n_bytes - offset)
            encryptor.update_into(_ZEROS[:size] if size < chunk else _ZEROS, self._bytes[offset:])
        words = self._buffer[: self.n_words]
        if sys.byteorder == "big":  # the keystream is defined as little-endian words
            words.byteswap(inplace=True)
        return words


def expand_mask(seed: bytes, n_words: int) -> npt.NDArray[np.uint32]:
    """A fresh copy of the mask of ``seed`` (convenience; hot paths keep a :class:`MaskPRG`)."""
    return MaskPRG(n_words).expand(seed).copy()
