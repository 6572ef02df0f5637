"""Synchronous SecAgg+ rounds on the aggregator: check-ins, cohort selection, relaying, result.

The MQTT edge of :class:`fededge.secagg.ServerRound` (the pure state machine): the
:class:`RoundDriver` collects check-ins of devices that have an update on the current version,
starts a round with a cohort of them, maps every ``Outgoing`` of the server onto the topics of
docs/protocol.md (secure aggregation), feeds device messages back in, calls ``advance`` on a timer, and, when
the server is DONE, turns the unmasked *sum* into the next version through the aggregator's own
publication path. An aborted round publishes nothing. No code here sees an individual update:
masked inputs go straight into the server's running sum.

Rounds need the model owner's signed roster (``{prefix}/{task}/roster``): cohorts are drawn
from enrolled devices only, and the server checks the identity signatures devices check too
(round protocol v2), so one bad signature drops its sender instead of failing the round.
"""

from __future__ import annotations

import logging
import random
import time
import uuid
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from fededge.aggregator.policy import check_secure_sum
from fededge.aggregator.privacy import secure_noise_stddev
from fededge.aggregator.rotated import Rotation, round_rotation
from fededge.errors import FededgeError, ProtocolError, SecAggError
from fededge.mqtt import Message
from fededge.protocol.clipping import (
    adaptive,
    bit_entry_scale,
    clip_in_force,
    round_clip,
    unclipped_fraction,
)
from fededge.protocol.messages import (
    CheckIn,
    ModelVersion,
    Plan,
    SecureAggregation,
    Weights,
    decode_json,
)
from fededge.protocol.roster import Roster, open_roster
from fededge.protocol.topics import CHECKIN, Topics
from fededge.protocol.vocab import check_name
from fededge.secagg import (
    TO_ALL,
    TO_SERVER,
    Outgoing,
    RoundConfig,
    ServerRound,
    Stage,
    encode,
    warmup,
)
from fededge.secagg import decode_payload as decode_round_payload
from fededge.secagg.messages import (
    AdvertiseKeys,
    ConsistencyCheck,
    MaskedInput,
    ShareKeys,
    UnmaskShares,
)
from fededge.secagg.quantize import dp_scale

log = logging.getLogger(__name__)
# Device -> aggregator stage topics and the message type each must carry.
STAGE_TYPES: dict[str, type[Any]] = {
    Stage.ADVERTISE.value: AdvertiseKeys,
    Stage.SHARE.value: ShareKeys,
    Stage.MASKED.value: MaskedInput,
    Stage.CONSISTENCY.value: ConsistencyCheck,
    Stage.UNMASK.value: UnmaskShares,
}
RETAINED = ("config", "status")  # aggregator -> all messages kept for devices that (re)connect


class RoundHost(Protocol):
    """What a :class:`RoundDriver` needs of the aggregator (fededge/aggregator/service.py)."""

    topics: Topics

    @property
    def task(self) -> str: ...
    @property
    def model(self) -> ModelVersion | None: ...
    @property
    def plan(self) -> Plan: ...
    def publish(
        self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False
    ) -> None: ...
    def publish_version(
        self,
        weights: Weights,
        metrics: dict[str, Any],
        update_ids: list[str],
        update_keys: list[str] | None = None,
        *,
        round_id: str | None = None,
    ) -> ModelVersion:
        """Store and announce the version after the current one (the round's result)."""
        ...

    def publish_status(self) -> None: ...
    def bad_round_message(self) -> None:
        """Count a rejected round message (a metric)."""
        ...


def effective_neighbours(sa: SecureAggregation, n: int) -> int:
    """The round's k for a cohort of n: the plan's, or n - 1 (complete graph) if 0 or too big."""
    return n - 1 if sa.neighbours == 0 or sa.neighbours >= n - 1 else sa.neighbours


class RoundDriver:
    """Runs secure-aggregation rounds for an aggregator whose plan asks for them.

    Everything runs on the aggregator's thread: ``on_message`` for every ``rounds/...`` message,
    ``tick`` from each step. Counters: ``rounds_done``, ``rounds_aborted``, ``rejected``.
    """

    def __init__(
        self,
        host: RoundHost,
        *,
        rng: random.Random | None = None,
        owner_keys: Sequence[Ed25519PublicKey] = (),
        unmask_threads: int | None = None,
    ) -> None:
        self.host = host
        self._unmask_threads = unmask_threads  # None: one per CPU
        self._owner_keys = list(owner_keys)  # verify the roster with them (else: unverified)
        self.roster: Roster | None = None
        self._roster_keys: dict[str, Ed25519PublicKey] = {}
        self._said_no_roster = False
        self.topics = host.topics
        self._rng = rng or random.SystemRandom()
        # device -> (check-in, first seen, last seen); the window runs from the first sighting
        self._checkins: dict[str, tuple[CheckIn, float, float]] = {}
        self.server: ServerRound | None = None
        self._round_version: int | None = None
        self._rotation: Rotation | None = None
        self._extra = 0  # 1: the round's last entry is the adaptive-clipping bit
        self._examples: dict[str, int] = {}
        self._clip = 1.0  # the clip in force on the round's version (set when it starts)
        self._last_round: str | None = None  # its status stays retained until the next round
        self.rounds_done = 0
        self.rounds_aborted = 0
        self.rejected = 0
        self.last_abort_reason: str | None = None
        self.last_dropped: dict[str, str] = {}  # device -> why, in the last finished round
        self._warm = False

    # -- status --------------------------------------------------------------------------------
    @property
    def plan(self) -> SecureAggregation | None:
        return self.host.plan.secure_aggregation

    @property
    def round_id(self) -> str | None:
        return self.server.config.round_id if self.server is not None else None

    @property
    def stage(self) -> str | None:
        """The current round's stage, ``checkin`` between rounds, None without secure rounds."""
        if self.server is not None:
            return self.server.stage.value
        return CHECKIN if self.plan is not None else None

    @property
    def checked_in(self) -> int:
        return len(self._checkins)

    def subscriptions(self) -> list[tuple[str, int]]:
        """(filter, QoS) the aggregator needs: stage topics, not its own relays.

        Check-ins at QoS 0: devices repeat them, so a session queue full of stale ones while
        the aggregator is down would only delay it.
        """
        t = self.topics
        stages = [(t.round_stage_filter(s), 1) for s in STAGE_TYPES]
        return [(t.roster, 1), (t.checkin_filter, 0), *stages,
                (t.round_broadcast_filter("config"), 1),
                (t.round_broadcast_filter("status"), 1)]  # fmt: skip

    # -- input ---------------------------------------------------------------------------------
    def on_message(self, msg: Message) -> None:
        """Handle one ``rounds/...`` or roster message; ProtocolError for a bad one."""
        if msg.topic == self.topics.roster:
            self._on_roster(msg.payload)
            return
        where = self.topics.parse_round(msg.topic)
        if where is None:
            return
        if where.kind == "checkin" and where.device is not None:
            self._on_checkin(where.device, msg.payload)
        elif where.kind == "broadcast" and where.round_id and where.type in RETAINED:
            self._on_retained(where.round_id, where.type, msg.payload)
        elif (
            where.kind == "stage" and where.round_id and where.device and where.type in STAGE_TYPES
        ):
            self._on_round_message(where.round_id, where.type, where.device, msg.payload)

    def _on_roster(self, payload: bytes) -> None:
        if not payload:
            return
        try:
            roster = open_roster(payload, self._owner_keys or None)
        except FededgeError as e:
            raise ProtocolError(f"roster refused: {e}") from None
        if roster.task != self.host.task:
            raise ProtocolError(f"roster for task {roster.task!r}")
        if self.roster is not None and roster.serial < self.roster.serial:
            raise ProtocolError(f"roster serial {roster.serial} is older than {self.roster.serial}")
        self.roster, self._roster_keys = roster, roster.public_keys()
        self._said_no_roster = False
        log.info("roster %d: %d devices enrolled", roster.serial, len(roster.devices))

    def _on_retained(self, round_id: str, kind: str, payload: bytes) -> None:
        # Retained round messages left by an earlier aggregator process (or our own, coming
        # back): clear what does not belong to the current or the last round.
        if payload and round_id not in (self.round_id, self._last_round):
            log.info("clearing the stale retained %s of round %s", kind, round_id)
            self.host.publish(self.topics.round_broadcast(round_id, kind), b"", retain=True)

    def _on_checkin(self, device: str, payload: bytes) -> None:
        if self.plan is None or self.host.model is None:
            return
        ci = decode_json(payload, CheckIn)
        if ci.device != device or ci.task != self.host.task:
            raise ProtocolError(f"check-in on the topic of {device!r} names {ci.device!r}")
        if ci.base_version != self.host.model.version:
            log.debug("check-in of %s on version %d ignored (stale)", device, ci.base_version)
            return
        if self.server is not None and device in self.server.config.cohort:
            return  # busy in the current round
        now = time.monotonic()
        old = self._checkins.get(device)
        first = old[1] if old is not None and old[0].base_version == ci.base_version else now
        self._checkins[device] = (ci, first, now)

    def _reject(self, what: str, why: str) -> None:
        self.rejected += 1
        self.host.bad_round_message()
        log.warning("round message rejected (%s): %s", what, why)

    def _on_round_message(self, round_id: str, stage: str, device: str, payload: bytes) -> None:
        server, now = self.server, time.monotonic()
        what = f"{stage} from {device} for round {round_id}"
        if server is None or round_id != server.config.round_id:
            self._reject(what, "not the current round (late or replayed)")
            return
        try:
            check_name(device, "device")
            msg = decode_round_payload(
                payload,
                masked=stage == Stage.MASKED.value,
                max_length=server.config.vector_length + 1,
            )
            if not isinstance(msg, STAGE_TYPES[stage]):
                raise ProtocolError(f"a {msg.TYPE} message on the {stage} topic")
            if msg.device != device:
                raise ProtocolError(f"message names device {msg.device!r}")
            out = server.handle(msg, now)
        except (ProtocolError, SecAggError, ValueError) as e:
            self._reject(what, str(e))
            out = server.advance(now)
        self._send(out)
        self._after(now)

    # -- timer ---------------------------------------------------------------------------------
    def tick(self) -> None:
        """Apply stage deadlines, and start a round when enough devices are ready."""
        now = time.monotonic()
        if self.server is not None:
            self._send(self.server.advance(now))
            self._after(now)
        elif (sa := self.plan) is not None and (model := self.host.model) is not None:
            if not self._warm:  # compile the kernels now, not inside the first round's stages
                warmup()
                self._warm = True
            self._maybe_start(sa, model, now)

    def _maybe_start(self, sa: SecureAggregation, model: ModelVersion, now: float) -> None:
        expiry = 3 * sa.checkin_interval
        for device, (ci, _, seen) in list(self._checkins.items()):
            if ci.base_version != model.version or now - seen > expiry:
                del self._checkins[device]
        if not self._checkins:
            return
        if self.roster is None:
            if not self._said_no_roster:
                self._said_no_roster = True
                log.warning("devices check in but there is no roster: secure rounds need one "
                            "(fededge keys enroll)")  # fmt: skip
            return
        ready = sorted(d for d in self._checkins if d in self._roster_keys)
        if not ready:
            return
        first = min(self._checkins[d][1] for d in ready)
        if len(ready) >= sa.cohort_size or (
            len(ready) >= sa.min_cohort and now - first >= sa.checkin_window
        ):
            cohort = sorted(self._rng.sample(ready, min(len(ready), sa.cohort_size)))
            self._start(sa, model, cohort, now)

    def _start(
        self, sa: SecureAggregation, model: ModelVersion, cohort: list[str], now: float
    ) -> None:
        plan = self.host.plan
        n, clip = len(cohort), clip_in_force(plan, model)
        # Adaptive clipping: the noised bit is one more entry of the masked vector, so only
        # the survivors' sum of bits is revealed (fededge/protocol/clipping.py).
        extra = 1 if adaptive(plan) else 0
        self._clip = clip
        self._extra = extra
        d = sum(int(w.size) for w in model.weights.values())
        # Rotated rounds (plan update_rotation): devices send H D x, P values (protocol.md),
        # then the bit entry if any.
        self._rotation = round_rotation(plan, model, d)
        config = RoundConfig(
            round_id=f"v{model.version}-{uuid.uuid4().hex[:8]}",
            cohort=tuple(cohort),
            threshold=sa.threshold,
            neighbours=effective_neighbours(sa, n),
            bits=sa.bits,
            clip=round_clip(plan, clip),
            scale=dp_scale(n, round_clip(plan, clip), sa.bits, secure_noise_stddev(plan, clip)),
            max_weight=sa.max_weight,
            vector_length=(self._rotation.p if self._rotation is not None else d) + extra,
            timeout_s=sa.stage_timeout,
        )
        self._examples = {d: self._checkins.pop(d)[0].num_examples for d in cohort}
        self._round_version = model.version
        if self._last_round is not None:
            self.host.publish(
                self.topics.round_broadcast(self._last_round, "status"), b"", retain=True
            )
            self._last_round = None
        self.server = ServerRound(
            config, roster=self._roster_keys, unmask_threads=self._unmask_threads
        )
        log.info("round %s started: %d devices, t=%d, k=%d, d=%d", config.round_id, n,
                 config.threshold, config.neighbours, config.vector_length)  # fmt: skip
        self._send(self.server.start(now))
        self.host.publish_status()

    # -- output --------------------------------------------------------------------------------
    def _send(self, outgoing: list[Outgoing]) -> None:
        if not outgoing:
            return
        if self.server is None:
            raise SecAggError("messages of a round that is not running")
        rid = self.server.config.round_id
        for out in outgoing:
            kind = out.message.TYPE
            if out.to == TO_SERVER:
                raise SecAggError("the server addressed a message to itself")
            t = self.topics
            topic = t.round_broadcast(rid, kind) if out.to == TO_ALL else t.round_to(rid, out.to)
            retain = out.to == TO_ALL and kind in RETAINED
            self.host.publish(topic, encode(out.message), qos=1, retain=retain)

    def _after(self, now: float) -> None:
        server = self.server
        if server is None or server.stage not in (Stage.DONE, Stage.ABORTED):
            return
        rid = server.config.round_id
        self.server = None
        self._last_round = rid
        self.last_dropped = {**server.dropped, **server.offenders}
        # The round's retained config goes; its status stays retained until the next round.
        self.host.publish(self.topics.round_broadcast(rid, "config"), b"", retain=True)
        if server.stage == Stage.ABORTED:
            self.rounds_aborted += 1
            self.last_abort_reason = server.abort_reason
            self.host.publish_status()
            return
        self._finish(server)

    def _finish(self, server: ServerRound) -> None:
        result, model = server.result, self.host.model
        rid = server.config.round_id
        if result is None:
            raise SecAggError(f"round {rid} is done but has no result")
        if model is None or model.version != self._round_version:
            log.warning("round %s finished on an outdated version; result dropped", rid)
            return
        sum_wd, sum_w = result
        if not sum_w > 0:
            self.rounds_aborted += 1
            log.warning("round %s: total weight %g, nothing to publish", rid, sum_w)
            return
        try:  # a sum honest devices cannot produce is not published (issue 9)
            check_secure_sum(sum_wd, sum_w, survivors=len(server.survivors),
                             clip=server.config.clip, max_weight=server.config.max_weight,
                             scale=server.config.scale,
                             noise=secure_noise_stddev(self.host.plan, self._clip))  # fmt: skip
        except SecAggError as e:
            self.rounds_aborted += 1
            self.last_abort_reason = str(e)
            log.warning("round %s aborted: %s", rid, e)
            self.host.publish_status()
            return
        unclipped = None
        if self._extra:
            centred = float(sum_wd[-1]) / bit_entry_scale(self._clip)  # sum of w~ (b - 1/2)
            sum_wd, unclipped = sum_wd[:-1], unclipped_fraction(centred, sum_w)
        if self._rotation is not None:  # the sum in the model's coordinates, unrotated once
            sum_wd = self._rotation.unrotate(sum_wd)
        step = self.host.plan.server_learning_rate / sum_w
        weights, offset = {}, 0
        # DeviceRound flattens an update by sorted tensor name; undo exactly that.
        for name in sorted(model.weights):
            base = np.asarray(model.weights[name], dtype=np.float32)
            part = sum_wd[offset : offset + base.size].reshape(base.shape)
            weights[name] = (base.astype(np.float64) + step * part).astype(np.float32)
            offset += base.size
        survivors = server.survivors
        metrics: dict[str, Any] = {
            "updates": len(survivors),
            "examples": sum(self._examples.get(d, 0) for d in survivors),
            "train_loss": None,
            "eval_loss": None,
            "eval_accuracy": None,
            "mean_update_norm": None,
            "unclipped": unclipped,
        }
        self.rounds_done += 1
        log.info("round %s done: %d survivors, total weight %.6g", rid, len(survivors), sum_w)
        self.host.publish_version(weights, metrics, [], round_id=rid)
