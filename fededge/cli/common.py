"""Options and helpers shared by the commands: settings from --config/env/flags, errors."""

from __future__ import annotations

import functools
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


def settings_options(f: F) -> F:
    """Add --config/--broker/--task/--state-dir/--log-level; pass ``settings`` to the command."""

    @click.option("--config", "config_path", type=click.Path(path_type=Path), help="TOML file.")
    @click.option("--broker", help="Broker URL, mqtt://host:port or mqtts://host:port.")
    @click.option("--mqtt-version", type=click.Choice(["3.1.1", "5"]), help="MQTT protocol.")
    @click.option("--task", help="Task name (default: digits).")
    @click.option("--prefix", "topic_prefix", help="Topic prefix (default: fededge).")
    @click.option("--state-dir", type=click.Path(path_type=Path), help="State directory.")
    @click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]))
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


def echo_err(message: str) -> None:
    click.echo(message, err=True)
    sys.stderr.flush()


__all__ = ["Settings", "echo_err", "run_command", "settings_options"]
