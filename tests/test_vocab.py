"""The wire vocabulary is defined once (fededge/protocol/vocab.py) and the docs say the same."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from fededge.protocol import Topics
from fededge.protocol.vocab import NO_GRAPH, RejectReason, check_name, is_name

DOCS = Path(__file__).resolve().parent.parent / "docs"


def documented_reasons(doc: str) -> list[str]:
    text = (DOCS / doc).read_text()
    blocks = re.findall(r"<!-- reasons -->(.*?)<!-- /reasons -->", text, re.S)
    assert len(blocks) == 1, f"{doc} must have exactly one <!-- reasons --> block"
    # Each reason is the first backticked word of an item: `name` (explanation ...).
    return re.findall(r"(?:^|[,:]\s*|\n)`([a-z_]+)`", blocks[0])


@pytest.mark.parametrize("doc", ["protocol.md", "operations.md"])
def test_documented_reject_reasons_equal_the_enum(doc: str) -> None:
    found = documented_reasons(doc)
    assert sorted(found) == sorted(r.value for r in RejectReason), doc
    assert len(found) == len(set(found)), f"{doc} lists a reason twice"


def test_no_graph_is_64_zero_hex_digits() -> None:
    assert NO_GRAPH == "0" * 64


@pytest.mark.parametrize("name", ["pi-17", "a", "A.b_c-9", "x" * 64])
def test_valid_names(name: str) -> None:
    assert is_name(name)
    assert check_name(name, "device") == name


@pytest.mark.parametrize(
    "name", ["", "x" * 65, "a/b", "a+", "#", "dev\n", "dévice", "a b", "١٢", None, 5]
)
def test_invalid_names(name: object) -> None:
    assert not is_name(name)
    if isinstance(name, str):
        with pytest.raises(ValueError, match="device must be"):
            check_name(name, "device")


T = Topics("fededge", "digits")


def test_round_topics_build_and_parse() -> None:
    assert T.checkin("pi-1") == "fededge/digits/rounds/checkin/pi-1"
    assert T.round_broadcast("r7", "config") == "fededge/digits/rounds/r7/config"
    assert T.round_stage("r7", "masked", "pi-1") == "fededge/digits/rounds/r7/masked/pi-1"
    assert T.round_to("r7", "pi-1") == "fededge/digits/rounds/r7/to/pi-1"
    assert T.round_to_filter("pi-1") == "fededge/digits/rounds/+/to/pi-1"
    assert T.round_stage_filter("share") == "fededge/digits/rounds/+/share/+"
    for topic, kind, rid, typ, dev in [
        (T.checkin("pi-1"), "checkin", None, "checkin", "pi-1"),
        (T.round_broadcast("r7", "status"), "broadcast", "r7", "status", None),
        (T.round_stage("r7", "advertise", "pi-2"), "stage", "r7", "advertise", "pi-2"),
        (T.round_to("r7", "pi-3"), "to", "r7", "to", "pi-3"),
    ]:
        parsed = T.parse_round(topic)
        assert parsed is not None
        assert (parsed.kind, parsed.round_id, parsed.type, parsed.device) == (kind, rid, typ, dev)


@pytest.mark.parametrize(
    "topic",
    [
        "fededge/digits/rounds",
        "fededge/digits/rounds/",
        "fededge/digits/rounds/r7",
        "fededge/digits/rounds/checkin/pi-1/x",
        "fededge/digits/rounds/checkin/to/pi-1",
        "fededge/digits/rounds/r7/masked/pi-1/extra",
        "fededge/digits/rounds/r7//pi-1",
        "fededge/other/rounds/r7/status",
        "fededge/digits/updates/pi-1",
    ],
)
def test_parse_round_refuses_other_topics(topic: str) -> None:
    assert T.parse_round(topic) is None


def test_round_topics_refuse_bad_names() -> None:
    with pytest.raises(ValueError):
        T.round_to("r/7", "pi-1")
    with pytest.raises(ValueError):
        T.checkin("+")
    with pytest.raises(ValueError, match="checkin"):
        T.round_broadcast("checkin", "config")


def test_plan_and_status_vectors_of_the_trust_fields() -> None:
    from fededge.protocol import DeviceStatus, Plan, decode_json

    text = (DOCS / "protocol.md").read_text()
    blocks = dict(re.findall(r"```vector (\S+)\n(.*?)```", text, re.S))
    plan = Plan(generation=3, max_updates_per_device=2, max_weight=64)
    assert plan.to_bytes() == blocks["plan-trust"].strip().encode()
    assert Plan().to_bytes() == blocks["plan"].strip().encode()
    raw = blocks["device-status-refused"].strip().encode()
    status = decode_json(raw, DeviceStatus)
    assert status.refused and status.to_bytes() == raw


def test_secagg_v2_and_roster_vectors_in_the_docs_are_the_checked_ones() -> None:
    import test_secagg_vectors as v  # the byte-for-byte checks of these vectors

    text = (DOCS / "protocol.md").read_text()
    blocks = {
        k: "".join(b.split()) for k, b in re.findall(r"```vector (\S+)\n(.*?)```", text, re.S)
    }
    assert blocks["secagg-v2-advertise-data"] == v.ADVERTISE_DATA
    assert blocks["secagg-v2-consistency-data"] == v.CONSISTENCY_DATA
    assert blocks["roster-payload"].encode() == v.ROSTER.replace(b" ", b"")
    assert blocks["roster-envelope-header"] == v.ROSTER_HEADER
    for example in (v.CONFIG, v.ADVERTISE, v.SURVIVORS, v.CONSISTENCY, v.UNMASK_REQUEST):
        assert example.decode() in text
    assert v.CONFIG_SHA256 in text


def test_update_encoding_vectors_in_the_docs_are_the_checked_ones() -> None:
    import test_compression as c  # the byte-for-byte checks of these vectors

    text = (DOCS / "protocol.md").read_text()
    blocks = {
        k: "".join(b.split()) for k, b in re.findall(r"```vector (\S+)\n(.*?)```", text, re.S)
    }
    assert blocks["update-f16"] == c.F16_VECTOR
    assert blocks["update-int8"] == c.INT8_VECTOR


def test_rotation_and_f16_model_vectors_in_the_docs_are_the_checked_ones() -> None:
    import test_rotation as r  # the checks of these vectors

    text = (DOCS / "protocol.md").read_text()
    blocks = {
        k: "".join(b.split()) for k, b in re.findall(r"```vector (\S+)\n(.*?)```", text, re.S)
    }
    assert blocks["model-f16"] == r.MODEL_F16_VECTOR
    assert r.VECTOR_SEED in text
    assert ", ".join(str(v) for v in r.VECTOR_Y) in " ".join(text.split())
