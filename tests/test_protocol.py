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


# --- the fast path for updates as devices write them (messages._written_update) -----------


def _same_as_the_general_path(
    raw: bytes | bytearray, max_bytes: int = 1 << 20
) -> Update | ProtocolError:
    """Update.from_bytes(raw) is what the general path makes of it: the same fields, tensors
    (names in the same order, dtype, shape, bits, read-only) or the same error."""
    try:
        p = decode_tensors(bytes(raw), max_bytes=max_bytes)
        want: Update | ProtocolError = Update.from_fields(p.metadata, p.tensors)
    except ProtocolError as e:
        want = e
    try:
        got: Update | ProtocolError = Update.from_bytes(raw, max_bytes=max_bytes)
    except ProtocolError as e:
        got = e
    if isinstance(want, ProtocolError):
        assert isinstance(got, ProtocolError), got
        assert (str(got), got.reason) == (str(want), want.reason)
        return got
    assert isinstance(got, Update), got
    for f in dataclasses.fields(Update):
        if f.name != "delta":
            assert getattr(got, f.name) == getattr(want, f.name), f.name
    assert list(got.delta) == list(want.delta)
    for name, a in want.delta.items():
        b = got.delta[name]
        assert (b.dtype, b.shape, b.tobytes()) == (a.dtype, a.shape, a.tobytes()), name
        assert not b.flags.writeable and type(b) is np.ndarray
    return got


def _with_header(raw: bytes, header: str) -> bytes:
    """``raw`` (a safetensors payload) with its header text replaced, the data kept."""
    (hlen,) = struct.unpack_from("<Q", raw)
    h = header.encode()
    return struct.pack("<Q", len(h)) + h + raw[8 + hlen :]


def _written(delta: dict[str, np.ndarray] | None = None, **kw: object) -> bytes:
    fields: dict[str, object] = {
        "task": "t", "device": "dev-1", "update_id": "u.1", "base_version": 3, "num_examples": 7,
        "delta": delta if delta is not None else {
            "b": np.arange(3, dtype=np.float32), "k": np.ones((2, 3), np.float32)},
        **kw,
    }  # fmt: skip
    return Update(**fields).to_bytes()  # type: ignore[arg-type]


@pytest.mark.parametrize("metrics", [{}, {"train_loss": 0.25},
                                     {"train_loss": 1.5, "eval_loss": 2.0, "eval_accuracy": 0.5}])  # fmt: skip
@pytest.mark.parametrize("wrap", [bytes, bytearray])
def test_updates_as_devices_write_them_take_the_fast_path(metrics, wrap) -> None:
    from fededge.protocol import messages

    raw = wrap(_written(**metrics))
    assert messages._written_update(raw, 1 << 20) is not None
    u = _same_as_the_general_path(raw)
    assert isinstance(u, Update) and u.train_loss == metrics.get("train_loss")
    assert memoryview(raw).nbytes > 0 and isinstance(Update.from_bytes(memoryview(raw),
                                                     max_bytes=1 << 20), Update)  # fmt: skip


_ENTRY_B = '"b":{"dtype":"F32","shape":[3],"data_offsets":[0,12]}'
_ENTRY_K = '"k":{"dtype":"F32","shape":[2,3],"data_offsets":[12,36]}'
_META = ('{"base_version":"3","device":"dev-1","fededge":"1","kind":"update",'
         '"num_examples":"7","task":"t","update_id":"u.1"}')  # fmt: skip


def _fast_header(
    meta: str = _META, entries: tuple[str, ...] = (_ENTRY_B, _ENTRY_K), tail: str = ""
) -> str:
    return '{"__metadata__":' + meta + "".join("," + e for e in entries) + "}" + tail


def _k(old: str, new: str) -> str:
    """The header with tensor k's entry changed."""
    return _fast_header(entries=(_ENTRY_B, _ENTRY_K.replace(old, new)))


def _m(old: str, new: str) -> str:
    """The header with its metadata changed."""
    return _fast_header(_META.replace(old, new))


@pytest.mark.parametrize(
    "header",
    [
        _fast_header(),  # as written: the fast path
        _fast_header(tail="   "),
        _fast_header(tail="\n"),
        _fast_header(tail=" x"),
        '{"__metadata__": ' + _META + "," + _ENTRY_B + "," + _ENTRY_K + "}",  # a space
        "{" + _ENTRY_B + ',"__metadata__":' + _META + "," + _ENTRY_K + "}",  # key order
        _fast_header(entries=(_ENTRY_K, _ENTRY_B)),  # tensors not by name
        _fast_header(entries=(_ENTRY_B, _ENTRY_B)),  # a name twice
        _fast_header(entries=(_ENTRY_B,)),  # data in no tensor
        _fast_header(
            entries=(
                '"k":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]}',
                '"b":{"dtype":"F32","shape":[3],"data_offsets":[24,36]}',
            )
        ),
        _fast_header(entries=(_ENTRY_B, '"b":{"dtype":"F32","shape":[6],"data_offsets":[12,36]}')),
        _fast_header(entries=('"A":' + _ENTRY_B[4:], '"__metadata__":' + _ENTRY_K[4:])),
        _fast_header(entries=(_ENTRY_B, _ENTRY_K.replace("[2,3]", "[7]").replace("36]", "40]"))),
        _fast_header(entries=(_ENTRY_B.replace("[3]", "[9]").replace("12]", "36]"),)),
        _fast_header(entries=()),  # no tensors
        _k('"k"', '"__metadata__"'),
        _k('"k"', '"\\u006b"'),  # an escape
        _k('"k"', '"k\\"x"'),
        _k('"k"', '"k\x01"'),  # a control character, refused by JSON
        _k('"k"', '"\u00e9"'),
        _k('"k"', '"' + "k" * 257 + '"'),
        _k('"k"', '""'),
        _k("[12,36]", "[12,35]"),
        _k("[12,36]", "[13,36]"),
        _k("[12,36]", "[12,012]"),
        _k("[12,36]", "[12,36.0]"),
        _k("[12,36]", "[36,12]"),
        _k("[2,3]", "[6]"),
        _k("[2,3]", "[2,3,1,1,1,1,1,1]"),
        _k("[2,3]", "[2,3,1,1,1,1,1,1,1]"),
        _k("[2,3]", "[02,3]"),
        _k("[2,3]", "[1099511627776,0]"),
        _k("[2,3]", "[999999999999,0]"),
        _k("[2,3]", "[2,true]"),
        _k("[2,3]", "[2,-3]"),
        _k("F32", "F64"),
        _k('"dtype":"F32","shape":[2,3]', '"shape":[2,3],"dtype":"F32"'),
        _m('"base_version":"3"', '"base_version":"0003"'),
        _m('"base_version":"3"', '"base_version":"9007199254740992"'),
        _m('"base_version":"3"', '"base_version":"9007199254740991"'),
        _m('"base_version":"3"', '"base_version":"\u0663"'),
        _m('"num_examples":"7"', '"num_examples":"0"'),
        _m('"num_examples":"7"', '"num_examples":"1099511627776"'),
        _m('"num_examples":"7"', '"num_examples":"12345678901234567"'),
        _m("dev-1", "dev/1"),
        _m("dev-1", "d" * 65),
        _m("u.1", ""),
        _m('"fededge":"1"', '"fededge":"2"'),
        _m('"kind":"update"', '"kind":"model"'),
        _m('"fededge"', '"eval_loss":"nan","fededge"'),
        _m('"fededge"', '"eval_loss":"-inf","fededge"'),
        _m('"fededge"', '"eval_accuracy":"1e999","fededge"'),
        _m('"fededge"', '"eval_loss":"x","fededge"'),
        _m('"fededge"', '"eval_loss":" 1_0 ","fededge"'),
        _m('"fededge"', '"eval_loss":"","fededge"'),
        _m('"fededge"', '"eval_loss":"' + "1" * 65 + '","fededge"'),
        _m('"fededge"', '"eval_accuracy":"0.5","eval_loss":"0.25","fededge"'),
        _m('"fededge"', '"eval_loss":"0.25","eval_accuracy":"0.5","fededge"'),
        _m('"task"', '"eval_loss":"0.25","task"'),
        _m('"update_id"', '"train_loss":"nan","update_id"'),
        _m('"update_id"', '"train_loss":"-1e5","update_id"'),
        _m('"update_id"', '"train_loss":"' + "1" * 65 + '","update_id"'),
        _m('"update_id"', '"unclipped":"0.5","update_id"'),
        _m('"update_id"', '"encoding":"f32","update_id"'),
        _m('"task"', '"task":"x","task"'),
    ],
)
def test_odd_headers_are_decoded_as_the_general_path_does(header: str) -> None:
    # The fast path matches the header as Update.to_bytes writes it, character for character;
    # everything else (valid JSON written otherwise, or refused) goes the general way.
    raw = _with_header(_written(), header)
    _same_as_the_general_path(raw)
    _same_as_the_general_path(bytearray(raw))


def test_headers_over_the_bound_are_refused_as_the_general_path_does() -> None:
    for pad in ((1 << 20) - len(_fast_header()), (1 << 20) - len(_fast_header()) + 1):
        raw = _with_header(_written(), _fast_header(tail=" " * pad))
        got = _same_as_the_general_path(raw, max_bytes=1 << 22)
        assert isinstance(got, Update) == (pad <= (1 << 20) - len(_fast_header()))


_NAMES = st.text("abk_.", min_size=1, max_size=3) | st.just("__metadata__") | st.text(
    st.sampled_from(["a", "k", '"', "\\", "\x01", "\u00e9", ",", ":", "{", "]", " "]), min_size=1,
    max_size=4)  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(
        _NAMES,
        st.tuples(st.sampled_from(["<f4"] * 6 + ["<f8", "<f2", "i1"]),
                  st.lists(st.integers(0, 3), max_size=3)),
        min_size=1, max_size=4,
    ),
    st.dictionaries(st.sampled_from(["train_loss", "eval_loss", "eval_accuracy"]),
                    st.floats(allow_nan=False, allow_infinity=False)),
    st.booleans(),
)  # fmt: skip
def test_written_updates_of_any_tensors_decode_as_the_general_path(
    tensors: dict[str, tuple[str, list[int]]], metrics: dict[str, float], in_place: bool
) -> None:
    delta = {name: np.zeros(shape, np.dtype(dt)) + 1 for name, (dt, shape) in tensors.items()}
    raw = _written(delta, **metrics)
    _same_as_the_general_path(bytearray(raw) if in_place else raw)


_TOKENS = st.sampled_from(['"', '\\', ",", ":", "{", "}", "[", "]", " ", "0", "7", "12", "-1",
                           "F32", "F16", "__metadata__", "x", "\x00", "\u00e9", "\ud7ff", "1e3",
                           "null", "true", '"a"', "shape", "data_offsets"])  # fmt: skip


@settings(max_examples=500, deadline=None)
@given(st.integers(0, 400), st.integers(0, 6), st.lists(_TOKENS, max_size=4), st.booleans())
def test_mutated_written_headers_decode_as_the_general_path(
    at: int, cut: int, tokens: list[str], metrics: bool
) -> None:
    losses: dict[str, object] = (
        {"train_loss": 0.5, "eval_loss": 1.0, "eval_accuracy": 0.5} if metrics else {}
    )
    raw = _written(None, **losses)
    (hlen,) = struct.unpack_from("<Q", raw)
    header = raw[8 : 8 + hlen].decode().rstrip(" ")
    at %= len(header) + 1
    header = header[:at] + "".join(tokens) + header[at + cut :]
    _same_as_the_general_path(_with_header(raw, header))


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(st.text("abkz_.-/ 0", min_size=1, max_size=8),
                    st.lists(st.integers(0, 3), max_size=8), min_size=1, max_size=6),
    st.dictionaries(st.sampled_from(["train_loss", "eval_loss", "eval_accuracy"]),
                    st.floats(allow_nan=False, allow_infinity=False)),
)  # fmt: skip
def test_written_f32_updates_take_the_fast_path(
    shapes: dict[str, list[int]], metrics: dict[str, float]
) -> None:
    from fededge.protocol import messages

    delta = {name: np.full(shape, 0.5, np.float32) for name, shape in shapes.items()}
    raw = _written(delta, **metrics)
    assert messages._written_update(raw, 1 << 20) is not None
    _same_as_the_general_path(raw)


@pytest.mark.parametrize("n", [4096, 4097])
def test_tensor_count_bound_holds_on_the_fast_path(n: int) -> None:
    raw = _written({f"t{i:05d}": np.zeros(i % 2, np.float32) for i in range(n)})
    got = _same_as_the_general_path(raw, max_bytes=1 << 22)
    assert isinstance(got, Update) == (n <= 4096)
