"""The coordinator of a sharded task: merges the workers' partial sums into versions.

It is an ordinary :class:`~fededge.aggregator.service.Aggregator` (the task's one writer: it
holds the ``writer`` lease, owns plan, graph, model, status, signing and secure rounds) that
takes no device updates. Instead it subscribes to ``aggregator/partials/+`` and, for each
batch ``(worker, seq)``:

1. drops it as a duplicate if its marker is in a published version or it is already stored;
2. answers ``conflict`` with the keys already counted (a device's resend that another worker
   took), so the worker sends the batch again without them;
3. otherwise stores the message durably (``batches/{worker}-{seq}.bin``, fsynced) and only
   then acknowledges it to the broker and answers ``merged``.

Once the stored batches hold ``min_updates_per_version`` updates it publishes the version:
``base + lr * sum(sums) / sum(weight)``, with every update key and one marker per batch in
the version's metadata (the same write that makes the version durable), then deletes the
batch files. A restart deletes the files whose marker is in a stored version (a crash between
the two steps) and merges the rest again: each batch is counted exactly once.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from fededge.aggregator import kernels
from fededge.aggregator.partial import PartialSum, merge_marker
from fededge.aggregator.policy import Layout
from fededge.aggregator.service import Aggregator
from fededge.errors import ProtocolError
from fededge.fsio import atomic_write
from fededge.mqtt import Message
from fededge.protocol import BatchAck

log = logging.getLogger(__name__)


class Merger:
    """Merges batches on the coordinator ``agg`` (attach before ``agg.start``)."""

    def __init__(self, agg: Aggregator) -> None:
        self.agg = agg
        self.topics = agg.topics
        self.dir: Path = agg.store.root / "batches"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.open: dict[tuple[str, int], PartialSum] = {}
        self.open_keys: set[str] = set()
        self._restored = False
        self.merged_total = 0  # batches merged by this process (tests, logs)
        self.workers = {f"shard-{i}" for i in range(agg.cfg.shards)}
        # Site gateways (fededge/gateway/) send the same partial sums under their own names.
        self.workers |= {f"gateway-{site}" for site in agg.cfg.gateways}
        agg.update_filter = None
        agg.extra_subscriptions = [(self.topics.partials_filter, 1)]
        agg.on_other = self.on_message

    @property
    def count(self) -> int:
        return sum(p.count for p in self.open.values())

    def _path(self, worker: str, seq: int) -> Path:
        return self.dir / f"{worker}-{seq:012d}.bin"

    def ensure_restored(self) -> None:
        """Load the stored batches once the aggregator has its state (after ``agg.start``)."""
        if not self._restored and self.agg.model is not None:
            self.restore()

    def restore(self) -> None:
        """Load the stored batches that no version holds yet (needs the agg's state)."""
        self._restored = True
        dedup = self.agg.core.state.dedup
        limit = self._limit()
        for path in sorted(self.dir.glob("*.bin")):
            p = PartialSum.from_bytes(path.read_bytes(), max_bytes=limit)
            if merge_marker(p.worker, p.seq) in dedup:
                path.unlink()  # published before a crash cut the clean-up short
                continue
            self._add(p)
        if self.open:
            log.info("restored %d stored batches (%d updates) not yet in a version",
                     len(self.open), self.count)  # fmt: skip

    def _limit(self) -> int:
        return 4 * self.agg.core.state.update_limit + (1 << 20)

    def _add(self, p: PartialSum) -> None:
        self.open[(p.worker, p.seq)] = p
        self.open_keys.update(p.keys)

    # -- messages (the aggregator's thread) -------------------------------------------------
    def on_message(self, msg: Message) -> bool:
        worker = self.topics.device_of(msg.topic, "aggregator/partials")
        if worker is None:
            return False
        if self.agg.model is None:
            log.warning("partial sum from %s before the first model: left for later", worker)
            return True  # not acknowledged: the broker sends it again after a reconnect
        if not self._restored:
            self.restore()
        try:
            p = PartialSum.from_bytes(msg.payload, max_bytes=self._limit())
            self._check(p, worker)
        except ProtocolError as e:
            self.agg.metrics.bad_control.inc()
            log.warning("rejected partial sum on %s: %s", msg.topic, e)
            self.agg.client.ack(msg)
            return True
        if worker not in self.workers:
            why = (f"{worker} is not one of this task's {len(self.workers)} shard workers and "
                   "gateways (aggregator.shards and aggregator.gateways of the coordinator): "
                   "its batches are never merged")  # fmt: skip
            log.warning("refused batch %s/%d: %s", worker, p.seq, why)
            ack = BatchAck(task=p.task, worker=worker, seq=p.seq, status="refused", detail=why)
            self.agg.client.ack(msg)
            self.agg.client.publish(self.topics.batch_ack(worker), ack.to_bytes(), qos=1)
            return True
        marker = merge_marker(p.worker, p.seq)
        dedup = self.agg.core.state.dedup
        exclude: list[str] = []
        if p.count == 0:
            status = "merged"  # a worker's probe at start: nothing to store
        elif marker in dedup or (p.worker, p.seq) in self.open:
            status = "duplicate"
        else:
            exclude = [k for k in p.keys if k in dedup or k in self.open_keys]
            if exclude:
                status = "conflict"
            else:
                self.agg.fence()  # nothing is stored once another process may be the writer
                atomic_write(self._path(p.worker, p.seq), msg.payload, fsync=self.agg.cfg.fsync)
                self._add(p)
                self.merged_total += 1
                status = "merged"
        log.info("batch %s/%d: %s (%d updates%s)", p.worker, p.seq, status, p.count,
                 f", {len(exclude)} already counted" if exclude else "")  # fmt: skip
        ack = BatchAck(task=p.task, worker=p.worker, seq=p.seq, status=status, exclude=exclude)
        self.agg.client.ack(msg)
        self.agg.client.publish(self.topics.batch_ack(p.worker), ack.to_bytes(), qos=1)
        if self.count >= self.agg.plan.min_updates_per_version:
            self.close()
        return True

    def _check(self, p: PartialSum, worker: str) -> None:
        if p.task != self.agg.settings.task or p.worker != worker:
            raise ProtocolError(f"batch of {p.task}/{p.worker} on the topic of {worker}")
        model = self.agg.model
        assert model is not None
        layout = Layout.of(model.weights)
        names = tuple(sorted(p.sums))
        shapes = tuple(tuple(p.sums[n].shape) for n in names)
        if names != layout.names or shapes != layout.shapes:
            raise ProtocolError(f"batch tensors {names} {shapes} do not match the model")

    # -- versions -------------------------------------------------------------------------------
    def close(self) -> None:
        """Publish the version of the stored batches, then delete their files."""
        model = self.agg.model
        assert model is not None
        batches = sorted(self.open.values(), key=lambda p: (p.worker, p.seq))
        layout = Layout.of(model.weights)
        acc = np.zeros(layout.size, dtype=np.float64)
        floats: dict[str, float] = {}
        for p in batches:
            for name, sl in layout.slices():
                acc[sl] += p.sums[name].reshape(-1)
            for k, v in p.floats.items():
                floats[k] = floats.get(k, 0.0) + v
        lr = self.agg.plan.server_learning_rate
        weights = {}
        for (name, sl), shape in zip(layout.slices(), layout.shapes, strict=True):
            base = np.ascontiguousarray(model.weights[name], dtype=np.float32).reshape(-1)
            weights[name] = kernels.finalize(base, acc[sl], floats["weight"], lr).reshape(shape)
        keys = [k for p in batches for k in p.keys]
        count = len(keys)
        metrics = {
            "updates": count,
            "examples": sum(p.examples for p in batches),
            "train_loss": floats["loss_w"] / floats["loss_wsum"] if floats["loss_wsum"] else None,
            "eval_loss": floats["eval_loss_w"] / floats["eval_wsum"]
            if floats["eval_wsum"]
            else None,
            "eval_accuracy": (
                floats["eval_acc_w"] / floats["eval_wsum"] if floats["eval_wsum"] else None
            ),
            "mean_update_norm": floats["norm_sum"] / count if count else None,
        }
        markers = [merge_marker(p.worker, p.seq) for p in batches]
        self.agg.fence()
        new = self.agg.publish_version(
            weights, metrics, [k.split("/", 1)[1] for k in keys], keys + markers
        )
        if new.version == model.version:
            return  # not published (the privacy budget is spent): the batches stay stored
        log.info("version %d merges %d batches: %s", new.version, len(batches),
                 ", ".join(f"{p.worker}/{p.seq}:{p.count}" for p in batches))  # fmt: skip
        for p in batches:
            self._path(p.worker, p.seq).unlink(missing_ok=True)
        self.open.clear()
        self.open_keys.clear()
