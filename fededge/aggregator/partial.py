"""The partial sum: what a shard worker (or a site gateway) sends the coordinator.

One message per *batch* of a worker: the weighted sum of the update deltas it accepted since
its previous batch, with their total weight, count, examples, metric sums and dedup keys. A
batch is an atom: it is merged whole into one version (the one open when it arrives), never
split, so a worker needs to know nothing about version boundaries (docs/protocol.md,
"Sharded aggregation"). ``(worker, seq)`` names a batch: the coordinator merges each once.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

from fededge.aggregator import codec
from fededge.aggregator.policy import Layout
from fededge.errors import ProtocolError
from fededge.protocol import Update
from fededge.protocol.messages import PROTOCOL_VERSION
from fededge.protocol.tensors import decode_tensors, encode_tensors
from fededge.protocol.vocab import is_name

KIND = "partial_sum"
# The float sums carried as metadata (docs/protocol.md): name -> what it sums over the batch.
FLOAT_SUMS = ("weight", "loss_w", "loss_wsum", "eval_loss_w", "eval_acc_w", "eval_wsum", "norm_sum")


def ids_digest(keys: Sequence[str]) -> str:
    """sha256 over the batch's dedup keys (``device/update_id``), sorted, joined by newlines."""
    return hashlib.sha256("\n".join(sorted(keys)).encode()).hexdigest()


def merge_marker(worker: str, seq: int) -> str:
    """The pseudo dedup key a version records for each batch merged into it.

    ``#`` cannot occur in a device name, so it never collides with an update's key.
    """
    return f"#batch/{worker}/{seq}"


@dataclass
class PartialSum:
    """A worker's batch: ``sums`` (float64, one per model tensor) and what they add up."""

    task: str
    worker: str
    seq: int
    base_version: int  # the newest version the worker knew when it sent this batch
    sums: dict[str, NDArray[np.float64]]
    count: int
    examples: int
    keys: list[str] = field(default_factory=list)
    floats: dict[str, float] = field(default_factory=lambda: dict.fromkeys(FLOAT_SUMS, 0.0))

    @property
    def weight(self) -> float:
        return self.floats["weight"]

    def to_bytes(self) -> bytes:
        meta = {
            "fededge": str(PROTOCOL_VERSION),
            "kind": KIND,
            "task": self.task,
            "worker": self.worker,
            "seq": str(self.seq),
            "base_version": str(self.base_version),
            "count": str(self.count),
            "examples": str(self.examples),
            "keys": json.dumps(self.keys, separators=(",", ":")),
            "ids_digest": ids_digest(self.keys),
        }
        for k in FLOAT_SUMS:
            meta[k] = repr(float(self.floats[k]))
        return encode_tensors(self.sums, meta)

    @classmethod
    def from_bytes(cls, payload: bytes, *, max_bytes: int) -> PartialSum:
        """Decode and check an untrusted partial sum; ProtocolError says what is wrong."""
        p = decode_tensors(payload, max_bytes=max_bytes)
        m = p.metadata
        if m.get("fededge") != str(PROTOCOL_VERSION) or m.get("kind") != KIND:
            raise ProtocolError(f"not a v1 {KIND} message: {m.get('fededge')}/{m.get('kind')}")
        for k in ("task", "worker"):
            if not is_name(m.get(k, "")):
                raise ProtocolError(f"metadata {k!r} must be a name, got {m.get(k)!r}")
        ints = {}
        for k in ("seq", "base_version", "count", "examples"):
            raw = m.get(k, "")
            if not (raw.isascii() and raw.isdigit() and len(raw) <= 16):
                raise ProtocolError(f"metadata {k!r} must be a non-negative integer, got {raw!r}")
            ints[k] = int(raw)
        floats = {}
        for k in FLOAT_SUMS:
            try:
                floats[k] = float(m.get(k, "nan")[:64])
            except ValueError:
                floats[k] = math.nan
            if not math.isfinite(floats[k]):
                raise ProtocolError(f"metadata {k!r} must be a finite number")
        try:
            keys = json.loads(m.get("keys", ""))
        except ValueError:
            raise ProtocolError("metadata 'keys' is not a JSON list") from None
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            raise ProtocolError("metadata 'keys' must be a JSON list of strings")
        if len(keys) != ints["count"] or len(set(keys)) != len(keys):
            raise ProtocolError(f"{len(keys)} keys (distinct: {len(set(keys))}) for count "
                                f"{ints['count']}")  # fmt: skip
        if m.get("ids_digest") != ids_digest(keys):
            raise ProtocolError("ids_digest does not match the keys")
        sums = {}
        for name, arr in p.tensors.items():
            if arr.dtype != np.float64:
                raise ProtocolError(f"tensor {name!r} must be F64, got {arr.dtype}")
            if not np.isfinite(arr).all():
                raise ProtocolError(f"tensor {name!r} has non-finite values")
            sums[name] = np.asarray(arr, dtype=np.float64)
        if ints["count"] > 0 and floats["weight"] <= 0:
            raise ProtocolError("a batch with updates must have a positive weight")
        return cls(m["task"], m["worker"], ints["seq"], ints["base_version"], sums,
                   ints["count"], ints["examples"], keys, floats)  # fmt: skip


class BatchSum:
    """Folds accepted updates, in order, into the float64 sums of one batch."""

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self.acc = np.zeros(layout.size, dtype=np.float64)
        self.count = 0
        self.examples = 0
        self.keys: list[str] = []
        self.floats = dict.fromkeys(FLOAT_SUMS, 0.0)

    def add(self, update: Update, weight: float, norm: float) -> None:
        for name, sl in self.layout.slices():
            codec.fold(self.acc[sl], name, [(update, weight)])
        f = self.floats
        self.count += 1
        self.examples += update.num_examples
        f["weight"] += weight
        f["norm_sum"] += norm
        if update.train_loss is not None:
            f["loss_w"] += weight * update.train_loss
            f["loss_wsum"] += weight
        if update.eval_loss is not None and update.eval_accuracy is not None:
            f["eval_loss_w"] += weight * update.eval_loss
            f["eval_acc_w"] += weight * update.eval_accuracy
            f["eval_wsum"] += weight
        self.keys.append(f"{update.device}/{update.update_id}")

    def message(self, task: str, worker: str, seq: int, base_version: int) -> PartialSum:
        sums = {
            name: self.acc[sl].reshape(shape).copy()
            for (name, sl), shape in zip(self.layout.slices(), self.layout.shapes, strict=True)
        }
        return PartialSum(task, worker, seq, base_version, sums, self.count, self.examples,
                          list(self.keys), dict(self.floats))  # fmt: skip
