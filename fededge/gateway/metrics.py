"""Prometheus metrics of a site gateway, in a registry of its own."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from fededge.protocol.vocab import RejectReason

ANSWERS = ("merged", "duplicate", "conflict", "refused")


class GatewayMetrics:
    """What a gateway counts; ``out_age`` and the batch sizes are read when scraped."""

    def __init__(self, out_age: Callable[[], float], open_updates: Callable[[], float],
                 out_updates: Callable[[], float]) -> None:  # fmt: skip
        self.registry = CollectorRegistry()
        r = self.registry
        self.accepted = Counter(
            "fededge_gateway_updates_accepted", "Site updates logged and receipted", registry=r
        )
        self.duplicates = Counter(
            "fededge_gateway_updates_duplicate", "Redelivered site updates answered again",
            registry=r,
        )  # fmt: skip
        self.rejected = Counter(
            "fededge_gateway_updates_rejected", "Site updates rejected, by reason", ["reason"],
            registry=r,
        )  # fmt: skip
        for reason in RejectReason:
            self.rejected.labels(reason.value)
        self.bad_control = Counter(
            "fededge_gateway_control_messages_rejected",
            "Plan, model or answer messages refused (undecodable or untrusted)",
            registry=r,
        )
        self.sent = Counter(
            "fededge_gateway_partials_sent", "Partial sums published upstream (resends too)",
            registry=r,
        )  # fmt: skip
        self.answers = Counter(
            "fededge_gateway_partials_answered", "Central answers to partial sums, by status",
            ["status"], registry=r,
        )  # fmt: skip
        for status in ANSWERS:
            self.answers.labels(status)
        self.version = Gauge("fededge_gateway_model_version", "Newest version seen", registry=r)
        g = Gauge(
            "fededge_gateway_out_batch_age_seconds",
            "Seconds the batch that is out has waited for the central answer (0: none out); "
            "grows while the uplink is down",
            registry=r,
        )
        g.set_function(out_age)
        Gauge("fededge_gateway_open_batch_updates", "Updates in the open batch",
              registry=r).set_function(open_updates)  # fmt: skip
        Gauge("fededge_gateway_out_batch_updates", "Updates in the batch that is out",
              registry=r).set_function(out_updates)  # fmt: skip

    def serve(self, host: str, port: int) -> int:
        """Start the HTTP endpoint; return the bound port (``port=0`` picks a free one)."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return int(server.server_port)
