"""fededge.logs: text and JSON lines, journald priorities, structured key=value fields."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from fededge import logs


@pytest.fixture(autouse=True)
def _restore_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    numba_level = logging.getLogger("numba").level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.getLogger("numba").setLevel(numba_level)
    logging.captureWarnings(False)


def _emit(fmt: logs.Format, journal: bool, level: str = "debug") -> io.StringIO:
    out = io.StringIO()
    logs.setup_logging(level, fmt, stream=out, journal=journal)
    log = logging.getLogger("fededge.aggregator")
    log.info("version published", extra={"version": 4, "updates": 12})
    log.warning(
        "update rejected",
        extra={"device": "pi-07", "topic": "fl/digits/updates/pi-07", "reason": "stale"},
    )
    log.debug("odd value", extra={"detail": 'norm = 3.2 "clipped"', "empty": ""})
    return out


def test_text_lines_carry_time_level_and_key_value_fields() -> None:
    lines = _emit("text", journal=False).getvalue().splitlines()
    assert len(lines) == 3
    stamp, level, rest = lines[1].split(" ", 2)
    assert stamp.endswith("Z") and "T" in stamp
    assert level == "WARNING"
    assert rest == (
        "fededge.aggregator: update rejected "
        "device=pi-07 topic=fl/digits/updates/pi-07 reason=stale"
    )
    assert lines[0].endswith("version published version=4 updates=12")
    # Values with spaces, quotes or '=' are quoted so each field stays one token.
    assert lines[2].endswith('odd value detail="norm = 3.2 \\"clipped\\"" empty=""')


def test_text_under_journald_has_priorities_and_no_timestamps() -> None:
    lines = _emit("text", journal=True).getvalue().splitlines()
    assert lines == [
        "<6>fededge.aggregator: version published version=4 updates=12",
        "<4>fededge.aggregator: update rejected "
        "device=pi-07 topic=fl/digits/updates/pi-07 reason=stale",
        '<7>fededge.aggregator: odd value detail="norm = 3.2 \\"clipped\\"" empty=""',
    ]


def test_every_traceback_line_keeps_the_priority_under_journald() -> None:
    out = io.StringIO()
    logs.setup_logging("info", "text", stream=out, journal=True)
    try:
        raise RuntimeError("disk full")
    except RuntimeError:
        logging.getLogger("fededge.wal").exception("append failed")
    lines = out.getvalue().splitlines()
    assert len(lines) > 3
    assert all(line.startswith("<3>") for line in lines)
    assert lines[-1] == "<3>RuntimeError: disk full"


def test_json_lines_are_objects_with_fields() -> None:
    lines = _emit("json", journal=False).getvalue().splitlines()
    objs = [json.loads(line) for line in lines]
    assert objs[1]["level"] == "warning"
    assert objs[1]["logger"] == "fededge.aggregator"
    assert objs[1]["msg"] == "update rejected"
    assert (objs[1]["device"], objs[1]["reason"]) == ("pi-07", "stale")
    assert objs[0]["version"] == 4
    assert objs[0]["ts"].endswith("Z")


def test_json_under_journald_is_prefixed_and_otherwise_plain_json() -> None:
    lines = _emit("json", journal=True).getvalue().splitlines()
    assert [line[:3] for line in lines] == ["<6>", "<4>", "<7>"]
    assert json.loads(lines[1][3:])["reason"] == "stale"


def test_json_survives_unserialisable_values_and_exceptions() -> None:
    out = io.StringIO()
    logs.setup_logging("info", "json", stream=out, journal=False)
    try:
        1 / 0  # noqa: B018
    except ZeroDivisionError:
        logging.getLogger("x").exception("boom", extra={"path": Path("/var/lib/x"), "msg2": {1}})
    (line,) = out.getvalue().splitlines()
    obj = json.loads(line)
    assert obj["path"] == "/var/lib/x"
    assert "ZeroDivisionError" in obj["exc"]


def test_level_filters_and_a_second_setup_replaces_the_first() -> None:
    first, second = io.StringIO(), io.StringIO()
    logs.setup_logging("warning", "text", stream=first, journal=False)
    logs.setup_logging("error", "text", stream=second, journal=False)
    log = logging.getLogger("fededge.device")
    log.warning("quiet")
    log.error("loud")
    assert first.getvalue() == ""
    assert second.getvalue().splitlines()[0].endswith("fededge.device: loud")


def test_numba_debug_chatter_is_capped() -> None:
    logs.setup_logging("debug", "text", stream=io.StringIO(), journal=False)
    assert logging.getLogger("numba").getEffectiveLevel() == logging.INFO


def test_bad_level_and_format_are_named() -> None:
    with pytest.raises(ValueError, match="'loud'"):
        logs.setup_logging("loud")
    with pytest.raises(ValueError, match="'xml'"):
        logs.setup_logging("info", "xml")  # type: ignore[arg-type]


def test_bound_fields_appear_on_every_line_and_extra_wins() -> None:
    out = io.StringIO()
    logs.setup_logging("info", "text", stream=out, journal=True)
    log = logs.bind("fededge.device", task="digits", device="pi-01")
    log.info("trained", extra={"examples": 64})
    log.info("override", extra={"device": "pi-02"})
    assert out.getvalue().splitlines() == [
        "<6>fededge.device: trained task=digits device=pi-01 examples=64",
        "<6>fededge.device: override task=digits device=pi-02",
    ]


def test_journal_stream_is_only_trusted_when_it_names_our_stream(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with (tmp_path / "a").open("w") as a, (tmp_path / "b").open("w") as b:
        st = os.fstat(a.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        assert logs.journal_stream_active(a)
        assert not logs.journal_stream_active(b)  # inherited variable, redirected stderr
        assert not logs.journal_stream_active(io.StringIO())  # no file descriptor
        monkeypatch.setenv("JOURNAL_STREAM", "garbage")
        assert not logs.journal_stream_active(a)
        monkeypatch.delenv("JOURNAL_STREAM")
        assert not logs.journal_stream_active(a)


def test_journald_is_detected_from_the_environment_in_a_real_process(tmp_path: Path) -> None:
    # What systemd does: stderr is a stream whose dev:inode is in JOURNAL_STREAM.
    out = tmp_path / "stderr"
    code = (
        "import logging, os; from fededge.logs import setup_logging; "
        "st = os.fstat(2); os.environ['JOURNAL_STREAM'] = f'{st.st_dev}:{st.st_ino}'; "
        "setup_logging('info', 'text'); logging.getLogger('svc').warning('hello', "
        "extra={'k': 'v'})"
    )
    with out.open("w") as err:
        subprocess.run([sys.executable, "-c", code], stderr=err, check=True)
    assert out.read_text() == "<4>svc: hello k=v\n"
