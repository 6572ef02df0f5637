"""Fleet gauges of the aggregator (fededge/aggregator/fleet.py): bounded, no label per device."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from aggtools import make_settings, running_aggregator
from devtools import mlp_bundle, new_task, publish_task
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from test_aggregator_core import Harness
from test_device_daemon import Daemon

from fededge.aggregator.fleet import FleetTracker
from fededge.protocol import DeviceStatus, Plan
from fededge.testing import wait_until


def _status(device: str, state: str = "online", version: int | None = 3, **kw: object) -> bytes:
    return DeviceStatus(device=device, state=state, version=version, **kw).to_bytes()


class Tracked:
    """A tracker on its own registry, with a current version the test sets."""

    def __init__(self, max_devices: int = 1000) -> None:
        self.registry = CollectorRegistry()
        self.version: int | None = 5
        self.fleet = FleetTracker(self.registry, lambda: self.version, max_devices=max_devices)

    def sample(self, name: str, **labels: str) -> float:
        value = self.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value

    def lag_buckets(self) -> dict[str, float]:
        return {
            le: self.sample("fededge_fleet_version_lag_bucket", le=le)
            for le in ("0.0", "1.0", "2.0", "5.0", "+Inf")
        }


def test_online_and_version_lag_from_statuses() -> None:
    t = Tracked()
    t.fleet.on_status("a", _status("a", version=5))
    t.fleet.on_status("b", _status("b", version=4))
    t.fleet.on_status("c", _status("c", "training", version=1))
    t.fleet.on_status("d", _status("d", "offline", version=None))  # a Last Will
    t.fleet.on_status("e", _status("e", version=None))  # online, no model yet: not in the lag
    assert t.sample("fededge_fleet_devices_online") == 4
    assert t.sample("fededge_fleet_devices_tracked") == 5
    assert t.lag_buckets() == {"0.0": 1, "1.0": 2, "2.0": 2, "5.0": 3, "+Inf": 3}
    assert t.sample("fededge_fleet_version_lag_gcount") == 3
    assert t.sample("fededge_fleet_version_lag_gsum") == 0 + 1 + 4
    assert t.sample("fededge_fleet_version_lag_max") == 4
    # A new version moves every device one further behind, without any event.
    t.version = 6
    assert t.lag_buckets() == {"0.0": 0, "1.0": 1, "2.0": 2, "5.0": 3, "+Inf": 3}
    # c goes offline (its will), a moves to v6; a cleared retained status forgets b.
    t.fleet.on_status("c", _status("c", "offline", version=1))
    t.fleet.on_status("a", _status("a", version=6))
    t.fleet.on_status("b", b"")
    assert t.sample("fededge_fleet_devices_online") == 2
    assert t.sample("fededge_fleet_devices_tracked") == 4
    assert t.lag_buckets() == {"0.0": 1, "1.0": 1, "2.0": 1, "5.0": 1, "+Inf": 1}
    assert t.sample("fededge_fleet_version_lag_max") == 0


def test_refusing_devices_and_bad_statuses() -> None:
    t = Tracked()
    t.fleet.on_status("a", _status("a", refused="privacy_floor: too little noise"))
    assert t.sample("fededge_fleet_devices_refusing") == 1
    t.fleet.on_status("a", _status("a"))
    assert t.sample("fededge_fleet_devices_refusing") == 0
    for bad in (b"{", b'{"v":1,"kind":"device_status"}', b"[1]", _status("someone-else"),
                b'{"v":9}', b"x" * 100_000):  # fmt: skip
        t.fleet.on_status("a", bad)
    assert t.sample("fededge_fleet_status_rejected_total") == 6
    assert t.sample("fededge_fleet_devices_online") == 1  # the last valid status stands


def test_updates_per_device_and_staleness() -> None:
    t = Tracked()
    for device, n in (("a", 1), ("b", 3), ("c", 12)):
        for _ in range(n):
            t.fleet.on_update(device, base_version=4, current_version=5)
    t.fleet.on_status("d", _status("d"))  # known, no update yet
    buckets = {
        le: t.sample("fededge_fleet_updates_per_device_bucket", le=le)
        for le in ("0.0", "1.0", "2.0", "5.0", "10.0", "20.0", "+Inf")
    }
    assert buckets == {"0.0": 1, "1.0": 2, "2.0": 2, "5.0": 3, "10.0": 3, "20.0": 4, "+Inf": 4}
    assert t.sample("fededge_fleet_updates_per_device_gsum") == 16
    assert t.sample("fededge_update_staleness_count") == 16
    assert t.sample("fededge_update_staleness_bucket", le="0.0") == 0
    assert t.sample("fededge_update_staleness_bucket", le="1.0") == 16


def test_memory_is_bounded_least_recently_heard_evicted() -> None:
    t = Tracked(max_devices=3)
    for d in ("a", "b", "c"):
        t.fleet.on_status(d, _status(d, version=5))
    t.fleet.on_update("a", 5, 5)  # a is heard from again: b is now the oldest
    t.fleet.on_status("x", _status("x", version=2))
    assert len(t.fleet) == 3
    assert t.sample("fededge_fleet_devices_evicted_total") == 1
    assert t.sample("fededge_fleet_devices_online") == 3  # a, c, x: b was forgotten
    assert t.lag_buckets()["0.0"] == 2 and t.lag_buckets()["+Inf"] == 3
    for i in range(10_000):  # a churning fleet never grows the table
        t.fleet.on_update(f"dev{i}", 5, 5)
    assert len(t.fleet) == 3
    assert t.sample("fededge_fleet_devices_online") == 0
    assert t.sample("fededge_fleet_updates_per_device_gcount") == 3


def test_exposition_has_no_series_per_device() -> None:
    t = Tracked()
    for i in range(500):
        t.fleet.on_status(f"dev{i}", _status(f"dev{i}", version=i % 7))
        t.fleet.on_update(f"dev{i}", 4, 5)
    families = list(text_string_to_metric_families(generate_latest(t.registry).decode()))
    series = sum(len(f.samples) for f in families)
    assert series < 60, series  # bounded by the buckets, not by the 500 devices
    assert not any("dev" in str(s.labels) for f in families for s in f.samples)


def test_core_feeds_the_tracker(tmp_path: Path) -> None:
    h = Harness(tmp_path, Plan(min_updates_per_version=2))
    h.control(h.topics.device_status("dev1"), _status("dev1", version=0))
    h.control(h.topics.device_status("dev2"), _status("dev2", version=0))
    h.send("u1", device="dev1")
    h.send("u2", device="dev2")  # completes version 1: both devices are now 1 behind
    assert h.metric("fededge_model_version") == 1
    assert h.metric("fededge_fleet_devices_online") == 2
    assert h.metric("fededge_fleet_version_lag_bucket", le="0.0") == 0
    assert h.metric("fededge_fleet_version_lag_bucket", le="1.0") == 2
    assert h.metric("fededge_fleet_updates_per_device_bucket", le="1.0") == 2
    assert h.metric("fededge_wal_commit_duration_seconds_count") == 2
    # A hostile status is counted by the tracker, never a rejected control message.
    h.control(h.topics.device_status("dev1"), b"not json")
    assert h.metric("fededge_fleet_status_rejected_total") == 1
    assert h.metric("fededge_control_messages_rejected_total") == 0
    # Every rejection reason is exported from the start (rate() needs the series at 0).
    assert (
        h.metrics.registry.get_sample_value("fededge_updates_rejected_total", {"reason": "stale"})
        == 0
    )


@pytest.mark.broker
def test_aggregator_counts_real_devices_online(broker, tmp_path, aggregator, device) -> None:
    """Real device clients' retained statuses and clean stops move the aggregator's gauges."""
    task = new_task()
    publish_task(make_settings(broker.url, tmp_path / "owner", task=task))
    agg = aggregator(task)
    reg = agg.metrics.registry

    def online() -> float:
        return reg.get_sample_value("fededge_fleet_devices_online") or 0.0

    d1 = device(task, "d1", bundle=mlp_bundle())
    d2 = device(task, "d2", bundle=mlp_bundle())
    wait_until(lambda: online() == 2, 20, "two devices online")

    def up_to_date() -> float:
        return reg.get_sample_value("fededge_fleet_version_lag_bucket", {"le": "0.0"}) or 0.0

    # A status can name no version yet (the model is still being adopted), or the version
    # before one the aggregator has just published: the promise is that both devices get to
    # lag 0 once they have adopted the current model, not that their first status says so.
    wait_until(lambda: up_to_date() == 2, 20, "both devices on the current version")
    d1.close()  # a clean stop publishes the offline status, as the will would
    wait_until(lambda: online() == 1, 20, "one device online")
    assert reg.get_sample_value("fededge_fleet_devices_tracked") == 2
    d2.close()
    wait_until(lambda: online() == 0, 20, "no device online")
    assert reg.get_sample_value("fededge_fleet_version_lag_gcount") == 0


class _Round:
    """What the core reads of the secure-round driver (``core.RoundView``)."""

    round_id: str | None = "r3"
    stage: str | None = "share"
    checked_in = 7
    rounds_done = 2
    rounds_aborted = 1


def test_secure_round_stage_and_privacy_budget_gauges(tmp_path: Path) -> None:
    h = Harness(tmp_path, Plan(min_updates_per_version=2))
    stages = ("checkin", "advertise", "share", "masked", "consistency", "unmask", "done", "aborted")
    assert [h.metric("fededge_secure_round_stage", stage=s) for s in stages] == [0] * 8
    assert h.metric("fededge_secure_round_checked_in") == 0
    assert h.metric("fededge_privacy_max_epsilon") == 0  # no budget
    h.core.rounds = _Round()
    assert {s for s in stages if h.metric("fededge_secure_round_stage", stage=s)} == {"share"}
    assert h.metric("fededge_secure_round_checked_in") == 7
    assert h.metric("fededge_secure_rounds_done_total") == 2
    assert h.metric("fededge_secure_rounds_aborted_total") == 1
    h.control(h.topics.plan, Plan(min_updates_per_version=2, max_epsilon=8.0).to_bytes())
    assert h.metric("fededge_privacy_max_epsilon") == 8.0


@pytest.mark.broker
def test_killed_device_process_goes_offline_by_its_last_will(broker, tmp_path) -> None:
    """kill -9 of a `fededge device` process: the broker publishes its will, the gauge drops."""
    task = new_task()
    s = make_settings(broker.url, tmp_path / "agg", task=task)
    publish_task(s)
    with running_aggregator(s) as agg:
        reg = agg.metrics.registry

        def online() -> float:
            return reg.get_sample_value("fededge_fleet_devices_online") or 0.0

        d = Daemon(broker.url, task, tmp_path / "dev", "k1").start()
        try:
            wait_until(lambda: online() == 1, 30, "the device online")
            d.kill()
            wait_until(lambda: online() == 0, 30, "the device offline by its will")
            assert reg.get_sample_value("fededge_fleet_devices_tracked") == 1
        finally:
            d.cleanup()


def _on_updates_by_parts(fleet: FleetTracker, updates: list[tuple[str, int]], current: int) -> None:
    """on_updates as it was written first: each device touched, removed and added again."""
    for _, base in updates:
        fleet.staleness.observe(max(0, current - base))
    for device, _ in updates:
        d = fleet._touch(device)
        fleet._remove(d)
        d.updates += 1
        fleet._add(d)
    fleet._evict()


@pytest.mark.parametrize("max_devices", [3, 4, 100])
def test_on_updates_leaves_what_remove_and_add_did(max_devices: int) -> None:
    # The group form (the core's, once per commit) skips the online counts an update leaves
    # unchanged: the state must be what removing and adding each device made of it.
    ref, group = Tracked(max_devices), Tracked(max_devices)
    events = [("a", 5), ("b", 4), ("a", 5), ("c", 3), ("d", 5), ("e", 5), ("b", 5), ("a", 2)]
    for t in (ref, group):
        t.fleet.on_status("a", _status("a", version=5))
        t.fleet.on_status("b", _status("b", "training", version=4, refused="floor"))
        t.fleet.on_status("c", _status("c", "offline"))
    for part in (events[:3], events[3:]):
        _on_updates_by_parts(ref.fleet, part, 5)
        group.fleet.on_updates(part, 5)
    for name in ("_online", "_refusing", "_versions", "_updates"):
        assert getattr(group.fleet, name) == getattr(ref.fleet, name), name

    def devices(t: Tracked) -> list[tuple[str, bool, bool, int | None, int]]:
        return [(k, d.online, d.refused, d.version, d.updates) for k, d in t.fleet._devices.items()]

    assert devices(group) == devices(ref)

    def samples(t: Tracked) -> list[bytes]:  # the *_created timestamps differ: left out
        return [x for x in generate_latest(t.registry).splitlines() if b"_created" not in x]

    assert samples(group) == samples(ref)


@pytest.mark.parametrize("fields", ["as they are", "unexpected"])
def test_observe_counts_exports_what_single_observations_do(fields: str) -> None:
    # FleetTracker.on_updates observes a group's staleness once per distinct value: the sum,
    # buckets and count exported are exactly those of one observe() per update.
    from collections import Counter as Tally

    from prometheus_client import Histogram

    from fededge.aggregator.fleet import LAG_BUCKETS
    from fededge.aggregator.metrics import observe_counts

    rng = np.random.default_rng(4)
    groups = [[0] * 100, [0, 1, 1, 2, 3, 4, 5, 6, 9, 10, 11, 100, 101, 10**6],
              [int(x) for x in rng.integers(0, 200, 500)], [], [7]]  # fmt: skip
    one, many = CollectorRegistry(), CollectorRegistry()
    hists = [Histogram("h", "x", buckets=[*LAG_BUCKETS, float("inf")], registry=r)
             for r in (one, many)]  # fmt: skip
    if fields == "unexpected":  # another prometheus_client: observe() one at a time
        hists[1]._buckets = tuple(hists[1]._buckets)  # type: ignore[assignment]
    for group in groups:
        for lag in group:
            hists[0].observe(lag)
        observe_counts(hists[1], Tally(group))

    def samples(r: CollectorRegistry) -> list[bytes]:
        return [x for x in generate_latest(r).splitlines() if b"_created" not in x]

    assert samples(many) == samples(one)
    assert many.get_sample_value("h_count") == sum(map(len, groups))
