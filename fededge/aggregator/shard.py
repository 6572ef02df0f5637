"""A shard worker: takes a share of a task's updates and ships them as partial sums.

N workers subscribe to ``$share/fededge-{task}/{prefix}/{task}/updates/+`` (MQTT 5 shared
subscription: the broker gives each update to one of them). A worker validates an update like
the single aggregator (same checks, same receipts), logs it durably in the batch's write-ahead
log (``shard-{i}/batch-{seq}.wal``, one fsync per group) and only then sends its receipt and
its PUBACK. Every ``shard_batch`` updates (or ``ship_interval`` seconds) it folds the batch
into a :class:`~fededge.aggregator.partial.PartialSum` and sends it to the coordinator, then
takes no update until the coordinator's answer: ``merged``/``duplicate`` ends the batch
(``seq.json`` moves on, the log is deleted), ``conflict`` drops the named keys (resends another
worker took) and sends the batch again. kill -9 at any point: the log and ``seq.json`` say
which batch is open; it is sent again and the coordinator merges each ``(worker, seq)`` once.

Raw updates stay in the log until the batch is merged (no checkpoint folds them away), so a
batch can be rebuilt without the updates another worker already counted.
"""

from __future__ import annotations

import json
import logging
import queue
import time
from collections.abc import Callable
from pathlib import Path

from fededge.aggregator.intake import (
    check,
    check_quota,
    count_device,
    norms_of,
    parse_update,
    preparer,
    receipt_bytes,
    refuse_secure,
    update_limit,
)
from fededge.aggregator.partial import BatchSum, PartialSum
from fededge.aggregator.policy import Layout
from fededge.aggregator.store import Store, task_root
from fededge.aggregator.wal import SegmentWriter, read_segment
from fededge.errors import ConfigError, ProtocolError, SignatureError
from fededge.fsio import atomic_write
from fededge.keys import load_private
from fededge.memory import keep_freed_memory
from fededge.mqtt import RETAINED_QUIET, Message, MqttClient
from fededge.protocol import BatchAck, ModelVersion, Plan, Topics, Update, decode_json
from fededge.protocol.signing import SignedKind, open_message
from fededge.protocol.vocab import RejectReason
from fededge.settings import Settings

log = logging.getLogger(__name__)
Entry = tuple[Update, float, float]  # update, weight, norm


def unsharded_only(plan: Plan) -> str | None:
    """What in ``plan`` a partial sum cannot carry (None: shards can aggregate it)."""
    if plan.robust != "none" or plan.robust_zeroing is not None:
        return f"robust aggregation (robust={plan.robust!r}, robust_zeroing={plan.robust_zeroing})"
    if plan.update_rotation != "none":
        return f"update_rotation={plan.update_rotation!r}"
    return None


class ShardWorker:
    """One worker of a sharded task (see the module docstring)."""

    def __init__(self, settings: Settings, shard_id: int, *, group: str | None = None) -> None:
        self.settings = settings
        self.cfg = settings.aggregator
        self.worker = f"shard-{shard_id}"
        self.topics = Topics(settings.topic_prefix, settings.task)
        self.group = group or self.cfg.shard_group or f"fededge-{settings.task}"
        # Beside the coordinator's folder (not inside: its start-up sweeps stale files there);
        # the Store's lock keeps a second process of this shard out.
        root = task_root(settings.state_dir, settings.task)
        self.store = Store(root.with_name(f"{root.name}.{self.worker}"), fsync=self.cfg.fsync)
        self.root: Path = self.store.root
        self.signer = load_private(self.cfg.signing_key, "aggregator.signing_key") if (
            self.cfg.signing_key is not None) else None  # fmt: skip
        self.owner_keys = settings.trust.owner_keys()
        self.model_keys = [*self.owner_keys, *settings.trust.aggregator_keys()]
        if self.signer is not None and self.model_keys:
            self.model_keys.append(self.signer.public_key())
        self.plan = Plan()
        self.model: ModelVersion | None = None
        self._model_bytes = 0
        self.fence: Callable[[], object] = lambda: None
        self.seq = self._read_seq()
        self.batch: list[Entry] = self._recover()
        self._writer: SegmentWriter | None = None
        self._shipping: PartialSum | None = None
        self._shipped_at = 0.0
        self._opened = time.monotonic()
        self._deferred: list[Message] = []  # updates held while a batch is out (unacked)
        self.accepted_total = 0
        self.client = MqttClient(settings.broker, f"fededge-aggregator-{settings.task}-{self.worker}",
                                 persistent=True, manual_ack=True, exclusive=True,
                                 name=self.worker, in_place_payloads=True)  # fmt: skip
        # Large updates parsed and measured while in the cache (intake.preparer)
        self.client.messages.prepare = preparer(
            self.topics, lambda: update_limit(self._model_bytes, self.cfg.max_update_bytes)
        )

    # -- durable state ------------------------------------------------------------------------
    def _log_path(self, seq: int) -> Path:
        return self.root / f"batch-{seq:012d}.wal"

    def _read_seq(self) -> int:
        try:
            return int(json.loads((self.root / "seq.json").read_text())["next"])
        except FileNotFoundError:
            return 0

    def _recover(self) -> list[Entry]:
        for old in self.root.glob("batch-*.wal"):
            if int(old.stem.split("-")[1]) < self.seq:
                old.unlink()  # merged before a crash cut the clean-up short
        path = self._log_path(self.seq)
        if not path.exists():
            return []
        entries = []
        for rec in read_segment(path, repair=True):
            u = Update.from_bytes(rec.payload, max_bytes=1 << 34)
            entries.append((u, float(rec.header["weight"]), float(rec.header["norm"])))
        log.info("%s: batch %d reopened with %d logged updates", self.worker, self.seq,
                 len(entries))  # fmt: skip
        return entries

    def _rewrite(self, entries: list[Entry]) -> None:
        """Replace the open batch's log by ``entries`` (after a conflict), atomically."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        tmp = self._log_path(self.seq).with_suffix(".new")
        tmp.unlink(missing_ok=True)
        w = SegmentWriter(tmp, fsync=self.cfg.fsync)
        for u, weight, norm in entries:
            w.append({"id": u.update_id, "weight": weight, "norm": norm, "group": 0},
                     u.to_bytes())  # fmt: skip
        w.commit()
        w.close()
        tmp.replace(self._log_path(self.seq))
        self.batch = entries

    def _next_batch(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        atomic_write(self.root / "seq.json", json.dumps({"next": self.seq + 1}).encode(),
                     fsync=self.cfg.fsync)  # fmt: skip
        self._log_path(self.seq).unlink(missing_ok=True)
        self.seq += 1
        self.batch = []
        self._shipping = None
        self._opened = time.monotonic()

    # -- running ---------------------------------------------------------------------------------
    def start(self, tick: Callable[[], object] = lambda: None,
              should_stop: Callable[[], bool] = lambda: False) -> None:  # fmt: skip
        from fededge.aggregator.service import connect_with_retry

        keep_freed_memory()  # large packets reuse mapped pages (fededge/memory.py)
        connect_with_retry(self.client, self.settings, tick, should_stop)
        self.client.subscribe_all([self.topics.plan, self.topics.model,
                                   self.topics.batch_ack(self.worker)], qos=1)  # fmt: skip
        # The retained plan and model first (a quiet spell after the model): no update is
        # judged by a default plan.
        quiet_until = time.monotonic() + RETAINED_QUIET
        while self.model is None or time.monotonic() < quiet_until:
            tick()
            if should_stop():
                return
            if self._take_control(0.1):
                quiet_until = time.monotonic() + RETAINED_QUIET
        # Before taking any update: the open batch, or an empty one as a probe, goes to the
        # coordinator, and its answer comes back. A batch reopened after a crash may have been
        # merged already, so it is sent again as it is and nothing joins it (the coordinator
        # would drop the whole batch as a duplicate, new updates with it). A worker outside
        # the coordinator's shard set is refused here, before it acknowledges an update.
        self._ship()
        while self._shipping is not None:
            tick()
            if should_stop():
                return
            self._await_answer(0.2)
        self.client.subscribe(self.topics.shared_updates_filter(self.group), qos=1)
        log.info("%s ready: task=%s version=%d open batch %d with %d updates", self.worker,
                 self.settings.task, self.model.version, self.seq, len(self.batch))  # fmt: skip

    def _take_control(self, timeout: float) -> bool:
        """Handle one control message (True); an update is held for later (not acknowledged)."""
        try:
            msg = self.client.messages.get(timeout=timeout)
        except queue.Empty:
            return False
        if self.topics.device_of(msg.topic, "updates") is not None:
            self._deferred.append(msg)  # QoS 1: bounded by the broker's in-flight window
            return False
        self._control(msg)
        return True

    def run(
        self, should_stop: Callable[[], bool], tick: Callable[[], object] = lambda: None
    ) -> None:
        while not should_stop():
            tick()
            self.step(0.2)

    def step(self, timeout: float) -> None:
        """While a batch is out: only control messages (its answer); else a group of updates."""
        self.fence()
        if self._shipping is not None:
            self._await_answer(timeout)
            return
        msgs = self._deferred[: self.cfg.group_commit_max]
        del self._deferred[: len(msgs)]
        try:
            if not msgs:
                msgs.append(self.client.messages.get(timeout=timeout))
            limit = self.cfg.group_commit_max
            msgs += self.client.messages.take(limit - len(msgs))
            self.client.messages.linger(msgs, limit, self.cfg.commit_delay)
        except queue.Empty:
            pass
        staged: list[tuple[Message, Entry, bytes]] = []
        later: list[tuple[Message, Update]] = []
        for msg in msgs:
            if self.topics.device_of(msg.topic, "updates") is None:
                self._control(msg)
                continue
            self._ingest(msg, staged, later)
        if staged:
            self.fence()
            if self._writer is None:
                self._writer = SegmentWriter(self._log_path(self.seq), fsync=self.cfg.fsync)
            for _, (u, weight, norm), raw in staged:
                self._writer.append({"id": u.update_id, "weight": weight, "norm": norm,
                                     "group": 0}, raw)  # fmt: skip
            self._writer.commit()  # durable: now the receipts and the PUBACKs
            for msg, entry, _ in staged:
                self.batch.append(entry)
                self.accepted_total += 1
                self._answer(msg, entry[0], "accepted")
        for msg, u in later:
            self._answer(msg, u, "duplicate")
        self._maybe_ship()

    def _maybe_ship(self) -> None:
        size = self.cfg.shard_batch or self.plan.min_updates_per_version
        age = time.monotonic() - self._opened
        if self.batch and (len(self.batch) >= size or age >= self.cfg.ship_interval):
            self._ship()

    def _ship(self) -> None:
        assert self.model is not None
        acc = BatchSum(Layout.of(self.model.weights))
        for u, weight, norm in self.batch:
            acc.add(u, weight, norm)
        self._shipping = acc.message(self.settings.task, self.worker, self.seq, self.model.version)
        self._shipped_at = time.monotonic()
        self.client.publish(self.topics.partial(self.worker), self._shipping.to_bytes(), qos=1)
        log.info("%s: sent batch %d (%d updates)", self.worker, self.seq, len(self.batch))

    def _await_answer(self, timeout: float) -> None:
        if time.monotonic() - self._shipped_at > self.cfg.ship_timeout:
            log.warning("%s: no answer for batch %d in %.0f s; sending it again",
                        self.worker, self.seq, self.cfg.ship_timeout)  # fmt: skip
            self._ship()
        self._take_control(timeout)

    # -- updates -------------------------------------------------------------------------------
    def _ingest(self, msg: Message, staged: list[tuple[Message, Entry, bytes]],
                later: list[tuple[Message, Update]]) -> None:  # fmt: skip
        assert self.model is not None
        device = self.topics.device_of(msg.topic, "updates") or "?"
        if msg.qos == 0:
            log.warning("dropped a QoS 0 update device=%s (updates must use QoS 1)", device)
            self.client.ack(msg)
            return
        update: Update | None = None
        limit = update_limit(self._model_bytes, self.cfg.max_update_bytes)
        try:
            update = parse_update(msg.payload, limit, msg.prepared)
            refuse_secure(
                self.plan, "the plan asks for secure aggregation: send masked inputs in rounds"
            )
            key = (device, update.update_id)
            mine = [(u.device, u.update_id) for u, _, _ in self.batch]
            mine += [(e[0].device, e[0].update_id) for _, e, _ in staged]
            if key in mine:
                later.append((msg, update))  # answered once the first copy is durable
                return
            floor = self.model.version - self.cfg.versions_kept + 1
            if update.base_version < floor:
                # The coordinator remembers the keys of the versions it keeps: an update based
                # on an older one could be a resend of a counted update it has forgotten.
                raise ProtocolError(
                    f"base version {update.base_version} is older than the oldest version "
                    f"whose update ids are remembered ({floor})",
                    reason=RejectReason.STALE,
                )
            check_quota(count_device(device, (d for d, _ in mine)), device, self.plan,
                        "this worker's batch")  # fmt: skip
            weight, norm = check(
                update, self.settings.task, device, self.model, self.plan, norms_of(msg.prepared)
            )
        except ProtocolError as e:
            log.warning("rejected update device=%s reason=%s: %s", device, e.reason, e.detail)
            if update is not None and device != "?":
                self._answer(msg, update, "rejected", e.reason, e.detail)
            else:
                self.client.ack(msg)
            return
        staged.append((msg, (update, weight, norm), msg.payload))

    def _answer(self, msg: Message, u: Update, status: str, reason: RejectReason | None = None,
                detail: str | None = None) -> None:  # fmt: skip
        assert self.model is not None
        payload = receipt_bytes(self.settings.task, u, status, self.model.version, self.signer,
                                reason, detail)  # fmt: skip
        self.client.publish(self.topics.receipt(u.device), payload, qos=1)
        self.client.ack(msg)

    # -- control ---------------------------------------------------------------------------------
    def _control(self, msg: Message) -> None:
        try:
            if msg.topic == self.topics.plan and msg.payload:
                body = open_message(msg.payload, SignedKind.PLAN, self.owner_keys).payload
                plan = decode_json(body, Plan)
                if why := unsharded_only(plan):
                    # Not an update's fault: stop before taking one (the broker keeps them).
                    raise ConfigError(f"{self.worker}: the plan asks for {why}, which needs "
                                      "every single update in one process: run the task "
                                      "without --shards")  # fmt: skip
                self.plan = plan
            elif msg.topic == self.topics.model and msg.payload:
                body = open_message(msg.payload, SignedKind.MODEL, self.model_keys).payload
                model = ModelVersion.from_bytes(body, max_bytes=1 << 31)
                if model.task == self.settings.task and (
                    self.model is None or model.version > self.model.version
                ):
                    self.model, self._model_bytes = model, len(body)
            elif msg.topic == self.topics.batch_ack(self.worker):
                self._on_answer(decode_json(msg.payload, BatchAck))
        except (ProtocolError, SignatureError) as e:
            log.warning("%s: rejected message on %s: %s", self.worker, msg.topic, e)
        self.client.ack(msg)

    def _on_answer(self, ack: BatchAck) -> None:
        out = self._shipping
        if out is None or ack.seq != self.seq or ack.worker != self.worker:
            return  # an answer to a batch sent again: the first answer settled it
        if ack.status == "refused":
            raise ConfigError(f"the coordinator refused {self.worker}: {ack.detail}")
        if ack.status in ("merged", "duplicate"):
            if not self.batch:  # the probe at start: the coordinator knows this worker
                self._shipping = None
                return
            log.info("%s: batch %d %s", self.worker, self.seq, ack.status)
            self._next_batch()
            return
        drop = set(ack.exclude)
        keep = [e for e in self.batch if f"{e[0].device}/{e[0].update_id}" not in drop]
        log.warning("%s: batch %d holds %d updates already counted (resends another worker "
                    "took); sending it without them", self.worker, self.seq,
                    len(self.batch) - len(keep))  # fmt: skip
        self._shipping = None
        if not keep:
            self._next_batch()
            return
        self._rewrite(keep)
        self._ship()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self.client.close()
        self.store.close()
