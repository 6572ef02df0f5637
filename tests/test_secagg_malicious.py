"""A scripted malicious aggregator against honest DeviceRounds (pure state machines, no broker).

Each attack of issue 10 ends with the victim refusing (a logged reason, ``abort_reason`` set) and
a check on what the aggregator holds: it never has the victim's masked input together with t
shares of its self-mask seed and, for every neighbour the victim masked with, t shares of one of
the two mask keys of the pair - which is what unmasking one device's input takes.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fededge.device.effects import Publish
from fededge.device.examples import StateDb
from fededge.device.metrics import DeviceMetrics
from fededge.device.secagg_client import Participant, ReadyInput
from fededge.errors import SecAggError
from fededge.keys import public_text
from fededge.protocol import Plan, Topics
from fededge.protocol.messages import SecureAggregation
from fededge.protocol.roster import Roster
from fededge.secagg import crypto, identity
from fededge.secagg.device import DeviceRound, Floor
from fededge.secagg.graph import Stage
from fededge.secagg.messages import (
    AdvertiseKeys,
    ConsistencyCheck,
    MaskedInput,
    Message,
    Outgoing,
    PeerKeys,
    RelayedShares,
    RoundConfig,
    ShareKeys,
    SurvivorSet,
    UnmaskRequest,
    UnmaskShares,
    encode,
)
from fededge.testing.secagg import identity_keys, make_config, roster_of

D = 50
N, T = 7, 4  # complete graph (k = 6): t > n/2
NAMES = [f"dev{i}" for i in range(N)]
VICTIM = "dev0"
IDS = identity_keys(NAMES)
ROSTER = roster_of(IDS)


@dataclass
class Holdings:
    """Everything the devices sent to the (malicious) aggregator."""

    masked: dict[str, MaskedInput] = field(default_factory=dict)
    shares: dict[str, ShareKeys] = field(default_factory=dict)
    b_shares: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    s_shares: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))

    def take(self, sender: str, out: list[Outgoing]) -> list[Message]:
        msgs = [o.message for o in out]
        for m in msgs:
            if isinstance(m, MaskedInput):
                self.masked[sender] = m
            elif isinstance(m, ShareKeys):
                self.shares[sender] = m
            elif isinstance(m, UnmaskShares):
                for d in m.self_mask_shares:
                    self.b_shares[d].add(sender)
                for d in m.key_shares:
                    self.s_shares[d].add(sender)
        return msgs

    def can_unmask(self, victim: str, partners: list[str], t: int) -> bool:
        """Whether the holdings suffice to strip every mask off the victim's masked input."""
        if victim not in self.masked or len(self.b_shares[victim]) < t:
            return False
        if len(self.s_shares[victim]) >= t:
            return True
        return all(len(self.s_shares[p]) >= t for p in partners)


def rounds(cfg: RoundConfig, floor: Floor | None = None) -> dict[str, DeviceRound]:
    out = {}
    for d in cfg.cohort:
        rng = crypto.deterministic_random(cfg.round_id.encode() + d.encode())
        out[d] = DeviceRound(d, cfg, IDS[d], ROSTER, floor=floor or Floor(), rng=rng)
        out[d].set_input(np.full(D, 0.01 * (1 + NAMES.index(d)), np.float32), 10.0)
    return out


def advertise(devs: dict[str, DeviceRound]) -> dict[str, AdvertiseKeys]:
    adverts = {}
    for d, dev in devs.items():
        (out,) = dev.start()
        assert isinstance(out.message, AdvertiseKeys)
        adverts[d] = out.message
    return adverts


def peer_keys(cfg: RoundConfig, d: str, adverts: dict[str, AdvertiseKeys]) -> PeerKeys:
    keys = {p: (a.enc_key, a.mask_key, a.signature) for p, a in adverts.items() if p != d}
    return PeerKeys(cfg.round_id, d, keys)


def honest_until_masked(cfg: RoundConfig, held: Holdings) -> dict[str, DeviceRound]:
    """Advertise, share and relay honestly: every device has sent its masked input."""
    devs = rounds(cfg)
    adverts = advertise(devs)
    for d, dev in devs.items():
        held.take(d, dev.handle(peer_keys(cfg, d, adverts)))
    for d, dev in devs.items():
        cts = {s: held.shares[s].ciphertexts[d] for s in devs if s != d}
        held.take(d, dev.handle(RelayedShares(cfg.round_id, d, cts)))
    assert set(held.masked) == set(devs)
    return devs


def refused(dev: DeviceRound, caplog: pytest.LogCaptureFixture, words: str) -> None:
    assert dev.stage == Stage.ABORTED and words in (dev.abort_reason or "")
    assert any("leaving the round" in r.message and words in r.message for r in caplog.records)


def config(round_id: str = "r1", names: list[str] = NAMES, t: int = T) -> RoundConfig:
    return make_config(round_id, names, D, t, len(names) - 1)


# ------------------------------------------------------------------------------------ attacks
def test_empty_relay_gets_no_masked_input(caplog: pytest.LogCaptureFixture) -> None:
    """v1 masked with the self-mask only after an empty relay; v2 sends nothing."""
    cfg, held = config(), Holdings()
    devs = rounds(cfg)
    adverts = advertise(devs)
    held.take(VICTIM, devs[VICTIM].handle(peer_keys(cfg, VICTIM, adverts)))
    with caplog.at_level(logging.WARNING), pytest.raises(SecAggError, match="no masked input"):
        devs[VICTIM].handle(RelayedShares(cfg.round_id, VICTIM, {}))
    refused(devs[VICTIM], caplog, "bundles decrypted")
    assert VICTIM not in held.masked
    # Undecryptable bundles (the aggregator's own) count for nothing either.
    cfg2, held2 = config("r2"), Holdings()
    devs2 = rounds(cfg2)
    adverts2 = advertise(devs2)
    held2.take(VICTIM, devs2[VICTIM].handle(peer_keys(cfg2, VICTIM, adverts2)))
    junk = {s: bytes(164) for s in NAMES if s != VICTIM}
    with pytest.raises(SecAggError, match="0 neighbours' bundles decrypted"):
        devs2[VICTIM].handle(RelayedShares(cfg2.round_id, VICTIM, junk))
    assert VICTIM not in held2.masked
    assert not held2.can_unmask(VICTIM, NAMES[1:], T)


def test_split_unmask_cannot_collect_t_signatures_twice(caplog: pytest.LogCaptureFixture) -> None:
    """Tell some devices 'the victim survived' and others 'the victim dropped'."""
    cfg, held = config(), Holdings()
    devs = honest_until_masked(cfg, held)
    with_victim = tuple(NAMES)
    without = tuple(n for n in NAMES if n != VICTIM)
    group_a, group_b = NAMES[:4], NAMES[4:]  # the victim is in A
    sigs: dict[tuple[str, ...], dict[str, bytes]] = {with_victim: {}, without: {}}
    for d in group_a:
        (m,) = held.take(d, devs[d].handle(SurvivorSet(cfg.round_id, with_victim)))
        assert isinstance(m, ConsistencyCheck)
        sigs[with_victim][d] = m.signature
    for d in group_b:
        (m,) = held.take(d, devs[d].handle(SurvivorSet(cfg.round_id, without)))
        assert isinstance(m, ConsistencyCheck)
        sigs[without][d] = m.signature
    # A: 4 signatures on "survived" = t, so A reveals the victim's self-mask shares ...
    for d in group_a:
        held.take(d, devs[d].handle(UnmaskRequest(cfg.round_id, with_victim, sigs[with_victim])))
    # ... but only 3 devices signed "dropped": B refuses to reveal its key shares.
    with caplog.at_level(logging.WARNING):
        for d in group_b:
            with pytest.raises(SecAggError, match="valid signatures"):
                devs[d].handle(UnmaskRequest(cfg.round_id, without, sigs[without]))
            refused(devs[d], caplog, "valid signatures")
    # Padding B's request with A's signatures (made over another set) does not help.
    forged = {**sigs[without], **{d: s for d, s in sigs[with_victim].items() if d != VICTIM}}
    assert len(identity.valid_signers(ROSTER, forged, identity.consistency_data(cfg, without),
                                      without)) == 3  # fmt: skip
    assert len(held.b_shares[VICTIM]) == 3 and not held.s_shares[VICTIM]
    assert not held.can_unmask(VICTIM, NAMES[1:], T)
    # A second, contradictory request to a device that already answered ends its part.
    with pytest.raises(SecAggError):
        devs["dev1"].handle(UnmaskRequest(cfg.round_id, without, sigs[without]))
    assert devs["dev1"].stage == Stage.ABORTED


def test_unmask_request_for_a_set_the_device_did_not_sign(caplog: pytest.LogCaptureFixture) -> None:
    cfg, held = config(), Holdings()
    devs = honest_until_masked(cfg, held)
    everyone = tuple(NAMES)
    sigs = {}
    for d in NAMES:
        (m,) = held.take(d, devs[d].handle(SurvivorSet(cfg.round_id, everyone)))
        assert isinstance(m, ConsistencyCheck)
        sigs[d] = m.signature
    other = tuple(n for n in NAMES if n != "dev6")
    with caplog.at_level(logging.WARNING), pytest.raises(SecAggError, match="signed"):
        devs["dev1"].handle(UnmaskRequest(cfg.round_id, other, sigs))
    refused(devs["dev1"], caplog, "not the one this device signed")
    # and a second survivor set (a contradiction) ends participation too
    with pytest.raises(SecAggError, match="second, different survivors"):
        devs["dev2"].handle(SurvivorSet(cfg.round_id, other))
    assert devs["dev2"].stage == Stage.ABORTED


def test_consistency_counts_the_device_itself_once(caplog: pytest.LogCaptureFixture) -> None:
    """A device counts its own signature of the set without verifying it (it signed that exact
    set), so it needs t - 1 valid signatures of others; its own entry never counts twice and
    forged or missing entries count for nothing."""
    cfg, held = config(), Holdings()
    devs = honest_until_masked(cfg, held)
    everyone = tuple(NAMES)
    sigs = {}
    for d in NAMES:
        (m,) = held.take(d, devs[d].handle(SurvivorSet(cfg.round_id, everyone)))
        assert isinstance(m, ConsistencyCheck)
        sigs[d] = m.signature

    def request(me: str, others: list[str], own: bytes | None) -> UnmaskRequest:
        chosen = {d: sigs[d] for d in others}
        if own is not None:
            chosen[me] = own
        return UnmaskRequest(cfg.round_id, everyone, chosen)

    # t - 1 = 3 others: enough, with the own signature left out or replaced by junk.
    (out,) = devs["dev1"].handle(request("dev1", ["dev2", "dev3", "dev4"], None))
    assert isinstance(out.message, UnmaskShares)
    (out,) = devs["dev2"].handle(request("dev2", ["dev3", "dev4", "dev5"], bytes(64)))
    assert isinstance(out.message, UnmaskShares)
    # t - 2 others plus the device's own valid signature: 3 signers, fewer than t = 4.
    with caplog.at_level(logging.WARNING), pytest.raises(SecAggError, match="3 valid"):
        devs["dev3"].handle(request("dev3", ["dev4", "dev5"], sigs["dev3"]))
    refused(devs["dev3"], caplog, "fewer than the threshold 4")
    # Forged signatures for the missing others do not help.
    forged = request("dev4", ["dev5", "dev6"], sigs["dev4"])
    forged = UnmaskRequest(cfg.round_id, everyone, {**forged.signatures, "dev0": bytes(64)})
    with pytest.raises(SecAggError, match="3 valid"):
        devs["dev4"].handle(forged)
    assert devs["dev4"].stage == Stage.ABORTED


@pytest.mark.parametrize("substituted", [1, 3, 6])
def test_key_substitution(substituted: int, caplog: pytest.LogCaptureFixture) -> None:
    """The aggregator relays its own X25519 keys in place of some neighbours'."""
    cfg, held = config(), Holdings()
    devs = rounds(cfg)
    adverts = advertise(devs)
    mine = {p: (crypto.generate_keypair(crypto.system_random),
                crypto.generate_keypair(crypto.system_random)) for p in NAMES}  # fmt: skip
    victims_peers = [p for p in NAMES if p != VICTIM]
    fake = set(victims_peers[:substituted])
    keys = {}
    for p in victims_peers:
        a = adverts[p]
        if p in fake:  # its own keys, with the real device's signature (it cannot make one)
            keys[p] = (mine[p][0].public, mine[p][1].public, a.signature)
        else:
            keys[p] = (a.enc_key, a.mask_key, a.signature)
    msg = PeerKeys(cfg.round_id, VICTIM, keys)
    with caplog.at_level(logging.WARNING):
        if len(victims_peers) - substituted < T:
            with pytest.raises(SecAggError, match="validly signed"):
                devs[VICTIM].handle(msg)
            refused(devs[VICTIM], caplog, "validly signed")
            assert VICTIM not in held.shares
        else:
            (out,) = held.take(VICTIM, devs[VICTIM].handle(msg))
            assert isinstance(out, ShareKeys)
            # No share is encrypted to a substituted key: the aggregator decrypts nothing.
            assert not set(out.ciphertexts) & fake
            assert any("not signed by its identity" in p for p in devs[VICTIM].problems)
            for p, ct in out.ciphertexts.items():
                shared = crypto.agree(mine[p][0].private, devs[VICTIM]._enc.public)
                key = crypto.share_key(shared, cfg.round_id, VICTIM, p)
                with pytest.raises(SecAggError, match="authentication"):
                    crypto.decrypt_bundle(key, cfg.round_id, VICTIM, p, ct)
    assert not held.can_unmask(VICTIM, victims_peers, T)


def test_sybil_cohort_is_refused(caplog: pytest.LogCaptureFixture) -> None:
    """Cohort members that are not enrolled (the aggregator holds their keys)."""
    sybils = ["sybil1", "sybil2", "sybil3", "sybil4"]
    cfg = make_config("r1", [VICTIM, "dev1", "dev2", *sybils], D, 4, 6)
    with pytest.raises(SecAggError, match="not enrolled"):
        DeviceRound(VICTIM, cfg, IDS[VICTIM], ROSTER)
    # Enrolled-looking names with the aggregator's identity keys: the roster says otherwise.
    fake_ids = {s: Ed25519PrivateKey.generate() for s in ["dev4", "dev5", "dev6"]}
    cfg2 = config("r2")
    devs = rounds(cfg2)
    adverts = advertise(devs)
    for s, key in fake_ids.items():
        a = adverts[s]
        sig = key.sign(identity.advertise_data(cfg2, s, a.enc_key, a.mask_key))
        adverts[s] = AdvertiseKeys(a.round_id, s, a.enc_key, a.mask_key, sig)
    held = Holdings()
    with caplog.at_level(logging.WARNING), pytest.raises(SecAggError, match="validly signed"):
        devs[VICTIM].handle(peer_keys(cfg2, VICTIM, adverts))
    refused(devs[VICTIM], caplog, "validly signed")
    assert not held.can_unmask(VICTIM, NAMES[1:], T)


def test_replayed_round_advertisements_do_not_verify(caplog: pytest.LogCaptureFixture) -> None:
    """Neighbours' signed advertisements of round r1 (whose mask keys the aggregator may have
    rebuilt there) replayed into round r2 with the same cohort."""
    cfg1, held1 = config("r1"), Holdings()
    honest_until_masked(cfg1, held1)
    old = advertise(rounds(cfg1))
    cfg2 = config("r2")
    devs2 = rounds(cfg2)
    advertise(devs2)
    with caplog.at_level(logging.WARNING), pytest.raises(SecAggError, match="validly signed"):
        devs2[VICTIM].handle(peer_keys(cfg2, VICTIM, old))
    refused(devs2[VICTIM], caplog, "validly signed")
    # The config with its round id is what the signatures bind: a replayed r1 message is
    # refused by the r2 device as belonging to another round.
    with pytest.raises(SecAggError):
        rounds(cfg2)["dev1"].handle(peer_keys(cfg1, "dev1", old))


@pytest.mark.parametrize(
    ("names", "t", "floor", "words"),
    [
        (NAMES, 3, Floor(), "not above half of the cohort"),  # v1's default plan: t=2 of 10
        (NAMES, 4, Floor(min_cohort=8), "below this device's floor 8"),
        (NAMES, 4, Floor(min_threshold=5), "below this device's floor 5"),
    ],
)
def test_weak_round_or_cohort_below_the_floor_is_refused(
    names: list[str], t: int, floor: Floor, words: str
) -> None:
    cfg = make_config("r1", names, D, t, len(names) - 1)
    with pytest.raises(SecAggError, match=words):
        DeviceRound(VICTIM, cfg, IDS[VICTIM], ROSTER, floor=floor)
    sparse = make_config("r1", [f"dev{i}" for i in range(5)] + ["x1", "x2", "x3", "x4"], D, 2, 4)
    with pytest.raises(SecAggError, match="half of the 4 neighbours"):
        DeviceRound(VICTIM, sparse, IDS[VICTIM], {**ROSTER, **roster_of(identity_keys(
            ["x1", "x2", "x3", "x4"]))})  # fmt: skip


# ------------------------------------------------------------------ topics (the Participant)
SA = SecureAggregation(cohort_size=N, min_cohort=N, threshold=T, checkin_interval=1.0)
PLAN = Plan(clip_norm=1.0, secure_aggregation=SA)


def participant(tmp_path: Path, name: str, min_cohort: int = 1) -> tuple[Participant, Topics]:
    topics = Topics("fededge", "task")
    db = StateDb(tmp_path / f"{name}.sqlite")
    p = Participant(name, topics, db, DeviceMetrics(), version=lambda: 0, plan=lambda: PLAN)
    roster = Roster("task", 1, {d: public_text(k.public_key()) for d, k in IDS.items()})
    owner = Ed25519PrivateKey.generate()
    p.configure(IDS[name], [owner.public_key()], min_cohort=min_cohort,
                roster=roster.signed(owner))  # fmt: skip
    p.offer(ReadyInput(0, {"w": np.full(D, 0.01, np.float32)}, 10, []))
    return p, topics


def test_participant_takes_messages_only_on_their_topic(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    p, topics = participant(tmp_path, VICTIM)
    assert p.not_ready is None
    (checkin,) = p.tick(now=0.0, wall=1.0, connected=True)
    assert isinstance(checkin, Publish) and checkin.topic == topics.checkin(VICTIM)
    cfg = make_config("r1", NAMES, D, T, N - 1, clip=1.0)
    out = p.on_message(topics.round_broadcast("r1", "config"), encode(cfg), now=1.0)
    assert [e.topic for e in out if isinstance(e, Publish)] == [
        topics.round_stage("r1", "advertise", VICTIM)
    ]
    # An unmask request addressed to this device alone (v1's split-unmask vector): refused,
    # and the device leaves the round.
    req = UnmaskRequest("r1", tuple(NAMES), {})
    with caplog.at_level(logging.WARNING), pytest.raises(SecAggError, match="on the topic"):
        p.on_message(topics.round_to("r1", VICTIM), encode(req), now=2.0)
    assert p.round is None and p.rounds_aborted == 1
    assert p.masked_sent == 0 and p.busy()  # nothing was revealed: the update waits
    # A replayed config of the same round is ignored.
    assert p.on_message(topics.round_broadcast("r1", "config"), encode(cfg), now=3.0) == []


def test_participant_refuses_a_cohort_below_its_floor_and_a_forged_roster(tmp_path: Path) -> None:
    p, topics = participant(tmp_path, VICTIM, min_cohort=N + 1)
    cfg = make_config("r1", NAMES, D, T, N - 1, clip=1.0)
    with pytest.raises(SecAggError, match="below this device's floor"):
        p.on_message(topics.round_broadcast("r1", "config"), encode(cfg), now=1.0)
    assert p.round is None
    # A roster signed by someone else, or an older serial, is refused; the old one stays.
    forged = Roster("task", 5, {VICTIM: public_text(IDS[VICTIM].public_key())})
    with pytest.raises(Exception, match="not trusted"):
        p.on_message(topics.roster, forged.signed(Ed25519PrivateKey.generate()), now=2.0)
    assert p.roster is not None and p.roster.serial == 1
