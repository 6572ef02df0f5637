"""Append-only write-ahead log of accepted updates, in segments, with CRC-checked records."""

from __future__ import annotations

import json
import logging
import os
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fededge.errors import StorageError
from fededge.fsio import fsync_dir

log = logging.getLogger(__name__)

# Record: magic, header length, payload length, crc32 over header+payload, header, payload.
_MAGIC = b"FEW1"
_PREFIX = struct.Struct("<4sIQI")
MAX_RECORD_HEADER = 1 << 20


@dataclass(frozen=True)
class Record:
    """One logged update: JSON header (id, weight, group, ...) and the raw update payload."""

    header: dict[str, Any]
    payload: bytes


def encode_record(header: dict[str, Any], payload: bytes) -> bytes:
    h = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
    crc = zlib.crc32(payload, zlib.crc32(h))
    return _PREFIX.pack(_MAGIC, len(h), len(payload), crc) + h + payload


class SegmentWriter:
    """Appends records to one segment file; ``commit()`` makes everything written durable."""

    def __init__(self, path: Path, *, fsync: bool) -> None:
        self.path = path
        self._fsync = fsync
        self._f = path.open("ab")
        if fsync:
            fsync_dir(path.parent)

    def append(self, header: dict[str, Any], payload: bytes) -> None:
        self._f.write(encode_record(header, payload))

    def commit(self) -> None:
        """Group commit: one flush and one fsync for every record appended since the last."""
        self._f.flush()
        if self._fsync:
            os.fdatasync(self._f.fileno())

    def close(self) -> None:
        self._f.close()


def read_segment(path: Path, *, repair: bool) -> Iterator[Record]:
    """Yield the valid records of a segment; a torn or corrupt tail is cut off (if ``repair``).

    Only the tail can be torn: records are acknowledged after fsync, so everything before the
    first bad record was durable, and nothing after it was ever acknowledged.
    """
    data = path.read_bytes()
    pos = 0
    while pos < len(data):
        bad = _check(data, pos)
        if bad:
            log.warning("write-ahead log %s: %s at byte %d; dropping the tail", path, bad, pos)
            if repair:
                with path.open("r+b") as f:
                    f.truncate(pos)
                    f.flush()
                    os.fsync(f.fileno())
            return
        _, hlen, plen, _ = _PREFIX.unpack_from(data, pos)
        start = pos + _PREFIX.size
        try:
            header = json.loads(data[start : start + hlen])
        except json.JSONDecodeError as e:  # CRC passed, so this is a bug, not a torn write
            msg = f"write-ahead log {path}: record at {pos} has a bad header: {e}"
            raise StorageError(msg) from e
        yield Record(header=header, payload=data[start + hlen : start + hlen + plen])
        pos = start + hlen + plen


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
    if zlib.crc32(p, zlib.crc32(h)) != crc:
        return "CRC mismatch"
    return None
