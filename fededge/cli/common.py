"""Options and helpers shared by the commands: settings from --config/env/flags, errors."""

from __future__ import annotations

import functools
import importlib
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from fededge.errors import ConfigError, FededgeError
from fededge.logs import setup_logging
from fededge.settings import Settings, load_settings

F = TypeVar("F", bound=Callable[..., Any])
log = logging.getLogger("fededge.cli")


class LazyGroup(click.Group):
    """A group whose subcommands are imported only when run or listed (click's LazyGroup).

    ``lazy`` maps a command name to ``"module:attribute"``. Running one command imports only
    its module, so ``fededge device`` never loads rich or the aggregator; an import error in a
    command's module surfaces as an error when that command (or the help) runs, never as a
    silently missing command.
    """

    def __init__(self, *args: Any, lazy: dict[str, str] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lazy = dict(lazy or {})

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = self.lazy.get(cmd_name)
        if target is None:
            return super().get_command(ctx, cmd_name)
        module, _, attr = target.partition(":")
        command = getattr(importlib.import_module(module), attr)
        if not isinstance(command, click.Command):
            raise TypeError(f"{target} is {type(command).__name__}, not a click command")
        return command


def settings_options(f: F) -> F:
    """Add --config/--broker/--task/--state-dir/--log-level; pass ``settings`` to the command."""

    @click.option("--config", "config_path", type=click.Path(path_type=Path), help="TOML file.")
    @click.option("--broker", help="Broker URL, mqtt://host:port or mqtts://host:port.")
    @click.option("--mqtt-version", type=click.Choice(["3.1.1", "5"]), help="MQTT protocol.")
    @click.option("--task", help="Task name (default: digits).")
    @click.option("--prefix", "topic_prefix", help="Topic prefix (default: fededge).")
    @click.option("--state-dir", type=click.Path(path_type=Path), help="State directory.")
    @click.option(
        "--log-level",
        type=click.Choice(["debug", "info", "warning", "error"]),
        help="Log level (default: info).",
    )
    @functools.wraps(f)
    def wrapper(
        config_path: Path | None,
        broker: str | None,
        mqtt_version: str | None,
        task: str | None,
        topic_prefix: str | None,
        state_dir: Path | None,
        log_level: str | None,
        **kwargs: Any,
    ) -> Any:
        overrides = {
            "broker": {"url": broker, "protocol": mqtt_version},
            "task": task,
            "topic_prefix": topic_prefix,
            "state_dir": state_dir,
            "log_level": log_level,
        }
        settings = load_settings(config_path, overrides)
        setup_logging(settings.log_level, settings.log_format)
        return f(settings=settings, **kwargs)

    return wrapper  # type: ignore[return-value]


def run_command(group: click.Group, argv: list[str] | None) -> int:
    """Run the click group; FededgeErrors become one readable line and exit code 2 or 1."""
    try:
        rv = group.main(args=argv, prog_name="fededge", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 130
    except click.ClickException as e:
        e.show()
        return e.exit_code
    except ConfigError as e:
        click.echo(f"fededge: configuration error: {e}", err=True)
        return 2
    except FededgeError as e:
        click.echo(f"fededge: error: {e}", err=True)
        return 1
    except KeyboardInterrupt:
        return 130
    return rv if isinstance(rv, int) else 0


def quiet_transport(settings: Settings) -> None:
    """At the default level, keep the transport's connect/close lines off a one-shot command."""
    if settings.log_level == "info":
        logging.getLogger("fededge.mqtt").setLevel(logging.WARNING)


def echo_err(message: str) -> None:
    click.echo(message, err=True)
    sys.stderr.flush()


__all__ = [
    "LazyGroup",
    "Settings",
    "echo_err",
    "quiet_transport",
    "run_command",
    "settings_options",
]
