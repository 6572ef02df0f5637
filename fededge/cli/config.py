"""``fededge config show``: print the effective configuration."""

from __future__ import annotations

import json

import click

from fededge.cli.common import settings_options
from fededge.settings import Settings, settings_as_toml_dict


@click.group()
def config() -> None:
    """Inspect configuration."""


@config.command("show")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of TOML.")
@settings_options
def show(settings: Settings, as_json: bool) -> None:
    """Print the effective configuration (arguments > FEDEDGE_* env > --config file > defaults)."""
    data = settings_as_toml_dict(settings)
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    import tomli_w

    click.echo(tomli_w.dumps(data), nl=False)
