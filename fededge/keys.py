"""Ed25519 key files: the model owner's, the aggregator's and each device's identity key.

Private keys are PKCS#8 PEM files, unencrypted, mode 0600 (refused when group- or
world-readable, like ssh does). Public keys are written as text, ``ed25519:<base64 of the raw
32 bytes>``, short enough for a TOML setting or a command line; settings accept that text or
the path of a file that holds it.
"""

from __future__ import annotations

import base64
import binascii
import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING

from fededge.errors import ConfigError
from fededge.protocol.signing import raw_public

if TYPE_CHECKING:  # imported where a key is made or read (see fededge/protocol/signing.py)
    from cryptography.hazmat.primitives.asymmetric.ed25519 import (
        Ed25519PrivateKey,
        Ed25519PublicKey,
    )

PUBLIC_PREFIX = "ed25519:"
MAX_KEY_FILE = 16 * 1024


def public_text(key: Ed25519PublicKey) -> str:
    """``ed25519:<base64>`` of a public key."""
    return PUBLIC_PREFIX + base64.b64encode(raw_public(key)).decode("ascii")


def parse_public(text: str, what: str = "public key") -> Ed25519PublicKey:
    """Parse ``ed25519:<base64>``; ConfigError naming ``what`` if it is not one."""
    t = text.strip()
    if not t.startswith(PUBLIC_PREFIX):
        raise ConfigError(f"{what}: expected {PUBLIC_PREFIX}<base64 of 32 bytes>, got {t[:80]!r}")
    try:
        raw = base64.b64decode(t[len(PUBLIC_PREFIX) :], validate=True)
    except (binascii.Error, ValueError):
        raise ConfigError(f"{what}: not valid base64: {t[:80]!r}") from None
    if len(raw) != 32:
        raise ConfigError(f"{what}: an Ed25519 public key has 32 bytes, got {len(raw)}")
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    return Ed25519PublicKey.from_public_bytes(raw)


def load_public(value: str, what: str = "public key") -> Ed25519PublicKey:
    """A public key given as text or as the path of a file holding the text."""
    if value.strip().startswith(PUBLIC_PREFIX):
        return parse_public(value, what)
    path = Path(value)
    try:
        data = path.read_bytes()[: MAX_KEY_FILE + 1]
    except OSError as e:
        raise ConfigError(f"{what}: cannot read {path}: {e.strerror}") from None
    if len(data) > MAX_KEY_FILE:
        raise ConfigError(f"{what}: {path} is too large for a public key")
    try:
        return parse_public(data.decode("ascii"), f"{what} ({path})")
    except UnicodeDecodeError:
        raise ConfigError(f"{what}: {path} is not a text public key") from None


def write_private(path: Path, key: Ed25519PrivateKey, *, overwrite: bool = False) -> None:
    """Write ``key`` as PEM with mode 0600, atomically; refuse to replace a key unless told."""
    if path.exists() and not overwrite:
        raise ConfigError(f"{path} exists: refusing to overwrite a key (remove it first)")
    from cryptography.hazmat.primitives.serialization import (
        Encoding,
        NoEncryption,
        PrivateFormat,
    )

    pem = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, pem)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def load_private(path: Path | str, what: str = "private key") -> Ed25519PrivateKey:
    """Load a PEM Ed25519 private key that only its owner can read."""
    p = Path(path)
    try:
        st = p.stat()
        data = p.read_bytes()[: MAX_KEY_FILE + 1]
    except OSError as e:
        raise ConfigError(f"{what}: cannot read {p}: {e.strerror}") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(
            f"{what}: {p} is readable by others (mode {stat.S_IMODE(st.st_mode):04o}); "
            f"run `chmod 600 {p}`"
        )
    if len(data) > MAX_KEY_FILE:
        raise ConfigError(f"{what}: {p} is too large for a key file")
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    try:
        key = load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{what}: {p} is not an unencrypted PEM private key: {e}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{what}: {p} holds a {type(key).__name__}, not an Ed25519 key")
    return key


def generate(path: Path, *, overwrite: bool = False) -> Ed25519PrivateKey:
    """Make a new key at ``path`` (0600) and return it."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    write_private(path, key, overwrite=overwrite)
    return key


def load_or_create(path: Path) -> Ed25519PrivateKey:
    """A device's identity key: made on first start, loaded afterwards."""
    if not path.exists():
        return generate(path)
    return load_private(path, "device identity key")
