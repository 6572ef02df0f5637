"""The device's SQLite state database and its example store (labelled examples from local apps).

One SQLite file (WAL mode, ``synchronous=FULL``) holds the example store and the outbox
(fededge/device/outbox.py), so that marking a training batch's examples used and storing the
update made from them is one transaction: a crash between the two can neither lose the batch nor
train on it twice.

"Fresh" examples: examples no training run has used yet. A training run takes the *newest*
``examples_per_update`` fresh examples (a device that falls behind trains on what its users do
now; an older backlog is still used later unless retention expires it) and marks them used in
the same transaction that stores the update. Used examples stay until retention removes them
(evicted before fresh ones when the store is over ``max_examples``); every example older than
``max_example_age`` is deleted.
"""

from __future__ import annotations

import contextlib
import math
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fededge.device.spec import BundleSpec, check_labels
from fededge.errors import InputError, StorageError

SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS examples (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    created REAL NOT NULL,
    dim INTEGER NOT NULL,
    x BLOB NOT NULL,
    y INTEGER NOT NULL,
    used INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS examples_fresh ON examples (used, dim, id);
CREATE INDEX IF NOT EXISTS examples_created ON examples (created);
CREATE TABLE IF NOT EXISTS outbox (
    update_id TEXT PRIMARY KEY,
    base_version INTEGER NOT NULL,
    num_examples INTEGER NOT NULL,
    created REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    payload BLOB NOT NULL
);
"""


class StateDb:
    """One SQLite connection to the device state file, shared by threads behind a lock.

    ``transaction()`` runs ``BEGIN IMMEDIATE`` so a read-modify-write never interleaves with
    another writer (thread or process); ``busy_timeout`` makes a second process wait, not fail.
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE below).
            self._conn = sqlite3.connect(
                self.path, isolation_level=None, check_same_thread=False, timeout=30.0
            )
            self._conn.execute("PRAGMA journal_mode=WAL")
            # FULL: a committed outbox entry survives power loss, which is the outbox's promise.
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.execute("PRAGMA busy_timeout=30000")
            version = self._conn.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, SCHEMA_VERSION):
                raise StorageError(
                    f"{self.path}: schema version {version}, this fededge reads {SCHEMA_VERSION}"
                )
            self._conn.executescript(_SCHEMA)
            self._conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except sqlite3.Error as e:
            raise StorageError(f"device state {self.path} cannot be opened: {e}") from None
        self._lock = threading.RLock()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """A write transaction; commits at the end of the block, rolls back on an exception."""
        with self._lock:
            try:
                self._conn.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as e:
                raise StorageError(f"device state {self.path}: cannot begin: {e}") from None
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            try:
                self._conn.execute("COMMIT")
            except sqlite3.Error as e:
                raise StorageError(f"device state {self.path}: commit failed: {e}") from None

    def query(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Run a read-only statement and return all rows."""
        with self._lock:
            try:
                return self._conn.execute(sql, args).fetchall()
            except sqlite3.Error as e:
                raise StorageError(f"device state {self.path}: {e}") from None

    def close(self) -> None:
        """Close the connection (idempotent)."""
        with self._lock:
            self._conn.close()


@dataclass(frozen=True)
class Batch:
    """Examples taken for one training run; ``ids`` are marked used when its update is stored."""

    ids: tuple[int, ...]
    x: np.ndarray
    y: np.ndarray


def validate_inputs(x: Any, input_shape: tuple[int, ...]) -> np.ndarray:
    """Check untrusted model inputs; return float32 [n, *input_shape] or raise InputError.

    Rows may also be flat (``prod(input_shape)`` values) for image models.
    """
    xa = _numeric(x, "x")
    if xa.ndim == 0 or xa.shape[0] == 0:
        raise InputError("x must be a non-empty list of examples", reason="bad_shape")
    dim = math.prod(input_shape)
    if xa.shape[1:] != input_shape and not (xa.ndim == 2 and xa.shape[1] == dim):
        raise InputError(
            f"x has shape {list(xa.shape)}, expected [n, {', '.join(map(str, input_shape))}]",
            reason="bad_shape",
        )
    if not np.all(np.isfinite(xa)):
        raise InputError("x contains NaN or Inf", reason="non_finite")
    with np.errstate(over="ignore"):
        out = np.ascontiguousarray(xa.reshape(len(xa), *input_shape), dtype=np.float32)
    if not np.all(np.isfinite(out)):
        raise InputError("x has values too large for float32", reason="non_finite")
    return out


def validate_examples(
    x: Any, y: Any, input_shape: tuple[int, ...], labels: int | BundleSpec
) -> tuple[np.ndarray, np.ndarray]:
    """Check untrusted labelled examples; return (x float32 [n, *shape], y).

    ``labels`` is the bundle's spec (its task says what a label is) or, for a classification
    model, the number of classes. Class ids come back int32 ``[n]``; float labels (binary 0/1,
    multi-hot rows, regression targets) float32 ``[n, *label_shape]``.

    Raises InputError naming what is wrong: shape, non-numbers, NaN/Inf, labels out of
    range or not one per example.
    """
    xa = validate_inputs(x, input_shape)
    if isinstance(labels, BundleSpec) and not labels.task.integer_labels:
        ya = _numeric(y, "y")
        try:
            return xa, check_labels(ya, len(xa), labels)
        except ValueError as e:
            shape = "shape" in str(e)
            raise InputError(str(e), reason="bad_shape" if shape else "bad_label") from None
    num_classes = labels.num_classes if isinstance(labels, BundleSpec) else labels
    ya = np.asarray(y) if isinstance(y, np.ndarray) else _labels(y)
    if ya.shape != (len(xa),):
        raise InputError(
            f"y must be {len(xa)} labels (one per example), got shape {list(ya.shape)}",
            reason="bad_shape",
        )
    if ya.dtype.kind not in "iu":
        raise InputError(f"labels must be integers, got {ya.dtype}", reason="bad_label")
    if ya.min() < 0 or ya.max() >= num_classes:
        raise InputError(f"labels must lie in [0, {num_classes})", reason="bad_label")
    return xa, ya.astype(np.int32)


def _numeric(value: Any, what: str) -> np.ndarray:
    if isinstance(value, np.ndarray):
        arr = value
    else:
        try:
            # No dtype: strings, bools and huge integers keep a dtype that is refused below.
            arr = np.asarray(value)
        except (ValueError, TypeError, OverflowError):
            raise InputError(
                f"{what} must be a rectangular array of numbers", reason="bad_shape"
            ) from None
    if arr.dtype.kind not in "fiu" or arr.dtype == np.bool_:
        raise InputError(f"{what} must hold numbers, got {arr.dtype}", reason="bad_type")
    return arr


def _labels(value: Any) -> np.ndarray:
    # JSON gives ints as int; a float label or a bool is a client bug worth reporting.
    if not isinstance(value, list | tuple) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        raise InputError("y must be a list of integer labels", reason="bad_label")
    try:
        return np.asarray(value, dtype=np.int64)
    except OverflowError:
        raise InputError("a label is out of range", reason="bad_label") from None


def _decode_labels(values: list[Any]) -> np.ndarray:
    if all(isinstance(v, int) for v in values):
        return np.fromiter(values, dtype=np.int32, count=len(values))
    if all(isinstance(v, bytes) for v in values) and len({len(v) for v in values}) == 1:
        return (
            np.frombuffer(b"".join(values), dtype="<f4").reshape(len(values), -1).astype(np.float32)
        )
    raise StorageError("stored labels mix class ids and float labels of different sizes")


class ExampleStore:
    """Labelled examples kept in the state database, bounded by count and age."""

    def __init__(
        self,
        db: StateDb,
        *,
        max_examples: int,
        max_age: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.db = db
        self.max_examples = max_examples
        self.max_age = max_age
        self._clock = clock

    def add(self, x: np.ndarray, y: np.ndarray) -> int:
        """Store validated examples (see :func:`validate_examples`) in one transaction.

        Returns how many were added; retention runs in the same transaction, so the store
        never holds more than ``max_examples``.
        """
        n = len(x)
        if n == 0:
            return 0
        dim = int(np.prod(x.shape[1:]))
        flat = np.ascontiguousarray(x.reshape(n, dim), dtype="<f4")
        now = self._clock()
        # Class ids are stored as integers (as always); float labels (binary, multi-hot,
        # regression targets) as little-endian float32 bytes in the same column.
        if np.issubdtype(y.dtype, np.integer):
            labels: list[int | bytes] = [int(v) for v in y]
        else:
            yf = np.ascontiguousarray(np.asarray(y).reshape(n, -1), dtype="<f4")
            labels = [yf[i].tobytes() for i in range(n)]
        rows = [(now, dim, flat[i].tobytes(), labels[i]) for i in range(n)]
        with self.db.transaction() as c:
            c.executemany("INSERT INTO examples (created, dim, x, y) VALUES (?, ?, ?, ?)", rows)
            self._retain(c, now)
        return n

    def _retain(self, c: sqlite3.Connection, now: float) -> None:
        c.execute("DELETE FROM examples WHERE created < ?", (now - self.max_age,))
        (total,) = c.execute("SELECT COUNT(*) FROM examples").fetchone()
        excess = total - self.max_examples
        if excess > 0:
            # Used examples go first (oldest first), then the oldest fresh ones.
            c.execute(
                "DELETE FROM examples WHERE id IN (SELECT id FROM examples "
                "ORDER BY used = 0, id LIMIT ?)",
                (excess,),
            )

    def expire(self) -> None:
        """Apply the age limit now (also done on every add)."""
        with self.db.transaction() as c:
            self._retain(c, self._clock())

    def fresh_count(self, dim: int | None = None) -> int:
        """Number of examples not used by any training run (of ``dim`` features, if given)."""
        if dim is None:
            rows = self.db.query("SELECT COUNT(*) FROM examples WHERE used = 0")
        else:
            rows = self.db.query("SELECT COUNT(*) FROM examples WHERE used = 0 AND dim = ?", (dim,))
        return int(rows[0][0])

    def count(self) -> int:
        """Number of examples stored."""
        return int(self.db.query("SELECT COUNT(*) FROM examples")[0][0])

    def take(self, n: int, input_shape: tuple[int, ...]) -> Batch | None:
        """The newest ``n`` fresh examples of this shape, or None if fewer exist; not yet marked.

        Labels come back as stored: int32 ``[n]`` class ids, or float32 ``[n, k]`` rows (the
        runtime reshapes them to the task's label shape).

        Call :meth:`mark_used` (or :meth:`mark_used_in` inside the transaction storing the
        update) once the batch has produced an update.
        """
        dim = math.prod(input_shape)
        rows = self.db.query(
            "SELECT id, x, y FROM examples WHERE used = 0 AND dim = ? ORDER BY id DESC LIMIT ?",
            (dim, n),
        )
        if len(rows) < n:
            return None
        rows.reverse()  # oldest first inside the batch; training shuffles anyway
        x = np.frombuffer(b"".join(r[1] for r in rows), dtype="<f4").reshape(n, *input_shape)
        y = _decode_labels([r[2] for r in rows])
        return Batch(tuple(int(r[0]) for r in rows), x.astype(np.float32), y)

    @staticmethod
    def mark_used_in(c: sqlite3.Connection, ids: Sequence[int]) -> None:
        """Mark examples used inside an open transaction of the same database."""
        c.executemany("UPDATE examples SET used = used + 1 WHERE id = ?", [(i,) for i in ids])

    def mark_used(self, ids: Sequence[int]) -> None:
        """Mark examples used in a transaction of their own."""
        with self.db.transaction() as c:
            self.mark_used_in(c, ids)
