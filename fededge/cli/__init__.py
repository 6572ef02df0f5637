"""The ``fededge`` command line: one click group, one module per command family."""

from __future__ import annotations

import sys

import click

from fededge import __version__
from fededge.cli.common import run_command
from fededge.errors import FededgeError


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="fededge")
def cli() -> None:
    """Federated learning for fleets of edge devices over MQTT."""


def _register() -> None:
    from fededge.cli import aggregator, config, model

    cli.add_command(config.config)
    cli.add_command(aggregator.aggregator)
    cli.add_command(model.model)
    for optional in ("device", "fleet", "demo"):
        try:
            mod = __import__(f"fededge.cli.{optional}", fromlist=["register"])
        except ImportError:
            continue
        mod.register(cli)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fededge`` console script; returns the exit code."""
    _register()
    return run_command(cli, argv)


__all__ = ["FededgeError", "cli", "main"]

if __name__ == "__main__":
    sys.exit(main())
