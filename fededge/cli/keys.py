"""``fededge keys``: make and show the Ed25519 keys of the model owner, aggregator and devices."""

from __future__ import annotations

from pathlib import Path

import click

from fededge import keys


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
    """Print the public key (ed25519:...) of PRIVATE_KEY."""
    click.echo(keys.public_text(keys.load_private(private_key).public_key()))
