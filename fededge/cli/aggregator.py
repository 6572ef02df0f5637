"""``fededge aggregator``: run the aggregator service (systemd Type=notify)."""

from __future__ import annotations

import logging

import click

from fededge import systemd
from fededge.cli.common import settings_options
from fededge.settings import Settings

log = logging.getLogger("fededge.aggregator")


@click.command()
@click.option(
    "--wait-for-model",
    type=float,
    default=None,
    help="Give up after this many seconds without a model (default: wait forever).",
)
@settings_options
def aggregator(settings: Settings, wait_for_model: float | None) -> int:
    """Run the aggregator service until SIGTERM/SIGINT."""
    from fededge.aggregator.service import Aggregator

    shutdown = systemd.install_signal_handlers()
    dog = systemd.Watchdog()
    agg = Aggregator(settings)
    try:
        systemd.status("starting: restoring state and connecting")
        # READY once the broker answered: waiting for `fededge model init` is a working state,
        # not a start-up that should time out.
        agg.start(
            wait_for_model=wait_for_model,
            tick=dog.tick,
            should_stop=lambda: shutdown.requested,
            on_connected=lambda: systemd.ready("connected; restoring state"),
        )
        systemd.status(f"version {agg.version}, waiting for updates")
        agg.on_new_version(lambda _m, _old, new: systemd.status(f"published version {new}"))
        agg.run(lambda: shutdown.requested, tick=dog.tick)
        log.info("stopping: shutdown requested (signal %s)", shutdown.signum)
        return 0
    except systemd.ShutdownRequested:
        return 0
    finally:
        systemd.stopping("shutting down")
        agg.close()
        shutdown.restore()
