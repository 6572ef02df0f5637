"""Prometheus metrics of one device client, in a registry of its own (several run in-process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server


class DeviceMetrics:
    """Counters and gauges a Client updates; the daemon serves them over HTTP."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.updates_sent = Counter(
            "fededge_device_updates_sent", "Updates produced and stored in the outbox", registry=r
        )
        self.publishes = Counter(
            "fededge_device_update_publishes", "Update publications, resends included", registry=r
        )
        self.receipts = Counter(
            "fededge_device_receipts", "Receipts received, by status", ["status"], registry=r
        )
        self.dropped = Counter(
            "fededge_device_updates_dropped", "Updates given up, by reason", ["reason"], registry=r
        )
        self.outbox = Gauge("fededge_device_outbox_depth", "Updates awaiting a receipt", registry=r)
        self.train_seconds = Counter(
            "fededge_device_train_seconds", "Seconds spent in local training", registry=r
        )
        self.train_runs = Counter("fededge_device_train_runs", "Local training runs", registry=r)
        self.examples_added = Counter(
            "fededge_device_examples_added", "Examples handed in by apps", registry=r
        )
        self.examples = Gauge("fededge_device_examples", "Examples in the store", registry=r)
        self.fresh = Gauge(
            "fededge_device_fresh_examples", "Examples no training run used yet", registry=r
        )
        self.predictions = Counter("fededge_device_predictions", "Examples predicted", registry=r)
        self.version = Gauge("fededge_device_model_version", "Model version in use", registry=r)
        self.bad_messages = Counter(
            "fededge_device_messages_rejected", "Malformed messages from the broker", registry=r
        )
        self.refused = Counter(
            "fededge_device_messages_refused",
            "Plans, graphs, models and receipts refused by the trust rules or the privacy "
            "floor, by kind and reason",
            ["kind", "reason"],
            registry=r,
        )
        self.api_requests = Counter(
            "fededge_device_api_requests", "Local API requests", ["path", "code"], registry=r
        )

    def serve(self, host: str, port: int) -> int:
        """Start the HTTP endpoint; return the bound port (``port=0`` picks a free one)."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return int(server.server_port)
