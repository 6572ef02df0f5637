"""``fededge device``: run the device daemon (systemd Type=notify).

Imports only what a device needs: no rich, no other command's module, no aggregator.
"""

from __future__ import annotations

from pathlib import Path

import click
import pydantic

from fededge import systemd
from fededge.cli.common import settings_options
from fededge.errors import ConfigError
from fededge.settings import Settings


@click.command()
@click.option(
    "--bundle",
    type=click.Path(path_type=Path, file_okay=False),
    help="Model bundle to start from (default: the graph the task publishes).",
)
@click.option("--device-id", help="Device id (default: device.device_id, the host name).")
@click.option(
    "--metrics-port",
    type=int,
    help="Port of the Prometheus endpoint (device.metrics_port, default 9465; 0 picks a free "
    "one): give each device on one host its own.",
)
@settings_options
def device(
    settings: Settings, bundle: Path | None, device_id: str | None, metrics_port: int | None
) -> int:
    """Run the device daemon until SIGTERM/SIGINT."""
    from fededge.device.daemon import run

    for name, value in (("device_id", device_id), ("metrics_port", metrics_port)):
        if value is None:
            continue
        try:
            setattr(settings.device, name, value)
        except pydantic.ValidationError as e:
            option = "--" + name.replace("_", "-")
            raise ConfigError(f"{option} {value!r}: {e.errors()[0]['msg']}") from None
    shutdown = systemd.install_signal_handlers()
    try:
        return run(settings, shutdown, bundle=bundle)
    finally:
        shutdown.restore()
