"""SecAgg+ messages: exact round trips, strict decoding, and fuzzing of the decoders."""

from __future__ import annotations

import contextlib
import json
import struct

import numpy as np
import pytest
import safetensors.numpy
from hypothesis import given, settings
from hypothesis import strategies as st

from fededge.errors import ProtocolError, SecAggError
from fededge.protocol.tensors import encode_tensors
from fededge.secagg.messages import (
    CIPHERTEXT_BYTES,
    AdvertiseKeys,
    ConsistencyCheck,
    MaskedInput,
    PeerKeys,
    RelayedShares,
    RoundConfig,
    RoundStatus,
    ShareKeys,
    SurvivorSet,
    UnmaskRequest,
    UnmaskShares,
    decode_json,
    decode_payload,
    encode,
)
from fededge.testing.secagg import make_config

CONFIG = make_config("r-1", ["a", "b", "c", "d"], 10, threshold=2, neighbours=2)
SHARE = b"\x00\x02" + bytes(range(66))
MESSAGES = [
    CONFIG,
    AdvertiseKeys("r-1", "a", bytes(range(32)), bytes(range(1, 33)), b"\x05" * 64),
    PeerKeys("r-1", "a", {"b": (bytes(32), b"\x01" * 32, b"\x02" * 64)}),
    ShareKeys("r-1", "a", {"b": b"\x07" * CIPHERTEXT_BYTES}),
    RelayedShares("r-1", "b", {"a": b"\x07" * CIPHERTEXT_BYTES}),
    SurvivorSet("r-1", ("a", "b", "c")),
    ConsistencyCheck("r-1", "b", b"\x03" * 64),
    UnmaskRequest("r-1", ("a", "b", "c"), {"a": b"\x04" * 64, "b": b"\x03" * 64}),
    UnmaskShares("r-1", "b", {"a": SHARE}, {"d": SHARE}),
    RoundStatus("r-1", "aborted", "too few devices", 0),
]


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: m.TYPE)
def test_round_trip(msg: object) -> None:
    data = encode(msg)  # type: ignore[arg-type]
    back = decode_json(data)
    assert back == msg
    assert encode(back) == data  # canonical: sorted keys, compact
    obj = json.loads(data)
    assert obj["v"] == 2 and obj["type"] == msg.TYPE


def test_decode_payload_follows_the_topic() -> None:
    masked = MaskedInput("r-1", "a", np.arange(3, dtype=np.uint32))
    back = decode_payload(encode(masked), masked=True, max_length=3)
    assert isinstance(back, MaskedInput) and back.vector.tolist() == [0, 1, 2]
    assert decode_payload(encode(CONFIG), masked=False) == CONFIG
    with pytest.raises(ProtocolError):
        decode_payload(encode(masked), masked=True, max_length=2)
    with pytest.raises(ProtocolError):
        decode_payload(encode(masked), masked=False)


def test_config_fields_are_exactly_the_documented_ones() -> None:
    assert set(json.loads(CONFIG.to_json())) == {
        "v",
        "type",
        "round_id",
        "cohort",
        "threshold",
        "neighbours",
        "bits",
        "clip",
        "scale",
        "max_weight",
        "vector_length",
        "timeout_s",
    }


def test_advertise_wire_format_is_stable() -> None:
    """A test vector: the exact bytes of one message."""
    msg = AdvertiseKeys("r-1", "a", bytes(32), b"\xff" * 32, b"\x11" * 64)
    assert msg.to_json() == (
        b'{"device":"a","enc_key":"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",'
        b'"mask_key":"//////////////////////////////////////////8=","round_id":"r-1",'
        b'"signature":"EREREREREREREREREREREREREREREREREREREREREREREREREREREREREREREREREREREREREREREREREREREQ==",'
        b'"type":"advertise","v":2}'
    )


def test_masked_input_is_safetensors_with_metadata() -> None:
    vec = np.arange(11, dtype=np.uint32) * np.uint32(400_000_000)
    data = MaskedInput("r-1", "a", vec).to_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    meta = {"fededge": "2", "kind": "masked_input", "round_id": "r-1", "device": "a"}
    assert header["__metadata__"] == meta
    assert header["y"]["dtype"] == "U32" and header["y"]["shape"] == [11]
    assert data[8 + n :] == vec.astype("<u4").tobytes()  # raw little-endian words
    assert safetensors.numpy.load(data)["y"].tolist() == vec.tolist()  # any reader can open it
    back = MaskedInput.from_bytes(data)
    assert (back.round_id, back.device) == ("r-1", "a")
    np.testing.assert_array_equal(back.vector, vec)
    with pytest.raises(ProtocolError):
        MaskedInput.from_bytes(data, max_length=1)
    with pytest.raises(ProtocolError):
        MaskedInput.from_bytes(data[:-1])
    other = encode_tensors({"y": vec.astype(np.int32)}, meta)
    with pytest.raises(ProtocolError, match="U32"):
        MaskedInput.from_bytes(other)
    with pytest.raises(ProtocolError, match="kind"):
        MaskedInput.from_bytes(encode_tensors({"y": vec}, {**meta, "kind": "update"}))


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda o: o.update(v=1), "'v'"),
        (lambda o: o.update(v=True), "'v'"),
        (lambda o: o.update(extra=1), "unexpected"),
        (lambda o: o.pop("device"), "missing"),
        (lambda o: o.update(device="a/b"), "'device'"),
        (lambda o: o.update(enc_key="AAAA"), "'enc_key'"),
        (lambda o: o.update(mask_key="not base64!"), "'mask_key'"),
        (lambda o: o.update(signature="AAAA"), "'signature'"),
        (lambda o: o.update(type="share"), "missing"),
    ],
)
def test_strict_decoding_names_the_field(mutate: object, field: str) -> None:
    obj = json.loads(AdvertiseKeys("r-1", "a", bytes(32), bytes(32), bytes(64)).to_json())
    mutate(obj)  # type: ignore[operator]
    with pytest.raises(ProtocolError, match=field):
        decode_json(json.dumps(obj))


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"threshold": 1}, "threshold"),
        ({"threshold": 4}, "threshold"),
        ({"neighbours": 1}, "neighbours"),
        ({"scale": 1e12}, "scale"),
        ({"cohort": ["b", "a", "c"]}, "cohort"),
        ({"cohort": ["a", "a", "c"]}, "cohort"),
        ({"clip": -1.0}, "clip"),
        ({"clip": "1"}, "clip"),
        ({"bits": 40}, "bits"),
        ({"vector_length": 0}, "vector_length"),
    ],
)
def test_config_validation(change: dict[str, object], field: str) -> None:
    obj = json.loads(CONFIG.to_json())
    obj.update(change)
    with pytest.raises(ProtocolError, match=field):
        RoundConfig.from_json(json.dumps(obj))


def test_duplicate_keys_and_oversize_are_rejected() -> None:
    with pytest.raises(ProtocolError, match="duplicate"):
        decode_json(b'{"v":2,"v":2,"type":"status"}')
    with pytest.raises(ProtocolError, match="exceeds"):
        decode_json(b" " * (5 << 20))
    with pytest.raises(ProtocolError, match="unknown message type"):
        decode_json(b'{"v":2,"type":"nope"}')
    with pytest.raises(ProtocolError, match="ids must be unique and sorted"):
        UnmaskRequest.from_json(
            b'{"v":2,"type":"unmask_request","round_id":"r","survivors":["b","a"],"signatures":{}}'
        )


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=20,
)


def _templated(type_: str, body: dict[str, object]) -> bytes:
    return json.dumps({"v": 2, "type": type_, **body}).encode()


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_only_raise_protocol_errors(data: bytes) -> None:
    for decoder in (decode_json, MaskedInput.from_bytes):
        with contextlib.suppress(ProtocolError, SecAggError):
            decoder(data)


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from(MESSAGES),
    st.dictionaries(st.text(max_size=12), json_values, max_size=4),
    st.booleans(),
)
def test_mutated_messages_only_raise_protocol_errors(
    msg: object, patch: dict[str, object], drop: bool
) -> None:
    obj = json.loads(encode(msg))  # type: ignore[arg-type]
    if drop and len(obj) > 2:
        obj.pop(sorted(obj)[-1])
    for key, value in patch.items():
        target = key if key in obj or not obj else sorted(obj)[sum(map(ord, key)) % len(obj)]
        obj[target] = value
    with contextlib.suppress(ProtocolError, SecAggError):
        decode_json(json.dumps(obj))


@settings(max_examples=200, deadline=None)
@given(
    st.binary(min_size=0, max_size=64),
    st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=4),
)
def test_mutated_safetensors_only_raise_protocol_errors(tail: bytes, meta: dict[str, str]) -> None:
    good = MaskedInput("r", "a", np.arange(4, dtype=np.uint32)).to_bytes()
    (n,) = struct.unpack("<Q", good[:8])
    header = json.loads(good[8 : 8 + n])
    header["__metadata__"].update(meta)
    raw = json.dumps(header).encode()
    for data in (
        struct.pack("<Q", len(raw)) + raw + good[8 + n :] + tail,
        good[: len(tail)] + tail,
    ):
        with contextlib.suppress(ProtocolError, SecAggError):
            MaskedInput.from_bytes(data)
