"""Site gateways: a central broker, a site broker bridged to it with configs/site-bridge.conf as
shipped (address and CA path substituted), the central coordinator (``fededge aggregator
--coordinator``) and ``fededge gateway`` as processes, real device clients with real LiteRT on
the site broker. Versions are built from the gateway's partial sums; the bridge is cut (the
central broker stopped) while updates are pending and the gateway is killed -9 meanwhile; after
recovery every accepted update is counted exactly once."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from aggtools import Sender, init_task
from devtools import DIGITS_PLAN, cycle, digits_split, mlp_bundle, new_task, publish_task

from fededge.aggregator.partial import PartialSum
from fededge.device.client import Client
from fededge.gateway.service import Gateway
from fededge.keys import generate, public_text
from fededge.mqtt import Message, MqttClient
from fededge.protocol import BatchAck, ModelVersion, Plan, Receipt, Topics, decode_json
from fededge.protocol.messages import SecureAggregation
from fededge.protocol.signing import SignedKind, open_message
from fededge.settings import load_settings
from fededge.testing import wait_until
from fededge.testing.broker import Mosquitto, free_port, make_tls_files

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
SITE = "site-1"
TIMEOUT = 90.0  # a ceiling for a loaded machine, never a synchronisation


# --- two bridged brokers, the coordinator, the gateway and devices ---------------------------------


def _spawn(log: Path, *args: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "fededge.cli", *args]
    return subprocess.Popen(cmd, stdout=log.open("ab"), stderr=subprocess.STDOUT,
                            env={**os.environ, **env})  # fmt: skip


def _wait_log(proc: subprocess.Popen[bytes], log: Path, text: str, count: int = 1) -> None:
    def seen() -> bool:
        assert proc.poll() is None, log.read_text()[-3000:]
        return log.read_text().count(text) >= count

    try:
        wait_until(seen, TIMEOUT, f"{text!r} x{count} in {log.name}", interval=0.1)
    except TimeoutError:
        raise AssertionError(log.read_text()[-3000:]) from None


def _stop(proc: subprocess.Popen[bytes]) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    return proc.returncode


def _versions(root: Path) -> dict[int, tuple[ModelVersion, list[str]]]:
    out = {}
    for path in sorted((root / "versions").glob("*.safetensors")):
        info = json.loads(path.with_suffix(".json").read_text())
        keys = [k for k in info.get("update_keys", []) if not k.startswith("#")]
        out[int(path.stem)] = (ModelVersion.from_bytes(path.read_bytes(), max_bytes=1 << 30), keys)
    return out


def _stored_batches(root: Path) -> list[str]:
    keys: list[str] = []
    for path in (root / "batches").glob("*.bin"):
        keys += PartialSum.from_bytes(path.read_bytes(), max_bytes=1 << 30).keys
    return keys


def site_broker(workdir: Path, central_port: int, ca: Path, site: str = SITE) -> Mosquitto:
    """A site Mosquitto with configs/site-bridge.conf as shipped: only the address, the CA path
    and the site's name are changed."""
    text = (CONFIGS / "site-bridge.conf").read_text()
    assert "address central.example.org:8883" in text
    text = text.replace("central.example.org:8883", f"127.0.0.1:{central_port}")
    text = text.replace("site-1", site)
    text = text.replace("/etc/mosquitto/certs/central-ca.crt", str(ca))
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    return Mosquitto(workdir, extra_config=lines)


pytestmark = pytest.mark.broker


@pytest.mark.parametrize("cut", ["stop", "kill"])
def test_gateway_builds_versions_through_a_bridge_and_survives_a_cut(
    tmp_path: Path, cut: str
) -> None:
    tls = make_tls_files(tmp_path / "tls")
    tls_port = free_port()
    central = Mosquitto(tmp_path / "central",
                        extra_config=tls.listener(tls_port, require_certificate=False))  # fmt: skip
    central.start()
    site = site_broker(tmp_path / "site", tls_port, tls.ca_cert)
    site.start()
    task = new_task()
    agg_key, gw_key = tmp_path / "agg.key", tmp_path / "gw.key"
    trust = {"aggregator_key": public_text(generate(agg_key).public_key()),
             "gateway_key": public_text(generate(gw_key).public_key())}  # fmt: skip
    plan = DIGITS_PLAN.model_copy(update={"min_updates_per_version": 3, "examples_per_update": 16,
                                          "max_staleness": 10, "max_updates_per_device": 5})  # fmt: skip
    owner = load_settings(None, {"broker": {"url": central.url}, "task": task})
    publish_task(owner, plan)

    logs = {"central": tmp_path / "central.log", "gateway": tmp_path / "gateway.log"}
    state_c, state_g = tmp_path / "state-central", tmp_path / "state-gateway"
    env = {"FEDEDGE_AGGREGATOR__METRICS": "false", "FEDEDGE_AGGREGATOR__LEASE_SETTLE": "0.3"}
    central_args = ("aggregator", "--broker", central.url, "--task", task, "--state-dir",
                    str(state_c), "--coordinator", "--gateway", SITE)  # fmt: skip
    gateway_args = ("gateway", "--broker", site.url, "--task", task, "--state-dir",
                    str(state_g), "--site", SITE, "--signing-key", str(gw_key))  # fmt: skip
    # The gateway checks the versions it relays with the central aggregator's key, like a device.
    # Each round is 3 updates = min_updates_per_version: every batch goes up because it is full
    # (ship_interval 600 s never fires), so which updates share a batch is deterministic.
    gw_env = {**env, "FEDEDGE_GATEWAY__SHIP_INTERVAL": "600", "FEDEDGE_GATEWAY__SHIP_TIMEOUT": "3",
              "FEDEDGE_TRUST__AGGREGATOR_KEY": trust["aggregator_key"]}  # fmt: skip
    procs = {
        "central": _spawn(logs["central"], *central_args,
                          env={**env, "FEDEDGE_AGGREGATOR__SIGNING_KEY": str(agg_key)}),
    }  # fmt: skip
    _wait_log(procs["central"], logs["central"], "aggregator ready")
    procs["gateway"] = _spawn(logs["gateway"], *gateway_args, env=gw_env)
    _wait_log(procs["gateway"], logs["gateway"], "gateway ready")

    # Every receipt the site's devices get, as an observer on the site broker sees it.
    topics = Topics("fededge", task)
    accepted: set[str] = set()
    lock = threading.Lock()
    gw_pub = [load_settings(None, {"trust": trust}).trust.gateway_keys()[0]]

    bridge_states: list[bytes] = []

    def on_receipt(msg: Message) -> None:
        if msg.topic == f"fededge/bridges/{SITE}/state":
            bridge_states.append(msg.payload)
            return
        r = decode_json(open_message(msg.payload, SignedKind.RECEIPT, gw_pub).payload, Receipt)
        if r.status == "accepted":
            with lock:
                accepted.add(f"{r.device}/{r.update_id}")

    observer = MqttClient(site.settings(), f"obs-{task}", persistent=False)
    observer.connect()
    observer.subscribe(f"{topics.base}/receipts/+", qos=1)
    observer.subscribe(f"fededge/bridges/{SITE}/state", qos=1)  # the shipped notifications
    stop_obs = threading.Event()

    def drain() -> None:
        while not stop_obs.is_set():
            with contextlib.suppress(queue.Empty):
                on_receipt(observer.messages.get(timeout=0.2))

    obs_thread = threading.Thread(target=drain, daemon=True)
    obs_thread.start()

    parts, _, _ = digits_split(3)
    clients = [
        Client(load_settings(None, {"broker": site.settings().model_dump(), "task": task,
                                    "state_dir": tmp_path / "dev", "trust": trust,
                                    "device": {"device_id": f"d{i}", "metrics": False,
                                               "seed": i}}), bundle=mlp_bundle())
        for i in range(3)
    ]  # fmt: skip
    root = state_c / "aggregator" / task
    pos = 0

    def round_of_updates() -> None:
        nonlocal pos
        for c, part in zip(clients, parts, strict=True):
            c.fit(*cycle(part, pos, plan.examples_per_update))
        pos += plan.examples_per_update

    def central_version() -> int:
        return max(_versions(root), default=0)

    try:
        for c in clients:
            c.start()
        # Two versions built from the site's partial sums, the bridge up.
        for v in range(2):
            for c in clients:
                assert c.wait_for_version(v, TIMEOUT), f"{c.device_id} never saw version {v}"
            round_of_updates()
            wait_until(lambda: central_version() > v, TIMEOUT, f"version {v + 1}")  # noqa: B023
        for c in clients:
            assert c.wait_for_version(2, TIMEOUT)

        # Cut the bridge: the central broker goes away (stopped, or killed -9: then it also
        # loses the sessions and retained messages it had not saved). The site keeps working:
        # updates are accepted (receipts from the gateway), one batch goes out (queued by the
        # site broker's bridge), the next opens.
        central.stop() if cut == "stop" else central.kill()
        round_of_updates()
        for c in clients:
            assert c.wait_idle(TIMEOUT), f"{c.device_id} got no receipt during the cut"
        _wait_log(procs["gateway"], logs["gateway"], "sent batch 2 upstream")
        round_of_updates()
        for c in clients:
            assert c.wait_idle(TIMEOUT)
        # The gateway crashes meanwhile: the out batch and the open one are in its logs.
        procs["gateway"].send_signal(signal.SIGKILL)
        procs["gateway"].wait(10)
        procs["gateway"] = _spawn(logs["gateway"], *gateway_args, env=gw_env)
        _wait_log(procs["gateway"], logs["gateway"], "gateway ready", 2)
        assert "open batch 3 with 3 updates" in logs["gateway"].read_text()

        # The bridge is back: the batch that was out is merged once, then the open one.
        central.start()
        wait_until(lambda: central_version() >= 4, TIMEOUT, "versions 3 and 4 after the cut")
        # The bridge's state on the site broker: up, down during the cut, up again.
        wait_until(lambda: bridge_states[-1:] == [b"1"] and b"0" in bridge_states, TIMEOUT,
                   "the bridge state notifications")  # fmt: skip
        for c in clients:
            assert c.wait_for_version(4, TIMEOUT)

        def settled() -> bool:
            counted = [k for _, keys in _versions(root).values() for k in keys]
            with lock:
                return sorted(counted + _stored_batches(root)) == sorted(accepted)

        wait_until(settled, TIMEOUT, "every accepted update in a version, once")
    finally:
        for c in clients:
            c.close()
        stop_obs.set()
        observer.close()
        codes = {name: _stop(p) for name, p in procs.items()}
        site.stop()
        central.stop()
    out = {n: p.read_text()[-3000:] for n, p in logs.items()}
    assert set(codes.values()) == {0}, (codes, out)
    versions = _versions(root)
    counted = [k for _, keys in versions.values() for k in keys]
    assert len(counted) == len(set(counted)) == len(accepted) == 12, out  # 4 rounds x 3 devices
    for v in range(1, 5):
        model, keys = versions[v]
        assert model.updates == len(keys) == 3, (v, keys)
    central_log = logs["central"].read_text()
    assert "batch gateway-site-1/2: merged" in central_log, out


# --- one gateway alone, the central answers played by the test ------------------------------------


def test_gateway_answers_devices_and_follows_central_answers_and_refuses_garbage(
    broker: Mosquitto, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    task = new_task()
    s = load_settings(None, {"broker": broker.settings().model_dump(), "task": task,
                             "state_dir": tmp_path / "gw",
                             "aggregator": {"metrics": True, "metrics_port": 0},
                             "gateway": {"site": "s", "ship_interval": 600,
                                         "ship_timeout": 600}})  # fmt: skip
    plan = Plan(min_updates_per_version=2, clip_norm=1e9, max_staleness=5,
                max_updates_per_device=5)  # fmt: skip
    init_task(s, {"w": np.zeros(6, np.float32)}, plan)
    topics = Topics("fededge", task)
    partials = MqttClient(broker.settings(), f"obs-{task}", persistent=False)
    partials.connect()
    partials.subscribe(topics.partial("gateway-s"), qos=1)

    def next_partial() -> PartialSum:
        msg = partials.messages.get(timeout=TIMEOUT)
        return PartialSum.from_bytes(msg.payload, max_bytes=1 << 20)

    def answer(payload: bytes) -> None:
        partials.publish(topics.batch_ack("gateway-s"), payload, qos=1, wait=True, timeout=10)

    gw = Gateway(s)
    stop = threading.Event()
    gw.start(should_stop=stop.is_set)
    runner = threading.Thread(target=gw.run, args=(stop.is_set,), daemon=True)
    runner.start()
    d1, d2 = Sender(s, "d1"), Sender(s, "d2")
    delta = {"w": np.ones(6, np.float32)}

    def resend_u2() -> str:
        d2.receipts.pop("u2")
        d2.update(delta, uid="u2", n=5)
        return d2.receipt("u2").status

    try:
        d1.raw(b"garbage")  # no update id: no receipt, acknowledged, logged
        assert d1.update(delta, uid="u1", n=3) and d1.receipt("u1").status == "accepted"
        assert d2.update(delta, uid="u2", n=5) and d2.receipt("u2").status == "accepted"
        p = next_partial()
        assert (p.worker, p.seq, p.count, p.weight, sorted(p.keys)) == (
            "gateway-s", 0, 2, 8.0, ["d1/u1", "d2/u2"])  # fmt: skip
        np.testing.assert_array_equal(p.sums["w"], np.full(6, 8.0))
        # While the batch is out the site goes on: the next update opens batch 1.
        # (ship_interval is 600 s: every batch here goes up because it is full, none by age.)
        assert d1.update(delta, uid="u3", n=1) and d1.receipt("u3").status == "accepted"
        assert d2.update(delta, uid="u5", n=1) and d2.receipt("u5").status == "accepted"
        assert resend_u2() == "duplicate"
        answer(b"{not json")  # a hostile answer is logged and ignored
        # A coordinator that does not know the site refuses: the batch stays out (sent again
        # every ship_timeout), the site goes on.
        answer(BatchAck(task=task, worker="gateway-s", seq=0, status="refused",
                        detail="not configured").to_bytes())  # fmt: skip
        wait_until(lambda: "refused batch 0 of gateway-s: not configured" in caplog.text,
                   TIMEOUT, "the refusal logged")  # fmt: skip
        assert gw.batches.out_seq == 0
        # The central side had counted d1/u1 already (another path): batch 0 goes again
        # without it, same sequence number.
        answer(BatchAck(task=task, worker="gateway-s", seq=0, status="conflict",
                        exclude=["d1/u1"]).to_bytes())  # fmt: skip
        p = next_partial()
        assert (p.seq, p.count, p.keys, p.weight) == (0, 1, ["d2/u2"], 5.0)
        answer(BatchAck(task=task, worker="gateway-s", seq=0, status="merged").to_bytes())
        # Batch 0 was short (1 < min_updates_per_version): batch 1 goes without a new version.
        p = next_partial()
        assert (p.seq, p.keys) == (1, ["d1/u3", "d2/u5"])
        assert gw.batches.merged == 0 and gw.batches.out_seq == 1
        assert resend_u2() == "duplicate"
        # A plan asking for secure aggregation: plain updates are refused, with the reason.
        secure = plan.model_copy(update={"secure_aggregation": SecureAggregation(
            cohort_size=3, min_cohort=3, threshold=2)})  # fmt: skip
        partials.publish(topics.plan, secure.to_bytes(), qos=1, retain=True, wait=True,
                         timeout=10)  # fmt: skip
        wait_until(lambda: gw.plan.secure_aggregation is not None, TIMEOUT, "the secure plan")
        d1.update(delta, uid="u4", n=1)
        r = d1.receipt("u4")
        assert (r.status, r.reason) == ("rejected", "secure_aggregation")

        def sample(name: str, **labels: str) -> float | None:
            return gw.metrics.registry.get_sample_value(name, labels)

        assert sample("fededge_gateway_updates_accepted_total") == 4
        assert sample("fededge_gateway_updates_duplicate_total") == 2
        assert sample("fededge_gateway_updates_rejected_total", reason="malformed") == 1
        assert sample("fededge_gateway_updates_rejected_total", reason="secure_aggregation") == 1
        assert sample("fededge_gateway_control_messages_rejected_total") == 1
        for status, n in (("conflict", 1), ("refused", 1), ("merged", 1), ("duplicate", 0)):
            assert sample("fededge_gateway_partials_answered_total", status=status) == n
        assert sample("fededge_gateway_partials_sent_total") == 3
        assert sample("fededge_gateway_out_batch_updates") == 2
        assert sample("fededge_gateway_out_batch_age_seconds") > 0  # type: ignore[operator]
        with urllib.request.urlopen(f"http://127.0.0.1:{gw.metrics_port}/metrics") as resp:
            assert b"fededge_gateway_open_batch_updates 0.0" in resp.read()
    finally:
        stop.set()
        runner.join(30)
        gw.close()
        for c in (d1, d2, partials):
            c.close()
    assert gw.accepted_total == 4


def test_gateway_command_needs_a_site(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fededge.cli import main

    assert main(["gateway", "--broker", "mqtt://127.0.0.1:1", "--state-dir", str(tmp_path)]) == 2
    assert "gateway.site is not set: pass --site NAME" in capsys.readouterr().err
    assert main(["gateway", "--site", "no/slash", "--state-dir", str(tmp_path)]) == 2
    assert "gateway.site" in capsys.readouterr().err


def test_two_sites_fill_one_version_together(tmp_path: Path) -> None:
    """Neither site has min_updates_per_version updates: each sends its short batch(es) after
    ship_interval and the coordinator merges them into one version, the weighted mean of all."""
    tls = make_tls_files(tmp_path / "tls")
    tls_port = free_port()
    central = Mosquitto(tmp_path / "central",
                        extra_config=tls.listener(tls_port, require_certificate=False))  # fmt: skip
    central.start()
    sites = {s: site_broker(tmp_path / s, tls_port, tls.ca_cert, s) for s in ("s-1", "s-2")}
    for b in sites.values():
        b.start()
    task = new_task()
    plan = Plan(min_updates_per_version=4, clip_norm=1e9, max_staleness=5)
    init_task(load_settings(None, {"broker": {"url": central.url}, "task": task}),
              {"w": np.zeros(3, np.float32)}, plan)  # fmt: skip
    env = {"FEDEDGE_AGGREGATOR__METRICS": "false", "FEDEDGE_AGGREGATOR__LEASE_SETTLE": "0.3",
           "FEDEDGE_GATEWAY__SHIP_INTERVAL": "0.3"}  # fmt: skip
    state = tmp_path / "state"
    logs = {n: tmp_path / f"{n}.log" for n in ("central", "s-1", "s-2")}
    procs = {"central": _spawn(logs["central"], "aggregator", "--broker", central.url, "--task",
                               task, "--state-dir", str(state), "--coordinator",
                               "--gateway", "s-1", "--gateway", "s-2", env=env)}  # fmt: skip
    senders: dict[str, Sender] = {}
    sent: dict[str, tuple[float, int]] = {}  # key -> (delta value, examples)
    try:
        _wait_log(procs["central"], logs["central"], "aggregator ready")
        for s, b in sites.items():
            procs[s] = _spawn(logs[s], "gateway", "--broker", b.url, "--task", task,
                              "--state-dir", str(state), "--site", s, env=env)  # fmt: skip
            _wait_log(procs[s], logs[s], "gateway ready")
            for d in ("a", "b"):
                senders[f"{s}{d}"] = Sender(load_settings(None, {"broker": b.settings().model_dump(),
                                                                  "task": task}), f"{s}{d}")  # fmt: skip
        for v in range(2):
            for i, (name, snd) in enumerate(senders.items()):
                uid, value, n = f"u{v}", float(i + 1 + 4 * v), 1 + i
                sent[f"{name}/{uid}"] = (value, n)
                snd.update({"w": np.full(3, value, np.float32)}, base=v, n=n, uid=uid)
            for snd in senders.values():
                assert snd.receipt(f"u{v}", TIMEOUT).status == "accepted"
            for snd in senders.values():
                snd.model(v + 1, TIMEOUT)  # the version, down the bridge of its site
    finally:
        for snd in senders.values():
            snd.close()
        codes = {name: _stop(p) for name, p in procs.items()}
        for b in sites.values():
            b.stop()
        central.stop()
    out = {n: p.read_text()[-2000:] for n, p in logs.items()}
    assert set(codes.values()) == {0}, (codes, out)
    root = state / "aggregator" / task
    prev = np.zeros(3)
    for v in (1, 2):
        info = json.loads((root / "versions" / f"{v:08d}.json").read_text())
        keys = [k for k in info["update_keys"] if not k.startswith("#")]
        # Both sites' batches are in it (usually one each; two if a site's second update came
        # after its first batch had left).
        markers = [k for k in info["update_keys"] if k.startswith("#")]
        assert {m.split("/")[1] for m in markers} == {"gateway-s-1", "gateway-s-2"}, markers
        assert sorted(keys) == sorted(k for k in sent if k.endswith(f"/u{v - 1}"))
        w = np.array([sent[k][1] for k in keys], np.float64)
        x = np.array([sent[k][0] for k in keys], np.float64)
        expected = prev + (w * x).sum() / w.sum()
        model = _versions(root)[v][0]
        np.testing.assert_allclose(model.weights["w"], expected, rtol=1e-6)
        prev = expected


# --- exactly once when a key is forgotten: another site, a restart during a cut ------------------


class Link:
    """A TCP relay to the central broker's port, cut and restored by the test: one site's uplink
    goes away while the central broker and the other site stay up."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.port = free_port()
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        self._server: socket.socket | None = None
        self.restore()

    def restore(self) -> None:
        self._server = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, args=(self._server,), daemon=True).start()

    def _accept(self, server: socket.socket) -> None:
        while True:
            try:
                near, _ = server.accept()
                far = socket.create_connection(("127.0.0.1", self.target), timeout=10)
            except OSError:
                return  # cut
            far.settimeout(None)
            with self._lock:
                if self._server is not server:
                    near.close()
                    far.close()
                    return
                self._socks += [near, far]
            for src, dst in ((near, far), (far, near)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(1 << 16):
                dst.sendall(data)
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        with self._lock:
            server, self._server = self._server, None
            socks, self._socks = self._socks, []
        if server is not None:
            with contextlib.suppress(OSError):
                server.shutdown(socket.SHUT_RDWR)  # wakes accept()
            server.close()
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()


class Merges:
    """What the coordinator merged, seen on the central broker: each batch's latest copy and
    the answers; an update counts once per batch answered ``merged``."""

    def __init__(self, central: Mosquitto, topics: Topics) -> None:
        self.client = MqttClient(central.settings(), "merges-observer", persistent=False)
        self.client.connect()
        self.client.subscribe(topics.partials_filter, qos=1)
        self.client.subscribe(f"{topics.base}/aggregator/acks/+", qos=1)
        self.latest: dict[tuple[str, int], list[str]] = {}
        self.merged: list[str] = []

    def count(self, key: str) -> int:
        with contextlib.suppress(queue.Empty):
            while True:
                msg = self.client.messages.get_nowait()
                if "/partials/" in msg.topic:
                    p = PartialSum.from_bytes(msg.payload, max_bytes=1 << 30)
                    self.latest[(p.worker, p.seq)] = p.keys
                else:
                    ack = decode_json(msg.payload, BatchAck)
                    if ack.status == "merged":
                        self.merged += self.latest.get((ack.worker, ack.seq), [])
        return self.merged.count(key)


class TwoSites:
    """A central broker and coordinator, sites s-1 (its bridge through a ``Link``) and s-2 with
    their gateways, every process keeping ``versions_kept = 2``."""

    def __init__(self, tmp_path: Path, plan: Plan) -> None:
        tls = make_tls_files(tmp_path / "tls")
        tls_port = free_port()
        self.central = Mosquitto(tmp_path / "central",
                                 extra_config=tls.listener(tls_port, require_certificate=False))  # fmt: skip
        self.central.start()
        self.link = Link(tls_port)
        self.sites = {s: site_broker(tmp_path / s, port, tls.ca_cert, s)
                      for s, port in (("s-1", self.link.port), ("s-2", tls_port))}  # fmt: skip
        for b in self.sites.values():
            b.start()
        self.task = new_task()
        init_task(load_settings(None, {"broker": {"url": self.central.url}, "task": self.task}),
                  {"w": np.zeros(3, np.float32)}, plan)  # fmt: skip
        self.merges = Merges(self.central, Topics("fededge", self.task))
        self.env = {"FEDEDGE_AGGREGATOR__METRICS": "false",
                    "FEDEDGE_AGGREGATOR__LEASE_SETTLE": "0.3",
                    "FEDEDGE_AGGREGATOR__VERSIONS_KEPT": "2",
                    "FEDEDGE_GATEWAY__SHIP_INTERVAL": "0.3",
                    "FEDEDGE_GATEWAY__SHIP_TIMEOUT": "3"}  # fmt: skip
        self.state = tmp_path / "state"
        self.logs = {n: tmp_path / f"{n}.log" for n in ("central", "s-1", "s-2")}
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.senders: list[Sender] = []
        self.procs["central"] = _spawn(
            self.logs["central"], "aggregator", "--broker", self.central.url, "--task", self.task,
            "--state-dir", str(self.state), "--coordinator", "--gateway", "s-1", "--gateway",
            "s-2", env=self.env)  # fmt: skip
        _wait_log(self.procs["central"], self.logs["central"], "aggregator ready")
        for s in self.sites:
            self.start_gateway(s)

    def start_gateway(self, site: str, count: int = 1) -> None:
        self.procs[site] = _spawn(self.logs[site], "gateway", "--broker", self.sites[site].url,
                                  "--task", self.task, "--state-dir", str(self.state), "--site",
                                  site, env=self.env)  # fmt: skip
        _wait_log(self.procs[site], self.logs[site], "gateway ready", count)

    def kill_gateway(self, site: str) -> None:
        self.procs[site].send_signal(signal.SIGKILL)
        self.procs[site].wait(10)

    def sender(self, site: str, device: str) -> Sender:
        s = load_settings(None, {"broker": self.sites[site].settings().model_dump(),
                                 "task": self.task})  # fmt: skip
        self.senders.append(Sender(s, device))
        return self.senders[-1]

    def close(self) -> dict[str, str]:
        for snd in self.senders:
            snd.close()
        self.merges.client.close()
        codes = {name: _stop(p) for name, p in self.procs.items()}
        for b in self.sites.values():
            b.stop()
        self.link.cut()
        self.central.stop()
        out = {n: p.read_text()[-3000:] for n, p in self.logs.items()}
        assert set(codes.values()) == {0}, (codes, out)
        return out


def _delta(value: float) -> dict[str, np.ndarray]:
    return {"w": np.full(3, value, np.float32)}


# One update per version; an update may be 10 versions old, the memory of counted updates holds
# 2 versions (centrally and at the gateways): older resends can no longer be recognised.
FORGETFUL = Plan(min_updates_per_version=1, clip_norm=1e9, max_staleness=10,
                 max_updates_per_device=5)  # fmt: skip


def test_a_resend_older_than_the_central_memory_is_stale_at_another_site(tmp_path: Path) -> None:
    """d's update k is counted through site s-1; the central side keeps 2 versions, so 3
    versions later it has forgotten k. d moves to site s-2 without its receipt and resends k:
    s-2 never saw it and the coordinator would merge it again, so s-2 rejects it as stale, on
    the same floor as a shard worker (base version older than the versions remembered)."""
    t = TwoSites(tmp_path, FORGETFUL)
    try:
        d, e = t.sender("s-1", "d"), t.sender("s-2", "e")
        d.update(_delta(1.0), base=0, uid="k")
        assert d.receipt("k", TIMEOUT).status == "accepted"
        for v in (1, 2, 3):  # accepted on base v: s-2 has seen version v
            e.model(v, TIMEOUT)
            e.update(_delta(2.0 + v), base=v, uid=f"e{v}")
            assert e.receipt(f"e{v}", TIMEOUT).status == "accepted"
        e.model(4, TIMEOUT)  # the central side keeps versions 3 and 4; k is in version 1
        moved = t.sender("s-2", "d")
        moved.update(_delta(1.0), base=0, uid="k")
        r = moved.receipt("k", TIMEOUT)
        # Whatever s-2 did with k went up before e's next update (one batch at a time, in order).
        e.update(_delta(9.0), base=4, uid="e4")
        assert e.receipt("e4", TIMEOUT).status == "accepted"
        wait_until(lambda: t.merges.count("e/e4"), TIMEOUT, "e4 merged")
        assert t.merges.count("d/k") == 1, "k counted twice"
        assert (r.status, r.reason) == ("rejected", "stale"), r
        assert "older than the oldest version whose update ids are remembered" in (r.detail or "")
    finally:
        t.close()


def test_a_gateway_killed_during_a_cut_still_knows_what_it_merged(tmp_path: Path) -> None:
    """k is merged through s-1; s-1's uplink is cut and its gateway killed -9 and restarted; the
    central side builds versions from s-2 until it has forgotten k. d, which never got k's
    receipt, resends it: s-1 (still on version 1, so k is within every floor it knows) answers
    it as a duplicate from its durable memory, instead of sending k up again, where nothing
    could recognise it any more."""
    t = TwoSites(tmp_path, FORGETFUL)
    try:
        d, e = t.sender("s-1", "d"), t.sender("s-2", "e")
        d.update(_delta(1.0), base=0, uid="k")
        assert d.receipt("k", TIMEOUT).status == "accepted"
        _wait_log(t.procs["s-1"], t.logs["s-1"], "batch 0 merged upstream")
        d.model(1, TIMEOUT)
        t.link.cut()
        t.kill_gateway("s-1")
        t.start_gateway("s-1", 2)
        for v in (1, 2, 3):
            e.model(v, TIMEOUT)
            e.update(_delta(2.0 + v), base=v, uid=f"e{v}")
            assert e.receipt(f"e{v}", TIMEOUT).status == "accepted"
        e.model(4, TIMEOUT)  # the central side keeps versions 3 and 4; k is in version 1
        d.receipts.pop("k")
        d.update(_delta(1.0), base=0, uid="k")
        r = d.receipt("k", TIMEOUT)
        d.update(_delta(7.0), base=1, uid="f")
        assert d.receipt("f", TIMEOUT).status == "accepted"
        t.link.restore()
        wait_until(lambda: t.merges.count("d/f"), TIMEOUT, "f merged after the cut")
        assert t.merges.count("d/k") == 1, "k counted twice"
        assert (r.status, r.version) == ("duplicate", 1), r  # s-1 was on version 1
    finally:
        t.close()
