"""Prometheus metrics of the aggregator, in a registry of its own (several may run in-process)."""

from __future__ import annotations

from collections.abc import Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from fededge.protocol.vocab import RejectReason


class AggregatorMetrics:
    """Counters and gauges the aggregator updates; served over HTTP if a port is configured."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.accepted = Counter(
            "fededge_updates_accepted", "Updates folded into a version", registry=r
        )
        self.duplicates = Counter(
            "fededge_updates_duplicate", "Redelivered updates answered again", registry=r
        )
        self.rejected = Counter(
            "fededge_updates_rejected", "Updates rejected, by reason", ["reason"], registry=r
        )
        for reason in RejectReason:  # every reason exported from the start, at 0
            self.rejected.labels(reason.value)
        self.bytes_in = Counter("fededge_update_bytes", "Bytes of update payloads", registry=r)
        self.versions = Counter(
            "fededge_versions_published", "Model versions published", registry=r
        )
        self.kernel_seconds = Counter(
            "fededge_kernel_seconds", "Seconds spent in validation and fold kernels", registry=r
        )
        self.commit_seconds = Counter(
            "fededge_wal_commit_seconds", "Seconds spent in WAL group commits", registry=r
        )
        self.commit_duration = Histogram(
            "fededge_wal_commit_duration_seconds",
            "Seconds per WAL group commit (validated updates to durable; receipts follow)",
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0),
            registry=r,
        )
        self.bad_control = Counter(
            "fededge_control_messages_rejected", "Bad model/plan/graph messages", registry=r
        )
        self.untrusted = Counter(
            "fededge_control_messages_untrusted",
            "Plan/graph/model messages refused by the trust rules, by kind and reason",
            ["kind", "reason"],
            registry=r,
        )
        self.qos0 = Counter(
            "fededge_updates_qos0_refused", "Updates published with QoS 0, dropped", registry=r
        )
        self.internal_errors = Counter(
            "fededge_internal_errors", "Messages dropped by an internal error (a bug)", registry=r
        )
        self.zeroed = Counter(
            "fededge_updates_zeroed",
            "Updates dropped from robust aggregation by plan robust_zeroing",
            registry=r,
        )
        self.version = Gauge("fededge_model_version", "Current model version", registry=r)
        self.started = Gauge(
            "fededge_aggregator_start_time_seconds", "When this aggregator process started",
            registry=r,
        )  # fmt: skip
        self.started.set_to_current_time()  # changes() of it counts restarts (a crash loop)
        self.pending = Gauge(
            "fededge_pending_updates", "Updates in the pending version", registry=r
        )
        self.pending_examples = Gauge(
            "fededge_pending_examples", "Examples in the pending version", registry=r
        )
        self.epsilon = Gauge(
            "fededge_privacy_epsilon", "Epsilon spent at the plan's delta (docs/privacy.md)",
            registry=r,
        )  # fmt: skip
        self.privacy_stopped = Gauge(
            "fededge_privacy_stopped", "1 when the privacy budget stops new versions", registry=r
        )

    def serve(self, host: str, port: int) -> int:
        """Start the HTTP endpoint; return the bound port (``port=0`` picks a free one)."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return int(server.server_port)


def observe_counts(histogram: Histogram, counts: Mapping[int, int]) -> None:
    """``histogram.observe(value)`` ``n`` times for each ``value: n``, with one update of its
    sum and one of each bucket hit (prometheus_client has no batched observe).

    For integer observations of an unlabelled histogram: their sum is exact in floating point
    (below 2**53), so the exported sum, buckets and count are exactly those of the single
    observations, in any order. Reaches into the Histogram's fields (``_sum``, ``_buckets``,
    ``_upper_bounds``, as in prometheus_client 0.20 to 0.26); where they are not as expected,
    observes one at a time (tests/test_fleet.py compares both with single observations).
    """
    sum_value = getattr(histogram, "_sum", None)
    buckets = getattr(histogram, "_buckets", None)
    bounds = getattr(histogram, "_upper_bounds", None)
    if (
        sum_value is None
        or type(buckets) is not list
        or type(bounds) is not list
        or len(buckets) != len(bounds)
    ):
        for value, n in counts.items():
            for _ in range(n):
                histogram.observe(value)
        return
    total = 0
    for value, n in counts.items():
        total += value * n
        for i, bound in enumerate(bounds):  # Histogram.observe's bucket: the first bound >= it
            if value <= bound:
                buckets[i].inc(n)
                break
    sum_value.inc(total)
