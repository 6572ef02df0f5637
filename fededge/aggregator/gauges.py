"""Gauges read from the aggregator core's state when scraped: rounds, version time, budget.

Computed at scrape time rather than set on every change, so the code that changes a round's
stage or the plan does not have to remember the metrics.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from fededge.protocol.topics import CHECKIN
from fededge.secagg.graph import Stage

if TYPE_CHECKING:
    from fededge.aggregator.core import AggregatorCore

#: Every value of ``fededge_secure_round_stage{stage}``: ``checkin`` between rounds, then the
#: SecAgg+ stages in order.
STAGES = (CHECKIN, *(s.value for s in Stage))


class CoreGauges(Collector):
    """Scrape-time metrics of one :class:`AggregatorCore` (registered by it)."""

    def __init__(self, registry: CollectorRegistry, core: AggregatorCore) -> None:
        self._core = core
        registry.register(self)

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        rounds = self._core.rounds
        stage = rounds.stage if rounds is not None else None
        family = GaugeMetricFamily(
            "fededge_secure_round_stage",
            "1 for the stage the secure-aggregation round is in (all 0 without secure rounds)",
            labels=["stage"],
        )
        for s in STAGES:
            family.add_metric([s], 1.0 if s == stage else 0.0)
        yield family
        yield GaugeMetricFamily(
            "fededge_secure_round_checked_in",
            "Devices checked in for the next secure-aggregation round",
            value=rounds.checked_in if rounds is not None and stage is not None else 0,
        )
        yield CounterMetricFamily(
            "fededge_secure_rounds_done", "Secure-aggregation rounds completed",
            value=rounds.rounds_done if rounds is not None else 0,
        )  # fmt: skip
        yield CounterMetricFamily(
            "fededge_secure_rounds_aborted", "Secure-aggregation rounds aborted",
            value=rounds.rounds_aborted if rounds is not None else 0,
        )  # fmt: skip
        model = self._core.state.model
        yield GaugeMetricFamily(
            "fededge_model_version_timestamp_seconds",
            "When the current model version was published (0 before the first)",
            value=model.time if model is not None else 0.0,
        )
        budget = self._core.state.plan.max_epsilon
        yield GaugeMetricFamily(
            "fededge_privacy_max_epsilon",
            "The plan's privacy budget at its delta (0: no budget)",
            value=budget if budget is not None else 0.0,
        )

    def describe(self) -> Iterator[GaugeMetricFamily]:
        return iter(())  # collected only when scraped
