"""Adaptive clipping (fededge/protocol/clipping.py): the noised bit, the clip update, the wire
fields, the aggregator's averaging and publication, and the bit inside a secure round's sum."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_aggregator_core import WEIGHTS, Harness, receipts
from test_protocol import _hex, vectors

from fededge.aggregator.core import AggregatorCore
from fededge.aggregator.effects import Publish
from fededge.aggregator.metrics import AggregatorMetrics
from fededge.aggregator.policy import check_secure_sum, norm_bound
from fededge.aggregator.privacy import accounted_multiplier
from fededge.aggregator.store import Store, task_root
from fededge.device.training import secure_noise_stddev, update_noise_stddev
from fededge.protocol import ModelVersion, Plan, Update, VersionMetrics, decode_json
from fededge.protocol.clipping import (
    BIT_NOISE_SHARE,
    CLIP_LEARNING_RATE,
    MAX_CLIP,
    MIN_CLIP,
    adapt_clip,
    bit_entry_scale,
    bit_noise_stddev,
    clip_in_force,
    max_abs_bit,
    next_clip,
    noised_bit,
    round_clip,
    stale_clip,
    unclipped_fraction,
    with_bit_entry,
)
from fededge.protocol.messages import SecureAggregation
from fededge.protocol.vocab import NO_GRAPH
from fededge.secagg.quantize import FixedPoint, add_mod, dp_scale

ADAPTIVE = Plan(min_updates_per_version=4, clip_norm=1.0, target_unclipped_quantile=0.5)


# -- the bit and the clip update against numpy ---------------------------------------------------
def ref_clip(c: float, b: float, gamma: float) -> float:
    """Andrew et al. 2021, Algorithm 1 (geometric update), in numpy."""
    new = c * np.exp(-CLIP_LEARNING_RATE * (np.clip(b, 0.0, 1.0) - gamma))
    return float(np.clip(new, MIN_CLIP, MAX_CLIP))


@pytest.mark.parametrize("z", [0.0, 0.3, 1.0, 4.0])
def test_noised_bit_is_the_centred_bit_plus_gaussian_noise(z: float) -> None:
    plan = ADAPTIVE.model_copy(update={"noise_multiplier": z})
    sigma_b = z / (2 * math.sqrt(BIT_NOISE_SHARE))
    assert bit_noise_stddev(z) == pytest.approx(sigma_b)
    for unclipped in (True, False):
        got = [noised_bit(plan, unclipped, np.random.default_rng(s)) for s in range(50)]
        ref = [(0.5 if unclipped else -0.5) + (np.random.default_rng(s).normal(0, sigma_b)
               if z else 0.0) for s in range(50)]  # fmt: skip
        assert got == ref
    rng = np.random.default_rng(1)
    xs = np.array([noised_bit(plan, True, rng) for _ in range(20_000)])
    assert abs(xs.mean() - 0.5) < 0.05 * max(sigma_b, 0.1)
    assert xs.std() == pytest.approx(sigma_b, rel=0.03, abs=1e-12)
    assert np.all(np.abs(xs) <= max_abs_bit(plan))
    assert noised_bit(Plan(noise_multiplier=z), True, rng) is None  # not adaptive: no bit


@pytest.mark.parametrize("gamma", [0.1, 0.5, 0.9])
def test_clip_update_matches_numpy(gamma: float) -> None:
    rng = np.random.default_rng(0)
    for c, b in zip(rng.lognormal(0, 3, 200), rng.normal(0.5, 0.8, 200), strict=True):
        assert adapt_clip(float(c), float(b), gamma) == pytest.approx(ref_clip(c, b, gamma))
    plan = ADAPTIVE.model_copy(update={"target_unclipped_quantile": gamma})
    assert next_clip(plan, 2.0, None) == 2.0  # no bits: the clip stays
    assert next_clip(Plan(), 2.0, 0.3) is None  # not adaptive: nothing published
    # The sum of centred releases gives the fraction; all clipped moves C up by exp(eta gamma).
    assert unclipped_fraction(-2.0, 4) == 0.0 and unclipped_fraction(1.0, 4) == 0.75
    assert next_clip(plan, 1.0, 0.0) == pytest.approx(math.exp(CLIP_LEARNING_RATE * gamma))
    # A version moves C by at most exp(eta): the bound for an update s versions stale.
    assert stale_clip(plan, 1.0, 3) == pytest.approx(math.exp(3 * CLIP_LEARNING_RATE))


def test_clip_in_force_noise_and_accounting() -> None:
    plan = ADAPTIVE.model_copy(update={"noise_multiplier": 2.0, "clip_norm": 0.5})
    mv = ModelVersion(task="t", version=3, weights=WEIGHTS, graph_sha256=NO_GRAPH, clip=0.8)
    assert clip_in_force(plan, mv) == 0.8
    assert clip_in_force(plan, None) == 0.5
    assert clip_in_force(Plan(clip_norm=0.5), mv) == 0.5  # a plan without adaptive clipping
    assert update_noise_stddev(plan, 0.8) == pytest.approx(1.6)  # sigma = z * C in force
    assert update_noise_stddev(plan) == 1.0
    # Old absolute noise_stddev plans: z = noise_stddev / clip_norm, scaled with the clip.
    old = ADAPTIVE.model_copy(update={"noise_stddev": 0.1, "clip_norm": 0.5})
    assert update_noise_stddev(old, 1.0) == pytest.approx(0.2)
    assert norm_bound(plan, 100, 0.8) == pytest.approx(0.8 * (1 + 1e-5) + 1.6 * 20)
    # The round's vector with its bit entry has sensitivity C sqrt(1.1) at noise z C: the
    # accountant's z / sqrt(1.1).
    assert round_clip(plan, 0.8) == pytest.approx(0.8 * math.sqrt(1.1))
    assert math.hypot(0.8, bit_entry_scale(0.8) / 2) == pytest.approx(round_clip(plan, 0.8))
    assert accounted_multiplier(plan) == pytest.approx(2.0 / math.sqrt(1.1))


# -- wire ----------------------------------------------------------------------------------------
def test_vectors_and_old_bytes() -> None:
    u = Update(task="t", device="d", update_id="u1", base_version=0, num_examples=1,
               delta={"w": np.array([0.5], np.float32)}, unclipped=-0.375)  # fmt: skip
    assert u.to_bytes() == _hex(vectors()["update-unclipped"])
    assert Update.from_bytes(u.to_bytes(), max_bytes=1 << 20).unclipped == -0.375
    mv = ModelVersion(task="t", version=1, weights={"w": np.array([1.0], np.float32)},
                      graph_sha256=NO_GRAPH, parent=0, clip=1.25)  # fmt: skip
    assert mv.to_bytes() == _hex(vectors()["model-clip"])
    assert ModelVersion.from_bytes(mv.to_bytes(), max_bytes=1 << 20).clip == 1.25
    # Without adaptive clipping nothing changes on the wire.
    assert b"clip" not in ModelVersion(task="t", version=1, weights=WEIGHTS,
                                       graph_sha256=NO_GRAPH).to_bytes()  # fmt: skip
    assert b"unclipped" not in Update(task="t", device="d", update_id="u", base_version=0,
                                      num_examples=1, delta=WEIGHTS).to_bytes()  # fmt: skip
    assert b"target_unclipped_quantile" not in Plan().to_bytes()


# -- the aggregator ------------------------------------------------------------------------------
def _published(out: list[Any]) -> tuple[ModelVersion, VersionMetrics]:
    (model,) = [e for e in out if isinstance(e, Publish) and e.topic.endswith("/model")]
    (vm,) = [e for e in out if isinstance(e, Publish) and "metrics" in e.topic and e.payload]
    return (ModelVersion.from_bytes(model.payload, max_bytes=1 << 20),
            decode_json(vm.payload, VersionMetrics))  # fmt: skip


def _delta(norm: float) -> dict[str, np.ndarray]:
    d = {k: np.ones_like(v) for k, v in WEIGHTS.items()}
    s = norm / math.sqrt(sum(v.size for v in d.values()))
    return {k: (v * s).astype(np.float32) for k, v in d.items()}


def test_aggregator_averages_the_bits_and_publishes_the_clip(tmp_path: Path) -> None:
    h = Harness(tmp_path, ADAPTIVE)
    bits = [-0.5, 0.25, -0.375, 0.5]
    out: list[Any] = []
    for i, b in enumerate(bits):
        out = h.send(f"u{i}", device=f"d{i}", delta=_delta(0.5), unclipped=b)
    mv, vm = _published(out)
    frac = 0.5 + sum(bits) / len(bits)
    assert vm.unclipped == frac and mv.clip == vm.clip == ref_clip(1.0, frac, 0.5)
    c1 = mv.clip
    assert c1 is not None and c1 > 1.0
    # Version 2: checked against C1, not the plan's clip_norm; moved again from C1.
    ok = h.send("v0", device="d0", base=1, delta=_delta(c1 * 0.999), unclipped=-0.5)
    assert [r.status for r in receipts(ok)] == ["accepted"]
    big = h.send("v1", device="d1", base=1, delta=_delta(c1 * 1.01), unclipped=-0.5)
    assert [(r.status, r.reason) for r in receipts(big)] == [("rejected", "norm_too_large")]
    for i in (1, 2, 3):
        out = h.send(f"w{i}", device=f"d{i}", base=1, delta=_delta(0.1), unclipped=0.5)
    mv2, vm2 = _published(out)
    assert vm2.unclipped == 0.75 and mv2.clip == ref_clip(c1, 0.75, 0.5) < c1
    # A restart reads the clip from the stored version.
    h.store.close()
    store = Store(task_root(tmp_path, "t1"), fsync=False)
    core = AggregatorCore(h.settings, store, AggregatorMetrics())
    core.state.restore(5000.0)
    assert core.state.model is not None and core.state.model.clip == mv2.clip
    store.close()


@pytest.mark.parametrize(
    ("kw", "detail"),
    [
        ({}, "must carry 'unclipped'"),
        ({"unclipped": 0.51}, "outside"),
        ({"unclipped": -7.0}, "outside"),
    ],
)
def test_missing_or_impossible_bits_are_rejected(
    tmp_path: Path, kw: dict[str, Any], detail: str
) -> None:
    h = Harness(tmp_path, ADAPTIVE)  # z = 0: an honest bit is exactly +-1/2
    (r,) = receipts(h.send("u0", **kw))
    assert (r.status, r.reason) == ("rejected", "bad_metrics") and detail in (r.detail or "")
    assert h.metric("fededge_updates_rejected_total", reason="bad_metrics") == 1
    noisy = Harness(tmp_path / "z", ADAPTIVE.model_copy(update={"noise_multiplier": 1.0}))
    (r,) = receipts(noisy.send("u0", unclipped=-7.0, delta=_delta(0.1)))  # within 20 sigma_b
    assert r.status == "accepted"


def test_plans_without_adaptive_clipping_ignore_a_bit(tmp_path: Path) -> None:
    h = Harness(tmp_path, Plan(min_updates_per_version=1))
    mv, vm = _published(h.send("u0", unclipped=0.5))
    assert mv.clip is None and vm.clip is None and vm.unclipped is None


# -- secure aggregation: the bit is one more masked entry ----------------------------------------
def test_bit_entry_in_the_masked_sum_gives_the_fraction() -> None:
    """n devices encode [delta, k (b - 1/2)] with their Skellam share; the decoded last entry
    gives the unclipped fraction with noise sigma_b / n (t survivors' worth), the rest the sum
    of deltas, and the sum passes the aggregator's check at the round's clip."""
    n, t, d, clip, z = 30, 16, 500, 0.7, 1.0
    sa = SecureAggregation(cohort_size=n, min_cohort=t + 1, threshold=t)
    plan = ADAPTIVE.model_copy(update={"noise_multiplier": z, "clip_norm": clip,
                                       "secure_aggregation": sa})  # fmt: skip
    share = secure_noise_stddev(plan, clip)
    rc = round_clip(plan, clip)
    scale = dp_scale(n, rc, 32, share)
    fp = FixedPoint(32, rc, scale, 1000.0)
    rng = np.random.default_rng(5)
    fractions, totals = [], []
    for trial in range(40):
        acc = np.zeros(d + 2, dtype=np.uint32)
        flags = rng.random(n) < 0.3
        total = np.zeros(d)
        for i in range(n):
            delta = rng.normal(0, 1, d).astype(np.float32)
            delta *= np.float32(clip / np.linalg.norm(delta) * 0.999)
            total += delta
            vec = with_bit_entry(delta, clip, bool(flags[i]))
            add_mod(acc, fp.encode(vec, 1000.0, trial * 100 + i, noise_stddev=share, rng=rng), 32)
        sum_wd, sum_w = fp.decode(acc)
        check_secure_sum(sum_wd, sum_w, survivors=n, clip=rc, max_weight=1000.0, scale=scale,
                         noise=share)  # fmt: skip
        centred = sum_wd[-1] / bit_entry_scale(clip)
        fractions.append(unclipped_fraction(centred, sum_w) - flags.mean())
        totals.append(np.std(sum_wd[:-1] / 1000.0 - total))
    # Each sum carries noise z C sqrt(n/t) per entry: in bit units sigma_b sqrt(n/t), / n.
    want = bit_noise_stddev(z) * math.sqrt(n / t) / n
    assert np.std(fractions) == pytest.approx(want, rel=0.3)
    assert abs(np.mean(fractions)) < 3 * want / math.sqrt(len(fractions))
    assert np.mean(totals) == pytest.approx(z * clip * math.sqrt(n / t), rel=0.05)


def test_watch_and_status_show_the_clip() -> None:
    from fededge.cli.render import describe_metrics, describe_model, describe_plan

    mv = ModelVersion(task="t", version=2, weights=WEIGHTS, graph_sha256=NO_GRAPH, clip=0.75)
    assert describe_model(mv, mv.to_bytes()).endswith("clip=0.75")
    vm = VersionMetrics(task="t", version=2, updates=3, examples=9, unclipped=0.25, clip=0.75)
    assert "unclipped=0.25 clip=0.75" in describe_metrics(vm)
    assert "clip_quantile=0.5" in describe_plan(ADAPTIVE)
    plain = VersionMetrics(task="t", version=2, updates=3, examples=9)
    assert "clip" not in describe_metrics(plain) and b"clip" not in plain.to_bytes()


def test_demo_sizes_the_noise_for_the_charged_multiplier() -> None:
    from fededge.demo import DemoConfig, demo_epsilon, demo_plan

    plan = demo_plan(DemoConfig(versions=20, dp_epsilon=5.38, target_unclipped_quantile=0.5))
    assert plan.target_unclipped_quantile == 0.5
    # z / sqrt(1.1) is charged: z is sqrt(1.1) times the plain plan's (4.0 for this budget).
    assert plan.noise_multiplier == pytest.approx(4.0 * math.sqrt(1.1), rel=0.01)
    eps = demo_epsilon(plan, 20)
    assert eps is not None and eps <= 5.38
