"""The aggregator's on-disk state: model versions, the plan, the graph, checkpoints and the WAL.

Layout under ``{state_dir}/aggregator/{task}/``::

    graph.bin                      the task's graph message, as published
    plan.json                      the current plan, as published
    versions/00000042.json         metadata of version 42 (metrics, update ids folded into it)
    versions/00000042.safetensors  the model-version message, byte for byte as published
    pending/checkpoint.safetensors accumulator of the pending version after segment N
    pending/00000042-000003.wal    write-ahead log segments of the pending version

A version is complete once its ``.safetensors`` exists (written last, atomically). Everything in
``pending/`` that belongs to an older base version is discarded at start.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
from pathlib import Path
from typing import IO, Any

import numpy as np
from numpy.typing import NDArray

from fededge.errors import ProtocolError, StorageError
from fededge.fsio import atomic_write, fsync_dir
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


class Store:
    """Durable state of one task; every write is atomic, every read is validated."""

    def __init__(self, root: Path, *, fsync: bool = True) -> None:
        self.root = root
        self.fsync = fsync
        self.versions_dir = root / VERSIONS_DIR
        self.pending_dir = root / "pending"
        for d in (root, self.versions_dir, self.pending_dir):
            d.mkdir(parents=True, exist_ok=True)
        self._lock = self._take_lock()  # before touching anything another instance may own
        for stale in list(root.rglob("*.tmp")):
            stale.unlink()

    def close(self) -> None:
        """Release the state directory's lock."""
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

    def write_checkpoint(
        self, base_version: int, seg: int, acc: NDArray[np.float64], meta: dict[str, Any]
    ) -> None:
        """Checkpoint the accumulator after segment ``seg``; older segments become garbage."""
        header = {"base_version": str(base_version), "segment": str(seg), "state": json.dumps(meta)}
        # The header, then the accumulator's own buffer: no copy of 8 bytes per parameter.
        acc = np.ascontiguousarray(acc, dtype=np.float64)
        head = encode_header([("acc", acc.dtype, acc.shape)], header)
        atomic_write(
            self.pending_dir / "checkpoint.safetensors",
            [head, acc.data.cast("B")],
            fsync=self.fsync,
        )
        # The unlinks need no directory fsync of their own: a segment that reappears after a
        # crash is covered by this checkpoint, and recovery deletes it unread.
        for s, p in self.segments(base_version):
            if s <= seg:
                p.unlink()

    def load_checkpoint(
        self, base_version: int
    ) -> tuple[int, NDArray[np.float64], dict[str, Any]] | None:
        path = self.pending_dir / "checkpoint.safetensors"
        try:
            # Our own file: its header holds the pending update ids, which may exceed the 1 MiB
            # header limit meant for network input.
            payload = decode_tensors(path.read_bytes(), max_bytes=_MAX_FILE, max_header=_MAX_FILE)
            meta = payload.metadata
            if int(meta["base_version"]) != base_version:
                return None
            acc = np.array(payload.tensors["acc"], dtype=np.float64)  # writable copy
            return int(meta["segment"]), acc, json.loads(meta["state"])
        except FileNotFoundError:
            return None
        except (OSError, ProtocolError, KeyError, ValueError) as e:
            raise StorageError(f"checkpoint {path} is unreadable: {e}") from None

    def discard_pending(self, keep_base: int | None = None) -> None:
        """Remove WAL segments and the checkpoint of every base version but ``keep_base``."""
        for p in self.pending_dir.iterdir():
            if p.suffix == ".wal":
                v = p.stem.partition("-")[0]
                if keep_base is None or not v.isdigit() or int(v) != keep_base:
                    p.unlink()
        ck = self.pending_dir / "checkpoint.safetensors"
        if ck.exists() and (keep_base is None or self.load_checkpoint(keep_base) is None):
            ck.unlink()
        if self.fsync:
            fsync_dir(self.pending_dir)

    def disk_bytes(self) -> int:
        return sum(os.path.getsize(p) for p in self.root.rglob("*") if p.is_file())
