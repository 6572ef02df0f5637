"""Bounded resources around the shipped deployment: the units' ceilings and credentials, secrets
read from systemd's credentials directory, and the graph probe's scrubbed environment."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from devtools import mlp_bundle

from fededge.device import runtime
from fededge.mqtt import MqttClient
from fededge.settings import Settings, load_settings
from fededge.testing.broker import make_password_file

UNITS = sorted((Path(__file__).resolve().parent.parent / "systemd").glob("*.service"))


def _service(unit: Path) -> dict[str, list[str]]:
    """The [Service] section of a unit: key -> every value it is given."""
    out: dict[str, list[str]] = {}
    section = ""
    for raw in unit.read_text().splitlines():
        line = raw.strip()
        if line.startswith("["):
            section = line
        elif section == "[Service]" and "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out


@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_units_have_ceilings_and_take_secrets_as_credentials(unit: Path) -> None:
    service = _service(unit)
    assert service["MemoryMax"] and service["TasksMax"]
    assert int(service["TasksMax"][0]) >= 64
    # No secret in the environment: no environment file, no password in Environment=.
    assert "EnvironmentFile" not in service
    assert not [v for v in service.get("Environment", []) if "PASSWORD" in v.upper()]
    for cred in service["LoadCredential"]:
        name, _, path = cred.partition(":")
        assert path.startswith("/etc/fededge/"), cred
        # Named like a setting's variable, so the settings find it.
        section, _, key = name.removeprefix("FEDEDGE_").lower().partition("__")
        section_type = Settings.model_fields[section].annotation
        assert name.startswith("FEDEDGE_") and key in getattr(section_type, "model_fields", {})


@pytest.fixture
def credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A credentials directory as systemd makes it (files named like the variables, 0400)."""
    for key in [k for k in os.environ if k.startswith("FEDEDGE_")]:
        monkeypatch.delenv(key)
    creds = tmp_path / "credentials"
    creds.mkdir(mode=0o700)
    for name, value in {"FEDEDGE_BROKER__USERNAME": "pi-01",
                        "FEDEDGE_BROKER__PASSWORD": "s3cret-from-file\n"}.items():  # fmt: skip
        (creds / name).write_text(value)
        (creds / name).chmod(0o400)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    return creds


def test_settings_read_secrets_from_the_credentials_directory(
    credentials: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    toml = tmp_path / "device.toml"
    toml.write_text('[broker]\nusername = "from-toml"\npassword = "from-toml"\n')
    s = load_settings(toml)
    assert s.broker.username == "pi-01"  # the credential beats the file ...
    assert s.broker.password is not None
    assert s.broker.password.get_secret_value() == "s3cret-from-file"
    monkeypatch.setenv("FEDEDGE_BROKER__USERNAME", "from-env")
    assert load_settings(toml).broker.username == "from-env"  # ... the environment beats both
    monkeypatch.delenv("CREDENTIALS_DIRECTORY")
    assert load_settings(None).broker.password is None


@pytest.mark.broker
def test_a_credential_logs_in_to_a_broker(credentials: Path, mosquitto_factory: Any) -> None:
    pwfile = make_password_file(credentials.parent, {"pi-01": "s3cret-from-file"})
    m = mosquitto_factory([f"password_file {pwfile}"], allow_anonymous=False)
    settings = load_settings(None, {"broker": {"url": m.url, "connect_timeout": 10.0}})
    with MqttClient(settings.broker, "pi-01-client", persistent=False) as c:
        assert c.connected


def test_graph_probe_child_gets_a_scrubbed_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The probe runs an untrusted graph: it must not inherit the broker password or any
    other secret or systemd handle. A sitecustomize module records the child's environment."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import json, os\n"
        "with open(os.path.join(os.environ['TMPDIR'], 'probe-env.json'), 'w') as f:\n"
        "    json.dump(dict(os.environ), f)\n"
    )
    monkeypatch.setenv("PYTHONPATH", str(hook))
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setenv("FEDEDGE_BROKER__PASSWORD", "leak-me-not")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    monkeypatch.setenv("NOTIFY_SOCKET", "/run/systemd/notify")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "leak-me-not")
    bundle = mlp_bundle()
    monkeypatch.setattr(runtime, "_PROBED", set())  # probe again, even if done before
    runtime.probe_graph(bundle.graph, bundle.spec)
    env = json.loads((tmp_path / "probe-env.json").read_text())
    assert "leak-me-not" not in json.dumps(env)
    assert not {"CREDENTIALS_DIRECTORY", "NOTIFY_SOCKET"} & env.keys()
    assert not [k for k in env if k.startswith("FEDEDGE_")]
    assert env["PATH"] == os.environ["PATH"]
