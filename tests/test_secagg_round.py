"""Whole SecAgg+ rounds in memory: dropouts, aborts and protocol violations (through wire bytes)."""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping

import numpy as np
import pytest

from fededge.errors import SecAggError
from fededge.secagg import crypto
from fededge.secagg.device import DeviceRound
from fededge.secagg.graph import Ring, Stage, connected, neighbour_graph
from fededge.secagg.messages import (
    AdvertiseKeys,
    MaskedInput,
    Message,
    RoundStatus,
    ShareKeys,
    UnmaskShares,
)
from fededge.secagg.quantize import mean_error_bound
from fededge.secagg.server import ServerRound
from fededge.testing.secagg import Simulation, identity_keys, make_config, roster_of

D = 500
MAX_WEIGHT = 100.0


def cohort(n: int) -> list[str]:
    return [f"dev{i:02d}" for i in range(n)]


def make_inputs(devices: list[str], seed: int = 1) -> dict[str, tuple[np.ndarray, float]]:
    rng = np.random.default_rng(seed)
    scales = rng.uniform(0.01, 1.0, len(devices))  # some updates get clipped, some do not
    return {
        d: (
            rng.standard_normal(D).astype(np.float32) * s / np.sqrt(D) * 2,
            float(rng.integers(1, 150)),
        )
        for d, s in zip(devices, scales, strict=True)
    }


def plaintext_mean(
    inputs: Mapping[str, tuple[np.ndarray, float]], who: Collection[str], clip: float
) -> tuple[np.ndarray, float]:
    num, den = np.zeros(D), 0.0
    for d in who:
        x, w = inputs[d]
        x64 = x.astype(np.float64)
        x64 *= min(1.0, clip / float(np.linalg.norm(x64)))
        w = min(w, MAX_WEIGHT)
        num += w * x64
        den += w
    return num / den, den


def run(
    n: int,
    threshold: int,
    neighbours: int,
    offline: Mapping[Stage, Collection[str]] | None = None,
    tamper: Callable[[str, Message], list[Message]] | None = None,
) -> Simulation:
    devices = cohort(n)
    cfg = make_config("round-7", devices, D, threshold, neighbours, clip=1.0, max_weight=MAX_WEIGHT)
    sim = Simulation(cfg, make_inputs(devices), offline or {}, tamper=tamper)
    sim.run()
    return sim


def assert_correct(sim: Simulation, expected_survivors: Collection[str]) -> None:
    server = sim.server
    assert server.stage == Stage.DONE, server.abort_reason
    assert set(server.survivors) == set(expected_survivors)
    assert server.result is not None
    total, weight = server.result
    mean, den = plaintext_mean(sim.inputs, expected_survivors, sim.config.clip)
    bound = mean_error_bound(
        len(sim.config.cohort), sim.config.clip, sim.config.scale, den / MAX_WEIGHT
    )
    assert weight == pytest.approx(den, abs=len(sim.config.cohort) * MAX_WEIGHT / sim.config.scale)
    assert np.abs(total / weight - mean).max() <= bound
    for device, dev in sim.devices.items():
        if device in expected_survivors and device not in sim.offline.get(Stage.UNMASK, ()):
            assert dev.stage == Stage.DONE


def test_twenty_devices_two_drop_before_masking_three_after() -> None:
    devices = cohort(20)
    before, after = devices[3:5], devices[10:13]
    sim = run(20, threshold=7, neighbours=12, offline={Stage.MASKED: before, Stage.UNMASK: after})
    assert_correct(sim, set(devices) - set(before))  # the 3 late ones are in the sum
    assert set(sim.server.dropped) == set(before) | set(after)
    assert sim.rejected == []


def test_dropouts_at_every_stage() -> None:
    devices = cohort(16)
    offline = {
        Stage.ADVERTISE: ["dev01"],
        Stage.SHARE: ["dev05"],
        Stage.MASKED: ["dev09"],
        Stage.UNMASK: ["dev13"],
    }
    sim = run(16, threshold=6, neighbours=10, offline=offline)
    assert_correct(sim, set(devices) - {"dev01", "dev05", "dev09"})


def test_complete_graph_is_plain_secagg() -> None:
    sim = run(6, threshold=4, neighbours=5, offline={Stage.MASKED: ["dev02"]})
    assert_correct(sim, set(cohort(6)) - {"dev02"})


@pytest.mark.parametrize("stage", [Stage.ADVERTISE, Stage.SHARE, Stage.MASKED])
def test_below_threshold_aborts_and_tells_devices(stage: Stage) -> None:
    devices = cohort(10)
    sim = run(10, threshold=6, neighbours=8, offline={stage: devices[:5]})
    assert sim.server.stage == Stage.ABORTED
    assert "threshold" in (sim.server.abort_reason or "")
    assert sim.server.result is None
    for dev in sim.devices.values():
        if dev.device_id not in devices[:5]:
            assert dev.stage == Stage.ABORTED and dev.abort_reason


def test_too_few_unmask_answers_aborts() -> None:
    devices = cohort(10)
    sim = run(10, threshold=6, neighbours=8, offline={Stage.UNMASK: devices[:6]})
    assert sim.server.stage == Stage.ABORTED
    assert "shares" in (sim.server.abort_reason or "")


# -------------------------------------------------------------------------------- violations
def test_wrong_stage_message_drops_only_the_sender() -> None:
    def tamper(to: str, msg: Message) -> list[Message]:
        if isinstance(msg, AdvertiseKeys) and msg.device == "dev04":
            return [MaskedInput(msg.round_id, "dev04", np.zeros(D + 1, np.uint32)), msg]
        return [msg]

    sim = run(12, threshold=5, neighbours=8, tamper=tamper)
    assert_correct(sim, set(cohort(12)) - {"dev04"})
    assert "stage" in sim.server.dropped["dev04"]
    assert any("dev04" in r and "left the round" in r for r in sim.rejected)


def test_bad_ciphertext_is_survived() -> None:
    """A corrupted bundle: its recipient cannot decrypt it, masks anyway; the round completes."""

    def tamper(to: str, msg: Message) -> list[Message]:
        if isinstance(msg, ShareKeys) and msg.device == "dev02":
            cts = dict(msg.ciphertexts)
            victim = sorted(cts)[0]
            cts[victim] = cts[victim][:-1] + bytes([cts[victim][-1] ^ 1])
            return [ShareKeys(msg.round_id, msg.device, cts)]
        return [msg]

    sim = run(12, threshold=5, neighbours=8, tamper=tamper, offline={Stage.UNMASK: ["dev02"]})
    assert_correct(sim, set(cohort(12)))
    assert sum("authentication" in p for dev in sim.devices.values() for p in dev.problems) == 1


def test_wrong_length_masked_input_is_dropped() -> None:
    def tamper(to: str, msg: Message) -> list[Message]:
        if isinstance(msg, MaskedInput) and msg.device == "dev07":
            return [MaskedInput(msg.round_id, msg.device, msg.vector[:-1].copy())]
        return [msg]

    sim = run(12, threshold=5, neighbours=8, tamper=tamper)
    assert_correct(sim, set(cohort(12)) - {"dev07"})
    assert "masked vector" in sim.server.dropped["dev07"]


def test_shares_for_unknown_devices_are_refused() -> None:
    def tamper(to: str, msg: Message) -> list[Message]:
        if isinstance(msg, UnmaskShares) and msg.device == "dev03":
            extra = dict(msg.self_mask_shares)
            extra["intruder"] = next(iter(extra.values()))
            return [UnmaskShares(msg.round_id, msg.device, extra, msg.key_shares)]
        return [msg]

    sim = run(12, threshold=5, neighbours=8, tamper=tamper, offline={Stage.MASKED: ["dev08"]})
    assert_correct(sim, set(cohort(12)) - {"dev08"})  # dev03's input stays in the sum
    assert "dev03" in sim.server.offenders


def test_duplicates_replays_and_foreign_rounds() -> None:
    def tamper(to: str, msg: Message) -> list[Message]:
        if isinstance(msg, AdvertiseKeys) and msg.device == "dev01":
            return [msg, msg]  # at-least-once redelivery: ignored
        if isinstance(msg, ShareKeys) and msg.device == "dev02":
            return [msg, ShareKeys("other-round", msg.device, msg.ciphertexts)]
        if isinstance(msg, AdvertiseKeys) and msg.device == "dev05":
            forged = AdvertiseKeys(msg.round_id, msg.device, msg.mask_key, msg.enc_key,
                                   msg.signature)  # fmt: skip
            return [msg, forged]  # conflicting second message: the sender is dropped
        if isinstance(msg, MaskedInput) and msg.device == "dev06":
            return [msg, MaskedInput(msg.round_id, msg.device, msg.vector + np.uint32(1))]
        return [msg]

    sim = run(12, threshold=5, neighbours=8, tamper=tamper)
    # dev06's first input is in the sum, so it stays a survivor and only its later messages go.
    assert_correct(sim, set(cohort(12)) - {"dev05"})
    assert "conflicting" in sim.server.dropped["dev05"]
    assert "dev06" in sim.server.offenders
    assert any("other-round" in r for r in sim.rejected)
    assert "dev01" not in sim.server.dropped


def test_late_message_is_rejected() -> None:
    devices = cohort(8)
    cfg = make_config("r", devices, D, 3, 4)
    ids = identity_keys(devices)
    server = ServerRound(cfg, crypto.deterministic_random(b"s"), roster=roster_of(ids))
    server.start(0.0)
    rounds = {d: DeviceRound(d, cfg, ids[d], roster_of(ids), rng=crypto.deterministic_random(
        d.encode())) for d in devices}  # fmt: skip
    adverts = {d: r.start()[0].message for d, r in rounds.items()}
    for d in devices[1:]:
        server.handle(adverts[d], 1.0)
    assert server.stage == Stage.ADVERTISE
    server.advance(100.0)  # deadline: dev00 is dropped
    assert server.stage.value == "share"
    with pytest.raises(SecAggError, match="left the round"):
        server.handle(adverts["dev00"], 101.0)
    with pytest.raises(SecAggError, match="not in the cohort"):
        server.handle(AdvertiseKeys("r", "stranger", bytes(32), bytes(32), bytes(64)), 101.0)
    with pytest.raises(SecAggError, match="does not accept"):
        server.handle(RoundStatus("r", "done", "", 1), 101.0)


def test_server_drops_a_device_whose_advertisement_is_not_signed_by_it() -> None:
    devices = cohort(8)
    cfg = make_config("r", devices, D, 3, 4)
    ids = identity_keys(devices)
    server = ServerRound(cfg, crypto.deterministic_random(b"s"), roster=roster_of(ids))
    server.start(0.0)
    dev = DeviceRound("dev01", cfg, ids["dev01"], roster_of(ids))
    adv = dev.start()[0].message
    assert isinstance(adv, AdvertiseKeys)
    with pytest.raises(SecAggError, match="not signed"):
        server.handle(AdvertiseKeys("r", "dev02", adv.enc_key, adv.mask_key, adv.signature), 1.0)
    assert "dev02" in server.dropped


def test_neighbour_graph_is_deterministic_regular_and_connected() -> None:
    devices = cohort(30)
    g = neighbour_graph("r1", devices, 6)
    assert g == neighbour_graph("r1", list(reversed(devices)), 6)
    assert g != neighbour_graph("r2", devices, 6)
    assert all(len(nb) == 6 and d not in nb for d, nb in g.items())
    assert all(d in g[nb] for d, nbs in g.items() for nb in nbs)
    assert connected(g, devices)
    with pytest.raises(SecAggError):
        neighbour_graph("r1", devices, 5)


def test_ring_view_matches_the_neighbour_graph() -> None:
    """A device's Ring (positions only) gives the neighbour graph's neighbours and the same
    connectivity as a search over the whole graph, on sparse and complete graphs."""
    rnd = np.random.default_rng(7)
    for n, k in ((3, 2), (5, 2), (8, 4), (12, 6), (30, 6), (40, 10), (25, 24), (9, 40)):
        devices = cohort(n)
        for rid in ("r1", "r2"):
            g, ring = neighbour_graph(rid, devices, k), Ring(rid, devices, k)
            assert all(ring.neighbours(d) == g[d] for d in devices)
            assert not ring.connected([])
            for _ in range(200):
                size = int(rnd.integers(1, n + 1))
                nodes = [devices[i] for i in rnd.choice(n, size, replace=False)]
                assert ring.connected(nodes) == connected(g, nodes), (n, k, sorted(nodes))


def test_server_keeps_no_individual_vector() -> None:
    sim = run(8, threshold=3, neighbours=4)
    arrays = {k: v for k, v in vars(sim.server).items() if isinstance(v, np.ndarray)}
    assert set(arrays) == {"_acc"}  # the running sum is the only vector the server holds
