"""A scripted malicious aggregator over a real Mosquitto against real device clients.

The test plays the aggregator with a plain MQTT client: it collects check-ins and stage
messages and publishes whatever it likes on the aggregator's topics. The devices are the real
``Client`` (identity key in the state directory, the owner's signed roster, ``trust.owner_key``).
Each attack ends with the devices refusing (logged, the round left) and the test checks what the
scripted aggregator holds: no masked input of the victim with its secrets, or no shares at all.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from devtools import DIGITS_PLAN, broker_overrides, digits_split, new_task, publish_task, wait_until
from secagg_tools import enroll

from fededge.device.client import Client
from fededge.keys import public_text
from fededge.mqtt import MqttClient
from fededge.protocol import Plan, Topics
from fededge.protocol.messages import SecureAggregation
from fededge.secagg import crypto
from fededge.secagg.messages import (
    AdvertiseKeys,
    MaskedInput,
    PeerKeys,
    RelayedShares,
    RoundConfig,
    ShareKeys,
    SurvivorSet,
    UnmaskShares,
    decode_payload,
    encode,
)
from fededge.secagg.quantize import max_scale
from fededge.settings import Settings, load_settings

pytestmark = pytest.mark.broker
N, T = 5, 3  # complete graph: t > n/2
NAMES = [f"d{i}" for i in range(N)]
VICTIM = "d0"
SA = SecureAggregation(cohort_size=N, min_cohort=5, threshold=T, stage_timeout=30.0,
                       checkin_window=600.0, checkin_interval=0.3)  # fmt: skip
PLAN: Plan = DIGITS_PLAN.model_copy(update={"secure_aggregation": SA, "clip_norm": 1.0})


class Scripted:
    """The aggregator's side, by hand: everything devices send is kept in ``got``."""

    def __init__(self, broker: Any, task: str) -> None:
        self.topics = Topics("fededge", task)
        self.mqtt = MqttClient(broker.settings(), f"evil-{task}", persistent=False)
        self.mqtt.connect()
        self.mqtt.subscribe(self.topics.checkin_filter)
        for stage in ("advertise", "share", "masked", "consistency", "unmask"):
            self.mqtt.subscribe(self.topics.round_stage_filter(stage))
        self.checkins: set[str] = set()
        self.got: dict[str, dict[str, Any]] = {}  # stage -> device -> message

    def pump(self) -> None:
        with contextlib.suppress(queue.Empty):
            while True:
                msg = self.mqtt.messages.get(timeout=0.1)
                where = self.topics.parse_round(msg.topic)
                if where is None or where.device is None or not msg.payload:
                    continue
                if where.kind == "checkin":
                    self.checkins.add(where.device)
                    continue
                m = decode_payload(msg.payload, masked=where.type == "masked")
                self.got.setdefault(where.type, {})[where.device] = m

    def wait_for(self, stage: str, devices: list[str], what: str) -> dict[str, Any]:
        def ready() -> bool:
            self.pump()
            return set(devices) <= set(self.got.get(stage, {}))

        wait_until(ready, 60, what)
        return self.got[stage]

    def config(self, round_id: str, cohort: list[str], d: int) -> RoundConfig:
        cfg = RoundConfig(
            round_id=round_id, cohort=tuple(sorted(cohort)), threshold=T,
            neighbours=len(cohort) - 1, bits=SA.bits, clip=PLAN.clip_norm,
            scale=max_scale(len(cohort), PLAN.clip_norm, SA.bits), max_weight=SA.max_weight,
            vector_length=d, timeout_s=SA.stage_timeout,
        )  # fmt: skip
        self.mqtt.publish(self.topics.round_broadcast(round_id, "config"), encode(cfg), retain=True)
        return cfg

    def to(self, rid: str, device: str, msg: Any) -> None:
        self.mqtt.publish(self.topics.round_to(rid, device), encode(msg), wait=True, timeout=5)

    def broadcast(self, rid: str, msg: Any) -> None:
        topic = self.topics.round_broadcast(rid, msg.TYPE)
        self.mqtt.publish(topic, encode(msg), wait=True, timeout=5)

    def close(self) -> None:
        self.mqtt.close()


def device_settings(
    url: str, state: Path, task: str, name: str, owner: str, **privacy: Any
) -> Settings:
    dev = {"device_id": name, "metrics": False, "seed": zlib.crc32(name.encode())}
    return load_settings(None, {"broker": broker_overrides(url), "task": task, "state_dir": state,
                                "device": dev, "trust": {"owner_key": owner},
                                "privacy": privacy})  # fmt: skip


@contextlib.contextmanager
def setup(
    broker: Any, tmp_path: Path, **privacy: Any
) -> Iterator[tuple[Scripted, dict[str, Client], int]]:
    """Task signed by the owner, devices enrolled and trained, waiting for a round."""
    task = new_task()
    owner = Ed25519PrivateKey.generate()
    s = load_settings(None, {"broker": broker_overrides(broker.url), "task": task,
                             "state_dir": tmp_path / "owner"})  # fmt: skip
    base = publish_task(s, PLAN, sign_key=owner)
    enroll(s.broker, tmp_path, task, NAMES, owner=owner)
    evil = Scripted(broker, task)
    clients = {n: Client(device_settings(broker.url, tmp_path, task, n,
                                         public_text(owner.public_key()), **privacy))
               for n in NAMES}  # fmt: skip
    try:
        for c in clients.values():
            c.start()
        parts, _, _ = digits_split(N)
        wait_until(lambda: all(c.version == 0 for c in clients.values()), 60, "version 0")
        for i, c in enumerate(clients.values()):
            c.fit(parts[i][0][:32], parts[i][1][:32])

        def checked_in() -> bool:
            evil.pump()
            return evil.checkins >= set(NAMES)

        wait_until(checked_in, 60, "every device checks in")
        yield evil, clients, sum(int(w.size) for w in base.weights.values())
    finally:
        for c in clients.values():
            with contextlib.suppress(Exception):
                c.close(timeout=5)
        evil.close()


def left(c: Client) -> bool:
    return c.core.secagg.round is None and c.core.secagg.rounds_aborted >= 1


def test_empty_relay_and_key_substitution_over_mqtt(
    broker: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING), setup(broker, tmp_path) as (evil, clients, d):
        cfg = evil.config("evil-1", NAMES, d)
        adverts: dict[str, AdvertiseKeys] = evil.wait_for("advertise", NAMES, "advertisements")
        mine = crypto.generate_keypair(crypto.system_random)
        for name in NAMES:
            keys = {
                p: (a.enc_key, a.mask_key, a.signature) for p, a in adverts.items() if p != name
            }
            if name == "d1":  # key substitution: the aggregator's own keys for three of four
                for p in sorted(keys)[:3]:
                    keys[p] = (mine.public, crypto.generate_keypair(crypto.system_random).public,
                               keys[p][2])  # fmt: skip
            evil.to(cfg.round_id, name, PeerKeys(cfg.round_id, name, keys))
        honest = [n for n in NAMES if n != "d1"]
        shares: dict[str, ShareKeys] = evil.wait_for("share", honest, "share bundles")
        wait_until(lambda: left(clients["d1"]), 30, "d1 refuses substituted keys")
        assert "d1" not in evil.got.get("share", {})
        # Empty relay for the victim, honest relays for the others.
        evil.to(cfg.round_id, VICTIM, RelayedShares(cfg.round_id, VICTIM, {}))
        wait_until(lambda: left(clients[VICTIM]), 30, "the victim refuses an empty relay")
        evil.pump()
        assert VICTIM not in evil.got.get("masked", {})  # nothing to unmask
        assert clients[VICTIM].core.secagg.busy()  # its update was not revealed: kept
        for name in ("d2", "d3", "d4"):
            cts = {s: shares[s].ciphertexts[name] for s in honest if s != name}
            evil.to(cfg.round_id, name, RelayedShares(cfg.round_id, name, cts))
        masked: dict[str, MaskedInput] = evil.wait_for("masked", ["d2", "d3", "d4"], "masked")
        assert set(masked) == {"d2", "d3", "d4"}
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "validly signed" in messages and "bundles decrypted" in messages


def test_split_unmask_over_mqtt(
    broker: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Two different survivor sets, and an unmask request sent to one device only."""
    with caplog.at_level(logging.WARNING), setup(broker, tmp_path) as (evil, clients, d):
        cfg = evil.config("evil-2", NAMES, d)
        adverts: dict[str, AdvertiseKeys] = evil.wait_for("advertise", NAMES, "advertisements")
        for name in NAMES:
            keys = {
                p: (a.enc_key, a.mask_key, a.signature) for p, a in adverts.items() if p != name
            }
            evil.to(cfg.round_id, name, PeerKeys(cfg.round_id, name, keys))
        shares: dict[str, ShareKeys] = evil.wait_for("share", NAMES, "share bundles")
        for name in NAMES:
            cts = {s: shares[s].ciphertexts[name] for s in NAMES if s != name}
            evil.to(cfg.round_id, name, RelayedShares(cfg.round_id, name, cts))
        evil.wait_for("masked", NAMES, "masked inputs")
        # "The victim survived" and then "the victim dropped", both on the broadcast topic.
        evil.broadcast(cfg.round_id, SurvivorSet(cfg.round_id, tuple(NAMES)))
        evil.wait_for("consistency", NAMES, "signatures on the first set")
        evil.broadcast(cfg.round_id, SurvivorSet(cfg.round_id, tuple(NAMES[1:])))
        wait_until(lambda: all(left(c) for c in clients.values()), 30, "every device leaves")
        # An unmask request on a device's own topic (v1's split vector) goes nowhere either.
        evil.to(cfg.round_id, "d1", SurvivorSet(cfg.round_id, tuple(NAMES)))
        evil.pump()
        unmask: dict[str, UnmaskShares] = evil.got.get("unmask", {})
        assert not unmask  # no share of any secret left a device
        assert all(c.core.secagg.masked_sent == 1 for c in clients.values())
    assert "second, different survivors" in " ".join(r.getMessage() for r in caplog.records)


def test_sybil_cohort_replay_and_floor_over_mqtt(
    broker: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with (
        caplog.at_level(logging.WARNING),
        setup(broker, tmp_path, min_cohort=5) as (evil, clients, d),
    ):
        # Sybils: cohort members nobody enrolled.
        evil.config("evil-3", [VICTIM, "d1", "d2", "sybil-1", "sybil-2"], d)
        # Below the floor (min_cohort = 5): four real devices.
        evil.config("evil-4", NAMES[:4], d)
        wait_until(lambda: sum("refused" in r.getMessage() for r in caplog.records) >= 5, 30,
                   "refusals")  # fmt: skip
        evil.pump()
        assert not evil.got.get("advertise")  # nobody took part
        # A replayed config of a round a device has already seen is ignored.
        evil.config("evil-3", [VICTIM, "d1", "d2", "sybil-1", "sybil-2"], d)
        evil.pump()
        assert not evil.got.get("advertise")
        assert all(
            c.core.secagg.busy() and c.core.secagg.masked_sent == 0 for c in clients.values()
        )
    text = " ".join(r.getMessage() for r in caplog.records)
    assert "not enrolled in the roster" in text and "below this device's floor 5" in text
