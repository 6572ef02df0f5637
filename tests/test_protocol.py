"""Protocol v1: test vectors from docs/protocol.md byte for byte, and hostile input to decoders."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import load as st_load

from fededge.errors import ProtocolError
from fededge.protocol import (
    AggregatorStatus,
    DeviceStatus,
    Graph,
    ModelVersion,
    Plan,
    Receipt,
    Topics,
    Update,
    VersionMetrics,
    decode_json,
    decode_tensors,
    encode_tensors,
)

DOC = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"


def vectors() -> dict[str, str]:
    """The ```vector NAME blocks of docs/protocol.md (hex or JSON text)."""
    text = DOC.read_text()
    return {
        m.group(1): m.group(2).strip()
        for m in re.finditer(r"```vector (\S+)\n(.*?)```", text, re.S)
    }


def _hex(block: str) -> bytes:
    return bytes.fromhex("".join(block.split()))


def test_vector_update() -> None:
    u = Update(
        task="digits",
        device="pi-17",
        update_id="0f3a9c",
        base_version=41,
        num_examples=32,
        delta={"bias": np.array([0.5, -1.0], np.float32)},
        train_loss=0.25,
    )
    assert u.to_bytes() == _hex(vectors()["update"])
    back = Update.from_bytes(_hex(vectors()["update"]), max_bytes=1 << 20)
    assert back.base_version == 41 and back.train_loss == 0.25
    np.testing.assert_array_equal(back.delta["bias"], [0.5, -1.0])


def test_vector_model() -> None:
    m = ModelVersion(
        task="digits",
        version=42,
        weights={"bias": np.array([1.0, 2.0], np.float32)},
        graph_sha256="ab" * 32,
        parent=41,
        updates=5,
        examples=160,
        time=1764000000.0,
    )
    assert m.to_bytes() == _hex(vectors()["model"])


def test_vector_graph() -> None:
    g = Graph(task="digits", tflite=b"TFL3", spec={"model": "demo"})
    assert g.to_bytes() == _hex(vectors()["graph"])


@pytest.mark.parametrize(
    ("name", "msg"),
    [
        ("plan", Plan(min_updates_per_version=5)),
        (
            "receipt",
            Receipt(
                task="digits",
                device="pi-17",
                update_id="0f3a9c",
                status="accepted",
                version=41,
                pending=42,
            ),
        ),
        (
            "receipt-rejected",
            Receipt(
                task="digits",
                device="pi-17",
                update_id="0f3a9c",
                status="rejected",
                reason="stale",
                detail="base version 39 is 2 behind 41; max_staleness is 0",
                version=41,
            ),
        ),
        (
            "device-status",
            DeviceStatus(
                device="pi-17",
                state="online",
                version=42,
                examples=120,
                outbox=0,
                updates_sent=7,
                software="fededge 0.1.0",
                time=1764000000.0,
            ),
        ),
        ("device-status-will", DeviceStatus(device="pi-17", state="offline")),
        (
            "aggregator-status",
            AggregatorStatus(
                task="digits",
                state="online",
                version=42,
                pending_updates=3,
                pending_examples=96,
                min_updates_per_version=5,
                accepted_total=213,
                rejected_total=2,
                time=1764000000.0,
            ),
        ),
        (
            "version-metrics",
            VersionMetrics(
                task="digits",
                version=42,
                updates=5,
                examples=160,
                train_loss=0.31,
                eval_loss=0.4,
                eval_accuracy=0.88,
                mean_update_norm=0.9,
                seconds=12.5,
                time=1764000000.0,
            ),
        ),
    ],
)
def test_vector_json(name: str, msg) -> None:
    assert msg.to_bytes().decode() == vectors()[name]
    assert decode_json(vectors()[name].encode(), type(msg)) == msg


def test_topics() -> None:
    t = Topics("fededge", "digits")
    assert t.model == "fededge/digits/model"
    assert t.update("pi-17") == "fededge/digits/updates/pi-17"
    assert t.receipt("pi-17") == "fededge/digits/receipts/pi-17"
    assert t.device_status("pi-17") == "fededge/digits/devices/pi-17/status"
    assert t.version_metrics(42) == "fededge/digits/versions/42/metrics"
    assert t.device_of("fededge/digits/updates/pi-17", "updates") == "pi-17"
    assert t.device_of("fededge/digits/updates/a+b", "updates") is None
    assert t.version_of_metrics("fededge/digits/versions/42/metrics") == 42
    with pytest.raises(ValueError):
        t.update("a/b")


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"{",
        b"[]",
        b'{"v": 2, "kind": "plan"}',
        b'{"kind": "plan"}',
        b'{"v": 1, "kind": "plan", "epochs": 0}',
        b'{"v": 1, "kind": "plan", "bogus": 1}',
        b'{"v": 1, "kind": "plan", "learning_rate": NaN}',
        b"\xff\xfe",
        b"[" * 100000,
    ],
)
def test_bad_json_rejected(payload: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_json(payload, Plan)


def test_unknown_version_has_its_own_reason() -> None:
    with pytest.raises(ProtocolError) as e:
        decode_json(b'{"v": 2}', Plan)
    assert e.value.reason == "unsupported_version"
    meta = {"fededge": "2", "kind": "update"}
    with pytest.raises(ProtocolError) as e:
        Update.from_bytes(encode_tensors({"a": np.zeros(1, np.float32)}, meta), max_bytes=1000)
    assert e.value.reason == "unsupported_version"


def test_reserved_chunk_and_signature_are_refused() -> None:
    u = Update(
        task="t",
        device="d",
        update_id="u",
        base_version=0,
        num_examples=1,
        delta={"a": np.zeros(2, np.float32)},
    )
    p = decode_tensors(u.to_bytes(), max_bytes=1000)
    for key in ("chunk", "signature"):
        raw = encode_tensors(p.tensors, {**p.metadata, key: "x"})
        with pytest.raises(ProtocolError, match="reserved"):
            Update.from_bytes(raw, max_bytes=1000)


def _header(obj: object, data: bytes = b"") -> bytes:
    h = json.dumps(obj).encode()
    return struct.pack("<Q", len(h)) + h + data


@pytest.mark.parametrize(
    "payload",
    [
        _header({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4),
        _header({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8),
        _header({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8),
        _header({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 8),
        _header({"a": {"dtype": "BF16", "shape": [1], "data_offsets": [0, 2]}}, b"\0" * 2),
        _header({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4),
        _header({"a": {"dtype": "F32", "shape": [1 << 62, 4], "data_offsets": [0, 0]}}),
        _header(
            {
                "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                "b": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
            },
            b"\0" * 4,
        ),
        _header({"__metadata__": {"a": 1}}),
        _header([1, 2]),
        struct.pack("<Q", 1 << 60) + b"{}",
        b"\x03\x00\x00\x00\x00\x00\x00\x00{}x",
    ],
)
def test_bad_safetensors_rejected(payload: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_tensors(payload, max_bytes=1 << 20)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512))
def test_decode_tensors_random_bytes(payload: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        decode_tensors(payload, max_bytes=1 << 20)


arrays = st.lists(st.floats(allow_nan=False, width=32), min_size=0, max_size=20).map(
    lambda xs: np.array(xs, np.float32)
)


@settings(max_examples=100, deadline=None)
@given(
    st.dictionaries(st.text("abcxyz_.", min_size=1, max_size=8), arrays, min_size=1, max_size=5),
    st.dictionaries(st.text(max_size=10), st.text(max_size=10), max_size=4),
)
def test_roundtrip_agrees_with_safetensors(tensors, meta) -> None:
    raw = encode_tensors(tensors, meta)
    ours = decode_tensors(raw, max_bytes=1 << 20)
    ref = st_load(raw)
    assert ours.metadata == meta
    assert set(ours.tensors) == set(ref)
    for k in ref:
        np.testing.assert_array_equal(ours.tensors[k], ref[k])


_PLAIN_META = {
    "fededge": "1", "kind": "update", "task": "t", "device": "d", "update_id": "u",
    "base_version": "0", "num_examples": "1",
}  # fmt: skip


def _general_update(raw: bytes) -> Update:
    """Update.from_bytes without its fast path (messages._plain_update)."""
    p = decode_tensors(raw, max_bytes=1 << 20)
    return Update.from_fields(p.metadata, p.tensors)


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from([*_PLAIN_META, "train_loss", "eval_loss", "eval_accuracy", "chunk",
                         "encoding", "rotation", "unclipped", "extra"]),
        st.one_of(st.sampled_from(["0", "1", "7", "update", "t", "d", "u", "1e3", "nan", "-1",
                                   "²", "9" * 17, "", "a/b", "x" * 65, "1.5", "inf"]),
                  st.text(max_size=8)),
    ),
)  # fmt: skip
def test_update_fast_path_agrees_with_the_general_path(changes: dict[str, str]) -> None:
    # The fast path for plain updates must accept, build and refuse exactly as the general
    # path does (same fields, same ProtocolError message and reason).
    meta = {**_PLAIN_META, **changes}
    raw = encode_tensors({"a": np.arange(4, dtype=np.float32)}, meta)
    try:
        want: Update | ProtocolError = _general_update(raw)
    except ProtocolError as e:
        want = e
    try:
        got: Update | ProtocolError = Update.from_bytes(raw, max_bytes=1 << 20)
    except ProtocolError as e:
        got = e
    if isinstance(want, ProtocolError):
        assert isinstance(got, ProtocolError)
        assert (str(got), got.reason) == (str(want), want.reason)
    else:
        assert isinstance(got, Update)
        for f in dataclasses.fields(Update):
            if f.name != "delta":
                assert getattr(got, f.name) == getattr(want, f.name), f.name
        assert got.delta.keys() == want.delta.keys()
        np.testing.assert_array_equal(got.delta["a"], want.delta["a"])


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=1, max_size=400), st.integers(0, 399))
def test_mutated_update_never_crashes(noise: bytes, at: int) -> None:
    u = Update(
        task="t",
        device="d",
        update_id="u",
        base_version=0,
        num_examples=1,
        delta={"a": np.arange(4, dtype=np.float32)},
    )
    raw = bytearray(u.to_bytes())
    at %= len(raw)
    raw[at : at + len(noise)] = noise
    for cls in (Update, ModelVersion, Graph):
        with contextlib.suppress(ProtocolError):
            cls.from_bytes(bytes(raw), max_bytes=1 << 20)


@settings(max_examples=200, deadline=None)
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
        lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
        max_leaves=20,
    )
)
def test_json_decoders_random_values(obj) -> None:
    payload = json.dumps(obj).encode()
    for cls in (Plan, Receipt, DeviceStatus, AggregatorStatus, VersionMetrics):
        with contextlib.suppress(ProtocolError):
            decode_json(payload, cls)


@pytest.mark.parametrize(
    "text",
    [
        '{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}',
        '{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}     ',
        ' \t{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}\n\r ',
        '{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}  x',
        '{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}{}',
        '{"a": 1, "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}',
        '\ufeff{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}',
        '{"a": {"dtype": "F\\u0033\\u0032", "shape": [1], "data_offsets": [0, 4]}}',
        "null  ",
        "  ",
        "",
        "1e400",
        "NaN",
        "[" * 100_000 + "]" * 100_000,
        '{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}',
    ],
)
def test_header_json_is_parsed_as_json_loads_does(text: str) -> None:
    # decode_tensors calls json's scanner directly for the usual header: the same value, and
    # for anything else json.loads' own value or message.
    raw = text.encode()
    payload = struct.pack("<Q", len(raw)) + raw + b"\0" * 4
    try:
        want: object = json.loads(text)
    except (ValueError, RecursionError) as e:
        want = f"safetensors header is not valid JSON: {str(e)[:200]}"
    try:
        got = decode_tensors(payload, max_bytes=1 << 22, max_header=1 << 22)
    except ProtocolError as e:
        if isinstance(want, str):
            assert e.detail == want
        else:
            assert type(want) is not dict or not want  # refused after parsing: not JSON's error
            assert "not valid JSON" not in e.detail
        return
    assert isinstance(want, dict)
    assert set(got.tensors) == set(want) - {"__metadata__"}
