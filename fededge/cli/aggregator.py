"""``fededge aggregator``: run the aggregator service (systemd Type=notify); ``repair-wal``."""

from __future__ import annotations

import logging

import click

from fededge import systemd
from fededge.cli.common import settings_options
from fededge.errors import ConfigError
from fededge.settings import Settings

log = logging.getLogger("fededge.aggregator")


@click.group(invoke_without_command=True)
@click.option(
    "--wait-for-model",
    type=float,
    default=None,
    help="Give up after this many seconds without a model (default: wait forever).",
)
@settings_options
@click.pass_context
def aggregator(ctx: click.Context, settings: Settings, wait_for_model: float | None) -> int | None:
    """Run the aggregator service until SIGTERM/SIGINT (or run one of the commands below)."""
    if ctx.invoked_subcommand is not None:
        return None
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


@aggregator.command("repair-wal")
@click.option(
    "--yes",
    is_flag=True,
    help="Truncate each damaged segment at its first bad record (a copy is kept as .bad).",
)
@settings_options
def repair_wal(settings: Settings, yes: bool) -> int:
    """Report damaged write-ahead-log segments of a task; with --yes, cut them at the damage.

    Run it with the aggregator stopped (it takes the state directory's lock). Truncating drops
    every record from the bad one on: updates that were acknowledged and will not count.
    """
    from fededge.aggregator.store import Store, task_root
    from fededge.aggregator.wal import scan_segment, truncate_at_damage

    root = task_root(settings.state_dir, settings.task)
    if not (root / "pending").is_dir():
        raise ConfigError(f"no aggregator state for task {settings.task!r} under {root}")
    store = Store(root, fsync=True)
    try:
        damaged = 0
        for path in sorted((root / "pending").glob("*.wal")):
            records, damage = scan_segment(path)
            if damage is None:
                click.echo(f"{path}: ok, {len(records)} records")
                continue
            damaged += 1
            kind = "torn tail" if damage.torn_tail else "CORRUPT"
            click.echo(f"{damage.describe()} [{kind}]; {len(records)} good records before it")
            if yes:
                truncate_at_damage(path)
                lost = damage.size - damage.offset
                click.echo(
                    f"{path}: truncated at byte {damage.offset} ({lost} bytes, "
                    f"{damage.records_after} records after the bad one dropped); "
                    f"copy kept as {path.name}.bad"
                )
        if damaged and not yes:
            click.echo("run again with --yes to truncate (the records after the damage are lost)")
            return 1
        if not damaged:
            click.echo("no damaged segments")
        return 0
    finally:
        store.close()
