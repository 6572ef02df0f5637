"""The ``fededge`` command line: one click group, one module per command family.

Every command is listed here, by name and ``module:attribute``, and imported only when it runs
(or when the help lists it): ``fededge device`` loads neither rich nor the aggregator.
"""

from __future__ import annotations

import sys

import click

from fededge import __version__
from fededge.cli.common import LazyGroup, run_command
from fededge.errors import FededgeError

COMMANDS = {
    "aggregator": "fededge.cli.aggregator:aggregator",
    "config": "fededge.cli.config:config",
    "demo": "fededge.cli.demo:demo",
    "device": "fededge.cli.device:device",
    "gateway": "fededge.cli.gateway:gateway",
    "keys": "fededge.cli.keys:keys_group",
    "model": "fededge.cli.model:model",
    "status": "fededge.cli.fleet:status",
    "watch": "fededge.cli.fleet:watch",
}


@click.group(
    cls=LazyGroup,
    lazy=COMMANDS,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.version_option(__version__, prog_name="fededge")
def cli() -> None:
    """Federated learning for fleets of edge devices over MQTT."""


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fededge`` console script; returns the exit code."""
    return run_command(cli, argv)


__all__ = ["FededgeError", "cli", "main"]

if __name__ == "__main__":
    sys.exit(main())
