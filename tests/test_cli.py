"""The ``fededge`` command tree: help everywhere, one spelling per option, explicit registration,
and ``model init`` / ``model init --force`` as docs/operations.md documents them."""

from __future__ import annotations

import logging
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import click
import numpy as np
import pytest

from fededge.cli import COMMANDS, cli, main
from fededge.cli.common import LazyGroup
from fededge.logs import _Handler
from fededge.mqtt import MqttClient, read_retained
from fededge.protocol import ModelVersion, Topics
from fededge.protocol.vocab import NO_GRAPH
from fededge.testing.fleet import Fleet, aggregator_settings, new_task


@pytest.fixture(autouse=True)
def _drop_cli_log_handler() -> Iterator[None]:
    # main() installs a stderr handler bound to this test's captured stream.
    yield
    root = logging.getLogger()
    for h in [h for h in root.handlers if isinstance(h, _Handler)]:
        root.removeHandler(h)
    logging.getLogger("fededge.mqtt").setLevel(logging.NOTSET)


def _walk(cmd: click.Command, path: str = "fededge") -> Iterator[tuple[str, click.Command]]:
    yield path, cmd
    if isinstance(cmd, click.Group):
        ctx = click.Context(cmd)
        for name in cmd.list_commands(ctx):
            sub = cmd.get_command(ctx, name)
            assert sub is not None, f"{path} {name}: listed but not loadable"
            yield from _walk(sub, f"{path} {name}")


ALL = list(_walk(cli))


def test_every_command_is_registered_and_loads() -> None:
    names = {p for p, _ in ALL}
    assert {f"fededge {c}" for c in COMMANDS} <= names
    for expected in ("model init", "model build", "model pull", "model inspect", "config show"):
        assert f"fededge {expected}" in names


@pytest.mark.parametrize(("path", "cmd"), ALL, ids=[p for p, _ in ALL])
def test_every_option_and_argument_has_help(path: str, cmd: click.Command) -> None:
    assert cmd.help, f"{path}: no help text"
    for p in cmd.params:
        if isinstance(p, click.Option) and p.hidden:
            continue
        if isinstance(p, click.Option):
            assert p.help, f"{path} {'/'.join(p.opts)}: no help text"
        else:  # click arguments have no help of their own: the command's text names them
            assert (p.human_readable_name in cmd.help) or (p.name or "").upper() in cmd.help, (
                f"{path}: argument {p.name} is not described in the command's help"
            )


def test_wait_and_output_are_spelled_one_way() -> None:
    wait_helps = set()
    for path, cmd in ALL:
        for p in cmd.params:
            if not isinstance(p, click.Option) or p.hidden:
                continue  # hidden: a compatibility spelling, not shown in --help
            names = set(p.opts) | set(p.secondary_opts)
            assert "--out" not in names, f"{path}: --out (use -o/--output)"
            if names & {"-o", "--output"}:
                assert p.opts == ["-o", "--output"], f"{path}: {p.opts}"
            if "--wait" in names:
                assert p.opts == ["--wait"] and isinstance(p.type, click.FloatRange), path
                wait_helps.add(p.help)
    assert len(wait_helps) == 1, wait_helps


def test_a_broken_command_module_is_an_error_not_a_missing_command() -> None:
    group = LazyGroup(name="g", lazy={"broken": "fededge.no_such_module:command"})
    ctx = click.Context(group)
    assert "broken" in group.list_commands(ctx)
    with pytest.raises(ModuleNotFoundError, match="no_such_module"):
        group.get_command(ctx, "broken")


def test_device_help_loads_neither_rich_nor_other_commands() -> None:
    code = (
        "import sys\n"
        "from fededge.cli import main\n"
        "rc = main(['device', '--help'])\n"
        "mods = [m for m in sys.modules if m.split('.')[0] == 'rich' or m.startswith('fededge.cli.')]\n"
        "print(sorted(mods))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "['fededge.cli.common', 'fededge.cli.device']"


def test_model_build_is_a_click_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        cli.main(["model", "build", "--help"], prog_name="fededge")
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "Usage: fededge model build" in out and "-o, --output" in out and "--model" in out
    assert main(["model", "build", "--model", "nosuch", "-o", "x"]) == 2
    # scripts/build_models.sh runs the same command as `python -m fededge.build`.
    proc = subprocess.run(
        [sys.executable, "-m", "fededge.build", "--help"], capture_output=True, text=True
    )
    assert proc.returncode == 0 and "Usage: fededge model build" in proc.stdout, proc.stderr


# --- model init against an aggregator --------------------------------------------------------


def _init(url: str, task: str, weights: Path, *extra: str) -> int:
    return main(
        ["model", "init", "--broker", url, "--task", task, "--weights", str(weights), *extra]
    )


def _weights_file(tmp_path: Path) -> Path:
    from safetensors.numpy import save

    path = tmp_path / "w.safetensors"
    path.write_bytes(save({"w": np.ones((2, 3), np.float32)}))
    return path


def test_model_init_force_needs_the_aggregator_stopped_and_resets_its_session(
    broker, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """docs/operations.md "Resetting a task": stop, remove state, init --force, start."""
    task = new_task()
    topics = Topics("fededge", task)
    weights = _weights_file(tmp_path)
    assert _init(broker.url, task, weights) == 0
    assert _init(broker.url, task, weights) == 2
    assert "already has version 0" in capsys.readouterr().err

    s1 = aggregator_settings(broker.url, tmp_path / "state1", task)
    with Fleet() as fleet:
        assert fleet.aggregator(s1).version == 0
        # A running aggregator would put its own model back: refused, even with --force.
        assert _init(broker.url, task, weights, "--force") == 2
        assert "is online" in capsys.readouterr().err

    # Stopped. A model message still queued in its persistent session (here an old version 7,
    # as when the echo of its last publication was never acknowledged) must not be what a
    # fresh aggregator adopts after the reset.
    old = ModelVersion(task=task, version=7, weights={"w": np.zeros((2, 3), np.float32)},
                       graph_sha256=NO_GRAPH)  # fmt: skip
    with MqttClient(s1.broker, f"test-{uuid.uuid4().hex[:8]}", persistent=False) as c:
        c.publish(topics.model, old.to_bytes(), retain=False, wait=True, timeout=10)
    assert _init(broker.url, task, weights, "--force") == 0
    s2 = aggregator_settings(broker.url, tmp_path / "state2", task)
    with Fleet() as fleet:
        assert fleet.aggregator(s2).version == 0
    held = read_retained(s2.broker, [topics.model], wait=5, required=[topics.model])
    assert ModelVersion.from_bytes(held[topics.model], max_bytes=1 << 20).version == 0
