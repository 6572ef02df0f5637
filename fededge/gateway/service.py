"""The site gateway: the aggregator of one site's devices, a shard worker of the central one.

On the site broker it does what the aggregator does for devices: validates each update (same
checks, same receipts), logs it durably (:mod:`fededge.gateway.batches`) and only then
receipts and acknowledges it. Upstream it is a worker of the sharded protocol
(:mod:`fededge.aggregator.partial`): it sends its batch as one
:class:`~fededge.aggregator.partial.PartialSum` on ``aggregator/partials/gateway-{site}``,
which the site broker's bridge carries to the central broker, where the coordinator
(:mod:`fededge.aggregator.coordinator`) merges it once and answers on
``aggregator/acks/gateway-{site}`` (bridged back). Plan, graph and model versions reach the
site's devices through the bridge unchanged (signed centrally); the gateway reads them too.

A batch is sent when it holds ``min_updates_per_version`` updates or its first update is
``gateway.ship_interval`` s old, one at a time (the next waits for the answer). After a *full*
batch (``min_updates_per_version`` updates, enough to close a version by itself) the next one
also waits for a version newer than the one the full batch was sent on: one partial sum per
version. After a short one it does not wait: the version it went into may need more updates,
and only this site may have them. Updates keep being accepted while a batch is out (they open
the next one), so a cut bridge stops nothing at the site.
"""

from __future__ import annotations

import logging
import queue
import time
from collections.abc import Callable

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
from fededge.aggregator.policy import Layout
from fededge.aggregator.store import Store, task_root
from fededge.errors import ConfigError, ProtocolError, SignatureError
from fededge.gateway.batches import Entry, SiteBatches, key_of
from fededge.gateway.metrics import GatewayMetrics
from fededge.keys import load_private
from fededge.memory import keep_freed_memory
from fededge.mqtt import Message, MqttClient
from fededge.protocol import BatchAck, ModelVersion, Plan, Topics, Update, decode_json
from fededge.protocol.signing import SignedKind, open_message
from fededge.protocol.vocab import RejectReason
from fededge.settings import Settings

log = logging.getLogger(__name__)


class Gateway:
    """One site's gateway for one task (see the module docstring)."""

    def __init__(self, settings: Settings) -> None:
        gw = settings.gateway
        if gw.site is None:
            raise ConfigError("gateway.site is not set: name the site (e.g. --site plant-3)")
        self.settings = settings
        self.cfg = settings.aggregator
        self.gw = gw
        self.worker = f"gateway-{gw.site}"
        self.topics = Topics(settings.topic_prefix, settings.task)
        root = task_root(settings.state_dir, settings.task)
        self.store = Store(root.with_name(f"{root.name}.{self.worker}"), fsync=self.cfg.fsync)
        self.batches = SiteBatches(self.store.root, fsync=self.cfg.fsync)
        self.signer = load_private(gw.signing_key, "gateway.signing_key") if (
            gw.signing_key is not None) else None  # fmt: skip
        self.owner_keys = settings.trust.owner_keys()
        # Versions are the central aggregator's (or the owner's version 0), never the gateway's.
        # As on a device (device/trust.py): with no aggregator key, versions are not verified.
        agg_keys = settings.trust.aggregator_keys()
        self.model_keys = [*agg_keys, *self.owner_keys] if agg_keys else []
        for what, keys in (("trust.owner_key (plans)", self.owner_keys),
                           ("trust.aggregator_key (model versions)", self.model_keys)):  # fmt: skip
            if not keys:
                log.warning("no %s set: this gateway trusts whoever can publish on the site "
                            "broker for them (docs/security.md)", what)  # fmt: skip
        self.plan = Plan()
        self._have_plan = False
        self.model: ModelVersion | None = None
        self._model_bytes = 0
        self._opened = time.monotonic()  # when the open batch got its first update
        self._sent_at = 0.0
        self._out_since: float | None = None  # when this process first sent the out batch
        b = self.batches
        self.metrics = GatewayMetrics(
            out_age=lambda: 0.0 if self._out_since is None else time.monotonic() - self._out_since,
            open_updates=lambda: len(b.open_keys), out_updates=lambda: len(b.out_keys))  # fmt: skip
        self.metrics_port: int | None = None
        self._warned_secure = False
        self.accepted_total = 0
        self.merged_total = 0
        self.client = MqttClient(settings.broker, f"fededge-gateway-{settings.task}-{gw.site}",
                                 persistent=True, manual_ack=True, exclusive=True,
                                 name="gateway", in_place_payloads=True)  # fmt: skip
        # Large updates parsed and measured while in the cache (intake.preparer)
        self.client.messages.prepare = preparer(
            self.topics, lambda: update_limit(self._model_bytes, self.cfg.max_update_bytes)
        )

    # -- running ---------------------------------------------------------------------------------
    def start(self, tick: Callable[[], object] = lambda: None,
              should_stop: Callable[[], bool] = lambda: False) -> None:  # fmt: skip
        from fededge.aggregator.service import connect_with_retry

        keep_freed_memory()  # large packets reuse mapped pages (fededge/memory.py)
        if self.cfg.metrics:
            try:
                self.metrics_port = self.metrics.serve(self.cfg.metrics_host, self.cfg.metrics_port)
            except OSError as e:
                raise ConfigError(f"aggregator.metrics_port={self.cfg.metrics_port}: cannot listen "
                                  f"on {self.cfg.metrics_host}: {e.strerror}") from None  # fmt: skip
        connect_with_retry(self.client, self.settings, tick, should_stop)
        self.client.subscribe_all([self.topics.plan, self.topics.model,
                                   self.topics.batch_ack(self.worker)], qos=1)  # fmt: skip
        # Both come down the bridge retained; checking updates against the default plan would
        # reject honest ones (its clip norm), so nothing is taken before the task's own plan.
        while self.model is None or not self._have_plan:
            tick()
            if should_stop():
                return
            try:
                msg = self.client.messages.get(timeout=0.2)
            except queue.Empty:
                continue
            self._control(msg)
        assert self.model is not None
        self.batches.bind(Layout.of(self.model.weights))
        self.client.subscribe(self.topics.updates_filter, qos=1)
        if self.batches.out_seq is not None:
            self._send()  # out before a restart: the central side merges it once
        log.info("gateway ready: task=%s site=%s version=%d out=%s open batch %d with %d "
                 "updates", self.settings.task, self.gw.site, self.model.version,
                 self.batches.out_seq, self.batches.open_seq, len(self.batches.open_keys))  # fmt: skip

    def run(
        self, should_stop: Callable[[], bool], tick: Callable[[], object] = lambda: None
    ) -> None:
        while not should_stop():
            tick()
            self.step(0.2)

    def step(self, timeout: float) -> None:
        """One group of messages: updates are logged in one commit, then receipted."""
        msgs: list[Message] = []
        try:
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
            else:
                self._ingest(msg, staged, later)
        if staged:
            if not self.batches.open_keys:
                self._opened = time.monotonic()
            self.batches.append([(entry, raw) for _, entry, raw in staged])
            self.metrics.accepted.inc(len(staged))
            for msg, entry, _ in staged:
                self.accepted_total += 1
                self._answer(msg, entry[0], "accepted")
        for msg, u in later:
            self.metrics.duplicates.inc()
            self._answer(msg, u, "duplicate")
        self._maybe_send()

    # -- upstream --------------------------------------------------------------------------------
    def _maybe_send(self) -> None:
        b = self.batches
        now = time.monotonic()
        if b.out_seq is not None:
            if now - self._sent_at > self.gw.ship_timeout:
                log.warning("no answer for batch %d in %.0f s (bridge down?); sending it again",
                            b.out_seq, self.gw.ship_timeout)  # fmt: skip
                self._send()
            return
        if not b.open_keys or self.model is None or self.model.version <= b.gate:
            return  # nothing to send, or this version already has our batch
        if len(b.open_keys) >= self.plan.min_updates_per_version or (
            now - self._opened >= self.gw.ship_interval
        ):
            b.send(self.model.version)
            self._send()

    def _send(self) -> None:
        b = self.batches
        assert self.model is not None and b.out_seq is not None and b.out_sum is not None
        msg = b.out_sum.message(self.settings.task, self.worker, b.out_seq, self.model.version)
        self.client.publish(self.topics.partial(self.worker), msg.to_bytes(), qos=1)
        self.metrics.sent.inc()
        self._sent_at = time.monotonic()
        if self._out_since is None:
            self._out_since = self._sent_at
        log.info("sent batch %d upstream (%d updates, weight %.6g, base version %d)",
                 b.out_seq, msg.count, msg.weight, msg.base_version)  # fmt: skip

    def _on_answer(self, ack: BatchAck) -> None:
        b = self.batches
        if ack.worker != self.worker or ack.seq != b.out_seq or self.model is None:
            return  # an answer to a batch sent again: the first answer settled it
        self.metrics.answers.labels(ack.status).inc()
        if ack.status == "refused":
            # The central side does not know this site (aggregator.gateways): the site keeps
            # working and the batch is offered again every ship_timeout, so it goes through
            # once the coordinator is configured for it.
            log.error("the central aggregator refused batch %d of %s: %s; sending it again in "
                      "%.0f s", ack.seq, self.worker, ack.detail, self.gw.ship_timeout)  # fmt: skip
            return
        if ack.status in ("merged", "duplicate"):
            full = len(b.out_keys) >= self.plan.min_updates_per_version
            self._out_since = None
            b.settle(wait=full)  # its keys stay on disk: a resend is answered duplicate
            self.merged_total += 1
            log.info("batch %d %s upstream", ack.seq, ack.status)
            return
        dropped = b.exclude(set(ack.exclude))
        log.warning("batch %d holds %d updates the central aggregator already counted (a "
                    "device's resend through another path); sending it without them",
                    ack.seq, dropped)  # fmt: skip
        if not b.out_keys:
            b.settle(wait=False)  # nothing of ours left: this version may still get a batch
            self._out_since = None
            return
        self._send()

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
                self.plan,
                "secure aggregation does not run through a site gateway: connect the device "
                "to the central broker",
            )
            key = f"{device}/{update.update_id}"
            if (
                self.batches.remembers(key)
                or self.batches.holds(key)
                or any(key_of(e) == key for _, e, _ in staged)
            ):
                later.append((msg, update))  # answered once the first copy is durable
                return
            floor = self._floor()
            if update.base_version < floor:
                # As a shard worker (aggregator/shard.py): the coordinator remembers the keys of
                # the versions it keeps only, this gateway those of the batches it sent on them:
                # an update based on an older version could be a resend of a counted update
                # that neither would recognise.
                raise ProtocolError(
                    f"base version {update.base_version} is older than the oldest version "
                    f"whose update ids are remembered ({floor})",
                    reason=RejectReason.STALE,
                )
            held = self.batches.device_count(device)
            held += count_device(device, (e[0].device for _, e, _ in staged))
            check_quota(held, device, self.plan, "this gateway's batch")
            weight, norm = check(
                update, self.settings.task, device, self.model, self.plan, norms_of(msg.prepared)
            )
        except ProtocolError as e:
            log.warning("rejected update device=%s reason=%s: %s", device, e.reason, e.detail)
            self.metrics.rejected.labels(e.reason.value).inc()
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
                self.plan = decode_json(body, Plan)
                self._have_plan = True
                if self.plan.secure_aggregation is not None and not self._warned_secure:
                    self._warned_secure = True
                    log.warning("the plan asks for secure aggregation, which does not run "
                                "through a site gateway: updates are rejected "
                                "(secure_aggregation); see docs/operations.md")  # fmt: skip
            elif msg.topic == self.topics.model and msg.payload:
                body = open_message(msg.payload, SignedKind.MODEL, self.model_keys).payload
                model = ModelVersion.from_bytes(body, max_bytes=1 << 31)
                if model.task == self.settings.task and (
                    self.model is None or model.version > self.model.version
                ):
                    self.model, self._model_bytes = model, len(body)
                    self.metrics.version.set(model.version)
                    self.batches.forget_before(self._floor())
            elif msg.topic == self.topics.batch_ack(self.worker):
                self._on_answer(decode_json(msg.payload, BatchAck))
        except (ProtocolError, SignatureError) as e:
            self.metrics.bad_control.inc()
            log.warning("rejected message on %s: %s", msg.topic, e)
        self.client.ack(msg)

    def _floor(self) -> int:
        """The oldest base version accepted: the central aggregator keeps ``versions_kept``
        versions (and their update keys), this gateway's ``versions_kept`` must not exceed
        that (docs/operations.md 2.5)."""
        assert self.model is not None
        return self.model.version - self.cfg.versions_kept + 1

    def close(self) -> None:
        self.batches.close()
        self.client.close()
        self.store.close()
