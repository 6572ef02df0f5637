"""``fededge gateway``: run a site gateway (systemd Type=notify) on the site broker."""

from __future__ import annotations

import logging
from pathlib import Path

import click
import pydantic

from fededge import systemd
from fededge.cli.common import settings_options
from fededge.errors import ConfigError
from fededge.settings import Settings

log = logging.getLogger("fededge.gateway")


@click.command()
@click.option(
    "--site",
    help="Name of the site (letters, digits, '-', '_'); upstream the gateway is gateway-{site}.",
)
@click.option(
    "--signing-key",
    type=click.Path(path_type=Path),
    help="Ed25519 private key (PEM, 0600) that signs the receipts the gateway sends devices.",
)
@click.option(
    "--standby",
    is_flag=True,
    default=None,
    help="If another gateway of this site runs, wait and take over when it is gone "
    "(default: refuse to start).",
)
@settings_options
def gateway(
    settings: Settings, site: str | None, signing_key: Path | None, standby: bool | None
) -> int:
    """Serve one site's devices on the site broker (--broker) and send their partial sums to
    the central aggregator through the broker bridge (docs/operations.md, "Site gateways")."""
    if site is None and settings.gateway.site is None:
        raise ConfigError("gateway.site is not set: pass --site NAME (or set it in [gateway])")
    try:
        if site is not None:
            settings.gateway.site = site
        if signing_key is not None:
            settings.gateway.signing_key = signing_key
    except pydantic.ValidationError as e:
        raise ConfigError("; ".join(str(err["msg"]) for err in e.errors())) from None
    from fededge.aggregator.lease import Lease
    from fededge.gateway.service import Gateway

    shutdown = systemd.install_signal_handlers()
    dog = systemd.Watchdog()
    # One gateway per site: the lease lives on the site broker (the bridge does not carry it).
    lease = Lease(settings, f"gateway-{settings.gateway.site}")
    try:
        systemd.status("claiming the site's gateway lease")
        lease.acquire(
            standby=bool(standby),
            tick=dog.tick,
            should_stop=lambda: shutdown.requested,
            on_standby=lambda h: (
                systemd.ready(f"standby: instance {h.instance} on {h.host} is active"),
                systemd.status(f"standby behind instance {h.instance} on {h.host}"),
            ),
        )
        gw = Gateway(settings)
        lease.watch_session(lambda: gw.client)

        def tick() -> None:
            dog.tick()
            lease.check(dog.tick)

        try:
            gw.start(tick=tick, should_stop=lambda: shutdown.requested)
            systemd.ready(f"gateway of site {settings.gateway.site}")
            gw.run(lambda: shutdown.requested, tick=tick)
            log.info("stopping: shutdown requested (signal %s)", shutdown.signum)
            return 0
        except systemd.ShutdownRequested:
            return 0
        finally:
            systemd.stopping("shutting down")
            gw.close()
    finally:
        lease.release()
        shutdown.restore()
