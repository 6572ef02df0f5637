"""Append-only write-ahead log of accepted updates, in segments, with CRC-checked records."""

from __future__ import annotations

import json
import logging
import math
import os
import struct
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from fededge.errors import StorageError
from fededge.fsio import fsync_dir

_isal_crc32: Callable[[bytes | memoryview, int], int] | None
try:  # ISA-L's CRC-32: the same checksum as zlib's, about 5x faster on 4 MB records
    from isal.isal_zlib import crc32 as _isal_crc32
except ImportError:  # pragma: no cover - isal comes with the aggregator extra
    _isal_crc32 = None

log = logging.getLogger(__name__)

# Record: magic, header length, payload length, crc32 over header+payload, header, payload.
_MAGIC = b"FEW1"
_PREFIX = struct.Struct("<4sIQI")
MAX_RECORD_HEADER = 1 << 20
_IOV_MAX = 1024  # POSIX's minimum and Linux's value


@dataclass(frozen=True)
class Record:
    """One logged update: JSON header (id, weight, group, ...) and the raw update payload."""

    header: dict[str, Any]
    payload: bytes


# One encoder for every record: json.dumps with arguments builds a JSONEncoder per call.
_HEADER_JSON = json.JSONEncoder(separators=(",", ":"), sort_keys=True).encode


def encode_record(header: dict[str, Any] | bytes, payload: bytes) -> bytes:
    """A record of ``header`` (a dict, or its JSON from ``update_header``) and ``payload``."""
    return record_head(header, payload) + payload


def record_head(header: dict[str, Any] | bytes, payload: bytes) -> bytes:
    """A record up to its payload: prefix and header (the payload follows as it is)."""
    h = header if isinstance(header, bytes) else _HEADER_JSON(header).encode()
    return _PACK(_MAGIC, len(h), len(payload), crc32(payload, crc32(h))) + h


_PACK = _PREFIX.pack
# Without ISA-L: zlib.crc32 releases the GIL for inputs over 5 KiB. For a small payload that
# costs more than it saves: in the aggregator the MQTT network thread takes the GIL and the
# main thread waits for it back (see SegmentWriter), so payloads below _CRC_SPLIT are
# checksummed in pieces that keep it; the CRC is the same (crc32 chains). Large ones release
# it (the MQTT thread runs meanwhile).
_CRC_PIECE = 5 * 1024
_CRC_SPLIT = 64 * 1024


def crc32(data: bytes | memoryview, crc: int = 0) -> int:
    """zlib's CRC-32 of ``data`` continuing ``crc`` (ISA-L's where installed: ~5x faster)."""
    if _isal_crc32 is not None:
        return _isal_crc32(data, crc)
    n = len(data)
    if n <= _CRC_PIECE or n >= _CRC_SPLIT:
        return zlib.crc32(data, crc)
    view = memoryview(data)
    for i in range(0, n, _CRC_PIECE):
        crc = zlib.crc32(view[i : i + _CRC_PIECE], crc)
    return crc


def update_header(update_id: str, weight: float, norm: float, group: int) -> bytes | None:
    """The JSON header of an update's record, as ``encode_record`` writes the dict
    ``{"id", "weight", "norm", "group"}``, without the JSON encoder: ``update_id`` is a checked
    name (nothing to escape). None if a value needs the encoder (not a finite float)."""
    if type(weight) is not float or type(norm) is not float:
        return None
    if not (math.isfinite(weight) and math.isfinite(norm)):
        return None
    w, n = repr(weight), repr(norm)
    return f'{{"group":{group},"id":"{update_id}","norm":{n},"weight":{w}}}'.encode()


class _Updates(NamedTuple):
    """A group of update records appended by ``SegmentWriter.append_updates``, not encoded yet."""

    group: int
    records: list[tuple[str, float, float, bytes]]

    def encode_into(self, parts: list[bytes]) -> None:
        """Each record as head and payload (the payload itself: no copy)."""
        group = self.group
        for update_id, weight, norm, payload in self.records:
            header: bytes | dict[str, Any] | None = update_header(update_id, weight, norm, group)
            if header is None:  # a value json must encode (not a finite float)
                header = {"id": update_id, "weight": weight, "norm": norm, "group": group}
            parts += (record_head(header, payload), payload)


class SegmentWriter:
    """Appends records to one segment file; ``commit()`` makes everything appended durable.

    Records are gathered and written by ``commit()`` in one ``writev``: a system call per
    record would release the GIL once per update, and in the aggregator each release hands it
    to the MQTT network thread and waits for it back.
    """

    def __init__(self, path: Path, *, fsync: bool) -> None:
        self.path = path
        self._fsync = fsync
        self._fd = -1  # the file is created by the first write (on whichever thread writes)
        # Parts to write, in order: encoded records, and groups of updates encoded by
        # ``write`` (on the WAL sync thread in the aggregator: their CRCs, off the main thread).
        self._pending: list[bytes | _Updates] = []

    def _file(self) -> int:
        if self._fd < 0:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            if self._fsync:
                fsync_dir(self.path.parent)
        return self._fd

    def append(self, header: dict[str, Any] | bytes, payload: bytes) -> None:
        """Add a record, written by the next ``write``/``commit``. The payload is written from
        the caller's object, not a copy: it must not change before then (received payloads
        never do)."""
        # The record as two parts for the writev, head and payload: no copy of the payload.
        self._pending += (record_head(header, payload), payload)

    def append_updates(
        self, group: int, records: Iterable[tuple[str, float, float, bytes]]
    ) -> None:
        """``append`` the record of each (update id, weight, norm, payload) of a group, its
        header ``{"id", "weight", "norm", "group"}`` (``update_header`` where it can)."""
        self._pending.append(_Updates(group, list(records)))

    def commit(self) -> None:
        """Group commit: one write and one fsync for every record appended since the last."""
        self.write()
        self.sync()

    def write(self) -> None:
        """Write the records appended since the last write (not yet durable: see ``sync``)."""
        parts: list[bytes] = []
        for part in self._pending:
            if isinstance(part, _Updates):
                part.encode_into(parts)
            else:
                parts.append(part)
        self._pending = []
        _write_all(self._file(), parts)

    def sync(self) -> None:
        """Make everything written so far durable (releases the GIL while the disk works)."""
        if self._fsync and self._fd >= 0:
            os.fdatasync(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _write_all(fd: int, parts: list[bytes]) -> None:
    """Write every part, in order, with as few ``writev`` calls as the kernel allows."""
    total = sum(map(len, parts))
    if not total:
        return
    done = 0  # bytes written
    if len(parts) <= _IOV_MAX:  # a group's records: one writev of the parts as they are
        done = os.writev(fd, parts)
        if done == total:
            return
    # More parts than one writev takes, or a short write (disk full): by views, resumed
    # after what is written.
    views = [memoryview(p) for p in parts if p]
    i = 0
    while i < len(views) and done >= len(views[i]):
        done -= len(views[i])
        i += 1
    if done:
        views[i] = views[i][done:]
    while i < len(views):
        n = os.writev(fd, views[i : i + _IOV_MAX])
        while i < len(views) and n >= len(views[i]):  # a short write (disk full) resumes
            n -= len(views[i])
            i += 1
        if n:
            views[i] = views[i][n:]


@dataclass(frozen=True)
class Damage:
    """The first bad record of a segment: where, why, and what valid data follows it."""

    path: Path
    offset: int
    problem: str
    size: int  # of the whole file
    records_after: int  # valid records found after the bad one

    @property
    def torn_tail(self) -> bool:
        """Nothing valid follows: a crash in the middle of an append (normal, never acked)."""
        return self.records_after == 0

    def describe(self) -> str:
        return (
            f"{self.path}: {self.problem} at byte {self.offset} of {self.size}, followed by "
            f"{self.records_after} valid record(s)"
        )


def repair_command(path: Path) -> str:
    """The command that repairs the segment at ``path`` (``{state}/aggregator/{task}/pending``)."""
    state_dir, task = path.parent.parent.parent.parent, path.parent.parent.name
    return f"fededge aggregator repair-wal --state-dir {state_dir} --task {task}"


def scan_segment(path: Path) -> tuple[list[Record], Damage | None]:
    """The valid records before the first bad one, and what is wrong with the rest (if any)."""
    data = path.read_bytes()
    records: list[Record] = []
    pos = 0
    while pos < len(data):
        bad = _check(data, pos)
        if bad:
            return records, Damage(path, pos, bad, len(data), _count_valid(data, pos + 1))
        _, hlen, plen, _ = _PREFIX.unpack_from(data, pos)
        start = pos + _PREFIX.size
        try:
            header = json.loads(data[start : start + hlen])
        except json.JSONDecodeError as e:  # CRC passed, so this is a bug, not a torn write
            msg = f"write-ahead log {path}: record at {pos} has a bad header: {e}"
            raise StorageError(msg) from e
        records.append(Record(header=header, payload=data[start + hlen : start + hlen + plen]))
        pos = start + hlen + plen
    return records, None


def record_at(data: bytes, pos: int) -> tuple[Record, int]:
    """The valid record at ``pos`` of ``data`` and where the next one starts; ValueError saying
    what is wrong with it (a torn or damaged record, or a header that is not JSON)."""
    bad = _check(data, pos)
    if bad:
        raise ValueError(bad)
    _, hlen, plen, _ = _PREFIX.unpack_from(data, pos)
    start = pos + _PREFIX.size
    try:
        header = json.loads(data[start : start + hlen])
    except json.JSONDecodeError as e:
        raise ValueError(f"bad record header: {e}") from None
    end = start + hlen + plen
    return Record(header=header, payload=data[start + hlen : end]), end


def _count_valid(data: bytes, pos: int) -> int:
    """Valid records anywhere from ``pos`` on (searching for the magic at every offset)."""
    n = 0
    while (pos := data.find(_MAGIC, pos)) >= 0:
        if _check(data, pos) is None:
            _, hlen, plen, _ = _PREFIX.unpack_from(data, pos)
            n += 1
            pos += _PREFIX.size + hlen + plen
        else:
            pos += 1
    return n


def read_segment(path: Path, *, repair: bool) -> Iterator[Record]:
    """Yield the records of a segment; cut off a torn tail (if ``repair``), stop on corruption.

    Records are acknowledged after fsync, so a crash can only tear the tail: a bad record with
    nothing valid after it is cut off (it was never acknowledged). A bad record *followed by
    valid ones* is corruption of acknowledged data: StorageError naming the file, the offset
    and the repair command; the operator decides to accept the loss.
    """
    records, damage = scan_segment(path)
    if damage is not None and not damage.torn_tail:
        raise StorageError(
            f"write-ahead log {damage.describe()}: the records after it were acknowledged and "
            f"would be lost. Stop the aggregator and run `{repair_command(path)}` to inspect "
            "it; with --yes that truncates the segment there (keeping a .bad copy)"
        )
    if damage is not None:
        log.warning("write-ahead log %s: %s at byte %d (a torn tail); dropping it",
                    path, damage.problem, damage.offset)  # fmt: skip
        if repair:
            _truncate(path, damage.offset)
    yield from records


def truncate_at_damage(path: Path) -> Damage | None:
    """Keep a copy as ``<segment>.bad`` and truncate the segment at its first bad record."""
    _, damage = scan_segment(path)
    if damage is None:
        return None
    bad = path.with_name(path.name + ".bad")
    bad.write_bytes(path.read_bytes())
    with bad.open("rb") as f:
        os.fsync(f.fileno())
    _truncate(path, damage.offset)
    return damage


def _truncate(path: Path, size: int) -> None:
    with path.open("r+b") as f:
        f.truncate(size)
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(path.parent)


def _check(data: bytes, pos: int) -> str | None:
    if len(data) - pos < _PREFIX.size:
        return "truncated record prefix"
    magic, hlen, plen, crc = _PREFIX.unpack_from(data, pos)
    if magic != _MAGIC:
        return "bad magic"
    start = pos + _PREFIX.size
    if hlen > MAX_RECORD_HEADER or start + hlen + plen > len(data):
        return "truncated record"
    h = data[start : start + hlen]
    p = data[start + hlen : start + hlen + plen]
    if crc32(p, crc32(h)) != crc:
        return "CRC mismatch"
    return None


def record_spans(path: Path) -> Iterator[tuple[dict[str, Any], int, int]]:
    """(header, payload offset, payload length) of each record, without reading payloads.

    For reading logged updates piecewise (robust aggregation reads each update's coordinates
    block by block with ``os.pread``). The CRCs were checked when the log was replayed or
    written by this process; a truncated tail ends the iteration.
    """
    size = path.stat().st_size
    with path.open("rb") as f:
        pos = 0
        while pos + _PREFIX.size <= size:
            f.seek(pos)
            magic, hlen, plen, _ = _PREFIX.unpack(f.read(_PREFIX.size))
            start = pos + _PREFIX.size
            if magic != _MAGIC or hlen > MAX_RECORD_HEADER or start + hlen + plen > size:
                return
            header = json.loads(f.read(hlen))
            yield header, start + hlen, plen
            pos = start + hlen + plen
