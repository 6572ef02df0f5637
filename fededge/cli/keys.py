"""``fededge keys``: make and show the Ed25519 keys of the model owner, aggregator and devices."""

from __future__ import annotations

import uuid
from pathlib import Path

import click
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fededge import keys
from fededge.cli.common import settings_options
from fededge.errors import ConfigError, FededgeError
from fededge.protocol.roster import Roster, open_roster
from fededge.protocol.topics import Topics
from fededge.protocol.vocab import check_name
from fededge.settings import Settings


@click.group("keys")
def keys_group() -> None:
    """Ed25519 signing keys (model owner, aggregator, device identities)."""


@keys_group.command("generate")
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Private key file to create (PEM, mode 0600); never overwritten.",
)
# The spelling of the issue that asked for this command; -o/--output is the CLI's convention.
@click.option("--out", "out_alias", type=click.Path(dir_okay=False, path_type=Path), hidden=True)
def generate(output: Path | None, out_alias: Path | None) -> None:
    """Make a new key pair: writes the private key, prints the public key (ed25519:...)."""
    path = output or out_alias
    if path is None or (output and out_alias):
        raise click.UsageError("give the key file once, with -o/--output FILE")
    key = keys.generate(path)
    click.echo(keys.public_text(key.public_key()))


@keys_group.command("public")
@click.argument("private_key", type=click.Path(dir_okay=False, path_type=Path))
def public(private_key: Path) -> None:
    """Print the public key (ed25519:...) of PRIVATE_KEY (a device's identity.key, too)."""
    click.echo(keys.public_text(keys.load_private(private_key).public_key()))


@keys_group.command("enroll")
@click.option(
    "--sign-key",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="The model owner's private key: signs the roster.",
)
@click.option(
    "--add",
    "add",
    nargs=2,
    multiple=True,
    metavar="DEVICE PUBLIC_KEY",
    help="Enroll DEVICE with its identity key (ed25519:... text or a file); repeatable.",
)
@click.option("--remove", multiple=True, metavar="DEVICE", help="Remove DEVICE; repeatable.")
@click.option("--list", "show", is_flag=True, help="Print the roster after the change.")
@click.option(
    "--wait",
    type=click.FloatRange(0.1, 600),
    default=3.0,
    show_default=True,
    help="Longest wait for the broker's retained messages, s.",
)
@settings_options
def enroll(
    settings: Settings,
    sign_key: Path,
    add: tuple[tuple[str, str], ...],
    remove: tuple[str, ...],
    show: bool,
    wait: float,
) -> None:
    """Add or remove devices in the task's signed roster of identity keys (secure aggregation).

    Reads the retained roster, verifies it with the owner key, applies the changes, bumps the
    serial, signs and publishes it retained on {prefix}/{task}/roster.
    """
    owner = keys.load_private(sign_key, "--sign-key")
    current = read_roster(settings, owner.public_key(), wait=wait)
    changed = current
    for name, key_text in add:
        key = keys.load_public(key_text, f"--add {name}")
        check_name(name, "device")
        changed = changed.with_device(name, keys.public_text(key))
    for name in remove:
        if name not in changed.devices:
            raise ConfigError(f"--remove {name}: not in the roster of task {settings.task!r}")
        changed = changed.without_device(name)
    if changed != current:  # one serial step per invocation, however many changes
        changed = Roster(changed.task, current.serial + 1, changed.devices)
    if changed == current:
        click.echo(f"roster of task {settings.task!r} unchanged (serial {current.serial})")
    else:
        publish_roster(settings, changed, owner)
        click.echo(
            f"published roster of task {settings.task!r}: serial {changed.serial}, "
            f"{len(changed.devices)} devices"
        )
    if show:
        for name, key_text in changed.devices.items():
            click.echo(f"{name} {key_text}")


def read_roster(settings: Settings, owner: Ed25519PublicKey, *, wait: float = 3.0) -> Roster:
    """The task's retained roster, verified with ``owner``; an empty one (serial 0) if none."""
    from fededge.mqtt import read_retained

    topic = Topics(settings.topic_prefix, settings.task).roster
    got = read_retained(settings.broker, [topic], wait=wait, name="roster")
    if topic not in got:
        return Roster(settings.task, 0, {})
    try:
        current = open_roster(got[topic], [owner])
    except FededgeError as e:
        raise ConfigError(
            f"the retained roster of task {settings.task!r} does not verify with the owner key "
            f"({e}); refusing to build on it"
        ) from None
    if current.task != settings.task:
        raise ConfigError(f"the retained roster names task {current.task!r}")
    return current


def publish_roster(settings: Settings, roster: Roster, owner: Ed25519PrivateKey) -> None:
    """Sign ``roster`` with ``owner`` and publish it retained (QoS 1, waits for the broker)."""
    from fededge.mqtt import MqttClient

    topic = Topics(settings.topic_prefix, settings.task).roster
    client = MqttClient(settings.broker, f"fededge-roster-{uuid.uuid4().hex[:10]}",
                        persistent=False, name="roster")  # fmt: skip
    with client:
        client.publish(topic, roster.signed(owner), retain=True, wait=True, timeout=30)
