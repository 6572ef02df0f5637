"""`fededge status`, `watch`, `model pull` and `model inspect` against a real Mosquitto."""

from __future__ import annotations

import json
import logging
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aggtools import Sender, init_task, make_settings, running_aggregator
from broker import free_port
from hypothesis import given, settings
from hypothesis import strategies as st

from fededge.cli import main
from fededge.cli.fleet import Snapshot, render_status
from fededge.cli.render import describe
from fededge.device.bundle import load_bundle, shipped_bundle_path
from fededge.logs import _Handler
from fededge.mqtt import MqttClient, read_retained
from fededge.protocol import (
    AggregatorStatus,
    DeviceStatus,
    Graph,
    ModelVersion,
    Plan,
    Receipt,
    Topics,
    Update,
    decode_json,
)
from fededge.protocol.vocab import NO_GRAPH
from fededge.settings import Settings as FededgeSettings
from fededge.testing import wait_until

MLP = shipped_bundle_path("digits_mlp")


@pytest.fixture(autouse=True)
def _drop_cli_log_handler() -> Iterator[None]:
    # main() installs a stderr handler bound to this test's captured stream; a later test's
    # log records must not go to a closed stream.
    yield
    root = logging.getLogger()
    for h in [h for h in root.handlers if isinstance(h, _Handler)]:
        root.removeHandler(h)
    logging.getLogger("fededge.mqtt").setLevel(logging.NOTSET)  # see common.quiet_transport


def _weights() -> dict[str, np.ndarray]:
    return {"b": np.arange(3, dtype=np.float32), "w": np.ones((2, 3), dtype=np.float32)}


def _publish(settings: FededgeSettings, topic: str, payload: bytes, retain: bool = True) -> None:
    client = MqttClient(settings.broker, f"test-pub-{uuid.uuid4().hex[:8]}", persistent=False)
    with client:
        client.publish(topic, payload, qos=1, retain=retain, wait=True, timeout=10)


def _aggregator_status(settings: FededgeSettings) -> AggregatorStatus:
    topic = Topics(settings.topic_prefix, settings.task).aggregator_status
    held = read_retained(settings.broker, [topic], wait=5, required=[topic])
    return decode_json(held[topic], AggregatorStatus)


def _run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    rc = main(list(args))
    out, err = capsys.readouterr()
    return rc, out, err


# --- render (no broker) -----------------------------------------------------------------------


def test_describe_every_kind_and_garbage() -> None:
    t = Topics("fededge", "digits")
    u = Update("digits", "dev1", "u1", 3, 12, {"w": np.full(4, 0.123, np.float32)}, train_loss=0.5)
    line = describe(t.update("dev1"), u.to_bytes(), "fededge")
    assert line.kind == "update" and not line.bad
    assert "dev1" in line.text and "base=v3" in line.text and "examples=12" in line.text
    assert "0.123" not in line.text  # never the values
    bad = describe(t.update("dev1"), b"\x00garbage", "fededge")
    assert bad.bad and bad.text.startswith("[bad message] malformed")
    r = Receipt(task="digits", device="dev1", update_id="u1", status="rejected", reason="stale",
                version=4)  # fmt: skip
    assert (
        "rejected at v4 reason=stale" in describe(t.receipt("dev1"), r.to_bytes(), "fededge").text
    )
    assert describe(t.plan, b"", "fededge").kind == "cleared"
    assert describe(t.plan, b'{"v": 2}', "fededge").text.startswith("[bad message] unsupported")
    rnd = describe(t.round("r1") + "/advertise/dev1", b'{"v":1,"type":"advertise"}', "fededge")
    assert rnd.kind == "round" and "advertise/dev1" in rnd.text and 'type="advertise"' in rnd.text
    assert describe("other/topic", b"hi", "fededge").kind == "unknown"


@settings(max_examples=300, deadline=None)
@given(
    kind=st.sampled_from(["model", "plan", "graph", "aggregator/status", "versions/3/metrics",
                          "updates/d", "receipts/d", "devices/d/status", "rounds/r/x", "other"]),
    payload=st.binary(max_size=300) | st.builds(lambda b: b'{"v":1,' + b, st.binary(max_size=50)),
)  # fmt: skip
def test_describe_never_raises(kind: str, payload: bytes) -> None:
    line = describe(f"fededge/t/{kind}", payload, "fededge")
    assert isinstance(line.text, str) and "\n" not in line.text


# --- status -----------------------------------------------------------------------------------


def test_status_json_and_table(broker, tmp_path, capsys) -> None:
    s = make_settings(broker.url, tmp_path)
    plan = Plan(min_updates_per_version=1, clip_norm=100.0)
    base = init_task(s, _weights(), plan)
    topics = Topics(s.topic_prefix, s.task)
    now = time.time()
    _publish(
        s,
        topics.device_status("dev1"),
        DeviceStatus(device="dev1", state="online", version=2, examples=40, time=now).to_bytes(),
    )
    off = DeviceStatus(device="dev2", state="offline", version=1, time=now)
    _publish(s, topics.device_status("dev2"), off.to_bytes())
    ones = {k: np.full_like(v, 0.5) for k, v in base.weights.items()}
    with running_aggregator(s):
        dev = Sender(s)
        for v in (1, 2):
            assert dev.receipt(dev.update(ones, base=v - 1, n=7 * v)).status == "accepted"
            dev.model(v)
        dev.close()
        wait_until(lambda: _aggregator_status(s).version == 2, what="the status after v2")
        rc, out, err = _run(capsys, "status", "--broker", broker.url, "--task", s.task, "--json")
        assert rc == 0, err
        st = json.loads(out)
        rc, text, err = _run(capsys, "status", "--broker", broker.url, "--task", s.task)
        assert rc == 0, err
    assert st["task"] == s.task and st["version"] == 2
    assert st["devices_online"] == 1 and st["devices_offline"] == 1
    assert [d["device"] for d in st["devices"]] == ["dev1", "dev2"]
    assert [(m["version"], m["updates"], m["examples"]) for m in st["versions"]] == [
        (1, 1, 7),
        (2, 1, 14),
    ]
    assert st["aggregator"]["state"] == "online" and st["aggregator"]["pending_updates"] == 0
    assert st["plan"]["min_updates_per_version"] == 1
    assert st["model"]["parent"] == 1 and st["model"]["parameters"] == 9
    assert st["problems"] == []
    assert [d["lag"] for d in st["devices"]] == [0, 1]  # versions behind the retained v2
    assert "v2 (parent v1)" in text and "1 online, 1 offline" in text
    assert re.search(r"dev1 +online +v2 +0 ", text) and re.search(r"dev2 +offline +v1 +1 ", text)
    assert "dev1" in text and "dev2" in text and "versions (last 2 of 2 retained)" in text


def test_status_table_shows_secure_round_stage_and_lag(capsys) -> None:
    mv = ModelVersion(task="t", version=9, weights=_weights(), graph_sha256=NO_GRAPH)
    snap = Snapshot("t", "mqtt://b:1883", "fededge", model=mv, plan=Plan(max_staleness=2))
    snap.aggregator = AggregatorStatus(task="t", state="online", version=9, round_id="r7",
                                       round_stage="share", checked_in=12)  # fmt: skip
    for name, version in (("a", 9), ("b", 8), ("c", 4), ("d", None)):
        snap.devices[name] = DeviceStatus(device=name, state="online", version=version)
    render_status(snap, last=5)
    text = capsys.readouterr().out
    assert re.search(r"^round +r7 stage share, 12 checked in$", text, re.M), text
    assert "round r7" not in text  # not repeated on the aggregator line
    lags = {m[1]: m[2] for m in re.finditer(r"^(\w) +online +(?:v\d+|-) +(\d+|-) ", text, re.M)}
    assert lags == {"a": "0", "b": "1", "c": "5", "d": "-"}
    snap.aggregator = snap.aggregator.model_copy(update={"round_id": None, "round_stage": "checkin",
                                                         "checked_in": 3})  # fmt: skip
    render_status(snap, last=5)
    assert re.search(r"^round +collecting check-ins, 3 checked in$", capsys.readouterr().out, re.M)
    # Asynchronous mode (no round_stage): no round line, as before.
    snap.aggregator = AggregatorStatus(task="t", state="online", version=9)
    render_status(snap, last=5)
    assert "round" not in capsys.readouterr().out


def test_status_unreachable_broker_and_missing_task(broker, capsys) -> None:
    url = f"mqtt://127.0.0.1:{free_port()}"
    rc, out, err = _run(capsys, "status", "--broker", url, "--task", "x")
    assert rc == 1 and out == ""
    assert "unreachable" in err and "127.0.0.1" in err
    rc, out, err = _run(
        capsys, "status", "--broker", broker.url, "--task", "nosuch", "--wait", "0.5"
    )
    assert rc == 1
    assert "task 'nosuch' has no model" in err and "fededge model init" in err
    corrupt = make_settings(broker.url, Path("unused"), task="corrupt")
    _publish(corrupt, Topics("fededge", "corrupt").model, b"garbage!garbage!")
    rc, out, err = _run(capsys, "status", "--broker", broker.url, "--task", "corrupt")
    assert rc == 1 and "retained model of task 'corrupt' is invalid: malformed" in err


def test_status_reports_bad_retained_messages(broker, tmp_path, capsys) -> None:
    s = make_settings(broker.url, tmp_path)
    init_task(s, _weights(), Plan())
    topics = Topics(s.topic_prefix, s.task)
    _publish(s, topics.device_status("evil"), b'{"v":1,"kind":"device_status"}')
    rc, out, err = _run(capsys, "status", "--broker", broker.url, "--task", s.task, "--json")
    assert rc == 0, err
    st = json.loads(out)
    assert st["version"] == 0 and st["devices"] == [] and st["aggregator"] is None
    assert [p["topic"] for p in st["problems"]] == [topics.device_status("evil")]


# --- watch ------------------------------------------------------------------------------------


def test_watch_count_and_raw(broker, tmp_path, capsys) -> None:
    s = make_settings(broker.url, tmp_path)
    init_task(s, _weights(), Plan())
    rc, out, err = _run(capsys, "watch", "--broker", broker.url, "--task", s.task, "--count", "2",
                        "--timeout", "10")  # fmt: skip
    assert rc == 0, err
    lines = out.splitlines()
    assert len(lines) == 2
    assert any(f"{s.task}/model model v0 " in ln and "(retained)" in ln for ln in lines)
    assert any(f"{s.task}/plan plan epochs=1" in ln for ln in lines)
    rc, out, err = _run(capsys, "watch", "--broker", broker.url, "--task", s.task, "--count", "2",
                        "--mqtt-version", "3.1.1", "--timeout", "10")  # fmt: skip
    assert rc == 0 and f"{s.task}/model model v0 " in out
    rc, out, err = _run(capsys, "watch", "--broker", broker.url, "--task", s.task, "--raw",
                        "--count", "2", "--timeout", "10")  # fmt: skip
    assert rc == 0
    assert any(f"{s.task}/plan" in ln and '"{\\"v\\":1' in ln for ln in out.splitlines())
    # Nothing matches: the timeout ends it.
    rc, out, _ = _run(
        capsys, "watch", "--broker", broker.url, "--task", "empty", "--timeout", "0.5"
    )
    assert rc == 0 and out == ""


def _lines(proc: subprocess.Popen[str]) -> queue.Queue[str]:
    q: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            q.put(line.rstrip("\n"))

    threading.Thread(target=pump, daemon=True).start()
    return q


def _wait_line(q: queue.Queue[str], seen: list[str], needle: str, timeout: float = 20) -> str:
    for line in seen:
        if needle in line:
            return line
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            line = q.get(timeout=0.1)
        except queue.Empty:
            continue
        seen.append(line)
        if needle in line:
            return line
    raise AssertionError(f"no line with {needle!r} in:\n" + "\n".join(seen))


def test_watch_live_stream_with_bad_message_and_ctrl_c(broker, tmp_path) -> None:
    s = make_settings(broker.url, tmp_path)
    base = init_task(s, _weights(), Plan(min_updates_per_version=1, clip_norm=100.0))
    cmd = [sys.executable, "-c", "import sys; from fededge.cli import main; sys.exit(main())",
           "watch", "--broker", broker.url, "--timeout", "60"]  # fmt: skip
    # A shell started in the background ignores SIGINT and children inherit SIG_IGN across
    # exec: give the child Python's default, as an interactive terminal would.
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        q = _lines(proc)
        seen: list[str] = []
        _wait_line(q, seen, f"{s.task}/model model v0")  # subscribed: the retained model is in
        with running_aggregator(s):
            dev = Sender(s)
            delta = {k: np.full_like(v, 0.123) for k, v in base.weights.items()}
            uid = dev.update(delta, n=9)
            assert dev.receipt(uid).status == "accepted"
            dev.raw(b"\x07not a safetensors payload")
            update = _wait_line(q, seen, f"{s.task}/updates/dev1 update dev1 id={uid}")
            assert "base=v0 examples=9" in update and "2 tensors" in update
            _wait_line(q, seen, f"receipt dev1 id={uid} accepted at v0 -> v1")
            _wait_line(q, seen, f"{s.task}/updates/dev1 [bad message] malformed")
            _wait_line(q, seen, "model v1 (parent v0)")
            _wait_line(
                q,
                seen,
                "aggregator online v1 pending 0/1 updates (0 examples) accepted=1 rejected=1",
            )
            _wait_line(q, seen, "metrics v1 updates=1 examples=9")
            dev.close()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(15) == 0
        assert not any("0.123" in ln for ln in seen)  # update values never shown
        assert proc.stderr is not None and "Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# --- model pull and inspect -------------------------------------------------------------------


def test_pull_bundle_latest_and_from_state_dir(broker, tmp_path, capsys) -> None:
    s = make_settings(broker.url, tmp_path / "state")
    plan = tmp_path / "plan.json"
    plan.write_bytes(Plan(min_updates_per_version=1, clip_norm=100.0).to_bytes())
    rc, _, err = _run(capsys, "model", "init", "--broker", broker.url, "--task", s.task,
                      "--bundle", str(MLP), "--plan", str(plan))  # fmt: skip
    assert rc == 0, err
    shipped = load_bundle(MLP, isolate=False)
    with running_aggregator(s):
        dev = Sender(s)
        delta = {k: np.full(v.shape, 0.01, np.float32) for k, v in shipped.weights.items()}
        assert dev.receipt(dev.update(delta)).status == "accepted"
        v1 = dev.model(1)
        dev.close()
    out1 = tmp_path / "v1"
    rc, out, err = _run(capsys, "model", "pull", "--broker", broker.url, "--task", s.task,
                        "-o", str(out1))  # fmt: skip
    assert rc == 0, err
    assert "version 1 from broker" in out
    b = load_bundle(out1)
    for name, arr in v1.weights.items():
        np.testing.assert_array_equal(b.weights[name], arr)
    assert b.graph == shipped.graph
    info = json.loads((out1 / "version.json").read_text())
    assert (info["version"], info["parent"], info["updates"], info["source"]) == (1, 0, 1, "broker")
    assert info["graph_sha256"] == shipped.graph_sha256

    # Version 0 is no longer on the broker; the aggregator's state dir has it.
    out0 = tmp_path / "v0"
    args = ["model", "pull", "--broker", broker.url, "--task", s.task, "--version", "0"]
    rc, _, err = _run(capsys, *args, "-o", str(out0), "--state-dir", str(tmp_path / "empty"))
    assert rc == 1 and "only the latest version (1)" in err and "--state-dir" in err
    rc, _, err = _run(capsys, *args, "-o", str(out0), "--state-dir", str(s.state_dir))
    assert rc == 0, err
    b0 = load_bundle(out0)
    for name, arr in shipped.weights.items():
        np.testing.assert_array_equal(b0.weights[name], arr)
    assert json.loads((out0 / "version.json").read_text())["source"] == "state_dir"


def test_pull_weights_only_task_and_missing_task(broker, tmp_path, capsys) -> None:
    s = make_settings(broker.url, tmp_path)
    init_task(s, _weights(), Plan())
    out = tmp_path / "out"
    rc, text, err = _run(capsys, "model", "pull", "--broker", broker.url, "--task", s.task,
                         "-o", str(out))  # fmt: skip
    assert rc == 0, err
    assert "weights only" in text
    assert sorted(p.name for p in out.iterdir()) == ["version.json", "weights.safetensors"]
    from safetensors.numpy import load

    got = load((out / "weights.safetensors").read_bytes())
    for name, arr in _weights().items():
        np.testing.assert_array_equal(got[name], arr)
    rc, _, err = _run(capsys, "model", "pull", "--broker", broker.url, "--task", "nosuch",
                      "--wait", "0.5", "-o", str(tmp_path / "x"))  # fmt: skip
    assert rc == 1 and "has no model" in err


def _inspect(capsys: pytest.CaptureFixture[str], path: Path) -> dict[str, Any]:
    rc, out, err = _run(capsys, "model", "inspect", str(path), "--json")
    assert rc == 0, err
    info: dict[str, Any] = json.loads(out)
    return info


def test_inspect_every_kind(tmp_path, capsys) -> None:
    info = _inspect(capsys, MLP)
    assert info["kind"] == "bundle" and info["valid"] is True
    assert info["spec"]["model"] == "digits_mlp"
    assert info["graph"]["signatures"]["train"]["inputs"]["x"] == "float32[-1, 64]"
    assert [t["name"] for t in info["weights"]["tensors"]] == [
        "dense1_bias", "dense1_kernel", "dense2_bias", "dense2_kernel"]  # fmt: skip
    info = _inspect(capsys, MLP / "model.tflite")
    assert info["kind"] == "tflite" and sorted(info["signatures"]) == ["eval", "infer", "train"]
    info = _inspect(capsys, MLP / "weights.safetensors")
    assert info["kind"] == "safetensors" and info["parameters"] == 64 * 32 + 32 + 32 * 10 + 10
    w = info["tensors"][1]
    assert w["norm"] > 0 and w["finite"] is True and w["shape"] == [64, 32]

    upd = tmp_path / "update.bin"
    upd.write_bytes(Update("t", "dev1", "u1", 2, 5, {"w": np.ones(3, np.float32)}).to_bytes())
    info = _inspect(capsys, upd)
    assert info["kind"] == "update" and info["message"]["base_version"] == 2
    assert info["tensors"][0]["norm"] == pytest.approx(3**0.5)
    graph = tmp_path / "graph.bin"
    tflite = (MLP / "model.tflite").read_bytes()
    spec = json.loads((MLP / "spec.json").read_text())
    graph.write_bytes(Graph("t", tflite, spec).to_bytes())
    info = _inspect(capsys, graph)
    assert info["kind"] == "graph" and info["graph"]["sha256"] == spec["graph_sha256"]
    plan = tmp_path / "plan.json"
    plan.write_bytes(Plan(epochs=3).to_bytes())
    assert _inspect(capsys, plan)["message"]["epochs"] == 3

    # Human output, and a broken bundle says why with exit code 1.
    rc, out, _ = _run(capsys, "model", "inspect", str(MLP))
    assert rc == 0 and "valid: yes" in out and "dense1_kernel" in out
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("model.tflite", "spec.json"):
        (broken / name).write_bytes((MLP / name).read_bytes())
    (broken / "weights.safetensors").write_bytes(upd.read_bytes())
    rc, out, _ = _run(capsys, "model", "inspect", str(broken))
    assert rc == 1 and "valid: NO" in out and "missing weights" in out
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\x01\x02\x03")
    rc, _, err = _run(capsys, "model", "inspect", str(junk))
    assert rc == 1 and "not a bundle, .tflite, safetensors or JSON file" in err


def test_aggregator_line_shows_the_running_round() -> None:
    from fededge.cli.render import describe_aggregator
    from fededge.protocol import AggregatorStatus

    a = AggregatorStatus(task="t", state="online", version=3, round_id="v3-0a1b2c3d",
                         round_stage="share_keys", checked_in=7)  # fmt: skip
    line = describe_aggregator(a)
    assert "round v3-0a1b2c3d share_keys" in line and "checked_in=7" in line
    assert "round" not in describe_aggregator(AggregatorStatus(task="t", state="online"))
