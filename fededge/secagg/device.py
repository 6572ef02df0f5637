"""The device side of a SecAgg+ round as a pure state machine: messages in, messages out."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
import numpy.typing as npt

from fededge.errors import SecAggError
from fededge.secagg import crypto
from fededge.secagg.graph import Stage, check_stage, connected, neighbour_graph
from fededge.secagg.messages import (
    BUNDLE_BYTES,
    TO_SERVER,
    AdvertiseKeys,
    MaskedInput,
    Message,
    Outgoing,
    PeerKeys,
    RelayedShares,
    RoundConfig,
    RoundStatus,
    ShareKeys,
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


class DeviceRound:
    """One device's part in one round: keys, shares, masked input, unmasking.

    Create it from the server's RoundConfig, send what :meth:`start` returns, feed every message
    for this round to :meth:`handle`, and give the update with :meth:`set_input` at any time
    before the masked-input stage ends. Rejected messages raise SecAggError and change nothing.
    """

    def __init__(
        self, device_id: str, config: RoundConfig, rng: crypto.RandomSource = crypto.system_random
    ) -> None:
        if device_id not in config.cohort:
            raise SecAggError(
                f"device {device_id!r} is not in the cohort of round {config.round_id!r}"
            )
        self.device_id = device_id
        self.config = config
        self.stage = Stage.ADVERTISE
        self.abort_reason: str | None = None
        self.problems: list[str] = []  # neighbours whose bundles failed to decrypt, for the log
        self._rng = rng
        self._fixed = FixedPoint(config.bits, config.clip, config.scale, config.max_weight)
        self._graph = neighbour_graph(config.round_id, config.cohort, config.neighbours)
        self._index = {d: i + 1 for i, d in enumerate(config.cohort)}  # Shamir x-coordinates
        self._enc = crypto.generate_keypair(rng)
        self._mask = crypto.generate_keypair(rng)
        self._self_seed = rng(crypto.SEED_BYTES)
        self._peers: dict[str, tuple[bytes, bytes]] = {}
        self._held: dict[
            str, tuple[bytes, bytes]
        ] = {}  # neighbour -> (mask-key share, self-mask share)
        self._partners: tuple[str, ...] | None = None  # neighbours to mask with
        self._encoded: npt.NDArray[np.uint32] | None = None
        self._masked_sent = False

    # ------------------------------------------------------------------------------- inputs
    def start(self) -> list[Outgoing]:
        """Stage 1: advertise the two public keys."""
        check_stage(self.stage, Stage.ADVERTISE, what="advertising keys")
        msg = AdvertiseKeys(
            self.config.round_id, self.device_id, self._enc.public, self._mask.public
        )
        return [Outgoing(TO_SERVER, msg)]

    def set_input(
        self,
        delta: Mapping[str, npt.NDArray[np.floating]] | npt.NDArray[np.floating],
        weight: float,
    ) -> list[Outgoing]:
        """Give this round's update (weight = e.g. example count); sends it if shares are in."""
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
        self._encoded = self._fixed.encode(flat, float(weight), key)
        return self._maybe_send_masked()

    def handle(self, msg: Message) -> list[Outgoing]:
        """React to one message from the server; returns the messages to send."""
        if msg.round_id != self.config.round_id:
            raise SecAggError(
                f"message for round {msg.round_id!r}, this is {self.config.round_id!r}"
            )
        if isinstance(msg, RoundStatus):
            return self._on_status(msg)
        check_stage(
            self.stage,
            Stage.ADVERTISE,
            Stage.SHARE,
            Stage.MASKED,
            Stage.UNMASK,
            what=f"a {msg.TYPE} message",
        )
        if isinstance(msg, PeerKeys | RelayedShares) and msg.device != self.device_id:
            raise SecAggError(f"{msg.TYPE} message addressed to {msg.device!r}")
        if isinstance(msg, PeerKeys):
            return self._on_peer_keys(msg)
        if isinstance(msg, RelayedShares):
            return self._on_relay(msg)
        if isinstance(msg, UnmaskRequest):
            return self._on_unmask(msg)
        raise SecAggError(f"a device does not accept {msg.TYPE} messages")

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
        unknown = set(msg.keys) - self._graph[me]
        if unknown:
            raise SecAggError(f"keys for devices that are not neighbours: {sorted(unknown)}")
        if len(msg.keys) < cfg.threshold:
            raise SecAggError(
                f"{len(msg.keys)} neighbours advertised, fewer than the threshold {cfg.threshold}"
            )
        all_keys = [k for pair in msg.keys.values() for k in pair] + [
            self._enc.public,
            self._mask.public,
        ]
        if len(set(all_keys)) != len(all_keys):
            raise SecAggError(
                "two advertised public keys are equal"
            )  # a copied key would leak masks
        peers = sorted(msg.keys)
        xs = [self._index[p] for p in peers]
        key_shares = crypto.split_secret(self._mask.private, xs, cfg.threshold, self._rng)
        seed_shares = crypto.split_secret(self._self_seed, xs, cfg.threshold, self._rng)
        cts = {}
        agreement = crypto.KeyAgreement(self._enc.private)
        for peer, s_share, b_share in zip(peers, key_shares, seed_shares, strict=True):
            shared = agreement.with_peer(msg.keys[peer][0])
            key = crypto.share_key(shared, cfg.round_id, me, peer)
            cts[peer] = crypto.encrypt_bundle(
                key, cfg.round_id, me, peer, s_share + b_share, self._rng
            )
        self._peers = dict(msg.keys)
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
        agreement = crypto.KeyAgreement(self._enc.private)
        for sender, ct in msg.ciphertexts.items():
            try:
                shared = agreement.with_peer(self._peers[sender][0])
                key = crypto.share_key(shared, cfg.round_id, sender, me)
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
                # The server counts the sender as live, so we still mask with it; we just cannot
                # help reconstruct its secrets. Others hold shares too; the round goes on.
                self.problems.append(str(exc))
                log.warning("round %s: %s", cfg.round_id, exc)
        self._held = held
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
        agreement = crypto.KeyAgreement(self._mask.private)
        for peer in self._partners:
            shared = agreement.with_peer(self._peers[peer][1])
            mask = prg.expand(crypto.pair_seed(shared, cfg.round_id, me, peer))
            # The smaller id adds and the larger subtracts, so the pair's masks cancel in the sum.
            (add_mod if me < peer else sub_mod)(y, mask, bits)
        self._encoded = None
        self._masked_sent = True
        return [Outgoing(TO_SERVER, MaskedInput(cfg.round_id, me, y))]

    def _on_unmask(self, msg: UnmaskRequest) -> list[Outgoing]:
        # Only one answer per round: a second request (perhaps with other lists) is refused, so the
        # server never gets both the self-mask and the mask key of one device from us.
        check_stage(self.stage, Stage.MASKED, what="an unmask request")
        if not self._masked_sent:
            raise SecAggError("unmask request before this device sent its masked input")
        cfg, me = self.config, self.device_id
        survivors, dropped = set(msg.survivors), set(msg.dropped)
        if survivors & dropped:
            raise SecAggError(f"devices both survived and dropped: {sorted(survivors & dropped)}")
        if me not in survivors:
            raise SecAggError("this device is not listed as a survivor")
        if not (survivors | dropped) <= set(cfg.cohort):
            raise SecAggError("unmask lists name devices outside the cohort")
        if len(survivors) < cfg.threshold:
            raise SecAggError(
                f"{len(survivors)} survivors, fewer than the threshold {cfg.threshold}"
            )
        assert self._partners is not None  # set with the relay, before the masked input
        unclassified = set(self._partners) - survivors - dropped
        if unclassified:
            raise SecAggError(f"neighbours neither survived nor dropped: {sorted(unclassified)}")
        if not connected(self._graph, survivors):
            raise SecAggError("survivors are not connected: their partial sums would be revealed")
        b_shares = {d: shares[1] for d, shares in self._held.items() if d in survivors}
        s_shares = {d: shares[0] for d, shares in self._held.items() if d in dropped}
        self.stage = Stage.UNMASK
        return [Outgoing(TO_SERVER, UnmaskShares(cfg.round_id, me, b_shares, s_shares))]

    def _forget(self) -> None:
        self._encoded = None
        self._held = {}
