"""SecAgg+ round messages: frozen dataclasses with strict JSON (and safetensors) encodings.

Every control message is a JSON object with ``"v": 2`` and a ``"type"``; bytes travel as standard
base64 (version 2 added identity signatures and the consistency check, docs/protocol.md). Decoding is strict: unknown, missing or duplicated fields, wrong types, out-of-range values
and wrong byte lengths raise ProtocolError naming the field. A masked input travels as safetensors
(one little-endian ``U32`` tensor ``"y"``; ``__metadata__`` with ``fededge``, ``kind``,
``round_id``, ``device``) through the project's codec in fededge.protocol.tensors.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, ClassVar, TypeAlias

import numpy as np
import numpy.typing as npt

from fededge.errors import ProtocolError
from fededge.protocol.tensors import decode_tensors, encode_tensors
from fededge.protocol.topics import ROUND_ADDRESSED, ROUND_BROADCASTS
from fededge.protocol.vocab import NAME_PATTERN, is_name
from fededge.secagg.crypto import KEY_BYTES, NONCE_BYTES, SHARE_BYTES, TAG_BYTES

SIGNATURE_BYTES = 64  # Ed25519

PROTOCOL_VERSION = 2
TO_SERVER = "@server"
TO_ALL = "@all"
MAX_JSON_BYTES = 4 << 20
MAX_COHORT = 10_000
MAX_VECTOR_LENGTH = 1 << 28
BUNDLE_BYTES = 2 * SHARE_BYTES  # plaintext of one share bundle: mask-key share, self-mask share
CIPHERTEXT_BYTES = NONCE_BYTES + BUNDLE_BYTES + TAG_BYTES


# ---------------------------------------------------------------------------------- field checks
def _id(name: str, value: object) -> str:
    if not is_name(value):
        raise ProtocolError(f"field {name!r}: expected an id matching {NAME_PATTERN}")
    return value


def _int(name: str, value: object, lo: int, hi: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise ProtocolError(f"field {name!r}: expected an integer in {lo}..{hi}, got {value!r}")
    return value


def _float(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ProtocolError(f"field {name!r}: expected a number, got {type(value).__name__}")
    result = float(value)
    if not math.isfinite(result) or result <= 0:
        raise ProtocolError(f"field {name!r}: expected a positive finite number, got {value!r}")
    return result


def _b64(name: str, value: object, length: int) -> bytes:
    if not isinstance(value, str) or len(value) > 4 * (length + 2) // 3 + 4:
        raise ProtocolError(f"field {name!r}: expected base64 of {length} bytes")
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ProtocolError(f"field {name!r}: invalid base64") from exc
    if len(raw) != length:
        raise ProtocolError(f"field {name!r}: expected {length} bytes, got {len(raw)}")
    return raw


def _ids(name: str, value: object, min_len: int = 0) -> tuple[str, ...]:
    if not isinstance(value, list) or not min_len <= len(value) <= MAX_COHORT:
        raise ProtocolError(f"field {name!r}: expected a list of {min_len}..{MAX_COHORT} ids")
    ids = tuple(_id(f"{name}[]", v) for v in value)
    if list(ids) != sorted(set(ids)):
        raise ProtocolError(f"field {name!r}: ids must be unique and sorted")
    return ids


def _b64_map(name: str, value: object, length: int) -> dict[str, bytes]:
    if not isinstance(value, dict) or len(value) > MAX_COHORT:
        raise ProtocolError(f"field {name!r}: expected an object of at most {MAX_COHORT} entries")
    return {_id(f"{name} key", k): _b64(f"{name}[{k}]", v, length) for k, v in value.items()}


def _enc(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise ProtocolError("duplicate field in JSON object")
    return result


def parse_json(data: bytes | str) -> dict[str, Any]:
    """A size-bounded, strict JSON object with a known protocol version."""
    if len(data) > MAX_JSON_BYTES:
        raise ProtocolError(f"message of {len(data)} bytes exceeds {MAX_JSON_BYTES}")
    try:
        obj = json.loads(data, object_pairs_hook=_no_duplicates)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, big ints
        raise ProtocolError(f"not valid JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise ProtocolError("message must be a JSON object")
    if obj.get("v") != PROTOCOL_VERSION or isinstance(obj.get("v"), bool):
        raise ProtocolError(f"field 'v': unsupported protocol version {obj.get('v')!r}")
    if not isinstance(obj.get("type"), str):
        raise ProtocolError("field 'type': missing or not a string")
    return obj


def _fields(obj: dict[str, Any], type_: str, names: tuple[str, ...]) -> dict[str, Any]:
    if obj.get("type") != type_:
        raise ProtocolError(f"field 'type': expected {type_!r}, got {obj.get('type')!r}")
    expected = {"v", "type", *names}
    if set(obj) != expected:
        extra, missing = sorted(set(obj) - expected), sorted(expected - set(obj))
        raise ProtocolError(f"fields: unexpected {extra}, missing {missing}")
    return obj


def _dump(type_: str, body: dict[str, Any]) -> bytes:
    return json.dumps(
        {"v": PROTOCOL_VERSION, "type": type_, **body}, sort_keys=True, separators=(",", ":")
    ).encode()


# -------------------------------------------------------------------------------------- messages
@dataclass(frozen=True)
class RoundConfig:
    """Server -> all: the round's cohort and parameters (stage 0)."""

    TYPE: ClassVar[str] = "config"
    round_id: str
    cohort: tuple[str, ...]
    threshold: int
    neighbours: int
    bits: int
    clip: float
    scale: float
    max_weight: float
    vector_length: int
    timeout_s: float

    def __post_init__(self) -> None:
        _id("round_id", self.round_id)
        _ids("cohort", list(self.cohort), min_len=2)
        _int("threshold", self.threshold, 2, len(self.cohort))
        _int("neighbours", self.neighbours, 1, MAX_COHORT)
        if self.neighbours < len(self.cohort) - 1 and self.neighbours % 2:
            raise ProtocolError("field 'neighbours': must be even unless >= cohort size - 1")
        if self.threshold > min(self.neighbours, len(self.cohort) - 1):
            raise ProtocolError("field 'threshold': exceeds the number of neighbours")
        _int("bits", self.bits, 8, 32)
        _int("vector_length", self.vector_length, 1, MAX_VECTOR_LENGTH)
        for name in ("clip", "scale", "max_weight", "timeout_s"):
            # Stored as float so that equal configs encode to equal bytes (60 vs 60.0).
            object.__setattr__(self, name, _float(name, getattr(self, name)))
        object.__setattr__(self, "cohort", tuple(self.cohort))
        from fededge.secagg.quantize import no_wrap  # local: quantize imports numpy kernels

        try:
            ok = no_wrap(len(self.cohort), self.clip, self.scale, self.bits)
        except Exception as exc:  # ConfigError: bits too small for the cohort
            raise ProtocolError(f"field 'scale': {exc}") from exc
        if not ok:
            raise ProtocolError("field 'scale': the sum of the cohort's updates could wrap")

    def to_json(self) -> bytes:
        """The message as compact, key-sorted JSON bytes."""
        body = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "cohort"}
        return _dump(self.TYPE, {**body, "cohort": list(self.cohort)})

    @classmethod
    def from_json(cls, data: bytes | str) -> RoundConfig:
        """Strictly decode; raises ProtocolError naming the bad field."""
        names = tuple(f.name for f in fields(cls))
        o = _fields(parse_json(data), cls.TYPE, names)
        for name in ("threshold", "neighbours", "bits", "vector_length"):
            _int(name, o[name], 0, MAX_VECTOR_LENGTH)
        cohort = _ids("cohort", o["cohort"], min_len=2)
        floats = {n: _float(n, o[n]) for n in ("clip", "scale", "max_weight", "timeout_s")}
        return cls(
            round_id=_id("round_id", o["round_id"]),
            cohort=cohort,
            threshold=o["threshold"],
            neighbours=o["neighbours"],
            bits=o["bits"],
            vector_length=o["vector_length"],
            **floats,
        )


@dataclass(frozen=True)
class AdvertiseKeys:
    """Device -> server: the device's two X25519 public keys, signed by its identity (stage 1)."""

    TYPE: ClassVar[str] = "advertise"
    round_id: str
    device: str
    enc_key: bytes
    mask_key: bytes
    signature: bytes  # Ed25519 over fededge.secagg.identity.advertise_data

    def to_json(self) -> bytes:
        """The message as compact, key-sorted JSON bytes."""
        body = {"round_id": self.round_id, "device": self.device}
        keys = {"enc_key": _enc(self.enc_key), "mask_key": _enc(self.mask_key)}
        return _dump(self.TYPE, {**body, **keys, "signature": _enc(self.signature)})

    @classmethod
    def from_json(cls, data: bytes | str) -> AdvertiseKeys:
        """Strictly decode; raises ProtocolError naming the bad field."""
        names = ("round_id", "device", "enc_key", "mask_key", "signature")
        o = _fields(parse_json(data), cls.TYPE, names)
        return cls(
            _id("round_id", o["round_id"]),
            _id("device", o["device"]),
            _b64("enc_key", o["enc_key"], KEY_BYTES),
            _b64("mask_key", o["mask_key"], KEY_BYTES),
            _b64("signature", o["signature"], SIGNATURE_BYTES),
        )


@dataclass(frozen=True)
class PeerKeys:
    """Server -> one device: its neighbours' signed advertisements, as (enc, mask, signature)."""

    TYPE: ClassVar[str] = "keys"
    round_id: str
    device: str
    keys: Mapping[str, tuple[bytes, bytes, bytes]]

    def to_json(self) -> bytes:
        """The message as compact, key-sorted JSON bytes."""
        keys = {d: [_enc(c), _enc(s), _enc(g)] for d, (c, s, g) in self.keys.items()}
        return _dump(self.TYPE, {"round_id": self.round_id, "device": self.device, "keys": keys})

    @classmethod
    def from_json(cls, data: bytes | str) -> PeerKeys:
        """Strictly decode; raises ProtocolError naming the bad field."""
        o = _fields(parse_json(data), cls.TYPE, ("round_id", "device", "keys"))
        raw = o["keys"]
        if not isinstance(raw, dict) or len(raw) > MAX_COHORT:
            raise ProtocolError("field 'keys': expected an object of device -> [enc, mask, sig]")
        keys: dict[str, tuple[bytes, bytes, bytes]] = {}
        for d, triple in raw.items():
            _id("keys key", d)
            if not isinstance(triple, list) or len(triple) != 3:
                raise ProtocolError(f"field 'keys[{d}]': expected [enc_key, mask_key, signature]")
            keys[d] = (
                _b64(f"keys[{d}][0]", triple[0], KEY_BYTES),
                _b64(f"keys[{d}][1]", triple[1], KEY_BYTES),
                _b64(f"keys[{d}][2]", triple[2], SIGNATURE_BYTES),
            )
        return cls(_id("round_id", o["round_id"]), _id("device", o["device"]), keys)


@dataclass(frozen=True)
class ShareKeys:
    """Device -> server: one encrypted share bundle per neighbour, keyed by recipient (stage 2)."""

    TYPE: ClassVar[str] = "share"
    round_id: str
    device: str
    ciphertexts: Mapping[str, bytes]

    def to_json(self) -> bytes:
        """The message as compact, key-sorted JSON bytes."""
        cts = {d: _enc(c) for d, c in self.ciphertexts.items()}
        return _dump(
            self.TYPE, {"round_id": self.round_id, "device": self.device, "ciphertexts": cts}
        )

    @classmethod
    def from_json(cls, data: bytes | str) -> ShareKeys:
        """Strictly decode; raises ProtocolError naming the bad field."""
        o = _fields(parse_json(data), cls.TYPE, ("round_id", "device", "ciphertexts"))
        cts = _b64_map("ciphertexts", o["ciphertexts"], CIPHERTEXT_BYTES)
        return cls(_id("round_id", o["round_id"]), _id("device", o["device"]), cts)


@dataclass(frozen=True)
class RelayedShares:
    """Server -> one device: the bundles its live neighbours encrypted to it, keyed by sender."""

    TYPE: ClassVar[str] = "relay"
    round_id: str
    device: str
    ciphertexts: Mapping[str, bytes]

    def to_json(self) -> bytes:
        """The message as compact, key-sorted JSON bytes."""
        cts = {d: _enc(c) for d, c in self.ciphertexts.items()}
        return _dump(
            self.TYPE, {"round_id": self.round_id, "device": self.device, "ciphertexts": cts}
        )

    @classmethod
    def from_json(cls, data: bytes | str) -> RelayedShares:
        """Strictly decode; raises ProtocolError naming the bad field."""
        o = _fields(parse_json(data), cls.TYPE, ("round_id", "device", "ciphertexts"))
        cts = _b64_map("ciphertexts", o["ciphertexts"], CIPHERTEXT_BYTES)
        return cls(_id("round_id", o["round_id"]), _id("device", o["device"]), cts)


@dataclass(frozen=True)
class SurvivorSet:
    """Server -> all: the devices whose masked input is in the sum; each survivor signs it."""

    TYPE: ClassVar[str] = "survivors"
    round_id: str
    survivors: tuple[str, ...]

    def to_json(self) -> bytes:
        """The message as compact, key-sorted JSON bytes."""
        return _dump(self.TYPE, {"round_id": self.round_id, "survivors": list(self.survivors)})

    @classmethod
    def from_json(cls, data: bytes | str) -> SurvivorSet:
        """Strictly decode; raises ProtocolError naming the bad field."""
        o = _fields(parse_json(data), cls.TYPE, ("round_id", "survivors"))
        return cls(_id("round_id", o["round_id"]), _ids("survivors", o["survivors"], min_len=1))


@dataclass(frozen=True)
class ConsistencyCheck:
    """Device -> server: its identity signature over the survivor set it was sent (stage 4)."""

    TYPE: ClassVar[str] = "consistency"
    round_id: str
    device: str
    signature: bytes  # Ed25519 over fededge.secagg.identity.consistency_data

    def to_json(self) -> bytes:
        """The message as compact, key-sorted JSON bytes."""
        body = {"round_id": self.round_id, "device": self.device}
        return _dump(self.TYPE, {**body, "signature": _enc(self.signature)})

    @classmethod
    def from_json(cls, data: bytes | str) -> ConsistencyCheck:
        """Strictly decode; raises ProtocolError naming the bad field."""
        o = _fields(parse_json(data), cls.TYPE, ("round_id", "device", "signature"))
        return cls(
            _id("round_id", o["round_id"]),
            _id("device", o["device"]),
            _b64("signature", o["signature"], SIGNATURE_BYTES),
        )


@dataclass(frozen=True)
class UnmaskRequest:
    """Server -> all: the survivor set again, with the survivors' signatures over it.

    A device answers only if at least t of them are valid; it sends self-mask shares of the
    survivors and mask-key shares of the neighbours it masked with that are not survivors.
    """

    TYPE: ClassVar[str] = "unmask_request"
    round_id: str
    survivors: tuple[str, ...]
    signatures: Mapping[str, bytes]

    def to_json(self) -> bytes:
        """The message as compact, key-sorted JSON bytes."""
        sigs = {d: _enc(s) for d, s in self.signatures.items()}
        body = {"survivors": list(self.survivors), "signatures": sigs}
        return _dump(self.TYPE, {"round_id": self.round_id, **body})

    @classmethod
    def from_json(cls, data: bytes | str) -> UnmaskRequest:
        """Strictly decode; raises ProtocolError naming the bad field."""
        o = _fields(parse_json(data), cls.TYPE, ("round_id", "survivors", "signatures"))
        return cls(
            _id("round_id", o["round_id"]),
            _ids("survivors", o["survivors"], min_len=1),
            _b64_map("signatures", o["signatures"], SIGNATURE_BYTES),
        )


@dataclass(frozen=True)
class UnmaskShares:
    """Device -> server: self-mask shares of survivors and mask-key shares of dropped devices."""

    TYPE: ClassVar[str] = "unmask"
    round_id: str
    device: str
    self_mask_shares: Mapping[str, bytes]
    key_shares: Mapping[str, bytes]

    def to_json(self) -> bytes:
        """The message as compact, key-sorted JSON bytes."""
        b = {d: _enc(s) for d, s in self.self_mask_shares.items()}
        s = {d: _enc(x) for d, x in self.key_shares.items()}
        body = {"round_id": self.round_id, "device": self.device}
        return _dump(self.TYPE, {**body, "self_mask_shares": b, "key_shares": s})

    @classmethod
    def from_json(cls, data: bytes | str) -> UnmaskShares:
        """Strictly decode; raises ProtocolError naming the bad field."""
        names = ("round_id", "device", "self_mask_shares", "key_shares")
        o = _fields(parse_json(data), cls.TYPE, names)
        return cls(
            _id("round_id", o["round_id"]),
            _id("device", o["device"]),
            _b64_map("self_mask_shares", o["self_mask_shares"], SHARE_BYTES),
            _b64_map("key_shares", o["key_shares"], SHARE_BYTES),
        )


@dataclass(frozen=True)
class RoundStatus:
    """Server -> all: the round finished (``done``) or was abandoned (``aborted``, with reason)."""

    TYPE: ClassVar[str] = "status"
    round_id: str
    status: str
    reason: str
    survivors: int

    def __post_init__(self) -> None:
        if self.status not in ("done", "aborted"):
            raise ProtocolError(
                f"field 'status': expected 'done' or 'aborted', got {self.status!r}"
            )
        if not isinstance(self.reason, str) or len(self.reason) > 500:
            raise ProtocolError("field 'reason': expected a string of at most 500 characters")
        _int("survivors", self.survivors, 0, MAX_COHORT)

    def to_json(self) -> bytes:
        """The message as compact, key-sorted JSON bytes."""
        body = {"status": self.status, "reason": self.reason, "survivors": self.survivors}
        return _dump(self.TYPE, {"round_id": self.round_id, **body})

    @classmethod
    def from_json(cls, data: bytes | str) -> RoundStatus:
        """Strictly decode; raises ProtocolError naming the bad field."""
        o = _fields(parse_json(data), cls.TYPE, ("round_id", "status", "reason", "survivors"))
        return cls(_id("round_id", o["round_id"]), o["status"], o["reason"], o["survivors"])


@dataclass(frozen=True, eq=False)
class MaskedInput:
    """Device -> server: the masked fixed-point vector [w~, w~*delta] + masks mod 2^k (stage 3)."""

    TYPE: ClassVar[str] = "masked"
    round_id: str
    device: str
    vector: npt.NDArray[np.uint32]

    def to_bytes(self) -> bytes:
        """safetensors bytes: tensor ``y`` (U32, little-endian), the ids in ``__metadata__``."""
        meta = {
            "fededge": str(PROTOCOL_VERSION),
            "kind": "masked_input",
            "round_id": self.round_id,
            "device": self.device,
        }
        vector = np.ascontiguousarray(self.vector, dtype="<u4")
        return encode_tensors({"y": vector}, meta)

    @classmethod
    def from_bytes(cls, data: bytes, max_length: int = MAX_VECTOR_LENGTH + 1) -> MaskedInput:
        """Strictly decode safetensors bytes, zero-copy; raises ProtocolError naming the problem."""
        payload = decode_tensors(data, max_bytes=4 * max_length + 4096)
        meta = payload.metadata
        if set(meta) != {"fededge", "kind", "round_id", "device"}:
            raise ProtocolError(
                "masked input: __metadata__ must hold fededge, kind, round_id, device"
            )
        if meta["fededge"] != str(PROTOCOL_VERSION) or meta["kind"] != "masked_input":
            raise ProtocolError(
                f"masked input: unsupported version/kind {meta['fededge']!r}/{meta['kind']!r}"
            )
        if set(payload.tensors) != {"y"}:
            raise ProtocolError("masked input: expected exactly one tensor, 'y'")
        vector = payload.tensors["y"]
        if vector.dtype != np.dtype("<u4") or vector.ndim != 1:
            raise ProtocolError("masked input: tensor 'y' must be 1-D U32")
        if not 1 <= vector.shape[0] <= max_length:
            raise ProtocolError(f"masked input: bad length {vector.shape[0]}")
        words = np.asarray(vector, dtype=np.uint32)  # no copy on little-endian hosts
        return cls(_id("round_id", meta["round_id"]), _id("device", meta["device"]), words)


JsonMessage: TypeAlias = (
    RoundConfig
    | AdvertiseKeys
    | PeerKeys
    | ShareKeys
    | RelayedShares
    | SurvivorSet
    | ConsistencyCheck
    | UnmaskRequest
    | UnmaskShares
    | RoundStatus
)
Message: TypeAlias = JsonMessage | MaskedInput
_BY_TYPE: dict[str, Any] = {
    c.TYPE: c
    for c in (
        RoundConfig,
        AdvertiseKeys,
        PeerKeys,
        ShareKeys,
        RelayedShares,
        SurvivorSet,
        ConsistencyCheck,
        UnmaskRequest,
        UnmaskShares,
        RoundStatus,
    )
}
# Which JSON types may arrive on which aggregator -> device topic (docs/protocol.md): a
# broadcast ``rounds/{round}/{type}`` carries only its own type, ``rounds/{round}/to/{device}``
# only the two addressed types. Anything else is refused.
BROADCAST_TYPES = ROUND_BROADCASTS  # defined with the topics: devices subscribe by them
ADDRESSED_TYPES = ROUND_ADDRESSED


def decode_json(data: bytes | str) -> JsonMessage:
    """Any JSON round message, dispatched on its ``type``."""
    obj = parse_json(data)
    cls = _BY_TYPE.get(obj["type"])
    if cls is None:
        raise ProtocolError(f"field 'type': unknown message type {obj['type']!r}")
    message: JsonMessage = cls.from_json(data)
    return message


def encode(message: Message) -> bytes:
    """The wire bytes of any round message (JSON, or safetensors for a masked input).

    There is no generic decoder on purpose: a safetensors header length can start with ``{``, so
    the topic (``.../masked/...``) decides between :func:`decode_json` and
    :meth:`MaskedInput.from_bytes`.
    """
    if isinstance(message, MaskedInput):
        return message.to_bytes()
    return message.to_json()


def decode_payload(
    data: bytes, *, masked: bool, max_length: int = MAX_VECTOR_LENGTH + 1
) -> Message:
    """A round message from an MQTT payload; ``masked`` is true on the ``.../masked/...`` topic.

    Pass ``max_length = vector_length + 1`` of the round so an oversized vector is refused
    before it is read.
    """
    if masked:
        return MaskedInput.from_bytes(data, max_length=max_length)
    return decode_json(data)


@dataclass(frozen=True)
class Outgoing:
    """A message to send: ``to`` is a device id, :data:`TO_SERVER` or :data:`TO_ALL`."""

    to: str
    message: Message
