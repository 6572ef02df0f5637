"""A gateway's unmerged batches on disk: at most one *out* (sent upstream, unanswered) and one
*open* (taking the site's updates), each a write-ahead log of raw updates.

Files in the gateway's state folder:

- ``batch-{seq}.wal``: the accepted updates of batch ``seq`` (raw bytes, weight, norm), one
  fsync per group commit; a device is acknowledged only after its update is in here;
- ``state.json``: ``sent`` (the newest batch sent upstream) and ``sent_base`` (the version
  the gateway knew when it first sent it), ``merged`` (the newest batch the central aggregator
  answered ``merged``/``duplicate``) and ``gate`` (the next batch waits for a version newer
  than this; -1: no wait);
- ``merged-{seq}.json``: the update keys of a merged batch and its ``sent_base``, written
  (atomically) before ``state.json`` says it is merged, so that a device's resend is answered
  ``duplicate`` after a restart too. Every update of the batch is based on ``sent_base`` or
  an older version, so the file is deleted once ``sent_base`` falls below the gateway's
  ``stale`` floor (:meth:`SiteBatches.forget_before`): an update that old is rejected anyway.

``sent`` is written before the batch is published, so after ``kill -9`` a batch with
``merged < seq <= sent`` is *out* and is sent again (the central side merges each
``(gateway, seq)`` once); the batch after it is *open*. Raw updates stay on disk until their
batch is merged, so a batch can be rebuilt without updates the central side already counted.

Memory is O(model size), however long the uplink is down: each batch is kept as its running
float64 sum (:class:`~fededge.aggregator.partial.BatchSum`) and its update keys; the raw
updates are read back from the log (transiently) only after a restart or a ``conflict``.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from fededge.aggregator.partial import BatchSum
from fededge.aggregator.pending import dedup_key
from fededge.aggregator.policy import Layout
from fededge.aggregator.wal import SegmentWriter, read_segment
from fededge.errors import NotReadyError, StorageError
from fededge.fsio import atomic_write
from fededge.protocol import Update

log = logging.getLogger(__name__)
Entry = tuple[Update, float, float]  # update, weight, L2 norm
STATE_KEYS = ("merged", "sent", "gate", "sent_base")


def key_of(entry: Entry) -> str:
    return dedup_key(entry[0].device, entry[0].update_id)


class SiteBatches:
    """The out and open batches of one gateway, kept consistent with their files.

    ``bind(layout)`` (once the model is known) folds the logged updates into their sums;
    before it, only the keys are known.
    """

    def __init__(self, root: Path, *, fsync: bool) -> None:
        self.root = root
        self.fsync = fsync
        state = self._read_state()
        self.merged, self.sent, self.gate, self.sent_base = (state[k] for k in STATE_KEYS)
        for path in root.glob("batch-*.wal"):
            if int(path.stem.split("-")[1]) <= self.merged:
                path.unlink()  # merged before a crash cut the clean-up short
        # The keys of merged batches still within the stale floor: seq -> (sent_base, keys).
        self._merged: dict[int, tuple[int, list[str]]] = {}
        self._recent: dict[str, int] = {}  # key -> seq of the merged batch that holds it
        for path in root.glob("merged-*.json.tmp"):
            path.unlink()  # a write cut short by a crash: the batch was not settled
        for path in root.glob("merged-*.json"):
            self._remember(*self._read_merged(path))
        self.out_seq: int | None = self.sent if self.sent > self.merged else None
        self.open_seq = max(self.sent, self.merged) + 1
        self.out_keys = [key_of(e) for e in self._entries(self.out_seq)]
        self.open_keys = [key_of(e) for e in self._entries(self.open_seq)]
        self._devices = Counter(k.split("/", 1)[0] for k in self.open_keys)
        self._keys = {*self.out_keys, *self.open_keys}
        for seq, keys in ((self.out_seq, self.out_keys), (self.open_seq, self.open_keys)):
            if keys:
                log.info("batch %d reopened with %d logged updates", seq, len(keys))
        self.layout: Layout | None = None
        self.out_sum: BatchSum | None = None
        self.open_sum: BatchSum | None = None
        self._writer: SegmentWriter | None = None

    # -- files ----------------------------------------------------------------------------------
    def _path(self, seq: int) -> Path:
        return self.root / f"batch-{seq:012d}.wal"

    def _read_state(self) -> dict[str, int]:
        path = self.root / "state.json"
        try:
            raw = json.loads(path.read_text())
            return {k: int(raw[k]) for k in STATE_KEYS}
        except FileNotFoundError:
            return dict.fromkeys(STATE_KEYS, -1)
        except (OSError, ValueError, KeyError, TypeError) as e:  # unreadable, or not ours
            raise StorageError(f"{path}: unreadable gateway state ({e})") from None

    def _merged_path(self, seq: int) -> Path:
        return self.root / f"merged-{seq:012d}.json"

    def _read_merged(self, path: Path) -> tuple[int, int, list[str]]:
        """``(seq, sent_base, keys)`` of a ``merged-{seq}.json``."""
        try:
            seq = int(path.stem.split("-", 1)[1])
            raw = json.loads(path.read_text())
            base, keys = int(raw["base"]), raw["keys"]
            if not (isinstance(keys, list) and all(isinstance(k, str) for k in keys)):
                raise TypeError("keys must be a list of strings")
            return seq, base, keys
        except (OSError, ValueError, KeyError, TypeError) as e:  # unreadable, or not ours
            raise StorageError(f"{path}: unreadable gateway state ({e})") from None

    def _remember(self, seq: int, base: int, keys: list[str]) -> None:
        self._merged[seq] = (base, keys)
        self._recent.update(dict.fromkeys(keys, seq))

    def _write_state(self) -> None:
        body = {k: getattr(self, k) for k in STATE_KEYS}
        atomic_write(self.root / "state.json", json.dumps(body).encode(), fsync=self.fsync)

    def _entries(self, seq: int | None) -> Iterator[Entry]:
        """The logged updates of batch ``seq``, decoded one at a time."""
        if seq is None or not self._path(seq).exists():
            return
        for rec in read_segment(self._path(seq), repair=True):
            u = Update.from_bytes(rec.payload, max_bytes=1 << 34)
            yield u, float(rec.header["weight"]), float(rec.header["norm"])

    def _fold(self, seq: int | None) -> BatchSum:
        assert self.layout is not None
        acc = BatchSum(self.layout)
        for u, weight, norm in self._entries(seq):
            acc.add(u, weight, norm)
        return acc

    def _rewrite(self, seq: int, drop: set[str]) -> None:
        """Replace batch ``seq``'s log by its updates but ``drop``, atomically."""
        tmp = self._path(seq).with_suffix(".new")
        tmp.unlink(missing_ok=True)
        w = SegmentWriter(tmp, fsync=self.fsync)
        for e in self._entries(seq):
            if key_of(e) not in drop:
                u, weight, norm = e
                w.append({"id": u.update_id, "weight": weight, "norm": norm, "group": 0},
                         u.to_bytes())  # fmt: skip
        w.commit()
        w.close()
        tmp.replace(self._path(seq))

    # -- what is held -----------------------------------------------------------------------------
    def bind(self, layout: Layout) -> None:
        """Fold the logged updates of both batches into their sums for the model's ``layout``."""
        self.layout = layout
        self.out_sum = self._fold(self.out_seq) if self.out_seq is not None else None
        self.open_sum = self._fold(self.open_seq)

    def holds(self, key: str) -> bool:
        """Whether the update with this dedup key is in the out or the open batch."""
        return key in self._keys

    def remembers(self, key: str) -> bool:
        """Whether the update with this dedup key is in a merged batch still remembered."""
        return key in self._recent

    def forget_before(self, floor: int) -> None:
        """Forget the merged batches first sent on a version older than ``floor`` (the gateway
        rejects an update based on a version that old as ``stale``)."""
        for seq, (base, keys) in list(self._merged.items()):
            if base < floor:
                self._merged_path(seq).unlink(missing_ok=True)
                del self._merged[seq]
                for k in keys:
                    if self._recent.get(k) == seq:
                        del self._recent[k]

    def device_count(self, device: str) -> int:
        """Updates of ``device`` in the open batch (max_updates_per_device)."""
        return self._devices[device]

    # -- transitions ---------------------------------------------------------------------------
    def append(self, group: list[tuple[Entry, bytes]]) -> None:
        """Log a group of accepted updates (``raw`` as received) in the open batch, durably."""
        if not group:
            return
        if self.open_sum is None:
            raise NotReadyError("bind() the model's layout before appending updates")
        if self._writer is None:
            self._writer = SegmentWriter(self._path(self.open_seq), fsync=self.fsync)
        for (u, weight, norm), raw in group:
            self._writer.append({"id": u.update_id, "weight": weight, "norm": norm, "group": 0},
                                raw)  # fmt: skip
        self._writer.commit()  # durable: the caller may now acknowledge
        for e, _ in group:
            self.open_sum.add(*e)
            self.open_keys.append(key_of(e))
            self._devices[e[0].device] += 1
        self._keys.update(self.open_keys[-len(group) :])

    def send(self, base: int) -> int:
        """The open batch becomes the out batch (recorded before it is published); ``base`` is
        the newest version the gateway knows."""
        if self.out_seq is not None:
            raise RuntimeError(f"batch {self.out_seq} is still out")
        assert self.layout is not None
        self._close_writer()
        self.sent, self.sent_base = self.open_seq, base
        self._write_state()
        self.out_seq, self.out_keys, self.out_sum = self.open_seq, self.open_keys, self.open_sum
        self.open_seq, self.open_keys, self.open_sum = self.open_seq + 1, [], BatchSum(self.layout)
        self._devices.clear()
        return self.sent

    def settle(self, *, wait: bool) -> list[str]:
        """The out batch is merged: forget it. With ``wait``, the next batch waits for a version
        newer than the one this batch was first sent on (the batch is in that version or a
        later one)."""
        if self.out_seq is None:
            return []
        keys = self.out_keys
        if keys:  # remembered before the batch is forgotten: a resend stays a duplicate
            body = {"base": self.sent_base, "keys": keys}
            atomic_write(self._merged_path(self.out_seq), json.dumps(body).encode(),
                         fsync=self.fsync)  # fmt: skip
            self._remember(self.out_seq, self.sent_base, keys)
        self._keys.difference_update(keys)
        self.merged, self.gate = self.out_seq, self.sent_base if wait else -1
        self._write_state()
        self._path(self.out_seq).unlink(missing_ok=True)
        self.out_seq, self.out_keys, self.out_sum = None, [], None
        return keys

    def exclude(self, drop: set[str]) -> int:
        """Drop updates the central side already counted from the out batch; return how many."""
        dropped = [k for k in self.out_keys if k in drop]
        if dropped and self.out_seq is not None:
            self._rewrite(self.out_seq, drop)
            self.out_keys = [k for k in self.out_keys if k not in drop]
            self._keys.difference_update(dropped)
            if self.layout is not None:
                self.out_sum = self._fold(self.out_seq)
        return len(dropped)

    def _close_writer(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def close(self) -> None:
        self._close_writer()
