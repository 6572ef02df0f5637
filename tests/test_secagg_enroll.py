"""`fededge keys enroll` against a real Mosquitto: add, remove, refuse a roster it cannot verify."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from devtools import new_task

from fededge import keys
from fededge.cli import main
from fededge.mqtt import read_retained
from fededge.protocol.roster import open_roster
from fededge.protocol.topics import Topics

pytestmark = pytest.mark.broker


def test_enroll_adds_removes_and_refuses_a_foreign_roster(broker: Any, tmp_path: Path) -> None:
    task = new_task()
    owner = keys.generate(tmp_path / "owner.key")
    dev = keys.generate(tmp_path / "dev.key")
    dev_pub = keys.public_text(dev.public_key())
    (tmp_path / "dev.pub").write_text(dev_pub + "\n")
    other = keys.public_text(keys.generate(tmp_path / "dev2.key").public_key())
    base = ["keys", "enroll", "--broker", broker.url, "--task", task,
            "--sign-key", str(tmp_path / "owner.key"), "--wait", "1"]  # fmt: skip
    assert main([*base, "--add", "pi-1", dev_pub, "--add", "pi-2", other]) == 0
    topic = Topics("fededge", task).roster

    def current() -> Any:
        got = read_retained(broker.settings(), [topic], wait=5, required=[topic])
        return open_roster(got[topic], [owner.public_key()])

    r = current()
    assert r.serial == 1 and r.devices == {"pi-1": dev_pub, "pi-2": other}
    assert main([*base, "--remove", "pi-2", "--add", "pi-3", str(tmp_path / "dev.pub")]) != 0
    assert current().serial == 1  # one key for two devices: refused, nothing published
    assert main([*base, "--remove", "pi-2"]) == 0
    r = current()
    assert r.serial == 2 and r.devices == {"pi-1": dev_pub}
    assert main([*base, "--remove", "nobody"]) != 0
    # Another owner cannot build on this roster.
    keys.generate(tmp_path / "mallory.key")
    foreign = [*base[:-3], "--sign-key", str(tmp_path / "mallory.key"), "--wait", "1"]
    assert main([*foreign, "--add", "pi-9", other]) != 0
    assert current().serial == 2
