"""The device side of a SecAgg+ round as a pure state machine: messages in, messages out.

Round protocol v2 holds against an actively malicious aggregator (Bonawitz et al. 2017 and
Bell et al. 2020, malicious variant): neighbours' advertisements must carry a valid signature of
their enrolled identity key, a device masks only when at least t neighbours' bundles decrypted,
reveals shares only after t valid signatures on the survivor set it signed, and any refused,
second or contradictory message ends its participation (fail closed).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fededge.errors import SecAggError
from fededge.secagg import crypto, identity
from fededge.secagg.graph import TERMINAL, Ring, Stage, check_stage
from fededge.secagg.messages import (
    BUNDLE_BYTES,
    TO_SERVER,
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
from fededge.secagg.quantize import FixedPoint, add_mod, sub_mod

log = logging.getLogger(__name__)


def flatten(
    delta: Mapping[str, npt.NDArray[np.floating]] | npt.NDArray[np.floating],
) -> npt.NDArray[np.float32]:
    """One float32 vector from an update: a flat array as is, a dict concatenated by sorted name."""
    if isinstance(delta, np.ndarray):
        return np.ascontiguousarray(delta.reshape(-1), dtype=np.float32)
    parts = [np.asarray(delta[name], dtype=np.float32).reshape(-1) for name in sorted(delta)]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)


@dataclass(frozen=True)
class Floor:
    """A device's privacy floor for rounds (settings ``privacy.min_threshold``/``min_cohort``)."""

    min_threshold: int = 1
    min_cohort: int = 1


def effective_k(config: RoundConfig) -> int:
    """The neighbour count of the round's graph (n - 1 for the complete graph)."""
    return min(config.neighbours, len(config.cohort) - 1)


def check_parameters(config: RoundConfig, floor: Floor) -> None:
    """Refuse a round whose threshold cannot protect a device (SecAggError naming why).

    Each honest neighbour answers one unmask request, so the aggregator gets both secrets of a
    device only from 2t of its k neighbours: t > k/2 rules that out (t > n/2 on the complete
    graph, the original SecAgg bound). The floor is the device owner's own minimum.
    """
    n, t, k = len(config.cohort), config.threshold, effective_k(config)
    complete = k >= n - 1
    if complete and 2 * t <= n:
        raise SecAggError(f"threshold {t} is not above half of the cohort of {n} (complete graph)")
    if not complete and 2 * t <= k:
        raise SecAggError(f"threshold {t} is not above half of the {k} neighbours")
    if t < floor.min_threshold:
        raise SecAggError(f"threshold {t} is below this device's floor {floor.min_threshold}")
    if n < floor.min_cohort:
        raise SecAggError(f"cohort of {n} is below this device's floor {floor.min_cohort}")


# The message types a device takes from the server after the config (the config is compared
# with the round's own; MaskedInput and the device -> server types are refused before any use).
_ACCEPTED = (PeerKeys, RelayedShares, SurvivorSet, UnmaskRequest)


def _usable(agreement: crypto.KeyAgreement | None) -> crypto.KeyAgreement:
    if agreement is None:  # unreachable: the stage guards come first
        raise SecAggError("this round's private key is already forgotten")
    return agreement


class DeviceRound:
    """One device's part in one round: keys, shares, masked input, consistency, unmasking.

    Create it from the server's RoundConfig with the device's identity key and the roster of
    enrolled identity keys (construction refuses a round that cannot protect the device: a
    cohort member not enrolled, t too low, below the floor). Send what :meth:`start` returns,
    feed every message for this round to :meth:`handle`, and give the update with
    :meth:`set_input` before the masked-input stage ends. An identical redelivery of a message
    is ignored; any refused, second or contradictory message raises SecAggError *and* ends the
    device's participation (stage ABORTED, ``abort_reason`` set, secrets forgotten).
    """

    def __init__(
        self,
        device_id: str,
        config: RoundConfig,
        identity_key: Ed25519PrivateKey,
        roster: identity.Roster,
        *,
        floor: Floor = Floor(),
        rng: crypto.RandomSource = crypto.system_random,
    ) -> None:
        if device_id not in config.cohort:
            raise SecAggError(
                f"device {device_id!r} is not in the cohort of round {config.round_id!r}"
            )
        mine = roster.get(device_id)
        if mine is None or mine.public_bytes_raw() != identity_key.public_key().public_bytes_raw():
            raise SecAggError(f"device {device_id!r} is not enrolled in the roster with its key")
        strangers = [d for d in config.cohort if d not in roster]
        if strangers:
            raise SecAggError(f"cohort members not enrolled in the roster: {strangers[:10]}")
        check_parameters(config, floor)
        self.device_id = device_id
        self.config = config
        self.stage = Stage.ADVERTISE
        self.abort_reason: str | None = None
        self.problems: list[str] = []  # neighbours refused or whose bundles failed, for the log
        self._identity = identity_key
        self._roster = roster
        self._rng = rng
        self._fixed = FixedPoint(config.bits, config.clip, config.scale, config.max_weight)
        self._ring = Ring(config.round_id, config.cohort, config.neighbours)
        self._index = {d: i + 1 for i, d in enumerate(config.cohort)}  # Shamir x-coordinates
        # each private key is parsed once: its agreement object serves every peer
        self._enc, enc_agreement = crypto.generate_agreement(rng)
        self._mask, mask_agreement = crypto.generate_agreement(rng)
        self._enc_agreement: crypto.KeyAgreement | None = enc_agreement
        self._mask_agreement: crypto.KeyAgreement | None = mask_agreement
        self._self_seed = rng(crypto.SEED_BYTES)
        self._peers: dict[str, tuple[bytes, bytes]] = {}  # verified neighbours' (enc, mask)
        # verified neighbour -> AES key of the bundle it encrypts to us: derived from the one
        # X25519 agreement of stage 2, so the relay stage does not repeat k agreements
        self._bundle_keys: dict[str, bytes] = {}
        # neighbour -> (mask-key share, self-mask share)
        self._held: dict[str, tuple[bytes, bytes]] = {}
        self._partners: tuple[str, ...] | None = None  # neighbours to mask with
        self._signed: tuple[str, ...] | None = None  # the survivor set this device signed
        self._signed_data = b""  # and the bytes it signed (identity.consistency_data)
        self._encoded: npt.NDArray[np.uint32] | None = None
        self._masked_sent = False
        # message type -> the one accepted (compared by value: a redelivery is equal)
        self._seen: dict[str, Message] = {}

    # ------------------------------------------------------------------------------- inputs
    def start(self) -> list[Outgoing]:
        """Stage 1: advertise the two public keys, signed by the identity key."""
        check_stage(self.stage, Stage.ADVERTISE, what="advertising keys")
        cfg, me = self.config, self.device_id
        data = identity.advertise_data(cfg, me, self._enc.public, self._mask.public)
        msg = AdvertiseKeys(cfg.round_id, me, self._enc.public, self._mask.public,
                            identity.sign(self._identity, data))  # fmt: skip
        return [Outgoing(TO_SERVER, msg)]

    def set_input(
        self,
        delta: Mapping[str, npt.NDArray[np.floating]] | npt.NDArray[np.floating],
        weight: float,
        *,
        noise_stddev: float = 0.0,
    ) -> list[Outgoing]:
        """Give this round's update (weight = e.g. example count); sends it if shares are in.

        ``noise_stddev`` > 0: this device's share of the distributed-DP noise, added as integer
        (Skellam) noise after quantisation (fededge.secagg.quantize.FixedPoint.encode).
        """
        check_stage(
            self.stage, Stage.ADVERTISE, Stage.SHARE, Stage.MASKED, what="setting the input"
        )
        if self._encoded is not None or self._masked_sent:
            raise SecAggError("the input of this round is already set")
        flat = flatten(delta)
        if flat.shape[0] != self.config.vector_length:
            raise SecAggError(
                f"input has {flat.shape[0]} values, the round expects {self.config.vector_length}"
            )
        key = int.from_bytes(self._rng(8), "little")
        noise_rng = None  # drawn only for noise: rounds without it keep their random stream
        if noise_stddev > 0:
            noise_rng = np.random.default_rng(int.from_bytes(self._rng(32), "little"))
        self._encoded = self._fixed.encode(flat, float(weight), key, noise_stddev=noise_stddev,
                                           rng=noise_rng)  # fmt: skip
        return self._maybe_send_masked()

    def handle(self, msg: Message) -> list[Outgoing]:
        """React to one message from the server; returns the messages to send.

        A refused message raises SecAggError and ends this device's part in the round.
        """
        if self.stage in TERMINAL:
            return []  # the round is over for us; nothing more is revealed
        try:
            return self._handle(msg)
        except SecAggError as exc:
            self.fail(str(exc))
            raise

    def fail(self, reason: str) -> None:
        """End this device's participation (logged), forgetting its secrets."""
        if self.stage in TERMINAL:
            return
        log.warning("round %s: leaving the round: %s", self.config.round_id, reason)
        self.stage, self.abort_reason = Stage.ABORTED, reason
        self._forget()

    def _handle(self, msg: Message) -> list[Outgoing]:
        if msg.round_id != self.config.round_id:
            raise SecAggError(
                f"message for round {msg.round_id!r}, this is {self.config.round_id!r}"
            )
        if isinstance(msg, RoundStatus):
            return self._on_status(msg)
        if isinstance(msg, RoundConfig):
            if msg != self.config:
                raise SecAggError("a different config for this round")
            return []
        if not isinstance(msg, _ACCEPTED):
            raise SecAggError(f"a device does not accept {msg.TYPE} messages")
        seen = self._seen.get(msg.TYPE)
        if seen is not None:
            if seen == msg:  # field by field, as the canonical JSON of both would compare
                return []  # an at-least-once redelivery
            raise SecAggError(f"a second, different {msg.TYPE} message")
        if isinstance(msg, PeerKeys | RelayedShares) and msg.device != self.device_id:
            raise SecAggError(f"{msg.TYPE} message addressed to {msg.device!r}")
        self._seen[msg.TYPE] = msg
        if isinstance(msg, PeerKeys):
            return self._on_peer_keys(msg)
        if isinstance(msg, RelayedShares):
            return self._on_relay(msg)
        if isinstance(msg, SurvivorSet):
            return self._on_survivors(msg)
        return self._on_unmask(msg)

    # ------------------------------------------------------------------------------- stages
    def _on_status(self, msg: RoundStatus) -> list[Outgoing]:
        self._forget()
        if msg.status == "aborted":
            self.stage, self.abort_reason = Stage.ABORTED, msg.reason
        else:
            self.stage = Stage.DONE
        return []

    def _on_peer_keys(self, msg: PeerKeys) -> list[Outgoing]:
        check_stage(self.stage, Stage.ADVERTISE, what="neighbour keys")
        cfg, me = self.config, self.device_id
        unknown = set(msg.keys) - self._ring.neighbours(me)
        if unknown:
            raise SecAggError(f"keys for devices that are not neighbours: {sorted(unknown)}")
        peers: dict[str, tuple[bytes, bytes]] = {}
        for peer, (enc, mask, sig) in sorted(msg.keys.items()):
            data = identity.advertise_data(cfg, peer, enc, mask)
            if identity.verify(self._roster.get(peer), sig, data):
                peers[peer] = (enc, mask)
            else:  # a substituted, replayed or forged key: that neighbour counts as dropped
                self.problems.append(f"advertisement of {peer!r} is not signed by its identity")
                log.warning("round %s: %s", cfg.round_id, self.problems[-1])
        if len(peers) < cfg.threshold:
            raise SecAggError(
                f"{len(peers)} neighbours with validly signed keys, fewer than the threshold "
                f"{cfg.threshold}"
            )
        all_keys = [k for pair in peers.values() for k in pair]
        all_keys += [self._enc.public, self._mask.public]
        if len(set(all_keys)) != len(all_keys):
            raise SecAggError("two advertised public keys are equal")  # a copy would leak masks
        names = sorted(peers)
        xs = [self._index[p] for p in names]
        key_shares = crypto.split_secret(self._mask.private, xs, cfg.threshold, self._rng)
        seed_shares = crypto.split_secret(self._self_seed, xs, cfg.threshold, self._rng)
        cts, bundle_keys = {}, {}
        agreement = _usable(self._enc_agreement)
        for peer, s_share, b_share in zip(names, key_shares, seed_shares, strict=True):
            shared = agreement.with_peer(peers[peer][0])
            key = crypto.share_key(shared, cfg.round_id, me, peer)
            cts[peer] = crypto.encrypt_bundle(
                key, cfg.round_id, me, peer, s_share + b_share, self._rng
            )
            bundle_keys[peer] = crypto.share_key(shared, cfg.round_id, peer, me)
        self._peers, self._bundle_keys = peers, bundle_keys
        self._forget_enc()  # the relay needs only the bundle keys
        self.stage = Stage.SHARE
        return [Outgoing(TO_SERVER, ShareKeys(cfg.round_id, me, cts))]

    def _on_relay(self, msg: RelayedShares) -> list[Outgoing]:
        check_stage(self.stage, Stage.SHARE, what="relayed shares")
        cfg, me = self.config, self.device_id
        unknown = set(msg.ciphertexts) - set(self._peers)
        if unknown:
            raise SecAggError(
                f"shares from devices that are not live neighbours: {sorted(unknown)}"
            )
        held = {}
        for sender, ct in sorted(msg.ciphertexts.items()):
            try:
                key = self._bundle_keys[sender]
                bundle = crypto.decrypt_bundle(key, cfg.round_id, sender, me, ct)
                if len(bundle) != BUNDLE_BYTES:
                    raise SecAggError(f"bundle from {sender!r} has {len(bundle)} bytes")
                s_share, b_share = bundle[: crypto.SHARE_BYTES], bundle[crypto.SHARE_BYTES :]
                for share in (s_share, b_share):
                    if crypto.decode_share(share)[0] != self._index[me]:
                        raise SecAggError(
                            f"bundle from {sender!r} holds a share for another device"
                        )
                held[sender] = (s_share, b_share)
            except SecAggError as exc:
                # We still mask with its sender (the server counts it live) but cannot help
                # rebuild its secrets; others hold shares too.
                self.problems.append(str(exc))
                log.warning("round %s: %s", cfg.round_id, exc)
        if len(held) < cfg.threshold:
            # An empty or gutted relay: masking with fewer than t partners would let the
            # aggregator strip the pairwise masks (or there are none), so nothing is sent.
            raise SecAggError(
                f"{len(held)} neighbours' bundles decrypted, fewer than the threshold "
                f"{cfg.threshold}: no masked input"
            )
        self._held, self._bundle_keys = held, {}
        self._partners = tuple(sorted(msg.ciphertexts))
        self.stage = Stage.MASKED
        return self._maybe_send_masked()

    def _maybe_send_masked(self) -> list[Outgoing]:
        if self.stage != Stage.MASKED or self._encoded is None or self._partners is None:
            return []
        cfg, me, bits = self.config, self.device_id, self.config.bits
        y = self._encoded
        prg = crypto.MaskPRG(y.shape[0])
        add_mod(y, prg.expand(self._self_seed), bits)
        agreement = _usable(self._mask_agreement)
        for peer in self._partners:
            shared = agreement.with_peer(self._peers[peer][1])
            mask = prg.expand(crypto.pair_seed(shared, cfg.round_id, me, peer))
            # The smaller id adds and the larger subtracts, so the pair's masks cancel in the sum.
            (add_mod if me < peer else sub_mod)(y, mask, bits)
        self._encoded, self._mask_agreement = None, None
        self._masked_sent = True
        return [Outgoing(TO_SERVER, MaskedInput(cfg.round_id, me, y))]

    def _check_survivors(self, survivors: tuple[str, ...]) -> None:
        cfg, me = self.config, self.device_id
        if me not in survivors:
            raise SecAggError("this device is not listed as a survivor")
        if not set(survivors) <= set(cfg.cohort):
            raise SecAggError("the survivor set names devices outside the cohort")
        if len(survivors) < cfg.threshold:
            raise SecAggError(
                f"{len(survivors)} survivors, fewer than the threshold {cfg.threshold}"
            )
        if not self._ring.connected(survivors):
            raise SecAggError("survivors are not connected: their partial sums would be revealed")

    def _on_survivors(self, msg: SurvivorSet) -> list[Outgoing]:
        # Stage 4, the consistency check: sign the one survivor set we were sent. We never sign
        # another, so two different sets cannot both collect t honest signatures.
        check_stage(self.stage, Stage.MASKED, what="a survivor set")
        if not self._masked_sent:
            raise SecAggError("survivor set before this device sent its masked input")
        self._check_survivors(msg.survivors)
        cfg = self.config
        self._signed_data = identity.consistency_data(cfg, msg.survivors)  # checked again below
        sig = identity.sign(self._identity, self._signed_data)
        self._signed = msg.survivors
        self.stage = Stage.CONSISTENCY
        return [Outgoing(TO_SERVER, ConsistencyCheck(cfg.round_id, self.device_id, sig))]

    def _on_unmask(self, msg: UnmaskRequest) -> list[Outgoing]:
        # Only one answer per round (a second request ends our part), only for the set we signed
        # and only once t cohort members signed that same set: the server never gets both the
        # self-mask and the mask key of one device from us.
        check_stage(self.stage, Stage.CONSISTENCY, what="an unmask request")
        cfg, me = self.config, self.device_id
        if msg.survivors != self._signed:
            raise SecAggError("the unmask request's survivor set is not the one this device signed")
        # This device signed exactly this set (checked above), so it counts itself without
        # verifying its own signature and needs t - 1 valid ones from the other survivors.
        data = self._signed_data  # the bytes of the set this device signed, equal to the request's
        others = {d: s for d, s in msg.signatures.items() if d != me}
        signers = identity.valid_signers(
            self._roster, others, data, msg.survivors, need=cfg.threshold - 1
        )
        if len(signers) + 1 < cfg.threshold:
            raise SecAggError(
                f"{len(signers) + 1} valid signatures on the survivor set (this device's "
                f"included), fewer than the threshold {cfg.threshold}"
            )
        if self._partners is None:  # unreachable: the CONSISTENCY stage follows the relay
            raise SecAggError("unmask request before the relay")
        survivors = set(msg.survivors)
        dropped = set(self._partners) - survivors
        b_shares = {d: shares[1] for d, shares in self._held.items() if d in survivors}
        s_shares = {d: shares[0] for d, shares in self._held.items() if d in dropped}
        self.stage = Stage.UNMASK
        return [Outgoing(TO_SERVER, UnmaskShares(cfg.round_id, me, b_shares, s_shares))]

    def _forget(self) -> None:
        self._encoded = None
        self._held, self._bundle_keys = {}, {}
        self._self_seed = b""
        self._mask = crypto.KeyPair(b"", self._mask.public)
        self._mask_agreement = None
        self._forget_enc()

    def _forget_enc(self) -> None:
        self._enc = crypto.KeyPair(b"", self._enc.public)
        self._enc_agreement = None
