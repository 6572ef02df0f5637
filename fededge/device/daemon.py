"""The device daemon: a Client, its local API and metrics, supervised by systemd."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from fededge import systemd
from fededge.device.api import ApiServer
from fededge.device.bundle import Bundle
from fededge.device.client import Client
from fededge.device.textfile import TextfileWriter
from fededge.errors import ConfigError
from fededge.settings import Settings

log = logging.getLogger(__name__)


def socket_path(settings: Settings) -> Path:
    """Where the local API listens: ``device.socket_path``, else ``state_dir/api.sock``."""
    return settings.device.socket_path or Path(settings.state_dir) / "api.sock"


def _summary(client: Client) -> str:
    st = client.status()
    return (
        f"version {st['version']}, {'connected' if st['connected'] else 'offline'}, "
        f"{st['fresh']}/{st['examples_per_update']} fresh examples, outbox {st['outbox']}, "
        f"{st['updates_sent']} updates sent"
    )


def _serve_metrics(client: Client, host: str, port: int) -> int:
    try:
        return client.metrics.serve(host, port)
    except OSError as e:
        raise ConfigError(
            f"device.metrics_port={port} (--metrics-port, FEDEDGE_DEVICE__METRICS_PORT): cannot "
            f"listen on {host}: {e.strerror}; give each device on a host its own port, or set "
            "device.metrics=false"
        ) from None


def _textfile(settings: Settings, client: Client) -> TextfileWriter | None:
    path = settings.device.metrics_textfile
    if path is None:
        return None
    try:
        return TextfileWriter(
            path, client.metrics.registry, settings.device.metrics_textfile_interval
        )
    except ValueError as e:
        raise ConfigError(f"device.metrics_textfile={str(path)!r}: {e}") from None


def run(
    settings: Settings, shutdown: systemd.Shutdown, *, bundle: Bundle | Path | None = None
) -> int:
    """Run until ``shutdown`` is requested; return the exit code.

    The watchdog is pinged from this loop only while the client's threads and the API
    threads are alive and the client's io loop keeps turning, so a wedged daemon is restarted.
    """
    cfg = settings.device
    dog = systemd.Watchdog()
    systemd.status("starting: opening state and connecting")
    client = Client(settings, bundle=bundle)
    api: ApiServer | None = None
    textfile: TextfileWriter | None = None
    try:
        textfile = _textfile(settings, client)
        if cfg.metrics:  # before connecting: a port in use is a configuration error, said now
            port = _serve_metrics(client, cfg.metrics_host, cfg.metrics_port)
            log.info("metrics on http://%s:%d/metrics", cfg.metrics_host, port)
        client.start(retry=True)
        api = ApiServer(
            client,
            socket_path(settings),
            mode=cfg.socket_mode,
            group=cfg.socket_group,
            max_request_bytes=cfg.max_request_bytes,
        )
        api.start()
        line = _summary(client)
        systemd.ready(line)
        log.info("device %s ready: %s", cfg.device_id, line)
        unhealthy_logged = False
        while not shutdown.requested:
            if client.healthy() and api.alive:
                dog.tick()
                unhealthy_logged = False
            elif not unhealthy_logged:
                log.error("a device thread died or hangs: no more watchdog pings")
                unhealthy_logged = True
            if (new := _summary(client)) != line:
                line = new
                systemd.status(line)
            if textfile is not None:
                textfile.maybe_write(time.monotonic())
            shutdown.wait(dog.poll_timeout(1.0))
        log.info("stopping: shutdown requested (signal %s)", shutdown.signum)
        return 0
    except systemd.ShutdownRequested:
        return 0
    finally:
        systemd.stopping("shutting down")
        if api is not None:
            api.close()
        client.close()
        if textfile is not None:
            textfile.write()  # the final counts, after the client stopped
