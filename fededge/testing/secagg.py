"""An in-memory SecAgg+ round: one ServerRound and many DeviceRounds wired through wire bytes.

For tests, benchmarks and demos: every message is encoded and decoded as it would be on MQTT,
and devices can go offline before any stage.
"""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fededge.errors import FededgeError
from fededge.secagg import crypto
from fededge.secagg.device import DeviceRound
from fededge.secagg.graph import Stage
from fededge.secagg.messages import (
    TO_ALL,
    TO_SERVER,
    MaskedInput,
    Message,
    Outgoing,
    RoundConfig,
    decode_json,
    encode,
)
from fededge.secagg.quantize import max_scale
from fededge.secagg.server import ServerRound


def wire(message: Message) -> Message:
    """The message after a trip through its wire encoding."""
    data = encode(message)
    return MaskedInput.from_bytes(data) if isinstance(message, MaskedInput) else decode_json(data)


def identity_keys(
    names: Collection[str], seed: bytes = b"identity"
) -> dict[str, Ed25519PrivateKey]:
    """Deterministic Ed25519 identity keys for test devices (never for production)."""
    return {
        n: Ed25519PrivateKey.from_private_bytes(hashlib.sha256(seed + n.encode()).digest())
        for n in names
    }


def roster_of(keys: Mapping[str, Ed25519PrivateKey]) -> dict[str, Ed25519PublicKey]:
    """The roster (device -> identity public key) that enrolls ``keys``."""
    return {n: k.public_key() for n, k in keys.items()}


def make_config(
    round_id: str,
    cohort: Collection[str],
    vector_length: int,
    threshold: int,
    neighbours: int,
    clip: float = 1.0,
    bits: int = 32,
    max_weight: float = 1000.0,
    timeout_s: float = 30.0,
) -> RoundConfig:
    """A RoundConfig with the largest scale that cannot wrap for this cohort."""
    members = tuple(sorted(cohort))
    return RoundConfig(
        round_id=round_id,
        cohort=members,
        threshold=threshold,
        neighbours=neighbours,
        bits=bits,
        clip=clip,
        scale=max_scale(len(members), clip, bits),
        max_weight=max_weight,
        vector_length=vector_length,
        timeout_s=timeout_s,
    )


@dataclass
class Simulation:
    """A round in memory. ``offline[stage]`` lists devices that vanish before sending in it."""

    config: RoundConfig
    inputs: Mapping[str, tuple[npt.NDArray[np.float32], float]]
    offline: Mapping[Stage, Collection[str]] = field(default_factory=dict)
    seed: bytes = b"simulation"
    # (to, msg) -> the messages actually delivered: none (lost), altered, or extra ones
    tamper: Callable[[str, Message], list[Message]] | None = None
    rejected: list[str] = field(default_factory=list)
    now: float = 0.0
    # identity keys of the cohort (deterministic from ``seed`` if not given) and the roster
    identities: Mapping[str, Ed25519PrivateKey] | None = None
    roster: Mapping[str, Ed25519PublicKey] | None = None
    unmask_threads: int | None = None  # the server's (None: one per CPU)

    def __post_init__(self) -> None:
        if self.identities is None:
            self.identities = identity_keys(self.config.cohort, self.seed)
        if self.roster is None:
            self.roster = roster_of(self.identities)
        self.server = ServerRound(self.config, crypto.deterministic_random(self.seed + b"server"),
                                  roster=self.roster,
                                  unmask_threads=self.unmask_threads)  # fmt: skip
        self.devices: dict[str, DeviceRound] = {}
        self._queue: deque[tuple[str, Outgoing]] = deque()

    def _gone(self, device: str, stage: Stage) -> bool:
        order = [Stage.ADVERTISE, Stage.SHARE, Stage.MASKED, Stage.CONSISTENCY, Stage.UNMASK]
        return any(device in self.offline.get(s, ()) for s in order[: order.index(stage) + 1])

    def _send(self, sender: str, outgoing: list[Outgoing]) -> None:
        for out in outgoing:
            self._queue.append((sender, out))

    def run(self) -> ServerRound:
        """Play the round until the server finishes or aborts; returns the server."""
        self._send(TO_SERVER, self.server.start(self.now))
        for _ in range(1000):
            while self._queue:
                self._deliver(*self._queue.popleft())
            if self.server.stage in (Stage.DONE, Stage.ABORTED):
                break
            self.now += self.config.timeout_s + 1  # everyone who could answer has: time out
            self._send(TO_SERVER, self.server.advance(self.now))
        return self.server

    def _deliver(self, sender: str, out: Outgoing) -> None:
        messages = [out.message] if self.tamper is None else self.tamper(out.to, out.message)
        for msg in messages:
            self._deliver_one(out.to, wire(msg))

    def _deliver_one(self, to: str, msg: Message) -> None:
        if to == TO_SERVER:
            try:
                self._send(TO_SERVER, self.server.handle(msg, self.now))
            except FededgeError as exc:
                self.rejected.append(f"server: {exc}")
                self._send(TO_SERVER, self.server.advance(self.now))
            return
        targets = list(self.config.cohort) if to == TO_ALL else [to]
        for device in targets:
            self._to_device(device, msg)

    def _to_device(self, device: str, msg: Message) -> None:
        if device not in self.devices:
            if self._gone(device, Stage.ADVERTISE) or not isinstance(msg, RoundConfig):
                return
            rng = crypto.deterministic_random(self.seed + device.encode())
            assert self.identities is not None and self.roster is not None  # set in __post_init__
            try:
                dev = DeviceRound(device, msg, self.identities[device], self.roster, rng=rng)
            except FededgeError as exc:
                self.rejected.append(f"{device}: {exc}")
                return
            self.devices[device] = dev
            delta, weight = self.inputs[device]
            self._send(device, dev.set_input(delta, weight))
            self._send(device, dev.start())
            return
        dev = self.devices[device]
        next_stage = {
            Stage.ADVERTISE: Stage.SHARE,
            Stage.SHARE: Stage.MASKED,
            Stage.MASKED: Stage.CONSISTENCY,
            Stage.CONSISTENCY: Stage.UNMASK,
        }
        if dev.stage in next_stage and self._gone(device, next_stage[dev.stage]):
            return  # offline before it would send the next stage's message
        try:
            self._send(device, dev.handle(msg))
        except FededgeError as exc:
            self.rejected.append(f"{device}: {exc}")
