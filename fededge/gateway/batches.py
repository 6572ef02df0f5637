"""A gateway's unmerged batches on disk: at most one *out* (sent upstream, unanswered) and one
*open* (taking the site's updates), each a write-ahead log of raw updates.

Files in the gateway's state folder:

- ``batch-{seq}.wal``: the accepted updates of batch ``seq`` (raw bytes, weight, norm), one
  fsync per group commit; a device is acknowledged only after its update is in here;
- ``state.json``: ``sent`` (the newest batch sent upstream) and ``sent_base`` (the version
  the gateway knew when it first sent it), ``merged`` (the newest batch the central aggregator
  answered ``merged``/``duplicate``) and ``gate`` (the next batch waits for a version newer
  than this; -1: no wait).

``sent`` is written before the batch is published, so after ``kill -9`` a batch with
``merged < seq <= sent`` is *out* and is sent again (the central side merges each
``(gateway, seq)`` once); the batch after it is *open*. Raw updates stay until their batch is
merged, so a batch can be rebuilt without updates the central side already counted.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from fededge.aggregator.pending import dedup_key
from fededge.aggregator.wal import SegmentWriter, read_segment
from fededge.errors import StorageError
from fededge.fsio import atomic_write
from fededge.protocol import Update

log = logging.getLogger(__name__)
Entry = tuple[Update, float, float]  # update, weight, L2 norm


def key_of(entry: Entry) -> str:
    return dedup_key(entry[0].device, entry[0].update_id)


class SiteBatches:
    """The out and open batches of one gateway, kept consistent with their files."""

    def __init__(self, root: Path, *, fsync: bool) -> None:
        self.root = root
        self.fsync = fsync
        state = self._read_state()
        self.merged: int = state["merged"]
        self.sent: int = state["sent"]
        self.gate: int = state["gate"]
        self.sent_base: int = state["sent_base"]
        for path in root.glob("batch-*.wal"):
            if int(path.stem.split("-")[1]) <= self.merged:
                path.unlink()  # merged before a crash cut the clean-up short
        self.out_seq: int | None = self.sent if self.sent > self.merged else None
        self.out: list[Entry] = self._load(self.sent) if self.out_seq is not None else []
        self.open_seq = max(self.sent, self.merged) + 1
        self.open: list[Entry] = self._load(self.open_seq)
        self._keys = {key_of(e) for e in [*self.out, *self.open]}
        self._writer: SegmentWriter | None = None

    # -- files ----------------------------------------------------------------------------------
    def _path(self, seq: int) -> Path:
        return self.root / f"batch-{seq:012d}.wal"

    def _read_state(self) -> dict[str, int]:
        path = self.root / "state.json"
        try:
            raw = json.loads(path.read_text())
            return {k: int(raw[k]) for k in ("merged", "sent", "gate", "sent_base")}
        except FileNotFoundError:
            return {"merged": -1, "sent": -1, "gate": -1, "sent_base": -1}
        except (ValueError, KeyError, TypeError) as e:
            raise StorageError(f"{path}: unreadable gateway state ({e})") from None

    def _write_state(self) -> None:
        body = {"merged": self.merged, "sent": self.sent, "gate": self.gate,
                "sent_base": self.sent_base}  # fmt: skip
        atomic_write(self.root / "state.json", json.dumps(body).encode(), fsync=self.fsync)

    def _load(self, seq: int) -> list[Entry]:
        path = self._path(seq)
        if not path.exists():
            return []
        entries = []
        for rec in read_segment(path, repair=True):
            u = Update.from_bytes(rec.payload, max_bytes=1 << 34)
            entries.append((u, float(rec.header["weight"]), float(rec.header["norm"])))
        log.info("batch %d reopened with %d logged updates", seq, len(entries))
        return entries

    def _rewrite(self, seq: int, entries: list[Entry]) -> None:
        """Replace batch ``seq``'s log by ``entries``, atomically (temp file + rename)."""
        tmp = self._path(seq).with_suffix(".new")
        tmp.unlink(missing_ok=True)
        w = SegmentWriter(tmp, fsync=self.fsync)
        for u, weight, norm in entries:
            w.append({"id": u.update_id, "weight": weight, "norm": norm, "group": 0}, u.to_bytes())
        w.commit()
        w.close()
        tmp.replace(self._path(seq))

    # -- what is held -----------------------------------------------------------------------------
    def holds(self, key: str) -> bool:
        """Whether the update with this dedup key is in the out or the open batch."""
        return key in self._keys

    def open_count(self, device: str) -> int:
        return sum(1 for u, _, _ in self.open if u.device == device)

    # -- transitions ---------------------------------------------------------------------------
    def append(self, group: list[tuple[Entry, bytes]]) -> None:
        """Log a group of accepted updates (``raw`` as received) in the open batch, durably."""
        if not group:
            return
        if self._writer is None:
            self._writer = SegmentWriter(self._path(self.open_seq), fsync=self.fsync)
        for (u, weight, norm), raw in group:
            self._writer.append({"id": u.update_id, "weight": weight, "norm": norm, "group": 0},
                                raw)  # fmt: skip
        self._writer.commit()  # durable: the caller may now acknowledge
        self.open.extend(e for e, _ in group)
        self._keys.update(key_of(e) for e, _ in group)

    def send(self, base: int) -> int:
        """The open batch becomes the out batch (recorded before it is published); ``base`` is
        the newest version the gateway knows."""
        if self.out_seq is not None:
            raise RuntimeError(f"batch {self.out_seq} is still out")
        self._close_writer()
        self.sent, self.sent_base = self.open_seq, base
        self._write_state()
        self.out_seq, self.out = self.open_seq, self.open
        self.open_seq, self.open = self.open_seq + 1, []
        return self.sent

    def settle(self, *, wait: bool) -> list[str]:
        """The out batch is merged: forget it. With ``wait``, the next batch waits for a version
        newer than the one this batch was first sent on (the batch is in that version or a
        later one)."""
        if self.out_seq is None:
            return []
        keys = [key_of(e) for e in self.out]
        self._keys.difference_update(keys)
        self.merged, self.gate = self.out_seq, self.sent_base if wait else -1
        self._write_state()
        self._path(self.out_seq).unlink(missing_ok=True)
        self.out_seq, self.out = None, []
        return keys

    def exclude(self, drop: set[str]) -> int:
        """Drop updates the central side already counted from the out batch; return how many."""
        keep = [e for e in self.out if key_of(e) not in drop]
        dropped = len(self.out) - len(keep)
        if dropped and self.out_seq is not None:
            self._rewrite(self.out_seq, keep)
            self._keys.difference_update(drop)
            self._keys.update(key_of(e) for e in self.open)
            self.out = keep
        return dropped

    def _close_writer(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def close(self) -> None:
        self._close_writer()
