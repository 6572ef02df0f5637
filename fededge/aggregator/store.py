"""The aggregator's on-disk state: model versions, the plan, the graph, checkpoints and the WAL.

Layout under ``{state_dir}/aggregator/{task}/``::

    graph.bin                      the task's graph message, as published
    plan.json                      the current plan, as published
    versions/00000042.json         metadata of version 42 (metrics, update ids folded into it)
    versions/00000042.safetensors  the model-version message, byte for byte as published
    pending/checkpoint-0.bin       the two checkpoint slots (accumulator of the pending
    pending/checkpoint-1.bin       version after segment N), written in turn
    pending/00000042-000003.wal    write-ahead log segments of the pending version
    pending/00000042.ids           update ids and devices of the pending version (append-only)

A version is complete once its ``.safetensors`` exists (written last, atomically). Everything in
``pending/`` that belongs to an older base version is discarded at start.

The ids of the updates a checkpoint covers (needed for deduplication once the WAL segments
are gone) are not rewritten by every checkpoint: the checkpoint's state holds only those not
yet in the ``.ids`` file (``ids``, ``devices``) and how much of that file belongs to it
(``ids_file``: entries and bytes, a prefix made durable before the checkpoint was written).
Each checkpoint's ids are appended to the file after it (``IdsFile``), so a checkpoint costs
the model plus the updates since the previous one, not the whole version. A checkpoint
written before the ``.ids`` file existed holds every id in its state: read as one whose file
part is empty.

Checkpoints are written in place, in two slots in turn, not as a new file renamed over the
old one: a slot is a 32-byte prefix (``FECK``, format 1, a sequence number, the body's length
and CRC-32, then the CRC-32 of those 28 bytes) and a body, which is what a checkpoint file
held before (a tensors message: the accumulator, the state in its metadata). A write goes to
the slot that does not hold the newest valid checkpoint, with the next sequence number, and
is made durable by one ``fdatasync``; a write torn by a crash fails its CRC and the other
slot, untouched, is read. The newest valid slot is the checkpoint. Quirk: creating, renaming
and fsyncing a new file and its directory per checkpoint cost 3-4x the CPU and wall time of
an overwrite (800 KB: 1.5 ms of CPU and 5.3 ms against 0.35 and 1.6; 8 MB: 6.1 and 31 ms
against 3.0 and 15; ext4 on this machine), and on the checkpoint path (models of 100k
parameters and up) there is a checkpoint per group commit. A ``checkpoint.safetensors`` of
an earlier fededge is read when no slot holds a checkpoint, and removed by the first write.

An accumulator of ``DIRECT_MIN`` bytes or more, page-aligned (``fededge.memory``), is written
with direct I/O (``O_DIRECT``) from its own memory: no copy into the page cache and no
writeback of it (8 MB with the fdatasync: 0.3 ms of CPU against 1.0). Its header is padded
with spaces so that the data starts on a page of the file, and its last page is padded with
zeros after the body (the prefix counts the body: the zeros are never read). The format is the
same; a file system that refuses ``O_DIRECT`` (EINVAL) turns it off for the store, logged once.
"""

from __future__ import annotations

import errno
import fcntl
import io
import json
import logging
import mmap
import os
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np
from numpy.typing import NDArray

from fededge.aggregator.wal import crc32, encode_record, record_at
from fededge.errors import ProtocolError, StorageError
from fededge.fsio import atomic_write, fsync_dir
from fededge.memory import PAGE, is_page_aligned, page_aligned_copy
from fededge.protocol import ModelVersion
from fededge.protocol.tensors import decode_tensors, encode_header

log = logging.getLogger(__name__)
_MAX_FILE = 1 << 34


def task_root(state_dir: Path | str, task: str) -> Path:
    """Where the aggregator keeps the state of ``task`` under ``state_dir``."""
    return Path(state_dir) / "aggregator" / task


def stored_version_path(state_dir: Path | str, task: str, version: int) -> Path:
    """The file of a stored version, for readers that must not lock the state (the CLI)."""
    return task_root(state_dir, task) / VERSIONS_DIR / version_file_name(version)


def version_file_name(version: int) -> str:
    return f"{version:08d}.safetensors"


VERSIONS_DIR = "versions"
#: The checkpoint slots (module docstring) and the file of earlier fededge versions.
CHECKPOINT_SLOTS = ("checkpoint-0.bin", "checkpoint-1.bin")
_SLOT_MAGIC = b"FECK"
_SLOT_FORMAT = 1
_SLOT_PREFIX = struct.Struct("<4sIQQI")  # magic, format, sequence, body bytes, body CRC-32
SLOT_PREFIX_BYTES = _SLOT_PREFIX.size + 4  # and the CRC-32 of those 28 bytes
CHECKPOINT = "checkpoint.safetensors"
#: From this size an accumulator is checkpointed with direct I/O where the file system has it.
DIRECT_MIN = 256 * 1024
_IDS_JSON = json.JSONEncoder(separators=(",", ":")).encode


class IdsFile:
    """The append-only ``pending/{base:08d}.ids`` file: the ids and devices of the pending
    version's updates, in fold order, as a durable prefix of the lists a checkpoint restores.

    Records in the WAL's format (CRC-checked): header ``{"base", "first", "n"}``, payload the
    JSON ``[ids, devices]`` of entries ``first`` to ``first + n``. ``entries`` and ``size`` are
    what is durable; ``add`` queues more, ``flush`` appends them. A checkpoint records
    (``entries``, ``size``) and holds the queued ones itself; bytes after ``size`` (an append
    a crash tore or no checkpoint counts yet) are never read, and the next ``flush`` cuts
    them off. Used by the checkpoint thread only (after ``PendingVersion.recover``).
    """

    def __init__(
        self,
        path: Path,
        base_version: int,
        *,
        fsync: bool,
        entries: int = 0,
        size: int = 0,
        ids: list[str] | None = None,
        devices: list[str] | None = None,
    ) -> None:
        self.path = path
        self.base_version = base_version
        self.entries = entries  # durable in the file, in its first ``size`` bytes
        self.size = size
        self._fsync = fsync
        self.ids: list[str] = ids or []  # queued: entries ``entries`` on, not in the file yet
        self.devices: list[str] = devices or []

    def add(self, first: int, ids: list[str], devices: list[str]) -> None:
        """Queue entries ``first`` on (the version's next ones) for the next ``flush``."""
        if first != self.entries + len(self.ids) or len(ids) != len(devices):
            raise StorageError(
                f"{self.path}: {len(ids)} entries from {first} do not continue the "
                f"{self.entries + len(self.ids)} given (a bug)"
            )
        self.ids += ids
        self.devices += devices

    def flush(self, at_least: int = 1) -> None:
        """Append the queued entries as one record and make them durable (fdatasync); only
        once ``at_least`` are queued (until then the checkpoints hold them)."""
        if not self.ids or len(self.ids) < at_least:
            return
        header = {"base": self.base_version, "first": self.entries, "n": len(self.ids)}
        record = encode_record(header, _IDS_JSON([self.ids, self.devices]).encode())
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            os.ftruncate(fd, self.size)  # a torn or uncounted tail (crash, failed flush)
            view, at = memoryview(record), self.size
            while view:
                n = os.pwrite(fd, view, at)
                view, at = view[n:], at + n
            if self._fsync:
                os.fdatasync(fd)
        finally:
            os.close(fd)
        if self._fsync and self.size == 0:  # the file may be new: its name must be durable
            fsync_dir(self.path.parent)
        self.entries += len(self.ids)
        self.size += len(record)
        self.ids, self.devices = [], []


def read_ids(path: Path, base_version: int, entries: int, size: int) -> tuple[list[str], list[str]]:
    """The first ``entries`` ids and devices of an ``IdsFile``, in its first ``size`` bytes;
    StorageError naming the file if it is missing, short or damaged there."""
    if entries == 0 and size == 0:
        return [], []
    what = f"pending ids file {path} (its checkpoint counts {entries} entries in {size} bytes)"
    try:
        with path.open("rb") as f:
            have = os.fstat(f.fileno()).st_size
            if have < size:  # checked first: a damaged count must not size a read
                raise StorageError(f"{what} holds only {have} bytes")
            data = f.read(size)
    except FileNotFoundError:
        raise StorageError(f"{what} is missing") from None
    except OSError as e:
        raise StorageError(f"{what} is unreadable: {e}") from None
    if len(data) < size:
        raise StorageError(f"{what} holds only {len(data)} bytes")
    ids: list[str] = []
    devices: list[str] = []
    pos = 0
    while pos < size:
        try:
            rec, end = record_at(data, pos)
            h = rec.header
            chunk = json.loads(rec.payload)
        except ValueError as e:  # JSONDecodeError included
            raise StorageError(f"{what} is damaged at byte {pos}: {e}") from None
        if not (
            isinstance(h, dict)
            and h.get("base") == base_version
            and h.get("first") == len(ids)
            and isinstance(chunk, list)
            and len(chunk) == 2
            and all(isinstance(x, list) and len(x) == h.get("n") for x in chunk)
            and all(type(x) is str for part in chunk for x in part)
        ):
            raise StorageError(
                f"{what}: the record at byte {pos} does not continue its {len(ids)} entries"
            )
        ids += chunk[0]
        devices += chunk[1]
        pos = end
    if len(ids) != entries:
        raise StorageError(f"{what} holds {len(ids)} entries")
    return ids, devices


class Store:
    """Durable state of one task; every write is atomic, every read is validated."""

    def __init__(self, root: Path, *, fsync: bool = True, direct_io: bool = True) -> None:
        self.root = root
        self.fsync = fsync
        #: Checkpoints of large accumulators go to disk with direct I/O (``O_DIRECT``): set
        #: off for good by the first refusal (a file system without it, such as tmpfs).
        self.direct_io = direct_io and hasattr(os, "O_DIRECT")
        self.direct_writes = 0  # checkpoints written with it
        self.versions_dir = root / VERSIONS_DIR
        self.pending_dir = root / "pending"
        for d in (root, self.versions_dir, self.pending_dir):
            d.mkdir(parents=True, exist_ok=True)
        self._lock = self._take_lock()  # before touching anything another instance may own
        for stale in list(root.rglob("*.tmp")):
            stale.unlink()
        # File objects, not bare descriptors: a Store dropped without close() (tests, errors)
        # closes them when collected.
        self._slot_files: dict[int, io.FileIO] = {}
        self._slot_direct: dict[int, io.FileIO] = {}  # the same files opened with O_DIRECT
        # Page-aligned memory for a direct write's first pages (prefix, header) and last one.
        self._scratch: mmap.mmap | None = None
        # (slot, sequence) of the newest valid checkpoint; None: not looked for yet.
        self._newest: tuple[int, int] | None = None

    def close(self) -> None:
        """Release the state directory's lock."""
        self._close_slots()
        self._scratch = None  # unmapped when collected
        self._lock.close()

    def _take_lock(self) -> IO[bytes]:
        """Hold an exclusive lock on this task's state; StorageError if another process has it."""
        f = (self.root / "lock").open("ab")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.close()
            raise StorageError(
                f"{self.root} is in use by another aggregator (lock held on {self.root / 'lock'})"
            ) from None
        return f

    # -- versions ---------------------------------------------------------------------------
    def version_numbers(self) -> list[int]:
        out = []
        for p in self.versions_dir.glob("*.safetensors"):
            if p.stem.isdigit():
                out.append(int(p.stem))
        return sorted(out)

    def latest_version(self) -> int | None:
        nums = self.version_numbers()
        return nums[-1] if nums else None

    def version_path(self, version: int) -> Path:
        return self.versions_dir / version_file_name(version)

    def read_version_bytes(self, version: int) -> bytes:
        return self.version_path(version).read_bytes()

    def load_version(self, version: int) -> ModelVersion:
        path = self.version_path(version)
        try:
            return ModelVersion.from_bytes(path.read_bytes(), max_bytes=_MAX_FILE)
        except (OSError, ProtocolError) as e:
            raise StorageError(f"stored version {path} is unreadable: {e}") from None

    def version_info(self, version: int) -> dict[str, Any]:
        path = self.versions_dir / f"{version:08d}.json"
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, json.JSONDecodeError) as e:
            raise StorageError(f"stored version metadata {path} is unreadable: {e}") from None
        return data if isinstance(data, dict) else {}

    def write_version(self, payload: bytes, version: int, info: dict[str, Any], keep: int) -> None:
        """Store a complete version (metadata first, weights last) and prune old versions."""
        atomic_write(
            self.versions_dir / f"{version:08d}.json",
            json.dumps(info, sort_keys=True).encode(),
            fsync=self.fsync,
        )
        atomic_write(self.version_path(version), payload, fsync=self.fsync)
        for old in self.version_numbers()[:-keep]:
            for suffix in (".safetensors", ".json"):
                (self.versions_dir / f"{old:08d}{suffix}").unlink(missing_ok=True)

    # -- plan and graph ---------------------------------------------------------------------
    def write_blob(self, name: str, data: bytes) -> None:
        atomic_write(self.root / name, data, fsync=self.fsync)

    def read_blob(self, name: str) -> bytes | None:
        try:
            return (self.root / name).read_bytes()
        except FileNotFoundError:
            return None

    # -- pending version: checkpoint and WAL segments ---------------------------------------
    def segments(self, base_version: int) -> list[tuple[int, Path]]:
        out = []
        for p in self.pending_dir.glob("*.wal"):
            v, _, seg = p.stem.partition("-")
            if v.isdigit() and seg.isdigit() and int(v) == base_version:
                out.append((int(seg), p))
        return sorted(out)

    def segment_path(self, base_version: int, seg: int) -> Path:
        return self.pending_dir / f"{base_version:08d}-{seg:06d}.wal"

    @property
    def checkpoint_path(self) -> Path:
        """The file the checkpoint is read from: the newest valid slot (slot 0 if none)."""
        newest = self._find_newest()
        return self._slot_path(newest[0] if newest[1] else 0)

    def _slot_path(self, slot: int) -> Path:
        return self.pending_dir / CHECKPOINT_SLOTS[slot]

    def ids_path(self, base_version: int) -> Path:
        """The ``IdsFile`` of the version built on ``base_version``."""
        return self.pending_dir / f"{base_version:08d}.ids"

    def write_checkpoint(
        self, base_version: int, seg: int, acc: NDArray[np.float64], meta: dict[str, Any]
    ) -> None:
        """Checkpoint the accumulator after segment ``seg``; older segments become garbage.

        ``meta``: the pending version's state, whose ``ids``/``devices`` are those after the
        ``ids_file`` part (entries, bytes) of its ``IdsFile``, durable before this is called.
        """
        header = {"base_version": str(base_version), "segment": str(seg), "state": json.dumps(meta)}
        # The header, then the accumulator's own buffer: no copy of 8 bytes per parameter.
        acc = np.ascontiguousarray(acc, dtype=np.float64)
        # Direct I/O: the accumulator goes from its own pages to the disk, without the copy
        # into the page cache and its writeback (8 MB: 0.3 ms of CPU against 1.0 ms, with
        # the fdatasync; measured here). It starts on a page of the file: the header is
        # padded with spaces up to it.
        direct = self.direct_io and acc.nbytes >= DIRECT_MIN and is_page_aligned(acc)
        entries = [("acc", acc.dtype, acc.shape)]
        if direct:
            head = encode_header(entries, header, start=SLOT_PREFIX_BYTES, align=PAGE)
        else:
            head = encode_header(entries, header)
        body = acc.data.cast("B")
        slot, seq = self._find_newest()
        slot, seq = (1 - slot if seq else 0), seq + 1  # the other slot (slot 0 if none valid)
        prefix = _SLOT_PREFIX.pack(
            _SLOT_MAGIC, _SLOT_FORMAT, seq, len(head) + len(body), crc32(body, crc32(head))
        )
        prefix += crc32(prefix).to_bytes(4, "little")
        fd = self._slot_fd(slot)
        if not (direct and self._write_direct(slot, prefix + head, body)):
            _pwrite_all(fd, [prefix, head, body])
        if self.fsync:
            os.fdatasync(fd)  # the file's, whichever descriptor wrote
        self._newest = (slot, seq)
        legacy = self.pending_dir / CHECKPOINT
        if legacy.exists():  # older than this one, which is durable now
            legacy.unlink()
        # The unlinks need no directory fsync of their own: a segment that reappears after a
        # crash is covered by this checkpoint, and recovery deletes it unread.
        for s, p in self.segments(base_version):
            if s <= seg:
                p.unlink()

    def _slot_fd(self, slot: int) -> int:
        """The open file of a checkpoint slot (created, and its name made durable, if new)."""
        f = self._slot_files.get(slot)
        if f is None:
            path = self._slot_path(slot)
            new = not path.exists()
            # Not O_APPEND (Linux's pwrite appends then, whatever the offset), not truncated.
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            f = self._slot_files[slot] = io.FileIO(fd, "r+", closefd=True)
            if new and self.fsync:
                fsync_dir(self.pending_dir)
        return f.fileno()

    def _write_direct(self, slot: int, first: bytes, body: memoryview) -> bool:
        """Write a slot with direct I/O from offset 0: ``first`` (prefix and header, a whole
        number of pages), then ``body`` (page-aligned memory) and zeros up to its last page's
        end (after the body's length: never read). False, and direct I/O off for this store,
        if the file system refuses it (EINVAL): the caller writes through the page cache."""
        assert len(first) % PAGE == 0
        try:
            f = self._slot_direct.get(slot)
            if f is None:
                fd = os.open(self._slot_path(slot), os.O_WRONLY | os.O_CLOEXEC | os.O_DIRECT)
                f = self._slot_direct[slot] = io.FileIO(fd, "w", closefd=True)
            full = len(body) - len(body) % PAGE
            tail = len(body) - full
            need = len(first) + (PAGE if tail else 0)
            if self._scratch is None or len(self._scratch) < need:
                self._scratch = mmap.mmap(-1, need + -need % (1 << 20))  # page-aligned
            scratch = self._scratch
            scratch[: len(first)] = first
            if tail:
                scratch[len(first) : len(first) + tail] = body[full:]
                scratch[len(first) + tail : need] = bytes(PAGE - tail)
            view = memoryview(scratch)
            parts = [view[: len(first)], body[:full], view[len(first) : need]]
            _pwrite_all(f.fileno(), [p for p in parts if len(p)])
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            log.info("checkpoints in %s: no direct I/O (%s); written through the page cache",
                     self.pending_dir, e)  # fmt: skip
            self.direct_io = False
            self._close_slots(direct_only=True)
            return False
        self.direct_writes += 1
        return True

    def _close_slots(self, *, direct_only: bool = False) -> None:
        files = list(self._slot_direct.values())
        self._slot_direct = {}
        if not direct_only:
            files += self._slot_files.values()
            self._slot_files = {}
        for f in files:
            f.close()

    def _read_slot(self, slot: int) -> tuple[int, bytes] | str | None:
        """(sequence, body) of a valid checkpoint slot; None for a missing or empty one; what
        is wrong with a damaged one (a write torn by a crash, or worse)."""
        path = self._slot_path(slot)
        data = _read_checkpoint_file(path)
        if not data:
            return None
        n = SLOT_PREFIX_BYTES
        if len(data) < n:
            return f"{len(data)} bytes, less than its {n}-byte prefix"
        if crc32(data[: n - 4]) != int.from_bytes(data[n - 4 : n], "little"):
            return "its prefix fails its CRC-32"
        magic, fmt, seq, size, crc = _SLOT_PREFIX.unpack_from(data)
        if magic != _SLOT_MAGIC or fmt != _SLOT_FORMAT:
            return f"not a checkpoint slot fededge can read (magic {magic!r}, format {fmt})"
        if size > len(data) - n:
            return f"its prefix counts {size} bytes of body, the file holds {len(data) - n}"
        body = data[n : n + size]
        if crc32(body) != crc:
            return "its body fails its CRC-32"
        return seq, body

    def _find_newest(self) -> tuple[int, int]:
        """(slot, sequence) of the newest valid checkpoint slot; sequence 0 if none is."""
        if self._newest is None:
            best = (0, 0)
            for slot in (0, 1):
                got = self._read_slot(slot)
                if isinstance(got, tuple) and got[0] > best[1]:
                    best = (slot, got[0])
            self._newest = best
        return self._newest

    def _read_checkpoint(self) -> tuple[int, int, NDArray[np.float64], dict[str, Any]] | None:
        """(base version, segment, accumulator, state as stored) of the checkpoint, if any:
        the newest valid slot's, else an earlier fededge's ``checkpoint.safetensors``."""
        found: list[tuple[int, int, bytes]] = []
        for slot in (0, 1):
            got = self._read_slot(slot)
            if isinstance(got, tuple):
                found.append((got[0], slot, got[1]))
            elif got is not None:
                # Torn by a crash while it was written (the other slot holds the checkpoint
                # before it, and the WAL what came since), or damaged.
                log.warning("checkpoint slot %s is not valid: %s", self._slot_path(slot), got)
        if found:
            seq, slot, body = max(found)
            self._newest = (slot, seq)
            return self._decode_checkpoint(self._slot_path(slot), body)
        self._newest = (0, 0)
        path = self.pending_dir / CHECKPOINT
        data = _read_checkpoint_file(path)
        return None if data is None else self._decode_checkpoint(path, data)

    @staticmethod
    def _decode_checkpoint(
        path: Path, data: bytes
    ) -> tuple[int, int, NDArray[np.float64], dict[str, Any]]:
        try:
            # Our own file: the header of a checkpoint written before the ids file existed
            # holds every pending update id, which may exceed the 1 MiB limit of the network.
            payload = decode_tensors(data, max_bytes=_MAX_FILE, max_header=_MAX_FILE)
            meta = payload.metadata
            state = json.loads(meta["state"])
            if not isinstance(state, dict):
                raise ValueError(f"state is a {type(state).__name__}")
            # A writable copy, page-aligned: checkpoints write it with direct I/O.
            acc = page_aligned_copy(np.asarray(payload.tensors["acc"], dtype=np.float64))
            return int(meta["base_version"]), int(meta["segment"]), acc, state
        except (ProtocolError, KeyError, ValueError) as e:
            raise StorageError(f"checkpoint {path} is unreadable: {e}") from None

    def load_checkpoint(
        self, base_version: int
    ) -> tuple[int, NDArray[np.float64], dict[str, Any]] | None:
        """(segment, accumulator, state) of the checkpoint of the version built on
        ``base_version``; None if there is none. The state's ``ids`` and ``devices`` are the
        whole lists (its ``IdsFile`` part read back), ``ids_file`` is ``[entries, bytes]`` of
        that part (``[0, 0]`` for a checkpoint that holds every id itself)."""
        ck = self._read_checkpoint()
        if ck is None or ck[0] != base_version:
            return None
        _, seg, acc, state = ck
        path = self.checkpoint_path
        part = state.get("ids_file", {"entries": 0, "bytes": 0})
        tail_ids, tail_devices = state.get("ids", []), state.get("devices", [])
        if not (
            isinstance(part, dict)
            and all(type(part.get(k)) is int and part[k] >= 0 for k in ("entries", "bytes"))
            and isinstance(tail_ids, list)
            and isinstance(tail_devices, list)
            and len(tail_ids) == len(tail_devices)
        ):
            raise StorageError(f"checkpoint {path} is unreadable: bad ids, devices or ids_file")
        entries, size = part["entries"], part["bytes"]
        ids, devices = read_ids(self.ids_path(base_version), base_version, entries, size)
        state["ids"], state["devices"] = ids + tail_ids, devices + tail_devices
        state["ids_file"] = [entries, size]
        return seg, acc, state

    def discard_pending(self, keep_base: int | None = None) -> None:
        """Remove WAL segments, ids files and the checkpoint of every base version but
        ``keep_base``."""
        for p in self.pending_dir.iterdir():
            if p.suffix in (".wal", ".ids"):
                v = p.stem.partition("-")[0]
                if keep_base is None or not v.isdigit() or int(v) != keep_base:
                    p.unlink()
        files = [self._slot_path(0), self._slot_path(1), self.pending_dir / CHECKPOINT]
        if any(f.exists() for f in files):
            stored = None if keep_base is None else self._read_checkpoint()
            if stored is None or stored[0] != keep_base:
                self._close_slots()
                for f in files:
                    f.unlink(missing_ok=True)
                self._newest = (0, 0)
        if self.fsync:
            fsync_dir(self.pending_dir)

    def disk_bytes(self) -> int:
        return sum(os.path.getsize(p) for p in self.root.rglob("*") if p.is_file())


def _read_checkpoint_file(path: Path) -> bytes | None:
    """The bytes of a checkpoint file; None if there is none."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise StorageError(f"checkpoint {path} is unreadable: {e}") from None


def _pwrite_all(fd: int, parts: Sequence[bytes | memoryview]) -> None:
    """Write ``parts`` one after the other from the start of the file (``pwritev`` may write
    less than asked, as ``write`` may)."""
    views = [memoryview(p).cast("B") for p in parts]
    offset = 0
    while views:
        n = os.pwritev(fd, views, offset)
        offset += n
        while views and n >= len(views[0]):
            n -= len(views[0])
            views.pop(0)
        if views and n:
            views[0] = views[0][n:]
