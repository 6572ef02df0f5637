"""Fleet gauges of the aggregator: devices online, their version lag, updates per device.

What devices already publish feeds it: their retained status (``devices/{device}/status``,
offline by Last Will) and their accepted updates. Per-device state is bounded: at most
``max_devices`` entries of a few fields, the least recently heard-from evicted first (an
online device republishes its status every 30 s, so it stays). The gauges are distributions
(gauge histograms) over the tracked devices, never one series per device: a fleet of 100,000
devices would be 100,000 series per metric in Prometheus. Counts are kept incrementally so an
event is O(1); a scrape is O(distinct versions + distinct update counts).
"""

from __future__ import annotations

import logging
import threading
from collections import Counter as Tally
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeHistogramMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from fededge.aggregator.metrics import observe_counts
from fededge.errors import ProtocolError
from fededge.protocol import DeviceStatus, decode_json

log = logging.getLogger(__name__)
ONLINE = frozenset({"online", "training"})
#: Upper bounds of the version-lag and staleness buckets (versions behind the aggregator).
LAG_BUCKETS = (0, 1, 2, 3, 5, 10, 20, 50, 100)
#: Upper bounds of the updates-per-device buckets (accepted since the aggregator started).
UPDATES_BUCKETS = (0, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)


class _Device:
    """What is kept of one device (a few machine words, slotted)."""

    __slots__ = ("online", "refused", "updates", "version")

    def __init__(self) -> None:
        self.online = False
        self.refused = False
        self.version: int | None = None
        self.updates = 0


def _buckets(tally: dict[int, int], bounds: Iterable[int]) -> list[tuple[str, float]]:
    """Cumulative ``(le, count)`` pairs of a value -> devices tally, ``+Inf`` last."""
    out = [(str(float(b)), float(sum(n for v, n in tally.items() if v <= b))) for b in bounds]
    return [*out, ("+Inf", float(sum(tally.values())))]


def _count(tally: Tally[int], key: int, sign: int) -> None:
    """Add ``sign`` to ``tally[key]``, keeping no zero entries (a scrape walks the tally)."""
    n = tally[key] + sign
    if n:
        tally[key] = n
    else:
        del tally[key]


class FleetTracker(Collector):
    """Bounded per-device state and the fleet metrics computed from it at scrape time.

    Fed by the aggregator core (``on_status`` from status messages, ``on_update`` per accepted
    update) on its thread; collected by the metrics endpoint's thread, hence the lock.
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        current_version: Callable[[], int | None],
        *,
        max_devices: int = 100_000,
    ) -> None:
        if max_devices < 1:
            raise ValueError(f"max_devices must be at least 1, got {max_devices}")
        self.max_devices = max_devices
        self._current = current_version
        self._lock = threading.Lock()
        self._devices: OrderedDict[str, _Device] = OrderedDict()  # least recently heard first
        self._online = 0
        self._refusing = 0
        self._versions: Tally[int] = Tally()  # device version -> online devices on it
        self._updates: Tally[int] = Tally()  # accepted updates -> tracked devices with that many
        self.evicted = Counter(
            "fededge_fleet_devices_evicted",
            "Devices forgotten to keep the fleet table within aggregator.fleet_max_devices",
            registry=registry,
        )
        self.bad_status = Counter(
            "fededge_fleet_status_rejected", "Device status messages that were invalid",
            registry=registry,
        )  # fmt: skip
        self.staleness = Histogram(
            "fededge_update_staleness",
            "Versions between an accepted update's base version and the current version",
            buckets=[*LAG_BUCKETS, float("inf")],
            registry=registry,
        )
        registry.register(self)

    # -- events (the aggregator's thread) ---------------------------------------------------
    def on_status(self, device: str, payload: bytes) -> None:
        """A retained status (or Last Will) of ``device``; an empty payload forgets it."""
        if not payload:
            with self._lock:
                if (d := self._devices.pop(device, None)) is not None:
                    self._remove(d)
            return
        try:
            status = decode_json(payload, DeviceStatus)
            if status.device != device:
                raise ProtocolError(f"status names device {status.device!r}")
        except ProtocolError as e:
            self.bad_status.inc()
            log.debug("invalid status of device %s: %s", device, e)
            return
        with self._lock:
            d = self._touch(device)
            self._remove(d)
            d.online = status.state in ONLINE
            d.refused = status.refused is not None
            d.version = status.version
            self._add(d)
            self._evict()

    def on_update(self, device: str, base_version: int, current_version: int) -> None:
        """An update of ``device`` on ``base_version`` was accepted at ``current_version``."""
        self.staleness.observe(max(0, current_version - base_version))
        with self._lock:
            d = self._touch(device)
            self._remove(d)
            d.updates += 1
            self._add(d)
            self._evict()

    def on_updates(self, updates: list[tuple[str, int]], current_version: int) -> None:
        """``on_update`` for a group of (device, base_version): one lock for the group."""
        lags: dict[int, int] = {}  # staleness -> updates, observed at once (one lock each)
        for _, base_version in updates:
            lag = current_version - base_version
            lag = lag if lag > 0 else 0
            lags[lag] = lags.get(lag, 0) + 1
        observe_counts(self.staleness, lags)
        devices, tally = self._devices, self._updates
        with self._lock:
            for device, _ in updates:
                # _touch, _remove, d.updates += 1, _add: the online and version counts a
                # remove and an add would take back and give again are left alone.
                d = devices.get(device)
                if d is None:
                    d = devices[device] = _Device()  # offline, no updates: counted at 0 only
                    old = 0
                else:
                    devices.move_to_end(device)
                    old = d.updates
                    _count(tally, old, -1)
                d.updates = old + 1
                tally[old + 1] += 1
            self._evict()

    def _touch(self, device: str) -> _Device:
        d = self._devices.get(device)
        if d is None:
            d = self._devices[device] = _Device()
            self._add(d)
        else:
            self._devices.move_to_end(device)
        return d

    def _add(self, d: _Device, sign: int = 1) -> None:
        _count(self._updates, d.updates, sign)
        if d.online:
            self._online += sign
            self._refusing += sign * d.refused
            if d.version is not None:
                _count(self._versions, d.version, sign)

    def _remove(self, d: _Device) -> None:
        self._add(d, -1)

    def _evict(self) -> None:
        while len(self._devices) > self.max_devices:
            _, d = self._devices.popitem(last=False)
            self._remove(d)
            self.evicted.inc()

    # -- scrape (the metrics endpoint's thread) ---------------------------------------------
    @property
    def devices_online(self) -> int:
        return self._online

    def __len__(self) -> int:
        return len(self._devices)

    def collect(self) -> Iterator[GaugeMetricFamily | GaugeHistogramMetricFamily]:
        with self._lock:
            tracked, online, refusing = len(self._devices), self._online, self._refusing
            versions, updates = dict(self._versions), dict(self._updates)
        yield GaugeMetricFamily(
            "fededge_fleet_devices_online",
            "Devices whose retained status says online or training",
            value=online,
        )
        yield GaugeMetricFamily(
            "fededge_fleet_devices_refusing",
            "Online devices that refuse to take part (e.g. below their privacy floor)",
            value=refusing,
        )
        yield GaugeMetricFamily(
            "fededge_fleet_devices_tracked",
            "Devices the aggregator keeps state for (at most aggregator.fleet_max_devices)",
            value=tracked,
        )
        current = self._current()
        lags: Tally[int] = Tally()
        if current is not None:
            for v, n in versions.items():
                lags[max(0, current - v)] += n
        yield GaugeHistogramMetricFamily(
            "fededge_fleet_version_lag",
            "Online devices by versions behind the aggregator's current version",
            buckets=_buckets(lags, LAG_BUCKETS),
            gsum_value=float(sum(lag * n for lag, n in lags.items())),
        )
        yield GaugeMetricFamily(
            "fededge_fleet_version_lag_max",
            "Versions behind of the online device furthest behind",
            value=max(lags, default=0),
        )
        yield GaugeHistogramMetricFamily(
            "fededge_fleet_updates_per_device",
            "Tracked devices by updates accepted from them since the aggregator started",
            buckets=_buckets(updates, UPDATES_BUCKETS),
            gsum_value=float(sum(k * n for k, n in updates.items())),
        )

    def describe(self) -> Iterator[GaugeMetricFamily]:
        return iter(())  # collected only when scraped (registering must not call collect)
