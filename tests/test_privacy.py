"""Differential privacy: DP-FedAvg vocabulary, accounting with dp-accounting, the budget."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import dp_accounting
import numpy as np
import pytest
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant
from scipy.stats import norm
from test_aggregator_core import WEIGHTS, Harness

from fededge.aggregator.core import AggregatorCore
from fededge.aggregator.effects import Publish
from fededge.aggregator.metrics import AggregatorMetrics
from fededge.aggregator.policy import check_secure_sum
from fededge.aggregator.privacy import (
    Ledger,
    accounted_multiplier,
    adapt_clip,
    bit_noise_stddev,
    epsilon_of,
)
from fededge.aggregator.privacy import secure_noise_stddev as agg_secure_noise_stddev
from fededge.aggregator.store import Store, task_root
from fededge.device.training import reported_examples, secure_noise_stddev, update_noise_stddev
from fededge.device.trust import privacy_refusal
from fededge.errors import SecAggError
from fededge.protocol import AggregatorStatus, Plan, Receipt, VersionMetrics, decode_json
from fededge.protocol.messages import SecureAggregation
from fededge.secagg.quantize import (
    FixedPoint,
    add_mod,
    dp_scale,
    max_scale,
    noise_headroom,
    skellam_noise,
)
from fededge.settings import PrivacySettings


def _exact_gaussian_delta(eps: float, z: float, t: int) -> float:
    """Balle & Wang 2018: delta(eps) of T composed Gaussians = one with multiplier z/sqrt(T)."""
    s = z / math.sqrt(t)
    return float(
        norm.cdf(-eps * s + 1 / (2 * s)) - math.exp(eps) * norm.cdf(-eps * s - 1 / (2 * s))
    )


@pytest.mark.parametrize(("z", "t"), [(1.0, 10), (2.0, 100), (5.0, 1000), (0.8, 1)])
def test_epsilon_is_dp_accountings_rdp_figure_and_sound(z: float, t: int) -> None:
    delta = 1e-5
    ours = epsilon_of(((z, t),), delta)
    rdp = rdp_privacy_accountant.RdpAccountant()
    rdp.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(z), t))
    assert ours == pytest.approx(rdp.get_epsilon(delta), rel=1e-12)
    # Sound: never below the exact epsilon of the composed Gaussian (Balle & Wang), which the
    # PLD accountant reproduces closely.
    pld = pld_privacy_accountant.PLDAccountant()
    pld.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(z), t))
    exact_delta_at_ours = _exact_gaussian_delta(ours, z, t)
    assert exact_delta_at_ours <= delta * 1.0001
    assert pld.get_epsilon(delta) <= ours * 1.0001


def test_known_figures() -> None:
    # dp-accounting 0.6.0's RDP figures, q = 1 (as charged here) and Poisson q = 0.01.
    assert epsilon_of(((1.0, 10),), 1e-5) == pytest.approx(19.0536, abs=1e-3)
    rdp = rdp_privacy_accountant.RdpAccountant()
    rdp.compose(
        dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(0.01, dp_accounting.GaussianDpEvent(1.1)), 10000
        )
    )
    assert rdp.get_epsilon(1e-5) == pytest.approx(5.632, abs=1e-3)
    # A run (z, n) is the same as n single versions, and more versions cost more.
    assert epsilon_of(((2.0, 3),), 1e-5) == pytest.approx(
        epsilon_of(((2.0, 1), (2.0, 1), (2.0, 1)), 1e-5)
    )
    assert epsilon_of(((2.0, 4),), 1e-5) > epsilon_of(((2.0, 3),), 1e-5)
    assert epsilon_of(((0.0, 1), (2.0, 3)), 1e-5) == math.inf


def test_plan_vocabulary_and_old_plans() -> None:
    old = Plan(clip_norm=2.0, noise_stddev=1.0)
    assert old.noise_sigma == 1.0 and old.effective_noise_multiplier == 0.5 and old.dp
    new = Plan(clip_norm=2.0, noise_multiplier=1.5)
    assert new.noise_sigma == 3.0 and new.effective_noise_multiplier == 1.5
    assert not Plan().dp
    # New fields at their defaults are not in the JSON: old plans keep their bytes.
    assert b"noise_multiplier" not in Plan().to_bytes() and b"delta" not in Plan().to_bytes()
    raw = Plan(noise_multiplier=1.0, max_epsilon=8.0, delta=1e-6).to_bytes()
    assert decode_json(raw, Plan) == Plan(noise_multiplier=1.0, max_epsilon=8.0, delta=1e-6)


def test_device_floor_uses_the_noise_multiplier() -> None:
    floor = PrivacySettings(min_noise_multiplier=1.0)
    assert privacy_refusal(Plan(clip_norm=2.0, noise_multiplier=1.0), floor) is None
    assert privacy_refusal(Plan(clip_norm=2.0, noise_stddev=2.0), floor) is None  # old units
    why = privacy_refusal(Plan(clip_norm=2.0, noise_multiplier=0.9), floor)
    assert why is not None and "0.9" in why


def test_device_noise_and_disclosed_counts() -> None:
    plain = Plan(clip_norm=0.5, noise_multiplier=2.0)
    assert update_noise_stddev(plain) == 1.0
    sa = SecureAggregation(cohort_size=10, min_cohort=9, threshold=8)
    secure = Plan(clip_norm=0.5, noise_multiplier=2.0, secure_aggregation=sa)
    # Secure rounds: no float noise; each device adds integer noise sigma / sqrt(t) after
    # quantisation, so the sum of t survivors carries sigma.
    assert update_noise_stddev(secure) == 0.0
    assert secure_noise_stddev(secure) * math.sqrt(8) == pytest.approx(1.0)
    assert secure_noise_stddev(secure) == agg_secure_noise_stddev(secure)
    assert secure_noise_stddev(plain) == 0.0
    assert reported_examples(37, plain) == 64 and reported_examples(37, Plan()) == 37


def test_adaptive_clipping_cost_and_step() -> None:
    z = 1.0
    plan = Plan(noise_multiplier=z, target_unclipped_quantile=0.5)
    zb = 2 * bit_noise_stddev(z)
    assert accounted_multiplier(plan) == pytest.approx((z**-2 + zb**-2) ** -0.5)
    assert accounted_multiplier(plan) < z  # the bit costs privacy
    assert accounted_multiplier(Plan(noise_multiplier=z, max_updates_per_device=2)) == 0.0
    assert adapt_clip(1.0, 1.0, 0.5) < 1.0 < adapt_clip(1.0, 0.0, 0.5)


def test_ledger_roundtrip_and_corruption() -> None:
    led = Ledger()
    for z in (1.0, 1.0, 2.0):
        led.charge(z)
    assert led.events == [[1.0, 2], [2.0, 1]] and led.versions == 3
    assert Ledger.from_bytes(led.to_bytes()).events == led.events
    assert Ledger.from_bytes(None).events == []
    with pytest.raises(ValueError, match="corrupt"):
        Ledger.from_bytes(b'{"events": [[1.0, -1]]}')


def _metrics_of(effects: Sequence[object]) -> list[VersionMetrics]:
    return [
        decode_json(e.payload, VersionMetrics)
        for e in effects
        if isinstance(e, Publish) and "metrics" in e.topic and e.payload
    ]


def _status(effects: Sequence[object]) -> AggregatorStatus:
    last = [e for e in effects if isinstance(e, Publish) and e.topic.endswith("status")][-1]
    assert isinstance(last, Publish)
    return decode_json(last.payload, AggregatorStatus)


def test_versions_carry_epsilon_and_the_budget_stops_the_task(tmp_path: Path) -> None:
    z, delta = 2.0, 1e-5
    budget = (epsilon_of(((z, 2),), delta) + epsilon_of(((z, 3),), delta)) / 2  # allows 2
    plan = Plan(min_updates_per_version=1, noise_multiplier=z, max_epsilon=budget)
    h = Harness(tmp_path, plan)
    seen: list[VersionMetrics] = []
    for i in range(2):
        out = h.send(f"u{i}", base=i)
        seen += _metrics_of(out)
        assert _status(out).epsilon == pytest.approx(epsilon_of(((z, i + 1),), delta))
    assert [m.epsilon for m in seen] == pytest.approx(
        [epsilon_of(((z, 1),), delta), epsilon_of(((z, 2),), delta)]
    )
    assert all(m.delta == delta for m in seen)
    # The third version would exceed the budget: accepted, but no version is published.
    out = h.send("u2", base=2)
    assert not _metrics_of(out)
    st = _status(out)
    assert st.version == 2 and st.stopped is not None and "privacy budget" in st.stopped
    assert st.max_epsilon == budget and st.epsilon == pytest.approx(epsilon_of(((z, 2),), delta))
    assert h.metrics.registry.get_sample_value("fededge_privacy_stopped") == 1
    assert h.metrics.registry.get_sample_value("fededge_privacy_epsilon") == pytest.approx(
        st.epsilon
    )
    # A restart remembers what was spent and why it stopped.
    h.store.close()
    store = Store(task_root(tmp_path, "t1"), fsync=False)
    core = AggregatorCore(h.settings, store, AggregatorMetrics())
    core.state.restore(2000.0)
    assert core.state.ledger.versions == 2 and core.state.ledger.stopped == st.stopped
    store.close()


def test_no_budget_claim_without_noise_or_user_level(tmp_path: Path) -> None:
    h = Harness(tmp_path, Plan(min_updates_per_version=1, max_epsilon=5.0))
    out = h.send("u0")
    assert not _metrics_of(out)
    assert "no noise" in (_status(out).stopped or "")
    plain = Harness(tmp_path / "b", Plan(min_updates_per_version=1))
    out = plain.send("u0")
    (m,) = _metrics_of(out)
    assert m.epsilon is None and _status(out).epsilon is None


def test_status_shows_epsilon_spent_and_left() -> None:
    from fededge.cli.fleet import _privacy_json
    from fededge.cli.render import describe_aggregator

    a = AggregatorStatus(task="t1", state="online", version=3, epsilon=2.5, delta=1e-5,
                         max_epsilon=4.0)  # fmt: skip
    text = describe_aggregator(a)
    assert "epsilon=2.5/4 left=1.5 at delta=1e-05" in text
    assert _privacy_json(a) == {"epsilon": 2.5, "delta": 1e-5, "max_epsilon": 4.0,
                                "epsilon_left": 1.5, "stopped": None}  # fmt: skip
    stopped = a.model_copy(update={"stopped": "privacy budget: ..."})
    assert "STOPPED: privacy budget" in describe_aggregator(stopped)
    assert _privacy_json(AggregatorStatus(task="t1", state="online")) is None
    # Old status bytes are unchanged: no privacy fields without DP.
    assert b"epsilon" not in AggregatorStatus(task="t1", state="online").to_bytes()


def test_distributed_noise_under_secure_aggregation() -> None:
    """n devices encode clipped deltas with their integer noise share; the modular sum decodes
    to the sum of deltas plus noise of standard deviation sigma * sqrt(n / t) - at least sigma
    whenever t or more survive - and passes the aggregator's check of honest sums."""
    n, t, d, clip, sigma = 20, 11, 4000, 1.0, 2.0
    rng = np.random.default_rng(7)
    share = sigma / math.sqrt(t)
    scale = dp_scale(n, clip, 32, share)
    assert scale <= max_scale(n, max(clip, 1.0) + noise_headroom(n, share), 32)
    fp = FixedPoint(32, clip, scale, 1000.0)
    acc = np.zeros(d + 1, dtype=np.uint32)
    total = np.zeros(d)
    for i in range(n):
        delta = rng.normal(0, 1, d)
        delta *= clip / np.linalg.norm(delta)
        total += delta
        add_mod(acc, fp.encode(delta, 1000.0, 1000 + i, noise_stddev=share, rng=rng), 32)
    sum_wd, sum_w = fp.decode(acc)
    assert sum_w == pytest.approx(n * 1000.0, rel=1e-6)  # uniform weights: w~ = 1 each
    noise = sum_wd / 1000.0 - total
    assert np.std(noise) == pytest.approx(sigma * math.sqrt(n / t), rel=0.05)
    assert abs(np.mean(noise)) < 0.1
    check_secure_sum(sum_wd, sum_w, survivors=n, clip=clip, max_weight=1000.0, scale=scale,
                     noise=share)  # fmt: skip
    with pytest.raises(SecAggError):  # without the noise allowance the sum looks too large
        check_secure_sum(sum_wd, sum_w, survivors=n, clip=clip, max_weight=1000.0, scale=scale)
    # The aggregator charges the plan's z for the worst case of t survivors.
    sa = SecureAggregation(cohort_size=n, min_cohort=t + 1, threshold=t)
    plan = Plan(clip_norm=clip, noise_multiplier=sigma / clip, secure_aggregation=sa)
    assert accounted_multiplier(plan) == sigma / clip
    assert secure_noise_stddev(plan) == pytest.approx(share)


def test_skellam_noise_has_its_variance() -> None:
    rng = np.random.default_rng(3)
    for std in (3.0, 65536.0, 1e7):  # Skellam, Skellam, rounded Gaussian (beyond 1e12 mu)
        x = skellam_noise(std, 100_000, rng).astype(np.float64)
        assert np.std(x) == pytest.approx(std, rel=0.02) and abs(np.mean(x)) < 0.02 * std


def test_demo_dp_epsilon_sizes_the_noise_for_the_budget() -> None:
    from fededge.demo import DemoConfig, demo_epsilon, demo_plan

    cfg = DemoConfig(versions=20, dp_epsilon=5.38)
    plan = demo_plan(cfg)
    assert plan.max_epsilon == 5.38 and plan.noise_multiplier == pytest.approx(4.0, rel=0.01)
    eps = [demo_epsilon(plan, v) for v in range(21)]
    assert eps[0] is None and all(e is not None for e in eps[1:])
    assert eps[20] is not None and eps[20] <= 5.38 and eps[19] is not None and eps[19] < eps[20]
    assert demo_epsilon(demo_plan(DemoConfig()), 3) is None
    assert b"noise_multiplier" not in demo_plan(DemoConfig()).to_bytes()


def test_noised_updates_of_a_noise_multiplier_plan_are_accepted(tmp_path: Path) -> None:
    z, clip = 3.0, 0.5
    h = Harness(tmp_path, Plan(min_updates_per_version=2, clip_norm=clip, noise_multiplier=z))
    rng = np.random.default_rng(0)
    noised = {k: rng.normal(0, z * clip, v.shape).astype(np.float32) for k, v in WEIGHTS.items()}
    out = h.send("u0", delta=noised)
    receipts = [decode_json(e.payload, Receipt) for e in out if isinstance(e, Publish)
                and "receipt" in e.topic]  # fmt: skip
    assert [r.status for r in receipts] == ["accepted"]


def test_a_dp_device_sends_no_raw_metrics(tmp_path: Path) -> None:
    """The device core (real LiteRT training): a DP plan's update carries no losses or
    accuracies; a plan without noise keeps them."""
    from test_device_core import PLAN, add_examples, ready_core

    from fededge.device.effects import Publish as DevicePublish
    from fededge.device.training import local_update
    from fededge.protocol import Update

    for name, plan, dp in (("dp", PLAN.model_copy(update={"noise_multiplier": 1.0}), True),
                           ("plain", PLAN, False)):  # fmt: skip
        d = tmp_path / name
        d.mkdir()
        core = ready_core(d, plan)
        add_examples(core, 8)
        job = core.next_job()
        assert job is not None
        lu = local_update(job.current.runtime, job.current.weights, job.batch.x, job.batch.y,
                          epochs=1, batch_size=8, learning_rate=0.1, clip_norm=plan.clip_norm,
                          noise_stddev=update_noise_stddev(plan), rng=np.random.default_rng(0),
                          evaluate_first=True)  # fmt: skip
        effects, _ = core.trained(job, lu, 0.01, now=100.0, connected=True)
        (pub,) = [e for e in effects if isinstance(e, DevicePublish) and "updates" in e.topic]
        u = Update.from_bytes(pub.payload, max_bytes=1 << 24)
        if dp:
            assert u.train_loss is None and u.eval_loss is None and u.eval_accuracy is None
        else:
            assert u.train_loss is not None and u.eval_accuracy is not None
