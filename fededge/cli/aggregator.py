"""``fededge aggregator``: run the aggregator service (systemd Type=notify); ``repair-wal``."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import click

from fededge import systemd
from fededge.cli.common import settings_options
from fededge.errors import ConfigError, LeaseError
from fededge.settings import Settings

if TYPE_CHECKING:
    from fededge.aggregator.lease import Lease

log = logging.getLogger("fededge.aggregator")


@click.group(invoke_without_command=True)
@click.option(
    "--wait-for-model",
    type=float,
    default=None,
    help="Give up after this many seconds without a model (default: wait forever).",
)
@click.option(
    "--standby",
    is_flag=True,
    default=None,
    help="If another instance runs this task (or shard), wait and take over when it is gone "
    "(default: refuse to start).",
)
@click.option("--shards", type=int, default=None, help="Shard workers of a sharded task.")
@click.option("--shard-id", type=int, default=None, help="Run as this shard worker (0-based).")
@click.option(
    "--coordinator", is_flag=True, default=None, help="Run as the sharded task's coordinator."
)
@click.option(
    "--gateway",
    "gateways",
    multiple=True,
    help="A site whose gateway's partial sums the coordinator merges (repeat for each site).",
)
@settings_options
@click.pass_context
def aggregator(
    ctx: click.Context,
    settings: Settings,
    wait_for_model: float | None,
    standby: bool | None,
    shards: int | None,
    shard_id: int | None,
    coordinator: bool | None,
    gateways: tuple[str, ...],
) -> int | None:
    """Run the aggregator service until SIGTERM/SIGINT (or run one of the commands below)."""
    if ctx.invoked_subcommand is not None:
        return None
    cfg = settings.aggregator
    for key, value in (("standby", standby), ("shards", shards), ("shard_id", shard_id),
                       ("coordinator", coordinator)):  # fmt: skip
        if value is not None:
            setattr(cfg, key, value)
    if gateways:
        cfg.gateways = list(gateways)
    if cfg.shard_id is not None and (cfg.coordinator or not cfg.shard_id < cfg.shards):
        raise ConfigError(
            f"aggregator.shard_id={cfg.shard_id}: expected 0 <= shard_id < shards "
            f"(shards={cfg.shards}) and not coordinator"
        )
    if cfg.coordinator and cfg.shards < 1 and not cfg.gateways:
        raise ConfigError(
            "aggregator.coordinator needs aggregator.shards >= 1 or aggregator.gateways"
        )
    from fededge.aggregator.lease import WRITER, Lease, shard_role

    shutdown = systemd.install_signal_handlers()
    dog = systemd.Watchdog()
    # One writer per role: claim the lease before the state is opened or the role's client id
    # connects (that would take the running instance's session over).
    lease = Lease(settings, WRITER if cfg.shard_id is None else shard_role(cfg.shard_id))
    try:
        systemd.status(f"claiming the task's {lease.role} lease")
        lease.acquire(
            standby=cfg.standby,
            tick=dog.tick,
            should_stop=lambda: shutdown.requested,
            on_standby=lambda h: (
                systemd.ready(f"standby: instance {h.instance} on {h.host} is active"),
                systemd.status(f"standby behind instance {h.instance} on {h.host}"),
            ),
        )
        if cfg.shard_id is not None:
            return _run_worker(settings, cfg.shard_id, lease, dog, shutdown)
        return _run_aggregator(settings, wait_for_model, lease, dog, shutdown)
    finally:
        lease.release()
        shutdown.restore()


def _run_worker(
    settings: Settings, shard_id: int, lease: Lease, dog: systemd.Watchdog, shutdown: Any
) -> int:
    from fededge.aggregator.shard import ShardWorker

    worker = ShardWorker(settings, shard_id)
    lease.watch_session(lambda: worker.client)
    worker.fence = lambda: lease.check(dog.tick)

    def tick() -> None:
        dog.tick()
        lease.check(dog.tick)

    try:
        worker.start(tick=tick, should_stop=lambda: shutdown.requested)
        systemd.ready(f"shard worker {shard_id}")
        worker.run(lambda: shutdown.requested, tick=tick)
        return 0
    except systemd.ShutdownRequested:
        return 0
    finally:
        systemd.stopping("shutting down")
        worker.close()


def _run_aggregator(
    settings: Settings,
    wait_for_model: float | None,
    lease: Lease,
    dog: systemd.Watchdog,
    shutdown: Any,
) -> int:
    from fededge.aggregator.service import Aggregator

    agg = Aggregator(settings)
    merger = None
    if settings.aggregator.coordinator:
        from fededge.aggregator.coordinator import Merger

        merger = Merger(agg)
    lease.watch_session(lambda: agg.client)  # start() makes a new client
    agg.fence = lambda: lease.check(dog.tick)

    def tick() -> None:  # the watchdog, and a lost lease ends the service wherever it is
        dog.tick()
        lease.check(dog.tick)

    lost = False
    try:
        systemd.status("starting: restoring state and connecting")
        # READY once the broker answered: waiting for `fededge model init` is a working state,
        # not a start-up that should time out.
        agg.start(
            wait_for_model=wait_for_model,
            tick=tick,
            should_stop=lambda: shutdown.requested,
            on_connected=lambda: systemd.ready("connected; restoring state"),
        )
        if merger is not None:
            merger.ensure_restored()
        systemd.status(f"version {agg.version}, waiting for updates")
        agg.on_new_version(lambda _m, _old, new: systemd.status(f"published version {new}"))
        agg.run(lambda: shutdown.requested, tick=tick)
        log.info("stopping: shutdown requested (signal %s)", shutdown.signum)
        return 0
    except systemd.ShutdownRequested:
        return 0
    except LeaseError:
        lost = True
        raise
    finally:
        systemd.stopping("shutting down")
        agg.close(offline=not lost)


@aggregator.command("repair-wal")
@click.option(
    "--yes",
    is_flag=True,
    help="Truncate each damaged segment at its first bad record (a copy is kept as .bad).",
)
@settings_options
def repair_wal(settings: Settings, yes: bool) -> int:
    """Report damaged write-ahead-log segments of a task; with --yes, cut them at the damage.

    Damaged ``.ids`` files (the pending version's update ids) are reported, never cut. Run it
    with the aggregator stopped (it takes the state directory's lock). Truncating drops
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
        # The .ids files (the pending version's update ids, same record format) are reported,
        # never cut: a checkpoint counts their bytes, and without those ids an update could be
        # counted twice. A torn tail is an append a crash cut, beyond what a checkpoint counts.
        corrupt_ids = 0
        for path in sorted((root / "pending").glob("*.ids")):
            records, damage = scan_segment(path)
            if damage is None:
                click.echo(f"{path}: ok, {len(records)} records of update ids")
            elif damage.torn_tail:
                click.echo(f"{damage.describe()} [torn tail]: an append cut by a crash, never "
                           "counted; the aggregator cuts it itself")  # fmt: skip
            else:
                corrupt_ids += 1
                click.echo(f"{damage.describe()} [CORRUPT]: update ids of the pending version, "
                           "not repairable here (--yes leaves the file alone); restore the state "
                           "directory from a backup, or reset the task (docs/operations.md)")  # fmt: skip
        if damaged and not yes:
            click.echo("run again with --yes to truncate (the records after the damage are lost)")
            return 1
        if not damaged:
            click.echo("no damaged segments")
        return 1 if corrupt_ids else 0
    finally:
        store.close()
