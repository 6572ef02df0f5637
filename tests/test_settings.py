"""Settings: precedence (arguments > FEDEDGE_* env > TOML > defaults) and readable errors."""

from __future__ import annotations

import pytest

from fededge.cli import main
from fededge.errors import ConfigError
from fededge.settings import load_settings


@pytest.fixture
def toml(tmp_path):
    p = tmp_path / "f.toml"
    p.write_text(
        'task = "from-file"\n[broker]\nurl = "mqtt://file:1884"\nkeepalive = 40\n'
        "[aggregator]\nversions_kept = 3\n"
    )
    return p


def test_defaults(monkeypatch) -> None:
    s = load_settings()
    assert s.task == "digits" and s.broker.url == "mqtt://127.0.0.1:1883"
    assert s.broker.port == 1883 and not s.broker.tls and s.broker.protocol == "5"


def test_precedence(toml, monkeypatch) -> None:
    s = load_settings(toml)
    assert (s.task, s.broker.host, s.broker.port, s.broker.keepalive) == (
        "from-file",
        "file",
        1884,
        40,
    )
    assert s.aggregator.versions_kept == 3
    monkeypatch.setenv("FEDEDGE_TASK", "from-env")
    monkeypatch.setenv("FEDEDGE_BROKER__KEEPALIVE", "50")
    s = load_settings(toml)
    assert (s.task, s.broker.keepalive, s.broker.port) == ("from-env", 50, 1884)
    s = load_settings(toml, {"task": "from-arg", "broker": {"keepalive": None, "url": "mqtts://x"}})
    assert (s.task, s.broker.keepalive, s.broker.port, s.broker.tls) == ("from-arg", 50, 8883, True)


@pytest.mark.parametrize(
    ("text", "expect"),
    [
        ("[broker]\nbogus = 1\n", "broker.bogus = 1: unknown key"),
        ("nope = 1\n", "nope = 1: unknown key"),
        ('[broker]\nurl = "http://x"\n', "broker.url = 'http://x'"),
        (
            "[broker]\nkeepalive = 1\n",
            "broker.keepalive = 1: Input should be greater than or equal to 5",
        ),
        ('task = "a/b"\n', "task = 'a/b'"),
        ('[aggregator]\nversions_kept = "many"\n', "aggregator.versions_kept = 'many'"),
        ('[broker]\nprotocol = "4"\n', "broker.protocol = '4'"),
    ],
)
def test_errors_name_key_value_and_expectation(tmp_path, text, expect) -> None:
    p = tmp_path / "bad.toml"
    p.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_settings(p)
    assert expect in str(e.value)
    assert str(p) in str(e.value)


def test_unknown_env_variable_is_an_error(monkeypatch) -> None:
    monkeypatch.setenv("FEDEDGE_BROKR__URL", "mqtt://x")
    with pytest.raises(ConfigError, match="FEDEDGE_BROKR__URL: unknown setting 'brokr'"):
        load_settings()


def test_bad_toml_and_missing_file(tmp_path) -> None:
    p = tmp_path / "x.toml"
    p.write_text("task = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(p)
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "missing.toml")


def test_password_is_never_printed(tmp_path, capsys) -> None:
    p = tmp_path / "s.toml"
    p.write_text('[broker]\nusername = "u"\npassword = "hunter2"\n')
    assert main(["config", "show", "--config", str(p)]) == 0
    out = capsys.readouterr().out
    assert "hunter2" not in out and 'password = "***"' in out
    p.write_text('[broker]\npassword = "hunter2"\nkeepalive = 1\n')
    assert main(["config", "show", "--config", str(p)]) == 2
    assert "hunter2" not in capsys.readouterr().err


def test_config_show_reflects_arguments(toml, capsys) -> None:
    assert main(["config", "show", "--config", str(toml), "--task", "cli", "--json"]) == 0
    out = capsys.readouterr().out
    assert '"task": "cli"' in out and '"url": "mqtt://file:1884"' in out


@pytest.mark.parametrize("raw", ["660", "0660", "0o660"])
def test_socket_mode_is_octal_in_env(monkeypatch, raw) -> None:
    monkeypatch.setenv("FEDEDGE_DEVICE__SOCKET_MODE", raw)
    assert load_settings().device.socket_mode == 0o660


def test_socket_mode_rejects_non_octal(monkeypatch, capsys) -> None:
    monkeypatch.setenv("FEDEDGE_DEVICE__SOCKET_MODE", "rw-rw----")
    with pytest.raises(ConfigError, match=r"device\.socket_mode = 'rw-rw----'"):
        load_settings()
    monkeypatch.delenv("FEDEDGE_DEVICE__SOCKET_MODE")
    assert main(["config", "show"]) == 0
    assert 'socket_mode = "660"' in capsys.readouterr().out
