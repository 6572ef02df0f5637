"""``fededge device``: run the device daemon (systemd Type=notify)."""

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
@settings_options
def device(settings: Settings, bundle: Path | None, device_id: str | None) -> int:
    """Run the device daemon until SIGTERM/SIGINT."""
    from fededge.device.daemon import run

    if device_id is not None:
        try:
            settings.device.device_id = device_id
        except pydantic.ValidationError as e:
            raise ConfigError(f"--device-id {device_id!r}: {e.errors()[0]['msg']}") from None
    shutdown = systemd.install_signal_handlers()
    try:
        return run(settings, shutdown, bundle=bundle)
    finally:
        shutdown.restore()


def register(cli: click.Group) -> None:
    """Add the ``device`` command to the ``fededge`` group."""
    cli.add_command(device)
