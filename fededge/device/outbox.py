"""The outbox: every update stays on disk until the aggregator's receipt for it arrives.

A broker's PUBACK proves nothing (Mosquitto drops QoS 1 messages silently when a subscriber's
queue is full), so an update is stored durably *before* it is first published, resent with the
same ``update_id`` after every reconnect and whenever ``receipt_timeout`` passes without a
receipt, and removed only when a receipt (accepted, duplicate or rejected) names it. The
aggregator deduplicates by ``update_id``, so resending is always safe. The one other way out is
staleness: an update whose base version is older than ``current - max_staleness`` would be
rejected anyway, so it is dropped with a logged reason.

Entries live in the device's state database (see fededge/device/examples.py); when each was
last sent is kept in memory only, so a restarted device resends everything at once.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from fededge.device.examples import StateDb

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Entry:
    """One stored update awaiting its receipt."""

    update_id: str
    base_version: int
    num_examples: int
    created: float
    attempts: int
    payload: bytes


class Outbox:
    """Durable queue of serialized Update payloads keyed by update id."""

    def __init__(self, db: StateDb, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.db = db
        self._clock = clock
        self._lock = threading.Lock()
        self._sent: dict[str, float] = {}  # update id -> clock() of the last send

    @staticmethod
    def put_in(
        c: sqlite3.Connection,
        update_id: str,
        base_version: int,
        num_examples: int,
        payload: bytes,
    ) -> None:
        """Store an update inside an open transaction (durable once it commits)."""
        c.execute(
            "INSERT INTO outbox (update_id, base_version, num_examples, created, payload) "
            "VALUES (?, ?, ?, ?, ?)",
            (update_id, base_version, num_examples, time.time(), payload),
        )

    def put(self, update_id: str, base_version: int, num_examples: int, payload: bytes) -> None:
        """Store an update in a transaction of its own."""
        with self.db.transaction() as c:
            self.put_in(c, update_id, base_version, num_examples, payload)

    def __len__(self) -> int:
        return int(self.db.query("SELECT COUNT(*) FROM outbox")[0][0])

    def ids(self) -> list[str]:
        """Update ids waiting for a receipt, oldest first."""
        return [r[0] for r in self.db.query("SELECT update_id FROM outbox ORDER BY rowid")]

    def get(self, update_id: str) -> Entry | None:
        """The stored entry for ``update_id``, if any."""
        rows = self.db.query(
            "SELECT update_id, base_version, num_examples, created, attempts, payload "
            "FROM outbox WHERE update_id = ?",
            (update_id,),
        )
        return Entry(*rows[0]) if rows else None

    def due(self, receipt_timeout: float, now: float | None = None) -> list[Entry]:
        """Entries to (re)send at ``now`` (default: the clock): never sent since the last reset,
        or unanswered for ``receipt_timeout`` s."""
        now = self._clock() if now is None else now
        # Ids first, payloads only for the entries that are due: this runs several times a
        # second while a backlog of large updates may wait for an aggregator that is down.
        rows = self.db.query("SELECT update_id FROM outbox ORDER BY rowid")
        with self._lock:
            due = [
                r[0]
                for r in rows
                if (last := self._sent.get(r[0])) is None or now - last >= receipt_timeout
            ]
        return [e for uid in due if (e := self.get(uid)) is not None]

    def mark_sent(self, update_id: str, now: float | None = None) -> None:
        """Record a (re)send at ``now`` (default: the clock): restarts its receipt timer and
        counts the attempt on disk."""
        with self._lock:
            self._sent[update_id] = self._clock() if now is None else now
        with self.db.transaction() as c:
            c.execute("UPDATE outbox SET attempts = attempts + 1 WHERE update_id = ?", (update_id,))

    def was_sent(self, update_id: str) -> bool:
        """Whether ``update_id`` was sent since the last reset."""
        with self._lock:
            return update_id in self._sent

    def reset(self) -> None:
        """Forget when entries were sent, so all are due (after a reconnect)."""
        with self._lock:
            self._sent.clear()

    def settle(self, update_id: str) -> Entry | None:
        """Remove the entry a receipt names; None if it was not (or no longer) here."""
        with self.db.transaction() as c:
            row = c.execute(
                "SELECT update_id, base_version, num_examples, created, attempts, payload "
                "FROM outbox WHERE update_id = ?",
                (update_id,),
            ).fetchone()
            if row is not None:
                c.execute("DELETE FROM outbox WHERE update_id = ?", (update_id,))
        with self._lock:
            self._sent.pop(update_id, None)
        return Entry(*row) if row is not None else None

    def drop_stale(self, current_version: int, max_staleness: int) -> list[Entry]:
        """Drop (and log) entries whose base version is older than the staleness window."""
        oldest = current_version - max_staleness
        if not self.db.query("SELECT 1 FROM outbox WHERE base_version < ? LIMIT 1", (oldest,)):
            return []  # the common case, without taking the write lock
        with self.db.transaction() as c:
            rows = c.execute(
                "SELECT update_id, base_version, num_examples, created, attempts, payload "
                "FROM outbox WHERE base_version < ?",
                (oldest,),
            ).fetchall()
            c.execute("DELETE FROM outbox WHERE base_version < ?", (oldest,))
        dropped = [Entry(*r) for r in rows]
        with self._lock:
            for e in dropped:
                self._sent.pop(e.update_id, None)
        for e in dropped:
            log.warning(
                "dropping update %s: too stale (base version %d, current %d, max_staleness %d)",
                e.update_id,
                e.base_version,
                current_version,
                max_staleness,
                extra={"update_id": e.update_id, "reason": "stale"},
            )
        return dropped
