"""The sans-IO aggregator core: update and control messages in, effects out.

``AggregatorCore`` owns everything the aggregator decides: validating an update, deduplicating
it, staging and group-committing it through :class:`PendingVersion`, answering it, when a
version completes and what is published then. It has no threads, sockets or clocks: the time
comes in as ``now`` and everything that goes to the network comes out as effects
(fededge/aggregator/effects.py) for the driver (fededge/aggregator/service.py) to carry out.
Durable writes happen here, through the :class:`Store`: they are the state machine's own
transitions and must precede the acknowledgements returned after them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, Literal, Protocol

import numpy as np
from numpy.typing import NDArray

from fededge.aggregator import robust
from fededge.aggregator.effects import Ack, Effect, Incoming, NewVersion, Publish, ack, publish
from fededge.aggregator.fleet import FleetTracker
from fededge.aggregator.gauges import CoreGauges
from fededge.aggregator.intake import norms_of, parse_update
from fededge.aggregator.metrics import AggregatorMetrics
from fededge.aggregator.pending import dedup_key, server_step_tensors
from fededge.aggregator.policy import Layout, check_update
from fededge.aggregator.store import Store
from fededge.aggregator.versions import VersionState
from fededge.errors import ProtocolError, SignatureError
from fededge.protocol import AggregatorStatus, ModelVersion, Receipt, Update
from fededge.protocol.clipping import clip_in_force
from fededge.protocol.messages import Weights
from fededge.protocol.signing import SignedKind
from fededge.protocol.vocab import RejectReason
from fededge.settings import Settings

# The service's logger: log lines keep the name they had before the core was split out.
log = logging.getLogger("fededge.aggregator.service")
Status = Literal["accepted", "duplicate", "rejected"]
OptState = tuple[NDArray[np.float64], NDArray[np.float64]]  # server optimizer (m, v)


class RoundView(Protocol):
    """What the status message shows of the secure-aggregation rounds."""

    @property
    def round_id(self) -> str | None: ...
    @property
    def stage(self) -> str | None: ...
    @property
    def checked_in(self) -> int: ...
    @property
    def rounds_done(self) -> int: ...
    @property
    def rounds_aborted(self) -> int: ...


class AggregatorCore:
    """Validate, stage, commit, answer and complete versions; return what to publish."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        metrics: AggregatorMetrics,
        *,
        perf: Callable[[], float] = time.perf_counter,  # durations for metrics only
    ) -> None:
        self.settings = settings
        self.cfg = settings.aggregator
        self.metrics = metrics
        self.state = VersionState(settings, store, metrics)
        self.topics = self.state.topics
        self.rounds: RoundView | None = None
        # Called during long computations (robust aggregation): the driver's watchdog ping.
        self.progress: Callable[[], object] = lambda: None
        version = lambda: self.state.model.version if self.state.model else None  # noqa: E731
        self.fleet = FleetTracker(metrics.registry, version, max_devices=self.cfg.fleet_max_devices)
        CoreGauges(metrics.registry, self)  # secure-round stage, privacy budget: read at scrape
        self.accepted_total = 0
        self.rejected_total = 0
        self._perf = perf
        self._staged: list[Incoming] = []
        self._inflight: list[Incoming] = []  # a group whose fsync runs (commit(pipeline=True))
        self._after_commit: list[tuple[Incoming, str, str]] = []  # copies of staged updates
        self._last_status: float | None = None  # when the last status was published
        self._kernel_seconds = 0.0  # validation time of the batch being ingested
        self._receipts = self.topics.receipt("d")[:-1]  # + a device name checked on arrival
        # The common receipt's JSON up to the device name (see _answer).
        self._receipt_head = f'{{"v":1,"kind":"receipt","task":"{settings.task}","device":"'

    def is_update(self, topic: str) -> bool:
        return self.topics.device_of(topic, "updates") is not None

    # -- updates ----------------------------------------------------------------------------
    def ingest(self, msg: Incoming) -> list[Effect]:
        """Validate one update: stage it for ``commit`` (no effects yet) or answer it now."""
        # Runs once per update on the aggregator's main thread: attributes read once each.
        state = self.state
        model, pending = state.ready()
        payload = msg.payload
        size = len(payload)
        device = self.topics.device_of(msg.topic, "updates") or "?"
        self.metrics.bytes_in.inc(size)  # at once: it shows the update arrived
        if msg.qos == 0:
            # QoS 0 has no acknowledgement and no redelivery, so "a receipt means durable"
            # cannot hold for it; devices always use QoS 1. Dropped without a receipt.
            self.metrics.qos0.inc()
            log.warning("dropped a QoS 0 update device=%s topic=%s (updates must use QoS 1)",
                        device, msg.topic)  # fmt: skip
            return [Ack(msg.handle)]
        perf = self._perf
        t0 = perf()
        update: Update | None = None
        limit = state.update_limit
        try:
            if size > limit:
                raise ProtocolError(
                    f"{size} bytes exceed the update limit of {limit} bytes "
                    "(max_update_bytes, or 2x the model message)",
                    reason=RejectReason.OVERSIZE,
                )
            # Parsed and measured ahead for large ones (intake.preparer), else parsed here
            update = parse_update(payload, limit, msg.prepared)
            plan = state.plan
            if plan.secure_aggregation is not None:
                raise ProtocolError(
                    "the plan asks for secure aggregation: send masked inputs in rounds",
                    reason=RejectReason.SECURE_AGGREGATION,
                )
            uid = update.update_id
            key = dedup_key(device, uid)
            if pending.is_staged(key):
                # A second copy in the same batch: answer only once the first is durable, or
                # a crash before the commit would leave the device holding a false receipt.
                self._after_commit.append((msg, device, uid))
                return []
            dedup = state.dedup
            if key in dedup or pending.has(key):
                self.metrics.duplicates.inc()
                log.info("duplicate update device=%s update_id=%s: answered again", device, uid)
                return self._answer(msg, device, uid, "duplicate")
            if update.base_version < dedup.floor:
                raise ProtocolError(
                    f"base version {update.base_version} is older than the oldest version whose "
                    f"update ids are remembered ({dedup.floor})",
                    reason=RejectReason.STALE,
                )
            quota = plan.max_updates_per_device
            if pending.device_count(device) >= quota:
                # After deduplication: a resend of a counted update is a duplicate, not this.
                raise ProtocolError(
                    f"device {device} already has {quota} update(s) in version "
                    f"{pending.base.version + 1} (max_updates_per_device)",
                    reason=RejectReason.DEVICE_QUOTA,
                )
            weight, norm = check_update(
                update,
                task=self.settings.task,
                device=device,
                current_version=model.version,
                plan=plan,
                layout=pending.layout,
                clip=clip_in_force(plan, model),
                norms=norms_of(msg.prepared),
            )
        except ProtocolError as e:
            log.warning("rejected update device=%s topic=%s reason=%s: %s",
                        device, msg.topic, e.reason, e.detail)  # fmt: skip
            uid_or_none = update.update_id if update is not None else None
            return self._reject(msg, device, uid_or_none, e.reason, e.detail)
        finally:
            self._kernel_seconds += perf() - t0
        pending.stage(update, payload, weight, norm)
        self._staged.append(msg)
        return []

    @property
    def in_flight(self) -> bool:
        """Whether a group is written and being fsynced (``commit(pipeline=True)``)."""
        return bool(self._inflight)

    def commit(self, now: float, *, pipeline: bool = False) -> list[Effect]:
        """Make the staged updates durable; their receipts, and a version if one completes.

        With ``pipeline`` the group's fsync runs in the background while the driver stages
        the next batch: this call returns the answers of the group before (now durable) and
        the next ``commit`` or ``flush`` those of this one. A group that would complete the
        version, or takes the checkpoint path, is committed at once as without it.
        """
        _, pending = self.state.ready()
        self._count_batch()
        out = self._finish(now)
        if self._staged:
            staged, self._staged = self._staged, []
            room = self.state.plan.min_updates_per_version - pending.sums.count
            if pipeline and len(staged) < room and pending.begin_commit():
                self._inflight = staged
            else:
                t0 = self._perf()
                updates = pending.commit()
                self._commit_time(self._perf() - t0)
                out += self._accept(staged, updates, now)
        return out + self._answer_duplicates()

    def _count_batch(self) -> None:
        """The batch's validation time into the metrics (one update of the counter)."""
        if self._kernel_seconds:
            self.metrics.kernel_seconds.inc(self._kernel_seconds)
            self._kernel_seconds = 0.0

    def flush(self, now: float) -> list[Effect]:
        """Finish the group in flight, if any: the answers that waited for its fsync."""
        self._count_batch()
        return self._finish(now) + self._answer_duplicates()

    def _finish(self, now: float) -> list[Effect]:
        if not self._inflight:
            return []
        _, pending = self.state.ready()
        msgs, self._inflight = self._inflight, []
        t0 = self._perf()
        updates = pending.finish_commit()
        self._commit_time(self._perf() - t0)
        return self._accept(msgs, updates, now)

    def _commit_time(self, elapsed: float) -> None:
        self.metrics.commit_seconds.inc(elapsed)
        self.metrics.commit_duration.observe(elapsed)

    def _accept(self, msgs: list[Incoming], updates: list[Update], now: float) -> list[Effect]:
        """Receipts of a durable, folded group; the version too if it is complete."""
        model, pending = self.state.ready()
        out: list[Effect] = []
        target = pending.base.version + 1
        self.fleet.on_updates([(u.device, u.base_version) for u in updates], pending.base.version)
        # _answer(msg, update.device, update.update_id, "accepted", target) for each, in one
        # loop: every update here is named and its device checked (a name, never "?").
        head = self._receipt_head
        tail = f'","status":"accepted","version":{model.version},"pending":{target}}}'
        sign, receipts, append = self.state.sign, self._receipts, out.append
        for msg, update in zip(msgs, updates, strict=True):
            device = update.device
            text = f'{head}{device}","update_id":"{update.update_id}{tail}'
            append(publish(receipts + device, sign(SignedKind.RECEIPT, text.encode())))
            append(ack(msg.handle))
        self.accepted_total += len(updates)
        self.metrics.accepted.inc(len(updates))
        self.metrics.pending.set(pending.sums.count)
        self.metrics.pending_examples.set(pending.sums.examples)
        if pending.sums.count >= self.state.plan.min_updates_per_version:
            out += self._complete_version(now)
        return out

    def _answer_duplicates(self) -> list[Effect]:
        """Answer second copies whose first copy is now durable (the others wait on)."""
        if not self._after_commit:
            return []
        pending = self.state.pending
        out: list[Effect] = []
        waiting: list[tuple[Incoming, str, str]] = []
        for msg, device, uid in self._after_commit:
            if pending is not None and pending.is_staged(dedup_key(device, uid)):
                waiting.append((msg, device, uid))
                continue
            self.metrics.duplicates.inc()
            out += self._answer(msg, device, uid, "duplicate")
        self._after_commit = waiting
        return out

    def internal_error(self, msg: Incoming) -> list[Effect]:
        """A bug while handling ``msg``: the documented ``internal_error`` receipt, then the ack.

        Called by the driver after logging the traceback; must not fail itself.
        """
        self.metrics.internal_errors.inc()
        device = self.topics.device_of(msg.topic, "updates")
        if device is None or self.state.model is None:
            return [Ack(msg.handle)]
        uid: str | None = None
        try:
            uid = Update.from_bytes(msg.payload, max_bytes=self.state.update_limit).update_id
        except Exception:  # the update cannot be named: no receipt, the device times out
            log.debug("update of the internal error cannot be named", exc_info=True)
        detail = "the aggregator failed on this update (a bug; see its log)"
        return self._reject(msg, device, uid, RejectReason.INTERNAL_ERROR, detail)

    def _reject(
        self, msg: Incoming, device: str, uid: str | None, reason: RejectReason, detail: str
    ) -> list[Effect]:
        self.rejected_total += 1
        self.metrics.rejected.labels(reason.value).inc()
        return self._answer(msg, device, uid, "rejected", None, reason, detail)

    def _answer(
        self,
        msg: Incoming,
        device: str,
        update_id: str | None,
        status: Status,
        pending: int | None = None,
        reason: RejectReason | None = None,
        detail: str | None = None,
    ) -> list[Effect]:
        """The receipt (if the update can be named), then the acknowledgement."""
        model, _ = self.state.ready()
        out: list[Effect] = []
        if update_id is not None and device != "?" and reason is None and detail is None:
            # The common receipt, without building and validating a Receipt model: every
            # field is a checked name, a status literal or an int, so these bytes are exactly
            # Receipt(...).to_bytes() (tests/test_aggregator_core.py compares them).
            version = model.version
            text = (
                f'{self._receipt_head}{device}",'
                f'"update_id":"{update_id}","status":"{status}","version":{version}}}'
                if pending is None
                else f'{self._receipt_head}{device}",'
                f'"update_id":"{update_id}","status":"{status}","version":{version},'
                f'"pending":{pending}}}'
            )
            payload = self.state.sign(SignedKind.RECEIPT, text.encode())
            out.append(publish(self._receipts + device, payload))
        elif update_id is not None and device != "?":
            receipt = Receipt(
                task=self.settings.task,
                device=device,
                update_id=update_id,
                status=status,
                reason=reason.value if reason is not None else None,
                detail=detail[:1024] if detail else None,
                version=model.version,
                pending=pending,
            )
            payload = self.state.sign(SignedKind.RECEIPT, receipt.to_bytes())
            out.append(Publish(self.topics.receipt(device), payload))
        out.append(ack(msg.handle))
        return out

    # -- versions ---------------------------------------------------------------------------
    def _complete_version(self, now: float) -> list[Effect]:
        _, pending = self.state.ready()
        if self.state.budget_refusal() is not None:
            return [self.status_publish(now)]  # the updates stay pending; no version
        t0 = self._perf()
        plan = self.state.plan
        opt_state: OptState | None = None
        done = robust.finalize(
            pending, plan, self.state.optimizer_state, self.metrics, self.progress,
            parallel=self.cfg.parallel_kernels,
        )  # fmt: skip
        if done:
            weights, opt_state = done
        elif plan.server_optimizer == "sgd":
            weights = pending.finalize(plan.server_learning_rate)
        else:  # fused with finalize: mean delta, optimizer state and weights in one pass
            m, v = self.state.optimizer_state(pending.layout.size)
            weights, m2, v2 = pending.finalize_with(plan, m, v)
            opt_state = (m2, v2)
        self.metrics.kernel_seconds.inc(self._perf() - t0)
        _, effects = self.new_version(
            weights,
            pending.metrics(),
            pending.sums.ids,
            pending.sums.keys(),
            now=now,
            opt_state=opt_state,
        )
        return effects

    def new_version(
        self,
        weights: Weights,
        metrics: dict[str, Any],
        update_ids: list[str],
        update_keys: list[str] | None = None,
        *,
        round_id: str | None = None,
        now: float,
        opt_state: OptState | None = None,
    ) -> tuple[ModelVersion, list[Effect]]:
        """Store the next version (async FedAvg or a secure round's result); its effects.

        A secure round's result comes as plain server-SGD weights (``base + lr * sum/weight``):
        with another ``server_optimizer`` the mean delta is recovered from them and the
        optimizer applied here (``opt_state`` None), so rounds get the same optimizers.
        """
        old, _ = self.state.ready()
        if opt_state is None and self.state.plan.server_optimizer != "sgd":
            weights, opt_state = self._optimize_result(old, weights)
        if self.state.budget_refusal() is not None:
            # A secure round's sum is dropped unpublished: it would spend beyond the budget.
            return old, [self.status_publish(now)]
        model, effects = self.state.publish_version(
            weights, metrics, update_ids, update_keys, round_id=round_id, now=now,
            opt_state=opt_state,
        )  # fmt: skip
        # The status after the version names it; the callbacks run last.
        return model, [
            *effects,
            self.status_publish(now),
            NewVersion(model, old.version, model.version),
        ]

    def _optimize_result(self, old: ModelVersion, weights: Weights) -> tuple[Weights, OptState]:
        """Apply the server optimizer to a result given as ``base + lr * mean delta``."""
        plan = self.state.plan
        layout = Layout.of(old.weights)
        delta = np.empty(layout.size, dtype=np.float64)
        for name, sl in layout.slices():
            new = np.asarray(weights[name], dtype=np.float64).reshape(-1)
            delta[sl] = new - np.asarray(old.weights[name], dtype=np.float64).reshape(-1)
        delta /= plan.server_learning_rate
        m, v = self.state.optimizer_state(layout.size)
        out, m2, v2 = server_step_tensors(old.weights, layout, delta, 1.0, plan, m, v)
        return out, (m2, v2)

    # -- control ----------------------------------------------------------------------------
    def control(self, msg: Incoming, now: float) -> list[Effect]:
        """Handle a plan, graph or model message; the effects end with its acknowledgement."""
        out: list[Effect] = []
        try:
            if msg.topic == self.topics.plan:
                if self.state.on_plan(msg.payload):
                    out += self._complete_version(now)
            elif msg.topic == self.topics.graph:
                self.state.on_graph(msg.payload)
            elif msg.topic == self.topics.model:
                out += self.state.on_model(msg.payload, now)
            elif (device := self.topics.device_of(msg.topic, "devices")) is not None:
                self.fleet.on_status(device, msg.payload)  # devices/+/status, fleet gauges
            else:
                log.debug("ignoring message on %s", msg.topic)
        except (ProtocolError, SignatureError) as e:
            self.metrics.bad_control.inc()
            kind = msg.topic.rsplit("/", 1)[-1]
            if isinstance(e, SignatureError):
                self.metrics.untrusted.labels(kind, e.reason).inc()
            elif e.reason is RejectReason.STALE:
                self.metrics.untrusted.labels(kind, "old_generation").inc()
            log.warning("rejected message on %s reason=%s: %s", msg.topic, e.reason, e.detail)
            if msg.topic == self.topics.plan and self.state.model is not None:
                # An invalid retained plan would leave devices on defaults (e.g. no noise), a
                # hostile one on its values: put the last valid one back, as it was signed.
                out.append(self.state.plan_publish())
            elif msg.topic == self.topics.graph and self.state.graph_raw is not None:
                # A refused retained graph would keep new devices from every version.
                out.append(Publish(self.topics.graph, self.state.graph_raw, retain=True))
        out.append(Ack(msg.handle))
        return out

    # -- status -----------------------------------------------------------------------------
    def status(self, state: Literal["online", "offline"], now: float) -> AggregatorStatus:
        r = self.rounds
        stage = r.stage if r is not None else None
        return AggregatorStatus(
            task=self.settings.task,
            state=state,
            version=self.state.model.version if self.state.model else None,
            pending_updates=self.state.pending.sums.count if self.state.pending else 0,
            pending_examples=self.state.pending.sums.examples if self.state.pending else 0,
            min_updates_per_version=self.state.plan.min_updates_per_version,
            accepted_total=self.accepted_total,
            rejected_total=self.rejected_total,
            time=now,
            round_id=r.round_id if r is not None else None,
            round_stage=stage,
            checked_in=r.checked_in if r is not None and stage is not None else None,
            epsilon=self.state.epsilon(),
            delta=self.state.plan.delta if self.state.ledger.events else None,
            max_epsilon=self.state.plan.max_epsilon,
            stopped=self.state.ledger.stopped,
        )

    def tick(self, now: float) -> list[Effect]:
        """A timer tick: the periodic status, every ``status_interval`` seconds."""
        last = self._last_status
        # A wall clock that stepped back (NTP) publishes now rather than never.
        if last is None or not 0 <= now - last <= self.cfg.status_interval:
            return [self.status_publish(now)]
        return []

    def status_publish(self, now: float) -> Publish:
        self._last_status = now
        payload = self.status("online", now).to_bytes()
        return Publish(self.topics.aggregator_status, payload, retain=True)
