"""The device side of synchronous SecAgg+ rounds: check in with a ready update, run its round.

A sans-IO driver of :class:`fededge.secagg.DeviceRound` (the pure state machine), owned by the
device core (fededge/device/core.py) when the plan has a ``secure_aggregation`` section. Instead
of a plaintext update, the trainer hands its clipped delta to :meth:`Participant.offer`; every
``checkin_interval`` s :meth:`Participant.tick` asks for a check-in on
``rounds/checkin/{device}`` until the aggregator puts the device in a round's cohort, then the
round's messages go through :meth:`Participant.on_message`. Both return effects (Publish,
WakeTrainer) for the driver; times are passed in. Calls are serialized by the core's driver.

Against a malicious aggregator (round protocol v2): the device has a long-term Ed25519 identity
key (``identity.key`` in its state directory, made on first start) and follows the model owner's
signed roster (``{prefix}/{task}/roster``, verified with ``trust.owner_key``). It checks in only
when it is enrolled in the roster under its own key, joins only rounds whose cohort is all
enrolled and whose threshold meets t > k/2 and its privacy floor, takes each round message only
from the topic of its type, and leaves a round on any refused, second or contradictory message.

What happens to an update (docs/protocol.md (secure aggregation)):

- its examples stay *fresh* until its masked input is about to be sent, so an update that goes
  stale (a new version arrived first) or whose round ends before the masked input left is either
  reused in the next round (same base version) or dropped and retrained from the same examples;
- its examples are marked used (one committed transaction) *before* the masked input is handed
  out for publishing, and the update is spent from then on, whether the publish, the round or the
  process then fails: reusing it in another round would let an aggregator difference two sums
  that both contain it. A crash between the two loses that one update, never reuses it.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fededge.device.effects import Effect, Persist, Publish, WakeTrainer
from fededge.device.examples import ExampleStore, StateDb
from fededge.device.metrics import DeviceMetrics
from fededge.device.training import reported_examples, secure_noise_stddev
from fededge.errors import FededgeError, ProtocolError, SecAggError
from fededge.protocol import Plan, Topics
from fededge.protocol.clipping import adaptive, round_clip, with_bit_entry
from fededge.protocol.messages import CheckIn
from fededge.protocol.roster import Roster, open_roster, trusted_keys
from fededge.protocol.topics import ROUND_BROADCASTS

if TYPE_CHECKING:  # fededge.secagg is imported on the first round message, not by every device
    from cryptography.hazmat.primitives.asymmetric.ed25519 import (
        Ed25519PrivateKey,
        Ed25519PublicKey,
    )

    from fededge.secagg import DeviceRound, Outgoing, RoundConfig
    from fededge.settings import Settings

IDENTITY_FILE = "identity.key"
ROSTER_FILE = "roster.bin"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReadyInput:
    """A trained, clipped update waiting for a round, and the examples it came from."""

    base_version: int
    delta: dict[str, np.ndarray]
    num_examples: int
    example_ids: Sequence[int]
    clip: float | None = None  # the clip in force when it was trained (None: the plan's)
    unclipped: bool = True  # adaptive clipping: whether the delta was within the clip


class Participant:
    """Runs this device's part in secure-aggregation rounds.

    ``version`` and ``plan`` are read through callables so the core stays their one owner.
    """

    def __init__(
        self,
        device_id: str,
        topics: Topics,
        db: StateDb,
        metrics: DeviceMetrics,
        *,
        version: Callable[[], int | None],
        plan: Callable[[], Plan],
    ) -> None:
        self.device_id = device_id
        self.topics = topics
        self._db = db
        self._metrics = metrics
        self._version = version
        self._plan = plan
        self._ready: ReadyInput | None = None
        self.round: DeviceRound | None = None
        self._round_input: ReadyInput | None = None
        self._masked_sent = False
        self._heard = 0.0  # time of the round's last message
        self._last_checkin: float | None = None
        self._seen_rounds: deque[str] = deque(maxlen=64)
        self.rounds_done = 0
        self.rounds_aborted = 0
        self.masked_sent = 0
        # Trust (configure): without an identity key and a roster that enrolls it, the device
        # takes part in no secure round.
        self.identity: Ed25519PrivateKey | None = None
        self._owner_keys: list[Ed25519PublicKey] = []
        self._min_threshold = 1
        self._min_cohort = 1
        self.roster: Roster | None = None
        self._roster_keys: dict[str, Ed25519PublicKey] = {}
        self.not_ready: str | None = "no identity key"  # why it would not check in, or None
        self._said: str | None = None
        # Loads (or makes) the identity key when a secure-aggregation plan first needs it.
        self._identity_loader: Callable[[], Ed25519PrivateKey] | None = None

    def configure(
        self,
        identity: Ed25519PrivateKey | Callable[[], Ed25519PrivateKey] | None,
        owner_keys: Sequence[Ed25519PublicKey] = (),
        *,
        min_threshold: int = 1,
        min_cohort: int = 1,
        roster: bytes | None = None,
    ) -> None:
        """Set the identity key, the owner's keys (roster signatures), the floor, a cached roster.

        ``identity`` may be a loader, called when a plan with secure aggregation first needs
        the key. Without owner keys a roster is taken unverified (the device trusts the broker;
        the driver warns at start).
        """
        if callable(identity):
            self._identity_loader, self.identity = identity, None
        else:
            self.identity = identity
        self._owner_keys = list(owner_keys)
        self._min_threshold, self._min_cohort = min_threshold, min_cohort
        if roster is not None:
            try:
                self._take_roster(roster)
            except FededgeError as e:
                log.warning("ignoring the cached roster: %s", e)
        self._update_readiness()

    def _update_readiness(self) -> None:
        from fededge.keys import public_text

        if self.identity is None:
            self.not_ready = "no identity key"
        elif self.roster is None:
            self.not_ready = "no roster yet (the owner enrolls devices with `fededge keys enroll`)"
        else:
            mine = self._roster_keys.get(self.device_id)
            own = self.identity.public_key().public_bytes_raw()
            if mine is None:
                self.not_ready = (f"not enrolled in roster {self.roster.serial} (identity key "
                                  f"{public_text(self.identity.public_key())})")  # fmt: skip
            elif mine.public_bytes_raw() != own:
                self.not_ready = f"enrolled in roster {self.roster.serial} under another key"
            else:
                self.not_ready = None

    def busy(self) -> bool:
        """Whether an update is waiting or in a round (the trainer must not make another)."""
        return self._ready is not None or self.round is not None

    def offer(self, ready: ReadyInput) -> None:
        """Hand over a fresh update; the next tick checks in with it."""
        self._ready = ready
        self._last_checkin = None  # check in at the next tick

    def subscriptions(self) -> list[str]:
        """What the device listens to: round configs, broadcasts and messages addressed to it."""
        t = self.topics
        return [t.roster, *(t.round_broadcast_filter(b) for b in sorted(ROUND_BROADCASTS)),
                t.round_to_filter(self.device_id)]  # fmt: skip

    def tick(self, now: float, wall: float, connected: bool) -> list[Effect]:
        """Check in when due; abandon a round that went silent; drop a stale update.

        ``now`` is a monotonic time, ``wall`` the epoch time stamped on the check-in.
        """
        plan = self._plan().secure_aggregation
        rnd = self.round
        if rnd is not None:
            # A stage lasts at most timeout_s; between two of our stages we wait for one.
            if now - self._heard > 2 * rnd.config.timeout_s + 5:
                log.warning("round %s went silent; leaving it", rnd.config.round_id)
                return self._end_round(aborted=True)
            return []
        ready = self._ready
        if ready is not None and (plan is None or ready.base_version != self._version()):
            self._ready = None  # stale: its examples are still fresh, train again
            log.info("dropped a secure-aggregation update on an outdated version")
            return [WakeTrainer()]
        if plan is not None and self.identity is None and self._identity_loader is not None:
            loader, self._identity_loader = self._identity_loader, None
            self.identity = loader()
            self._update_readiness()
        if ready is None or plan is None or not connected:
            return []
        if self.not_ready is not None:
            if self._said != self.not_ready:  # once per reason, not every tick
                self._said = self.not_ready
                log.warning("not checking in for secure aggregation: %s", self.not_ready)
            return []
        if self._last_checkin is not None and now - self._last_checkin < plan.checkin_interval:
            return []
        self._last_checkin = now
        ci = CheckIn(task=self.topics.task, device=self.device_id,
                     base_version=ready.base_version,
                     num_examples=reported_examples(ready.num_examples, self._plan()),
                     time=wall)  # fmt: skip
        return [Publish(self.topics.checkin(self.device_id), ci.to_bytes())]

    def on_message(self, topic: str, payload: bytes, now: float) -> list[Effect]:
        """Handle one ``rounds/...`` or roster message; raises ProtocolError/SecAggError if refused.

        A refused message on the topics of the round the device is in also ends its part in it.
        """
        if topic == self.topics.roster:
            return self._on_roster(payload)
        where = self.topics.parse_round(topic)
        if not payload or where is None or where.round_id is None:
            return []  # a cleared retained message, or not a topic of ours
        from fededge.secagg.graph import TERMINAL
        from fededge.secagg.messages import ADDRESSED_TYPES, BROADCAST_TYPES
        from fededge.secagg.messages import decode_payload as decode_round_payload

        round_id, kind = where.round_id, where.type
        rnd = self.round
        if kind == "config" and (rnd is None or round_id != rnd.config.round_id):
            return self._on_config(round_id, payload, now)
        if rnd is None or round_id != rnd.config.round_id:
            return []  # another round, or one we are not in
        self._heard = now
        ended: list[Effect] = []
        try:
            try:
                message = decode_round_payload(payload, masked=False)
            except ProtocolError as e:
                raise SecAggError(f"undecodable message on {topic}: {e}") from None
            if where.kind == "broadcast":
                allowed = kind == message.TYPE and kind in BROADCAST_TYPES
            else:
                allowed = where.kind == "to" and where.device == self.device_id
                allowed = allowed and message.TYPE in ADDRESSED_TYPES
            if not allowed:
                raise SecAggError(f"a {message.TYPE} message on the topic {topic}")
            out = rnd.handle(message)
        except SecAggError as e:
            rnd.fail(str(e))
            raise
        finally:
            if rnd.stage in TERMINAL:
                ended = self._end_round(aborted=rnd.stage.value != "done")
        return self._send(out) + ended

    def _on_roster(self, payload: bytes) -> list[Effect]:
        if not payload:
            return []  # a cleared retained roster changes nothing we know
        if not self._take_roster(payload):
            return []
        return [Persist(ROSTER_FILE, payload)]

    def _take_roster(self, payload: bytes) -> bool:
        """Adopt a roster message if it is newer; whether it was adopted."""
        roster = open_roster(payload, self._owner_keys or None)
        if roster.task != self.topics.task:
            raise ProtocolError(f"roster for task {roster.task!r}")
        cur = self.roster
        if cur is not None:
            if roster.serial < cur.serial:
                raise ProtocolError(f"roster serial {roster.serial} is older than {cur.serial}")
            if roster.serial == cur.serial:
                if roster != cur:
                    raise ProtocolError(f"a different roster with the same serial {cur.serial}")
                return False
        self.roster, self._roster_keys = roster, roster.public_keys()
        self._update_readiness()
        log.info("roster %d: %d devices enrolled%s", roster.serial, len(roster.devices),
                 "" if self.not_ready is None else f"; {self.not_ready}")  # fmt: skip
        return True

    def _on_config(self, round_id: str, payload: bytes, now: float) -> list[Effect]:
        from fededge.secagg import DeviceRound, RoundConfig
        from fededge.secagg.device import Floor, flatten

        if round_id in self._seen_rounds or self.round is not None:
            return []  # a round we already saw (a replay, or its retained config) or we are busy
        config = RoundConfig.from_json(payload)
        if self.device_id not in config.cohort:
            return []
        self._seen_rounds.append(round_id)
        ready = self._ready
        plan = self._plan()
        if ready is None or ready.base_version != self._version():
            log.info("selected for round %s without a current update; not joining", round_id)
            return []
        self._check_config(config, plan, ready)
        if self.not_ready is not None or self.identity is None:
            raise SecAggError(f"round {round_id}: not joining: {self.not_ready}")
        floor = Floor(self._min_threshold, self._min_cohort)
        try:
            rnd = DeviceRound(self.device_id, config, self.identity, self._roster_keys,
                              floor=floor)  # fmt: skip
        except SecAggError as e:
            raise SecAggError(f"round {round_id}: refused: {e}") from None
        # DP plans: uniform weights (an example count is data too) and this device's share of
        # the distributed noise (docs/privacy.md).
        weight = config.max_weight if plan.dp else float(ready.num_examples)
        clip = plan.clip_norm if ready.clip is None else ready.clip
        vector: np.ndarray | dict[str, np.ndarray] = ready.delta
        if adaptive(plan):  # the bit is one more entry of the masked vector
            vector = with_bit_entry(flatten(ready.delta), clip, ready.unclipped)
        out = rnd.set_input(vector, weight, noise_stddev=secure_noise_stddev(plan, clip))
        out += rnd.start()
        self.round, self._round_input, self._ready = rnd, ready, None
        self._masked_sent = False
        self._heard = now
        log.info("joined round %s (%d devices)", round_id, len(config.cohort))
        return self._send(out)

    def _check_config(self, config: RoundConfig, plan: Plan, ready: ReadyInput) -> None:
        """Refuse a round whose parameters are weaker than the plan's (or do not fit)."""
        sa = plan.secure_aggregation
        if sa is None:
            raise SecAggError("a round config arrived but the plan has no secure aggregation")
        n = len(config.cohort)
        k = n - 1 if sa.neighbours == 0 or sa.neighbours >= n - 1 else sa.neighbours
        d = sum(int(np.asarray(a).size) for a in ready.delta.values())
        clip = plan.clip_norm if ready.clip is None else ready.clip
        if adaptive(plan):  # the bit entry (fededge/protocol/clipping.py)
            d, clip = d + 1, round_clip(plan, clip)
        problems = [
            f"{name} {got!r}, the plan says {want!r}"
            for name, got, want in (
                ("threshold", config.threshold, sa.threshold),
                ("neighbours", config.neighbours, k),
                ("bits", config.bits, sa.bits),
                ("clip", config.clip, clip),
                ("max_weight", config.max_weight, sa.max_weight),
                ("vector_length", config.vector_length, d),
            )
            if got != want
        ]
        if problems:
            raise SecAggError(f"round {config.round_id}: " + "; ".join(problems))

    def _send(self, out: list[Outgoing]) -> list[Effect]:
        from fededge.secagg import TO_SERVER, Stage, encode
        from fededge.secagg.graph import TERMINAL
        from fededge.secagg.messages import MaskedInput

        rnd = self.round
        effects: list[Effect] = []
        for o in out:
            if o.to != TO_SERVER:
                raise SecAggError(f"a device message addressed to {o.to!r}")
            rid = o.message.round_id
            if isinstance(o.message, MaskedInput):
                self._spend_examples()  # committed before the masked input can leave
            topic = self.topics.round_stage(rid, o.message.TYPE, self.device_id)
            effects.append(Publish(topic, encode(o.message)))
        if rnd is not None and rnd.stage in TERMINAL:
            effects += self._end_round(aborted=rnd.stage == Stage.ABORTED)
        return effects

    def _spend_examples(self) -> None:
        # From here the update is spent whatever happens next (publish, round, crash).
        ready = self._round_input
        if ready is not None:
            with self._db.transaction() as c:
                ExampleStore.mark_used_in(c, ready.example_ids)
        self._masked_sent = True
        self.masked_sent += 1
        self._metrics.updates_sent.inc()
        self._metrics.publishes.inc()

    def _end_round(self, *, aborted: bool) -> list[Effect]:
        rnd = self.round
        if rnd is None:
            return []
        if aborted:
            self.rounds_aborted += 1
        else:
            self.rounds_done += 1
        self.round = None
        keep = not self._masked_sent and self._round_input is not None
        if keep and self._ready is None:
            self._ready = self._round_input  # nothing was revealed: try the next round
            self._last_checkin = None
        self._round_input = None
        log.info("round %s %s%s", rnd.config.round_id, "aborted" if aborted else "done",
                 "" if self._masked_sent else " (update kept for the next round)")  # fmt: skip
        return [] if keep else [WakeTrainer()]


def handle_safely(
    participant: Participant, topic: str, payload: bytes, now: float
) -> list[Effect] | None:
    """Pass a message to the participant; its effects, or None (logged) if it was refused."""
    try:
        return participant.on_message(topic, payload, now)
    except (ProtocolError, SecAggError, FededgeError, ValueError) as e:
        log.warning("refused round message on %s: %s", topic, e)
        return None


def configure_participant(participant: Participant, settings: Settings, state_dir: Path) -> None:
    """Give the participant its identity key (made on first start, 0600), the owner's keys,
    the privacy floor and the cached roster, from the device's settings and state directory."""

    def load_identity() -> Ed25519PrivateKey:
        from fededge.keys import load_or_create, public_text

        identity = load_or_create(state_dir / IDENTITY_FILE)
        log.info("device identity key %s (%s); the model owner enrolls it with `fededge keys "
                 "enroll --add %s KEY`", public_text(identity.public_key()),
                 state_dir / IDENTITY_FILE, participant.device_id)  # fmt: skip
        return identity

    # A device of a fleet with an owner key (or one that kept a secure-aggregation plan) makes
    # and logs its identity at start, for enrollment; a plain FedAvg device without trust keys
    # loads `cryptography` only once a plan with secure aggregation asks for the key.
    needed_now = settings.trust.owner_key is not None or (state_dir / IDENTITY_FILE).exists()
    identity: Ed25519PrivateKey | Callable[[], Ed25519PrivateKey] = (
        load_identity() if needed_now else load_identity
    )
    try:
        cached: bytes | None = (state_dir / ROSTER_FILE).read_bytes()
    except FileNotFoundError:
        cached = None
    participant.configure(
        identity,
        trusted_keys(settings.trust.owner_key),
        min_threshold=settings.privacy.min_threshold,
        min_cohort=settings.privacy.min_cohort,
        roster=cached,
    )
