"""The device core: what a device decides, as events in and effects out, with no I/O of its own.

:class:`DeviceCore` takes events - decoded graph, plan, model and receipt messages, round
messages, "connected", periodic ticks with the time passed in, training results - and returns
effects (fededge/device/effects.py): publish, write a state file, announce an adopted version,
wake the trainer. It owns

- adoption of graph, plan and model versions (fededge/device/adoption.py): a version waits for
  its graph, NO_GRAPH means "the task's graph", a lower version is adopted with a warning;
- the staleness window: outbox entries older than ``version - max_staleness`` are dropped when a
  new version or plan arrives, and an update trained on a version that fell out of the window
  meanwhile is discarded (its examples stay fresh);
- what to train (only on a plan from the task's owner, never on built-in defaults) and what to
  send: the outbox's due entries, the device status, secure-aggregation rounds
  (fededge/device/secagg_client.py);
- what a receipt does: it settles its outbox entry whatever its status; a rejection is counted.

It has no threads, sockets or clocks, and is not thread-safe: its driver
(fededge/device/client.py) serializes calls. Decisions that must survive a crash are written to
the device's SQLite database (examples and outbox) inside the transaction that makes them, so
those writes are direct calls, not effects; state files (graph, plan, model) are
:class:`Persist` effects. Graph validation (a subprocess probe) and building the runtime are the
driver's: the core is handed the validated spec and runtime.
"""

from __future__ import annotations

import logging
import math
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fededge import __version__
from fededge.device.adoption import Current, ModelSlot
from fededge.device.effects import Adopted, Effect, Persist, Publish, WakeTrainer
from fededge.device.examples import Batch, ExampleStore, StateDb
from fededge.device.metrics import DeviceMetrics
from fededge.device.outbox import Outbox
from fededge.device.secagg_client import Participant, ReadyInput, handle_safely
from fededge.device.spec import BundleSpec
from fededge.device.trust import TRUST_FILE, Refused, TrustState, privacy_refusal
from fededge.protocol import DeviceStatus, ModelVersion, Plan, Receipt, Topics, Update
from fededge.protocol.clipping import clip_in_force
from fededge.protocol.encoding import encode_delta
from fededge.settings import PrivacySettings

if TYPE_CHECKING:
    from fededge.device.runtime import ModelRuntime
    from fededge.device.training import LocalUpdate

log = logging.getLogger(__name__)
STATUS_INTERVAL = 30.0


@dataclass(frozen=True)
class TrainJob:
    """One training run the core decided on: the version, plan and examples to train with."""

    current: Current
    plan: Plan
    batch: Batch


class DeviceCore:
    """A device's decisions; see the module docstring."""

    def __init__(
        self,
        device_id: str,
        topics: Topics,
        db: StateDb,
        examples: ExampleStore,
        metrics: DeviceMetrics,
        *,
        receipt_timeout: float,
        privacy: PrivacySettings | None = None,
        trust: TrustState | None = None,
    ) -> None:
        self.device_id = device_id
        self.topics = topics
        self.examples = examples
        self.outbox = Outbox(db)
        self.metrics = metrics
        self.receipt_timeout = receipt_timeout
        self.model = ModelSlot(topics.task)
        self.plan = Plan()
        self.plan_known = False  # a plan from the task's owner, live or cached
        self.training = False
        self.updates_sent = 0
        self.privacy = privacy if privacy is not None else PrivacySettings()
        trust = trust if trust is not None else TrustState()
        self.generation = trust.generation  # highest plan generation seen (trust.json)
        self.model_floor = trust.model  # (generation, version) of the newest model adopted
        self.refused: str | None = None  # why the current plan is not used (privacy floor)
        self._made = (-1, 0)  # (base version, plain updates made on it): max_updates_per_device
        self._db = db
        self._resend_all = False
        self._status_due = True
        self._last_status: float | None = None
        self._stale_window: tuple[int, int] | None = None
        self.secagg = Participant(
            device_id, topics, db, metrics, version=lambda: self.version, plan=lambda: self.plan
        )

    @property
    def version(self) -> int | None:
        cur = self.model.current
        return cur.version if cur else None

    @property
    def current(self) -> Current | None:
        return self.model.current

    @property
    def spec(self) -> BundleSpec | None:
        return self.model.spec

    # -- messages ------------------------------------------------------------------------------
    def is_new_graph(self, task: str, sha256: str) -> bool:
        """Whether a graph needs validating and :meth:`on_graph` (ProtocolError: wrong task)."""
        return self.model.is_new_graph(task, sha256)

    def on_graph(self, spec: BundleSpec, runtime: ModelRuntime, raw: bytes | None) -> list[Effect]:
        """A validated graph (``raw``: its message, to persist; None when it came from disk)."""
        if not self.model.is_new_graph(self.model.task, spec.graph_sha256):
            return []
        effects: list[Effect] = [] if raw is None else [Persist("graph.bin", raw)]
        return effects + self._adopted(self.model.set_graph(spec, runtime))

    def on_model(self, mv: ModelVersion, raw: bytes | None) -> list[Effect]:
        """A model version (``raw`` to persist once adopted; None when it came from disk).

        Versions are ordered by (generation, version): one below the newest adopted (kept in
        trust.json) is refused (:class:`Refused`, ``old_generation`` or ``old_version``). Only
        a higher generation - a re-initialisation the owner signed - takes the version back.
        """
        floor = self.model_floor
        if floor is not None and (mv.generation, mv.version) < floor:
            older_generation = mv.generation < floor[0]
            raise Refused(
                f"model version {mv.version} (generation {mv.generation}) is older than version "
                f"{floor[1]} (generation {floor[0]}) adopted before",
                reason="old_generation" if older_generation else "old_version",
            )
        return self._adopted(self.model.adopt(mv, raw))

    def on_plan(self, plan: Plan, raw: bytes | None) -> list[Effect]:
        """The task's plan (``raw`` to persist; None when it came from disk).

        Refused (:class:`Refused`) if its generation is below the highest seen. A plan below
        the privacy floor is kept (and persisted) but not used: no training, nothing sent,
        and the status says why until a plan above the floor arrives.
        """
        if plan.generation < self.generation:
            raise Refused(
                f"plan generation {plan.generation} is older than {self.generation}",
                reason="old_generation",
            )
        refusal = privacy_refusal(plan, self.privacy)
        if plan == self.plan and self.plan_known and refusal == self.refused:
            return []
        effects: list[Effect] = [] if raw is None else [Persist("plan.json", raw)]
        if plan.generation > self.generation:
            log.info("plan generation %d -> %d (task re-initialised by its owner)",
                     self.generation, plan.generation)  # fmt: skip
            self.generation = plan.generation
            effects.append(self._trust_file())
        self.plan, self.plan_known = plan, True
        self._status_due = True
        if refusal is not None:
            if refusal != self.refused:
                self.metrics.refused.labels("plan", "privacy_floor").inc()
            log.warning("plan refused, not training or sending: %s", refusal,
                        extra={"reason": "privacy_floor"})  # fmt: skip
            self.refused = refusal
            return effects
        if self.refused is not None:
            log.info("the plan is above the privacy floor again: taking part")
        self.refused = None
        log.info("adopting plan %s", plan.model_dump_json())
        return [*effects, WakeTrainer()]

    def _trust_file(self) -> Persist:
        return Persist(TRUST_FILE, TrustState(self.generation, self.model_floor).to_bytes())

    def on_receipt(self, r: Receipt) -> list[Effect]:
        """Settle the outbox entry a receipt names, whatever its status."""
        if r.device != self.device_id or r.task != self.topics.task:
            return []
        entry = self.outbox.settle(r.update_id)
        self.metrics.receipts.labels(r.status).inc()
        self.metrics.outbox.set(len(self.outbox))
        if entry is None:
            log.debug("receipt for %s, which is no longer in the outbox", r.update_id)
        elif r.status == "rejected":
            self.metrics.dropped.labels(r.reason or "rejected").inc()
            log.warning("update %s rejected by the aggregator: %s (%s)", r.update_id, r.reason,
                        r.detail, extra={"update_id": r.update_id, "reason": r.reason})  # fmt: skip
        else:
            log.info("update %s %s (aggregator version %d)", r.update_id, r.status, r.version)
        self._status_due = True
        return []

    def on_round_message(self, topic: str, payload: bytes, now: float) -> list[Effect]:
        """A secure-aggregation round message; a refused one is counted and logged."""
        if self.refused is not None:
            return []  # below the privacy floor: no part in rounds
        effects = handle_safely(self.secagg, topic, payload, now)
        if effects is None:
            self.metrics.bad_messages.inc()
            return []
        return effects

    def on_connect(self) -> None:
        """(Re)connected: resend every outbox entry and the status."""
        self._resend_all = True
        self._status_due = True

    def _adopted(self, effects: list[Effect]) -> list[Effect]:
        cur = self.model.current
        if any(isinstance(e, Adopted) for e in effects) and cur is not None:
            key = (cur.model.generation, cur.version)
            if self.model_floor is None or key > self.model_floor:
                self.model_floor = key
                effects.append(self._trust_file())
            self.metrics.version.set(self.version or 0)
            self._status_due = True
            effects.append(WakeTrainer())
        return effects

    # -- periodic work ---------------------------------------------------------------------------
    def tick(self, now: float, wall: float, connected: bool) -> list[Effect]:
        """Drop stale entries, send due ones, run rounds, publish the status when due.

        ``now``: monotonic seconds (receipt timeouts); ``wall``: epoch seconds (message times).
        """
        effects: list[Effect] = []
        if self.refused is None:  # below the privacy floor nothing is sent
            if connected:
                effects += self._pump_outbox(now)
            effects += self.secagg.tick(now, wall, connected)
        last = self._last_status
        if self._status_due or last is None or now - last > STATUS_INTERVAL:
            self._status_due = False
            self._last_status = now
            if connected:
                state = "training" if self.training else "online"
                effects.append(self.status_publish(state, wall))
            self.metrics.examples.set(self.examples.count())
            self.metrics.fresh.set(self.examples.fresh_count())
        return effects

    def _pump_outbox(self, now: float) -> list[Effect]:
        if self._resend_all:
            self._resend_all = False
            self.outbox.reset()
        cur = self.model.current
        window = (cur.version, self.plan.max_staleness) if cur is not None else None
        if cur is not None and window != self._stale_window:
            self._stale_window = window  # only a new version or plan can make entries stale
            for e in self.outbox.drop_stale(cur.version, self.plan.max_staleness):
                self.metrics.dropped.labels("stale").inc()
                log.debug("dropped %s", e.update_id)
        effects: list[Effect] = []
        for entry in self.outbox.due(self.receipt_timeout, now):
            if entry.attempts:
                log.info("resending update %s (attempt %d)", entry.update_id, entry.attempts + 1)
            effects.append(self._send(entry.update_id, entry.payload, now))
        self.metrics.outbox.set(len(self.outbox))
        return effects

    def _send(self, update_id: str, payload: bytes, now: float) -> Publish:
        self.outbox.mark_sent(update_id, now)
        self.metrics.publishes.inc()
        return Publish(self.topics.update(self.device_id), payload)

    def status_publish(self, state: str, wall: float) -> Publish:
        """The retained device status (``offline`` also goes into the last will)."""
        online = state != "offline"
        msg = DeviceStatus(
            device=self.device_id,
            state=state,
            version=self.version,
            examples=self.examples.count() if online else 0,
            outbox=len(self.outbox) if online else 0,
            updates_sent=self.updates_sent + self.secagg.masked_sent,
            software=f"fededge {__version__}"[:64],
            time=wall,
            refused=self.refused if online else None,
        )
        return Publish(self.topics.device_status(self.device_id), msg.to_bytes(), retain=True)

    def status(self, connected: bool) -> dict[str, Any]:
        """A snapshot of the device's state (what the local API's /status returns)."""
        spec = self.model.spec
        return {
            "device": self.device_id,
            "task": self.topics.task,
            "version": self.version,
            "state": "training" if self.training else "online",
            "connected": connected,
            "examples": self.examples.count(),
            "fresh": self.examples.fresh_count(),
            "examples_per_update": self.plan.examples_per_update,
            "outbox": len(self.outbox),
            "updates_sent": self.updates_sent + self.secagg.masked_sent,
            "graph_sha256": spec.graph_sha256 if spec else None,
            "software": f"fededge {__version__}",
            "refused": self.refused,
            "generation": self.generation,
        }

    # -- training --------------------------------------------------------------------------------
    def trainable(self) -> bool:
        """Whether enough fresh examples wait for a version and a plan from the task's owner."""
        cur = self.model.current
        if cur is None or not self.plan_known or self.refused is not None:
            return False
        if self._quota_reached(cur.version):
            return False
        dim = math.prod(cur.runtime.spec.input_shape)
        return self.examples.fresh_count(dim) >= self.plan.examples_per_update

    def next_job(self) -> TrainJob | None:
        """What to train now, or None; marks the core as training until :meth:`trained`."""
        cur, plan = self.model.current, self.plan
        if cur is None or not self.plan_known or self.refused is not None:
            return None  # no model yet, no plan from the task's owner, or below the floor
        if self._quota_reached(cur.version):
            return None  # the aggregator takes no more of ours into this version
        if plan.secure_aggregation is not None and self.secagg.busy():
            return None  # one update at a time waits for its round
        batch = self.examples.take(plan.examples_per_update, cur.runtime.spec.input_shape)
        if batch is None:
            return None
        self.training = True
        self._status_due = True
        return TrainJob(cur, plan, batch)

    def trained(
        self, job: TrainJob, lu: LocalUpdate, seconds: float, now: float, connected: bool
    ) -> tuple[list[Effect], bool]:
        """Store (and send) what a run produced; the effects and whether to look for more work.

        A plain update and the use of its examples are one transaction; a secure-aggregation
        update goes to the participant, its examples stay fresh until its masked input is out.
        """
        self.training = False
        self._status_due = True
        self.metrics.train_seconds.inc(seconds)
        self.metrics.train_runs.inc()
        base = job.current.version
        latest = self.model.current
        if latest is not None and latest.version - base > self.plan.max_staleness:
            log.info("discarding an update on version %d: version %d arrived meanwhile",
                     base, latest.version)  # fmt: skip
            return [], True  # the examples stay fresh and train again on the new version
        if job.plan.secure_aggregation is not None:
            clip = clip_in_force(job.plan, job.current.model)  # the bit joins the masked vector
            self.secagg.offer(ReadyInput(base, lu.delta, lu.num_examples, job.batch.ids,
                                         clip=clip, unclipped=lu.delta_norm <= clip))  # fmt: skip
            log.info("trained on %d examples in %.3f s (loss %.4f): waiting for a round",
                     lu.num_examples, seconds, lu.train_loss)  # fmt: skip
            return [], False
        uid = uuid.uuid4().hex
        dp = job.plan.dp
        payload = Update(
            task=self.topics.task, device=self.device_id, update_id=uid, base_version=base,
            num_examples=lu.num_examples,
            # Compressed as the plan asks (issue 13), after clipping and noise.
            delta=encode_delta(lu.delta, job.plan.update_encoding, job.plan.update_block),
            encoding=job.plan.update_encoding, block=job.plan.update_block,
            # DP mode: no raw losses or accuracies (docs/privacy.md, "device metrics").
            train_loss=None if dp else lu.train_loss, eval_loss=None if dp else lu.eval_loss,
            eval_accuracy=None if dp else lu.eval_accuracy, unclipped=lu.unclipped,
        ).to_bytes()  # fmt: skip
        with self._db.transaction() as c:  # the update and the use of its examples, atomically
            Outbox.put_in(c, uid, base, lu.num_examples, payload)
            ExampleStore.mark_used_in(c, job.batch.ids)
        made_base, made = self._made
        self._made = (base, made + 1 if made_base == base else 1)
        self.updates_sent += 1
        self.metrics.updates_sent.inc()
        log.info(
            "trained on %d examples in %.3f s (loss %.4f, norm %.3g): update %s on version %d",
            lu.num_examples, seconds, lu.train_loss, lu.delta_norm, uid, base,
        )  # fmt: skip
        if not connected or self._resend_all or self.outbox.was_sent(uid):
            # A reconnect not yet pumped resends every entry, this one included: sending it
            # here too would make it go out twice.
            return [], True
        return [self._send(uid, payload, now)], True

    def _quota_reached(self, version: int) -> bool:
        """Whether this device already made ``max_updates_per_device`` plain updates on
        ``version``: the aggregator would refuse another (``device_quota``), so its examples
        wait for the next version instead of being spent."""
        if self.plan.secure_aggregation is not None:
            return False
        base, made = self._made
        return base == version and made >= self.plan.max_updates_per_device

    def end_training(self) -> None:
        """A run ended without :meth:`trained` (it failed): its examples stay fresh."""
        self.training = False
