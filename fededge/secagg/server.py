"""The aggregator side of a SecAgg+ round as a pure state machine over messages and clock values.

The server keeps one running masked sum modulo 2^k (O(d) memory) and a fingerprint of each
message, never an individual unmasked update. Protocol:

    ADVERTISE    all -> server: signed public keys  server -> each: its live neighbours' keys
    SHARE        each -> server: encrypted bundles  server -> each: the bundles addressed to it
    MASKED       each -> server: masked vector      server -> all: the survivor set
    CONSISTENCY  each -> server: signature on it    server -> all: survivors and signatures
    UNMASK       each -> server: shares             server -> all: done (sum available) or aborted

A stage ends when every live device has answered or at its deadline; devices that did not answer
are dropped. Below the threshold, or when a secret cannot be rebuilt, the round aborts.
"""

from __future__ import annotations

import hashlib
import logging

import numpy as np
import numpy.typing as npt

from fededge.errors import SecAggError
from fededge.secagg import crypto, identity, unmask
from fededge.secagg.graph import TERMINAL, Stage, check_stage, connected, neighbour_graph, prune
from fededge.secagg.messages import (
    TO_ALL,
    AdvertiseKeys,
    ConsistencyCheck,
    MaskedInput,
    Message,
    Outgoing,
    PeerKeys,
    RelayedShares,
    RoundConfig,
    RoundStatus,
    ShareKeys,
    SurvivorSet,
    UnmaskRequest,
    UnmaskShares,
)
from fededge.secagg.quantize import FixedPoint, add_mod, load_kernels

log = logging.getLogger(__name__)
_DEVICE_STAGE = {
    AdvertiseKeys: Stage.ADVERTISE,
    ShareKeys: Stage.SHARE,
    MaskedInput: Stage.MASKED,
    ConsistencyCheck: Stage.CONSISTENCY,
    UnmaskShares: Stage.UNMASK,
}
_ORDER = [Stage.ADVERTISE, Stage.SHARE, Stage.MASKED, Stage.CONSISTENCY, Stage.UNMASK, Stage.DONE]
_ACTIVE = _ORDER[:5]


def _fingerprint(msg: Message) -> bytes:
    if isinstance(msg, MaskedInput):  # a digest, so no individual vector is kept
        return hashlib.sha256(np.ascontiguousarray(msg.vector).tobytes()).digest()
    return hashlib.sha256(msg.to_json()).digest()


class ServerRound:
    """The aggregator's part in one round.

    Call :meth:`start`, feed every device message to :meth:`handle`, and call :meth:`advance`
    after each handle (including one that raised) and on a timer: stage deadlines and the
    consequences of dropping a misbehaving device are applied there. A rejected message raises
    SecAggError after the state is made consistent; honest devices are never affected.
    ``unmask_threads`` (default: one per CPU) remove the masks at unmasking
    (:func:`fededge.secagg.unmask.apply_masks`).
    """

    def __init__(
        self,
        config: RoundConfig,
        rng: crypto.RandomSource = crypto.system_random,
        *,
        roster: identity.Roster | None = None,
        unmask_threads: int | None = None,
    ) -> None:
        load_kernels()  # the aggregator's sums use Numba where installed (devices never load it)
        self.config = config
        self.stage = Stage.ADVERTISE
        self.abort_reason: str | None = None
        self.dropped: dict[str, str] = {}  # device -> why it left the round
        self.offenders: dict[str, str] = {}  # survivors whose unmask answer was refused
        self._rng = rng  # the protocol needs no server randomness today; kept for the API
        # With the roster, signatures are checked here too, so a bad one drops its sender
        # instead of failing the round at the devices (which check them whatever we do).
        self._roster = roster
        self._unmask_threads = unmask_threads  # None: one per CPU (fededge.secagg.unmask)
        self._fixed = FixedPoint(config.bits, config.clip, config.scale, config.max_weight)
        self._graph = neighbour_graph(config.round_id, config.cohort, config.neighbours)
        self._index = {d: i + 1 for i, d in enumerate(config.cohort)}
        self._live: set[str] = set(config.cohort)  # expected to answer in the current stage
        self._answered: dict[Stage, dict[str, bytes]] = {s: {} for s in _ACTIVE}
        self._deadline: float | None = None
        self._keys: dict[str, tuple[bytes, bytes]] = {}
        self._key_sigs: dict[str, bytes] = {}
        self._consistency: dict[str, bytes] = {}  # survivor -> its signature on the set
        self._advertised: set[str] = set()  # devices whose keys went to their neighbours
        self._cts: dict[str, dict[str, bytes]] = {}  # sender -> recipient -> bundle
        self._partners: dict[str, set[str]] = {}  # device -> neighbours it masked with
        self._survivors: set[str] = set()
        self._lost: set[str] = set()  # sent shares but no masked input
        self._b_shares: dict[str, list[bytes]] = {}
        self._s_shares: dict[str, list[bytes]] = {}
        self._acc = np.zeros(config.vector_length + 1, dtype=np.uint32)
        self._result: tuple[npt.NDArray[np.float64], float] | None = None

    @property
    def result(self) -> tuple[npt.NDArray[np.float64], float] | None:
        """(sum of weight * clipped delta, total weight) once DONE; divide for the mean."""
        return self._result

    @property
    def survivors(self) -> tuple[str, ...]:
        """Devices whose masked input is in the sum (known from the MASKED stage on)."""
        return tuple(sorted(self._survivors))

    def start(self, now: float) -> list[Outgoing]:
        """Announce the round and open the key-advertisement stage."""
        check_stage(self.stage, Stage.ADVERTISE, what="starting the round")
        if self._deadline is not None:
            raise SecAggError("the round has already started")
        self._deadline = now + self.config.timeout_s
        return [Outgoing(TO_ALL, self.config)]

    # ------------------------------------------------------------------------------ handling
    def handle(self, msg: Message, now: float) -> list[Outgoing]:
        """Take one device message; returns the messages to send (a stage may complete)."""
        cfg = self.config
        if self._deadline is None:
            raise SecAggError("the round has not started")
        check_stage(self.stage, *_ACTIVE, what=f"a {msg.TYPE} message")
        if msg.round_id != cfg.round_id:
            raise SecAggError(f"message for round {msg.round_id!r}, this is {cfg.round_id!r}")
        stage = _DEVICE_STAGE.get(type(msg))
        if stage is None or not isinstance(
            msg, AdvertiseKeys | ShareKeys | MaskedInput | ConsistencyCheck | UnmaskShares
        ):
            raise SecAggError(f"the server does not accept {msg.TYPE} messages")
        device = msg.device
        if device not in self._index:
            raise SecAggError(f"device {device!r} is not in the cohort")
        if device in self.dropped:
            raise SecAggError(f"device {device!r} already left the round: {self.dropped[device]}")
        seen = self._answered[stage].get(device)
        if seen is not None:
            if seen == _fingerprint(msg):
                return []  # an at-least-once redelivery: harmless
            self._reject(device, f"conflicting second {msg.TYPE} message")
        if stage != self.stage:
            if _ORDER.index(stage) < _ORDER.index(self.stage):
                raise SecAggError(f"late {msg.TYPE} message from {device!r}")
            self._reject(device, f"{msg.TYPE} message in stage {self.stage.value!r}")
        if device in self.offenders:
            raise SecAggError(f"device {device!r} sent a refused message; it is ignored")
        if device not in self._live:  # defensive: every other device is dropped or an offender
            raise SecAggError(f"device {device!r} is not expected in stage {self.stage.value!r}")
        if isinstance(msg, AdvertiseKeys):
            self._on_advertise(msg)
        elif isinstance(msg, ShareKeys):
            self._on_share(msg)
        elif isinstance(msg, MaskedInput):
            self._on_masked(msg)
        elif isinstance(msg, ConsistencyCheck):
            self._on_consistency(msg)
        else:
            self._on_unmask(msg)
        self._answered[stage][device] = _fingerprint(msg)
        return self.advance(now)

    def _reject(self, device: str, reason: str) -> None:
        if device in self._answered[Stage.MASKED]:
            # Its input is already in the sum and its self-mask will be rebuilt from others'
            # shares, so it cannot leave the round: we ignore it from now on.
            self.offenders[device] = reason
            if self.stage in (Stage.CONSISTENCY, Stage.UNMASK):
                self._live.discard(device)
        else:
            self._drop(device, reason)
        raise SecAggError(f"device {device!r}: {reason}")

    def _drop(self, device: str, reason: str) -> None:
        self.dropped[device] = reason
        self._live.discard(device)
        self._cts.pop(device, None)
        log.info("round %s: dropped %s (%s)", self.config.round_id, device, reason)

    def _on_advertise(self, msg: AdvertiseKeys) -> None:
        if msg.enc_key == msg.mask_key:
            self._reject(msg.device, "the two public keys are equal")
        used = {k for pair in self._keys.values() for k in pair}
        if msg.enc_key in used or msg.mask_key in used:
            self._reject(msg.device, "public key already advertised by another device")
        if self._roster is not None:
            data = identity.advertise_data(self.config, msg.device, msg.enc_key, msg.mask_key)
            if not identity.verify(self._roster.get(msg.device), msg.signature, data):
                self._reject(msg.device, "advertisement not signed by its enrolled identity key")
        self._keys[msg.device] = (msg.enc_key, msg.mask_key)
        self._key_sigs[msg.device] = msg.signature

    def _on_share(self, msg: ShareKeys) -> None:
        expected = self._graph[msg.device] & self._advertised
        if set(msg.ciphertexts) != expected:
            missing, extra = (
                sorted(expected - set(msg.ciphertexts)),
                sorted(set(msg.ciphertexts) - expected),
            )
            self._reject(
                msg.device, f"bundles for the wrong devices (missing {missing}, unexpected {extra})"
            )
        self._cts[msg.device] = dict(msg.ciphertexts)

    def _on_masked(self, msg: MaskedInput) -> None:
        v = msg.vector
        if v.dtype != np.uint32 or v.shape != self._acc.shape:
            self._reject(
                msg.device,
                f"masked vector of {v.dtype} {v.shape}, expected uint32 {self._acc.shape}",
            )
        if self.config.bits < 32 and int(v.max(initial=0)) >> self.config.bits:
            self._reject(msg.device, f"masked vector has values outside 0..2^{self.config.bits}")
        add_mod(self._acc, np.ascontiguousarray(v), self.config.bits)

    def _on_consistency(self, msg: ConsistencyCheck) -> None:
        if self._roster is not None:
            data = identity.consistency_data(self.config, self.survivors)
            if not identity.verify(self._roster.get(msg.device), msg.signature, data):
                self._reject(msg.device, "signature on the survivor set does not verify")
        self._consistency[msg.device] = msg.signature

    def _on_unmask(self, msg: UnmaskShares) -> None:
        device = msg.device
        nbs = self._graph[device]
        b_ok = set(msg.self_mask_shares) <= nbs & self._survivors
        s_ok = set(msg.key_shares) <= nbs & self._lost
        if not (b_ok and s_ok):
            self._reject(device, "shares for devices that are not its surviving/dropped neighbours")
        for share in (*msg.self_mask_shares.values(), *msg.key_shares.values()):
            try:
                x, _ = crypto.decode_share(share)
            except SecAggError as exc:
                self._reject(device, str(exc))
            if x != self._index[device]:
                self._reject(device, "a share with another device's x-coordinate")
        for d, share in msg.self_mask_shares.items():
            self._b_shares.setdefault(d, []).append(share)
        for d, share in msg.key_shares.items():
            self._s_shares.setdefault(d, []).append(share)

    # --------------------------------------------------------------------------- transitions
    def advance(self, now: float) -> list[Outgoing]:
        """Close the current stage if every live device answered or its deadline passed."""
        if self.stage in TERMINAL or self._deadline is None:
            return []
        answered = set(self._answered[self.stage])
        if not self._live <= answered and now < self._deadline:
            return []
        for device in sorted(self._live - answered):
            self._drop(device, f"no {self.stage.value} message before the deadline")
        self._deadline = now + self.config.timeout_s
        try:
            if self.stage == Stage.ADVERTISE:
                return self._close_advertise()
            if self.stage == Stage.SHARE:
                return self._close_share()
            if self.stage == Stage.MASKED:
                return self._close_masked()
            if self.stage == Stage.CONSISTENCY:
                return self._close_consistency()
            return self._close_unmask()
        except SecAggError as exc:
            return self._abort(str(exc))

    def _require(self, count: int, what: str) -> None:
        if count < self.config.threshold:
            raise SecAggError(f"{count} {what}, fewer than the threshold {self.config.threshold}")

    def _prune(self) -> None:
        for device in sorted(self._live - prune(self._graph, self._live, self.config.threshold)):
            self._drop(device, "fewer live neighbours than the threshold")

    def _close_advertise(self) -> list[Outgoing]:
        self._prune()
        self._require(len(self._live), "devices advertised keys")
        self._advertised = set(self._live)
        out = []
        for d in sorted(self._live):
            keys = {nb: (*self._keys[nb], self._key_sigs[nb])
                    for nb in sorted(self._graph[d] & self._live)}  # fmt: skip
            out.append(Outgoing(d, PeerKeys(self.config.round_id, d, keys)))
        self.stage = Stage.SHARE
        return out

    def _close_share(self) -> list[Outgoing]:
        self._prune()
        self._require(len(self._live), "devices shared keys")
        out = []
        for d in sorted(self._live):
            senders = sorted(self._graph[d] & self._live)
            cts = {s: self._cts[s][d] for s in senders}
            self._partners[d] = set(senders)
            out.append(Outgoing(d, RelayedShares(self.config.round_id, d, cts)))
        self._cts.clear()  # the bundles are delivered; nothing else needs them
        self.stage = Stage.MASKED
        return out

    def _close_masked(self) -> list[Outgoing]:
        self._survivors = set(self._live)
        self._lost = set(self._partners) - self._survivors
        self._require(len(self._survivors), "masked inputs")
        if not connected(self._graph, self._survivors):
            raise SecAggError("survivors are not connected in the neighbour graph")
        for d in sorted(self._survivors | self._lost):
            self._require(len(self._graph[d] & self._survivors), f"surviving neighbours of {d}")
        self.stage = Stage.CONSISTENCY
        self._live -= set(self.offenders)
        return [Outgoing(TO_ALL, SurvivorSet(self.config.round_id, self.survivors))]

    def _close_consistency(self) -> list[Outgoing]:
        signed = {d: s for d, s in self._consistency.items() if d not in self.offenders}
        self._require(len(signed), "signatures on the survivor set")
        self.stage = Stage.UNMASK
        self._live = set(signed)  # only a device that signed the set will reveal shares
        request = UnmaskRequest(self.config.round_id, self.survivors, signed)
        return [Outgoing(TO_ALL, request)]

    def _close_unmask(self) -> list[Outgoing]:
        cfg = self.config
        self_terms: list[unmask.MaskTerm] = []
        for d in sorted(self._survivors):
            shares = self._b_shares.get(d, [])
            self._require(len(shares), f"self-mask shares of {d}")
            self_terms.append((crypto.combine_shares(shares[: cfg.threshold]), -1))
        # Every mask is removed in one fused pass over the sum (fededge.secagg.unmask). Removing
        # the self-masks on worker threads while this thread runs the X25519 agreements was
        # measured too: no faster, as the workers then wait for the GIL between AES chunks.
        terms = self_terms + self._pair_mask_terms()
        unmask.apply_masks(self._acc, terms, cfg.bits, threads=self._unmask_threads)
        self._result = self._fixed.decode(self._acc)
        self._b_shares.clear()
        self._s_shares.clear()
        self.stage = Stage.DONE
        status = RoundStatus(cfg.round_id, "done", "", len(self._survivors))
        return [Outgoing(TO_ALL, status)]

    def _pair_mask_terms(self) -> list[unmask.MaskTerm]:
        """The pair masks that survivors added with the devices lost before masked input."""
        cfg, terms = self.config, []
        for d in sorted(self._lost):
            shares = self._s_shares.get(d, [])
            self._require(len(shares), f"mask-key shares of {d}")
            private = crypto.combine_shares(shares[: cfg.threshold])
            if crypto.public_key_of(private) != self._keys[d][1]:
                raise SecAggError(f"the rebuilt mask key of {d} does not match its public key")
            agreement = crypto.KeyAgreement(private)
            for partner in sorted(self._partners[d] & self._survivors):
                shared = agreement.with_peer(self._keys[partner][1])
                seed = crypto.pair_seed(shared, cfg.round_id, partner, d)
                # partner added +mask if its id is the smaller one, else -mask: undo that.
                terms.append((seed, -1 if partner < d else 1))
        return terms

    def _abort(self, reason: str) -> list[Outgoing]:
        log.warning("round %s aborted: %s", self.config.round_id, reason)
        self.stage, self.abort_reason = Stage.ABORTED, reason
        self._acc[:] = 0
        self._b_shares.clear()
        self._s_shares.clear()
        return [Outgoing(TO_ALL, RoundStatus(self.config.round_id, "aborted", reason[:500], 0))]
