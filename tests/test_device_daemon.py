"""`fededge device` as a real process against a real Mosquitto and the real aggregator."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aggtools import make_settings, running_aggregator
from devtools import (
    DIGITS_PLAN,
    call,
    cycle,
    digits_split,
    mlp_bundle,
    new_task,
    publish_task,
    wait_until,
)
from test_textfile import parse

from fededge.device.examples import StateDb
from fededge.device.outbox import Outbox
from fededge.device.runtime import ModelRuntime
from fededge.mqtt import MqttClient
from fededge.protocol import DeviceStatus, Topics, decode_json

pytestmark = pytest.mark.broker


class Daemon:
    """One `fededge device` process with its own state directory and API socket."""

    def __init__(self, url: str, task: str, state_dir: Path, device_id: str, **env: str) -> None:
        self.state_dir = state_dir
        self.socket = state_dir / "api.sock"
        self.device_id = device_id
        self.args = [
            sys.executable, "-m", "fededge.cli", "device", "--broker", url, "--task", task,
            "--state-dir", str(state_dir), "--device-id", device_id,
        ]  # fmt: skip
        self.env = {
            **os.environ,
            "FEDEDGE_DEVICE__METRICS_PORT": "0",
            "FEDEDGE_BROKER__RECONNECT_MIN_DELAY": "0.1",
            "FEDEDGE_BROKER__RECONNECT_MAX_DELAY": "1",
            **env,
        }
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = state_dir / f"{device_id}.log"

    def start(self) -> Daemon:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(self.args, env=self.env, stdout=out, stderr=out)
        return self

    def status(self) -> dict[str, Any]:
        code, body = call(self.socket, "GET", "/status")
        assert code == 200
        return body  # type: ignore[no-any-return]

    def wait(self, cond: Any, timeout: float, what: str) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc is not None and self.proc.poll() is None, self.log.read_text()
            try:
                st = self.status()
                if cond(st):
                    return st
            except (OSError, AssertionError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.device_id}: {what}\n{self.log.read_text()[-3000:]}")
            time.sleep(0.05)

    def post(self, url: str, body: Any) -> dict[str, Any]:
        code, answer = call(self.socket, "POST", url, body)
        assert code == 200, answer
        return answer  # type: ignore[no-any-return]

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def terminate(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(30)

    def cleanup(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def _outbox_ids(state_dir: Path, device_id: str, task: str) -> list[str]:
    db = StateDb(state_dir / "device" / device_id / task / "state.sqlite")
    try:
        return Outbox(db).ids()
    finally:
        db.close()


def _examples(part: tuple[np.ndarray, np.ndarray], start: int, n: int) -> dict[str, Any]:
    x, y = cycle(part, start, n)
    return {"x": x.tolist(), "y": y.tolist()}


def test_sigkill_with_update_in_outbox_delivers_it_exactly_once(broker, tmp_path) -> None:
    task = new_task()
    agg_settings = make_settings(broker.url, tmp_path / "agg", task=task)
    publish_task(agg_settings, DIGITS_PLAN.model_copy(
        update={"min_updates_per_version": 1, "examples_per_update": 8}))  # fmt: skip
    # The aggregator runs once and stops: its persistent session makes the broker queue the
    # device's first publication for it, so it will also see the resend (a duplicate).
    with running_aggregator(agg_settings):
        pass
    (part,), _, _ = digits_split(1)
    state = tmp_path / "dev"
    d = Daemon(broker.url, task, state, "k1", FEDEDGE_DEVICE__RECEIPT_TIMEOUT="1").start()
    try:
        d.wait(lambda st: st["version"] == 0, 30, "version 0")
        d.post("/examples", _examples(part, 0, 8))
        d.wait(lambda st: st["updates_sent"] == 1 and st["outbox"] == 1, 20, "an update")
        d.kill()  # no receipt can have come: the aggregator is down
        ids = _outbox_ids(state, "k1", task)
        assert len(ids) == 1
        d = Daemon(broker.url, task, state, "k1", FEDEDGE_DEVICE__RECEIPT_TIMEOUT="1").start()
        d.wait(lambda st: st["outbox"] == 1 and st["connected"], 30, "restart")
        # At least one timed resend while the aggregator is still down (the first send of this
        # process is attempt 2).
        wait_until(lambda: "(attempt 3)" in d.log.read_text(), 30, "a timed resend")
        with running_aggregator(agg_settings) as agg:
            wait_until(lambda: agg.version == 1, 20, "version 1")
            st = d.wait(lambda st: st["outbox"] == 0 and st["version"] == 1, 20, "receipt")
            # Settled: nothing is left to resend, and a late copy would count as a duplicate.
            assert agg.model is not None
            assert (agg.model.updates, agg.model.examples) == (1, 8)
            assert agg.store.version_info(1)["update_ids"] == ids
            assert agg.accepted_total == 1 and agg.version == 1
            dups = agg.metrics.registry.get_sample_value("fededge_updates_duplicate_total")
            assert dups is not None and dups >= 1  # the queued copy and/or resends
            assert st["updates_sent"] == 0  # this process made no new update: the old was resent
        assert d.terminate() == 0
    finally:
        d.cleanup()
    assert _outbox_ids(state, "k1", task) == []


def test_sigterm_stops_gracefully_with_sd_notify_and_metrics(broker, tmp_path) -> None:
    task = new_task()
    s = make_settings(broker.url, tmp_path / "agg", task=task)
    publish_task(s)
    notify_path = tmp_path / "notify.sock"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    notify.settimeout(0.1)
    textfile = tmp_path / "textfile" / "fededge.prom"
    textfile.parent.mkdir()
    d = Daemon(broker.url, task, tmp_path / "dev", "t1", NOTIFY_SOCKET=str(notify_path),
               WATCHDOG_USEC="600000", FEDEDGE_DEVICE__METRICS_TEXTFILE=str(textfile),
               FEDEDGE_DEVICE__METRICS_TEXTFILE_INTERVAL="0.1").start()  # fmt: skip
    watcher = MqttClient(broker.settings(), f"w-{task}", persistent=False)
    watcher.connect()
    got: list[str] = []

    def drain() -> None:
        with contextlib.suppress(TimeoutError):
            while True:
                got.extend(notify.recv(4096).decode().split("\n"))

    try:
        d.wait(lambda st: st["version"] == 0, 30, "version 0")

        def pinged() -> bool:  # a few watchdog periods (600 ms / 3), and the new status
            drain()
            status = any(line.startswith("STATUS=version 0") for line in got)
            return got.count("WATCHDOG=1") >= 2 and status

        # The main loop sends the changed STATUS on its next turn after the version arrived.
        wait_until(pinged, 30, "two watchdog pings and a STATUS naming version 0")
        assert "READY=1" in got
        port = re.search(r"metrics on http://127.0.0.1:(\d+)/metrics", d.log.read_text())
        assert port is not None
        text = urllib.request.urlopen(f"http://127.0.0.1:{port[1]}/metrics", timeout=5).read()
        assert b"fededge_device_outbox_depth 0.0" in text
        assert b"fededge_device_model_version 0.0" in text

        # The same registry for node_exporter's textfile collector, rewritten every loop turn.
        def written() -> bool:
            return textfile.exists() and parse(textfile).get("fededge_device_model_version") == 0

        wait_until(written, 30, "the textfile naming version 0")
        assert "fededge_device_outbox_depth" in parse(textfile)
        topic = Topics("fededge", task).device_status("t1")
        watcher.subscribe(topic)
        assert d.terminate() == 0
        drain()
        assert "STOPPING=1" in got
        assert not d.socket.exists()
        deadline = time.monotonic() + 5
        states = []
        while time.monotonic() < deadline and "offline" not in states:
            msg = watcher.messages.get(timeout=5)
            states.append(decode_json(msg.payload, DeviceStatus).state)
        assert states[-1] == "offline"
        assert parse(textfile)["fededge_device_model_version"] == 0  # written at exit too
        assert [p.name for p in textfile.parent.iterdir()] == ["fededge.prom"]
        assert "Traceback" not in d.log.read_text()
    finally:
        notify.close()
        watcher.close()
        d.cleanup()


@pytest.mark.slow
def test_five_daemons_learn_digits(broker, tmp_path) -> None:
    task = new_task()
    agg_settings = make_settings(broker.url, tmp_path / "agg", task=task)
    publish_task(agg_settings)
    parts, x_te, y_te = digits_split(5)
    rt = ModelRuntime.from_bundle(mlp_bundle())
    daemons = [Daemon(broker.url, task, tmp_path / f"d{i}", f"d{i}").start() for i in range(5)]
    history = []
    try:
        with running_aggregator(agg_settings) as agg:
            pos, n = 0, DIGITS_PLAN.examples_per_update
            for v in range(30):
                for d in daemons:
                    d.wait(lambda st, v=v: st["version"] is not None and st["version"] >= v, 30,
                           f"version {v}")  # fmt: skip
                for d, part in zip(daemons, parts, strict=True):
                    d.post("/examples", _examples(part, pos, n))
                pos += n
                wait_until(lambda: (agg.version or 0) > v, 30, f"version {v + 1}")  # noqa: B023
                assert agg.model is not None
                acc = float(np.mean(np.argmax(rt.infer(x_te, agg.model.weights), 1) == y_te))
                history.append(acc)
                if acc >= 0.85:
                    break
            assert history[-1] >= 0.85, history
            assert agg.rejected_total == 0
            for d in daemons:
                d.wait(lambda st: st["outbox"] == 0, 20, "empty outbox")
            # Predictions through the API come from the newest version.
            daemons[0].wait(lambda st: st["version"] == agg.version, 20, "newest version")
            probs = daemons[0].post("/predict", {"x": x_te[:2].tolist()})
            assert probs["version"] == agg.version
        for d in daemons:
            assert d.terminate() == 0
    finally:
        for d in daemons:
            d.cleanup()
    print("accuracy by version", json.dumps(history))


_IMPORT_LINE = re.compile(r"^import time:\s+\d+ \|\s+\d+ \|\s*(\S+)\s*$")


def test_device_process_imports_no_numba_rich_tensorflow_or_aggregator(broker, tmp_path) -> None:
    """What `fededge device` has imported once it serves, trains and answers: a device's needs.

    Python itself reports every import on stderr (PYTHONPROFILEIMPORTTIME), lazy ones included,
    so nothing in the daemon has to cooperate.
    """
    task = new_task()
    s = make_settings(broker.url, tmp_path / "agg", task=task)
    publish_task(s, DIGITS_PLAN.model_copy(update={"examples_per_update": 8}))
    (part,), x_te, _ = digits_split(1)
    d = Daemon(broker.url, task, tmp_path / "dev", "imp", PYTHONPROFILEIMPORTTIME="1").start()
    try:
        d.wait(lambda st: st["version"] == 0, 30, "version 0")
        assert d.post("/predict", {"x": x_te[:2].tolist()})["version"] == 0
        d.post("/examples", _examples(part, 0, 8))
        d.wait(lambda st: st["updates_sent"] == 1, 30, "a training run")  # the trainer ran
        assert d.terminate() == 0
    finally:
        d.cleanup()
    imported = {m[1] for line in d.log.read_text().splitlines() if (m := _IMPORT_LINE.match(line))}
    assert {"fededge.device.client", "fededge.device.training", "paho"} <= imported
    roots = {name.split(".")[0] for name in imported}
    assert not roots & {"numba", "llvmlite", "rich", "tensorflow", "keras", "pygments"}
    # No trust keys and no secure aggregation in this plan: nothing needs a key, so neither
    # cryptography nor the SecAgg code is loaded (docs/benchmarks.md, device memory).
    assert "cryptography" not in roots
    assert not {n for n in imported if n.startswith("fededge.secagg")}
    unwanted = {
        n
        for n in imported
        if n.startswith(
            ("fededge.aggregator", "fededge.native", "fededge.build", "fededge.testing")
        )
    }
    unwanted |= {n for n in imported if n.startswith("fededge.cli.") and n not in (
        "fededge.cli.__main__", "fededge.cli.common", "fededge.cli.device")}  # fmt: skip
    assert not unwanted


def test_metrics_port_in_use_fails_before_connecting(tmp_path) -> None:
    """A second device on the port of the first stops at once with a clear error, never connects."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with socket.socket() as nothing:  # a broker address where nothing listens
            nothing.bind(("127.0.0.1", 0))
            dead = f"mqtt://127.0.0.1:{nothing.getsockname()[1]}"
        d = Daemon(dead, new_task(), tmp_path / "dev", "m1")
        d.args += ["--metrics-port", str(port)]
        d.start()
        try:
            assert d.proc is not None
            assert d.proc.wait(60) == 2  # a configuration error
        finally:
            d.cleanup()
    text = d.log.read_text()
    assert f"device.metrics_port={port} (--metrics-port" in text
    assert "configuration error" in text
    assert "connect" not in text.replace("before connecting", "")  # it never tried
