"""Secure-aggregation rounds end to end: real Mosquitto, real aggregator, real device clients.

Devices "drop out" at a chosen stage through the broker itself: they connect with a user name
whose ACL forbids publishing that stage's topic (Mosquitto discards the message silently), so
the drop happens at exactly the right moment and the rest of the device keeps running.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aggtools import make_settings, running_aggregator
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from devtools import DIGITS_PLAN, broker_overrides, digits_split, new_task, publish_task, wait_until
from secagg_tools import enroll, make_identities, publish_roster

from fededge.device.client import Client
from fededge.device.secagg_client import ReadyInput
from fededge.keys import public_text
from fededge.mqtt import MqttClient
from fededge.protocol import ModelVersion, Plan, Topics
from fededge.protocol.messages import SecureAggregation
from fededge.protocol.roster import Roster
from fededge.secagg.quantize import max_scale, mean_error_bound
from fededge.settings import Settings, load_settings

pytestmark = pytest.mark.broker

STAGES = ("advertise", "share", "masked", "consistency", "unmask")


def acl_file(directory: Path) -> Path:
    """An ACL: anonymous clients may do anything; user ``no-<stage>`` cannot send that stage."""
    lines = ["topic readwrite #", ""]
    for stage in STAGES:
        lines += [f"user no-{stage}", "topic read #", "topic write fededge/+/devices/+/status",
                  "topic write fededge/+/rounds/checkin/+"]  # fmt: skip
        lines += [f"topic write fededge/+/rounds/+/{s}/+" for s in STAGES if s != stage]
        lines.append("")
    path = directory / "acl"
    path.write_text("\n".join(lines))
    return path


@pytest.fixture
def acl_broker(mosquitto_factory: Any, tmp_path: Path) -> Any:
    return mosquitto_factory([f"acl_file {acl_file(tmp_path)}"])


def sa_plan(**kw: Any) -> Plan:
    sa = {"stage_timeout": 3.0, "checkin_window": 1.0, "checkin_interval": 0.5, **kw}
    return DIGITS_PLAN.model_copy(update={"secure_aggregation": SecureAggregation(**sa)})


def client_settings(url: str, state: Path, task: str, device: str, user: str | None) -> Settings:
    broker = {**broker_overrides(url), "username": user}
    dev = {"device_id": device, "metrics": False, "seed": zlib.crc32(device.encode())}
    return load_settings(None, {"broker": broker, "task": task, "state_dir": state, "device": dev})


class Fleet:
    """In-process device clients; records each update a device hands to its round (test only)."""

    def __init__(self, url: str, state: Path, task: str, users: dict[str, str]) -> None:
        self.clients: dict[str, Client] = {}
        self.offered: dict[str, list[ReadyInput]] = {}
        self.url, self.state, self.task, self.users = url, state, task, users

    def add(self, device: str) -> Client:
        c = Client(client_settings(self.url, self.state, self.task, device,
                                   self.users.get(device)))  # fmt: skip
        record = self.offered.setdefault(device, [])
        offer = c.core.secagg.offer

        def recording_offer(ready: ReadyInput) -> None:
            record.append(ready)
            offer(ready)

        c.core.secagg.offer = recording_offer  # type: ignore[method-assign]
        self.clients[device] = c
        return c

    def close(self) -> None:
        for c in self.clients.values():
            with contextlib.suppress(Exception):
                c.close(timeout=5)


@contextlib.contextmanager
def fleet(
    url: str,
    state: Path,
    task: str,
    users: dict[str, str],
    n: int,
    extra: dict[str, Ed25519PrivateKey] | None = None,
) -> Iterator[Fleet]:
    """n device clients, enrolled (with ``extra`` identities) in a roster, started."""
    f = Fleet(url, state, task, users)
    broker = load_settings(None, {"broker": broker_overrides(url)}).broker
    others = {name: public_text(k.public_key()) for name, k in (extra or {}).items()}
    enroll(broker, state, task, [f"d{i:02d}" for i in range(n)], extra=others)
    try:
        for i in range(n):
            f.add(f"d{i:02d}")
        for c in f.clients.values():
            c.start()
        yield f
    finally:
        f.close()


def expected_version(
    base: ModelVersion, inputs: list[ReadyInput], plan: Plan
) -> dict[str, np.ndarray]:
    """base + server_lr * the plaintext weighted mean of the inputs (float64)."""
    sa = plan.secure_aggregation
    assert sa is not None
    weights = [min(r.num_examples, sa.max_weight) for r in inputs]
    total = sum(weights)
    out = {}
    for name, w0 in base.weights.items():
        mean = sum(
            w * r.delta[name].astype(np.float64) for w, r in zip(weights, inputs, strict=True)
        )
        out[name] = w0.astype(np.float64) + plan.server_learning_rate * mean / total
    return out


def error_bound(n: int, plan: Plan, total_weight: float) -> float:
    """The documented fixed-point error of the new weights (quantize.mean_error_bound)."""
    sa = plan.secure_aggregation
    assert sa is not None
    scale = max_scale(n, plan.clip_norm, sa.bits)
    bound = mean_error_bound(n, plan.clip_norm, scale, total_weight / sa.max_weight)
    return plan.server_learning_rate * bound


def feed(f: Fleet, parts: list[tuple[np.ndarray, np.ndarray]], n: int = 32) -> None:
    for i, c in enumerate(f.clients.values()):
        x, y = parts[i]
        c.fit(x[:n], y[:n])


def assert_close(got: ModelVersion, want: dict[str, np.ndarray], bound: float) -> float:
    worst = 0.0
    for name, w in want.items():
        diff = np.abs(got.weights[name].astype(np.float64) - w)
        # plus float32 rounding of the published weights
        tol = bound + np.abs(w) * 2.0**-23 + 1e-12
        assert np.all(diff <= tol), (name, float(diff.max()), bound)
        worst = max(worst, float(diff.max()))
    return worst


def test_round_with_dropouts_publishes_the_survivors_mean(acl_broker: Any, tmp_path: Path) -> None:
    """20 devices; 2 cannot send their masked input, 3 cannot answer the unmask request."""
    task = new_task()
    # The window is long so the round waits for all 20 check-ins, however loaded the host.
    plan = sa_plan(
        cohort_size=20, min_cohort=12, threshold=11, stage_timeout=5.0, checkin_window=120.0
    )
    s = make_settings(acl_broker.url, tmp_path / "agg", task=task)
    base = publish_task(s, plan)
    users = {"d03": "no-masked", "d11": "no-masked", "d05": "no-unmask", "d07": "no-unmask",
             "d16": "no-unmask"}  # fmt: skip
    parts, _, _ = digits_split(20)
    with running_aggregator(s) as agg, fleet(acl_broker.url, tmp_path, task, users, 20) as f:
        wait_until(lambda: all(c.version == 0 for c in f.clients.values()), 30, "version 0")
        feed(f, parts)
        wait_until(lambda: agg.version == 1, 60, "version 1 from a secure round")
        assert agg.model is not None
        survivors = [d for d in f.clients if users.get(d) != "no-masked"]
        assert agg.model.updates == len(survivors) == 18
        assert agg.rounds.rounds_done == 1 and agg.rounds.rounds_aborted == 0
        reg = agg.metrics.registry  # the same, as Prometheus sees it
        assert reg.get_sample_value("fededge_secure_rounds_done_total") == 1
        assert (
            reg.get_sample_value("fededge_secure_round_stage", {"stage": str(agg.rounds.stage)})
            == 1
        )
        inputs = [f.offered[d][-1] for d in survivors]
        want = expected_version(base, inputs, plan)
        total = sum(r.num_examples for r in inputs)
        bound = error_bound(20, plan, total)
        assert bound < 1e-4
        assert_close(agg.model, want, bound)
        # Every device took part; the spent updates were not resent in plaintext.
        assert all(c.core.secagg.masked_sent == 1 for c in f.clients.values())
        assert agg.accepted_total == 0


def test_round_starts_after_the_checkin_window_with_fewer_devices(
    broker: Any, tmp_path: Path
) -> None:
    """Five ready devices of a wanted six: the round starts once the window has passed."""
    task = new_task()
    plan = sa_plan(cohort_size=6, min_cohort=5, threshold=4, checkin_window=2.0)
    s = make_settings(broker.url, tmp_path / "agg", task=task)
    base = publish_task(s, plan)
    parts, _, _ = digits_split(5)
    with running_aggregator(s) as agg, fleet(broker.url, tmp_path, task, {}, 5) as f:
        wait_until(lambda: all(c.version == 0 for c in f.clients.values()), 30, "version 0")
        feed(f, parts)
        wait_until(lambda: agg.version == 1, 30, "version 1")
        assert agg.model is not None and agg.model.updates == 5
        assert agg.rounds.last_dropped == {}
        want = expected_version(base, [f.offered[d][-1] for d in f.clients], plan)
        assert_close(agg.model, want, error_bound(5, plan, 5 * 32))


@pytest.mark.slow
def test_aggregator_restart_mid_round(acl_broker: Any, tmp_path: Path) -> None:
    """The aggregator stops while a round waits in its share stage; after a restart the devices
    leave the dead round, check in again with the same (unrevealed) updates, and a new round
    publishes. The dead round's retained config is cleared."""
    task = new_task()
    # five devices, t = 3 > 5/2: the four left after d03's drop each keep 3 live neighbours
    plan = sa_plan(cohort_size=5, min_cohort=5, threshold=3, stage_timeout=3.0)
    s = make_settings(acl_broker.url, tmp_path / "agg", task=task)
    base = publish_task(s, plan)
    parts, _, _ = digits_split(5)
    users = {"d03": "no-share"}
    with fleet(acl_broker.url, tmp_path, task, users, 5) as f:
        with running_aggregator(s) as agg:
            wait_until(lambda: all(c.version == 0 for c in f.clients.values()), 30, "version 0")
            feed(f, parts)
            wait_until(lambda: agg.rounds.stage == "share", 20, "the share stage")
        with running_aggregator(s) as agg:
            wait_until(lambda: agg.version == 1, 60, "version 1 after the restart")
            assert agg.model is not None and agg.model.updates == 4
            assert agg.rounds.last_dropped.keys() == {"d03"}
        honest = [d for d in f.clients if d not in users]
        assert all(f.clients[d].core.secagg.masked_sent == 1 for d in honest)
        assert all(len(f.offered[d]) == 1 for d in honest)  # trained once, used in round 2
        want = expected_version(base, [f.offered[d][-1] for d in honest], plan)
        assert_close(agg.model, want, error_bound(5, plan, 4 * 32))
    watcher = MqttClient(acl_broker.settings(), f"w-{task}", persistent=False)
    watcher.connect()
    try:
        watcher.subscribe(f"fededge/{task}/rounds/+/config")
        with contextlib.suppress(queue.Empty):
            msg = watcher.messages.get(timeout=1.0)
            assert not msg.payload, f"a retained round config is left: {msg.topic}"
    finally:
        watcher.close()


def test_below_threshold_aborts_publishes_nothing_and_keeps_unrevealed_updates(
    acl_broker: Any, tmp_path: Path
) -> None:
    """Two of four devices cannot advertise keys: t = 3 is out of reach, the round aborts."""
    task = new_task()
    plan = sa_plan(cohort_size=4, min_cohort=4, threshold=3, stage_timeout=1.0)
    s = make_settings(acl_broker.url, tmp_path / "agg", task=task)
    publish_task(s, plan)
    users = {"d01": "no-advertise", "d02": "no-advertise"}
    parts, _, _ = digits_split(4)
    watcher = MqttClient(acl_broker.settings(), f"w-{task}", persistent=False)
    watcher.connect()
    topics = Topics("fededge", task)
    watcher.subscribe(f"{topics.base}/rounds/+/status")
    watcher.subscribe(topics.model)
    try:
        with running_aggregator(s) as agg, fleet(acl_broker.url, tmp_path, task, users, 4) as f:
            wait_until(lambda: all(c.version == 0 for c in f.clients.values()), 30, "version 0")
            feed(f, parts)
            wait_until(lambda: agg.rounds.rounds_aborted >= 2, 30, "two aborted rounds")
            assert agg.version == 0 and agg.rounds.rounds_done == 0
            assert "fewer than the threshold 3" in (agg.rounds.last_abort_reason or "")
            honest = f.clients["d00"].core.secagg
            # Nothing was revealed in an aborted round: the same update waits for the next one,
            # and its examples are still fresh.
            assert honest.masked_sent == 0 and honest.rounds_aborted >= 1 and honest.busy()
            assert len(f.offered["d00"]) == 1
            assert f.clients["d00"].examples.fresh_count() == 32
        statuses: list[bytes] = []
        models: list[bytes] = []
        with contextlib.suppress(queue.Empty):
            while True:
                msg = watcher.messages.get(timeout=0.5)
                (models if msg.topic == topics.model else statuses).append(msg.payload)
        assert any(b'"status":"aborted"' in p for p in statuses)
        assert all(ModelVersion.from_bytes(p, max_bytes=1 << 24).version == 0 for p in models if p)
    finally:
        watcher.close()


def test_demo_with_secure_aggregation_on_mosquitto(broker: Any, tmp_path: Path) -> None:
    import json

    from fededge.demo import DemoConfig, run_demo, write_outputs

    cfg = DemoConfig(
        devices=5,
        versions=4,
        broker=broker.url,
        task=new_task(),
        out_dir=tmp_path,
        json_path=tmp_path / "s.json",
        secure_aggregation=True,
    )
    rows: list[Any] = []
    summary = run_demo(cfg, rows.append)
    assert [r.version for r in rows] == [0, 1, 2, 3, 4]
    assert all(r.updates >= 4 for r in rows[1:])  # min_cohort of 5 devices
    write_outputs(summary, cfg)
    data = json.loads((tmp_path / "s.json").read_text())
    assert data["secure_aggregation"] is True
    assert data["versions"][-1]["accuracy"] > data["versions"][0]["accuracy"]


@pytest.mark.slow
def test_twenty_device_processes_with_dropouts_and_a_kill(acl_broker: Any, tmp_path: Path) -> None:
    """`fededge device` processes: 2 cannot send masked inputs, 3 cannot unmask and are then
    killed; the version equals the plaintext weighted mean of the 18 survivors' deltas."""
    from devtools import mlp_bundle
    from test_device_daemon import Daemon

    from fededge.device.runtime import ModelRuntime
    from fededge.device.training import local_update

    task = new_task()
    # Generous stages: 20 processes share this machine's two cores with other tests.
    plan = sa_plan(
        cohort_size=20, min_cohort=12, threshold=11, stage_timeout=10.0, checkin_window=120.0
    )
    s = make_settings(acl_broker.url, tmp_path / "agg", task=task)
    base = publish_task(s, plan)
    users = {"p02": "no-masked", "p13": "no-masked", "p04": "no-unmask", "p09": "no-unmask",
             "p17": "no-unmask"}  # fmt: skip
    parts, _, _ = digits_split(20)
    topics = Topics("fededge", task)
    watcher = MqttClient(acl_broker.settings(), f"w-{task}", persistent=False)
    watcher.connect()
    watcher.subscribe(f"{topics.base}/rounds/+/unmask_request")
    daemons: dict[str, Daemon] = {}
    enrolled: dict[str, str] = {}
    for i in range(20):
        enrolled.update(make_identities(tmp_path / f"p{i:02d}", task, [f"p{i:02d}"]))
    publish_roster(s.broker, task, Roster(task, 1, enrolled), Ed25519PrivateKey.generate())
    try:
        for i in range(20):
            name = f"p{i:02d}"
            env = {"FEDEDGE_DEVICE__SEED": str(1000 + i), "FEDEDGE_LOG_LEVEL": "info"}
            if name in users:
                env["FEDEDGE_BROKER__USERNAME"] = users[name]
            daemons[name] = Daemon(acl_broker.url, task, tmp_path / name, name, **env).start()
        with running_aggregator(s) as agg:
            for d in daemons.values():
                d.wait(lambda st: st["version"] == 0, 90, "version 0")
            for i, d in enumerate(daemons.values()):
                x, y = parts[i][0][:32], parts[i][1][:32]
                d.post("/examples", {"x": x.tolist(), "y": y.tolist()})
            watcher.messages.get(timeout=60)  # the unmask request: masked inputs are in
            for name, user in users.items():
                if user == "no-unmask":
                    daemons[name].kill()
            wait_until(lambda: agg.version == 1, 60, "version 1")
            assert agg.model is not None and agg.model.updates == 18
            assert agg.rounds.rounds_done == 1
            alive = [d for n, d in daemons.items() if users.get(n) != "no-unmask"]
            for d in alive:
                d.wait(lambda st: st["version"] == 1 and st["updates_sent"] == 1, 30, "v1")
        # The survivors' deltas, recomputed with the devices' own code path and seeds.
        runtime = ModelRuntime.from_bundle(mlp_bundle())
        inputs = []
        for i, name in enumerate(daemons):
            if users.get(name) == "no-masked":
                continue
            x, y = parts[i][0][:32], parts[i][1][:32]
            lu = local_update(
                runtime, base.weights, x, y, epochs=plan.epochs, batch_size=plan.batch_size,
                learning_rate=plan.learning_rate, clip_norm=plan.clip_norm,
                noise_stddev=plan.noise_stddev, rng=np.random.default_rng(1000 + i),
            )  # fmt: skip
            inputs.append(ReadyInput(0, lu.delta, lu.num_examples, ()))
        want = expected_version(base, inputs, plan)
        bound = error_bound(20, plan, sum(r.num_examples for r in inputs))
        assert_close(agg.model, want, bound)
    finally:
        watcher.close()
        for d in daemons.values():
            d.cleanup()


class Rogue:
    """A cohort member speaking the protocol through a real DeviceRound, with one misbehaviour."""

    def __init__(
        self,
        url: str,
        task: str,
        name: str,
        mode: str,
        delta: np.ndarray,
        identity: Ed25519PrivateKey,
        roster: dict[str, Any],
    ) -> None:
        from fededge.settings import BrokerSettings

        self.name, self.mode, self.delta = name, mode, delta
        self.identity, self.roster = identity, roster
        self.topics = Topics("fededge", task)
        self.base = f"{self.topics.base}/rounds"
        self.mqtt = MqttClient(BrokerSettings(url=url), f"rogue-{task}-{name}", persistent=False)
        self.mqtt.connect()
        for t in ("+/config", f"+/to/{name}", "+/survivors", "+/unmask_request", "+/status"):
            self.mqtt.subscribe(f"{self.base}/{t}")
        self.round: Any = None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _publish(self, kind: str, payload: bytes, device: str | None = None) -> None:
        rid = self.round.config.round_id
        self.mqtt.publish(f"{self.base}/{rid}/{kind}/{device or self.name}", payload)

    def _send(self, out: list[Any]) -> None:
        from fededge.secagg.messages import MaskedInput, ShareKeys, encode

        for o in out:
            m = o.message
            if isinstance(m, ShareKeys) and self.mode == "bad-ciphertext":
                first = sorted(m.ciphertexts)[0]
                cts = dict(m.ciphertexts)
                cts[first] = cts[first][:-1] + bytes([cts[first][-1] ^ 1])
                m = ShareKeys(m.round_id, m.device, cts)
            elif isinstance(m, ShareKeys) and self.mode == "unknown-shares":
                m = ShareKeys(m.round_id, m.device, {**m.ciphertexts, "ghost": b"\0" * 164})
            elif isinstance(m, MaskedInput) and self.mode == "wrong-length":
                m = MaskedInput(m.round_id, m.device, m.vector[:-1].copy())
            self._publish(m.TYPE, encode(m))

    def _run(self) -> None:
        from fededge.protocol.messages import CheckIn
        from fededge.secagg import DeviceRound
        from fededge.secagg.messages import MaskedInput, RoundConfig, decode_json

        while not self.stop.is_set():
            if self.round is None:
                ci = CheckIn(task=self.topics.task, device=self.name, base_version=0,
                             num_examples=32, time=time.time())  # fmt: skip
                self.mqtt.publish(f"{self.base}/checkin/{self.name}", ci.to_bytes())
            try:
                msg = self.mqtt.messages.get(timeout=0.3)
            except queue.Empty:
                continue
            if not msg.payload:
                continue
            parsed = decode_json(msg.payload)
            if isinstance(parsed, RoundConfig):
                if self.round is None and self.name in parsed.cohort:
                    self.round = DeviceRound(self.name, parsed, self.identity, self.roster)
                    if self.mode == "wrong-stage":  # a masked input before any keys
                        words = np.zeros(parsed.vector_length + 1, dtype=np.uint32)
                        self._publish("masked", MaskedInput(parsed.round_id, self.name,
                                                            words).to_bytes())  # fmt: skip
                    self._send(self.round.set_input(self.delta, 32.0) + self.round.start())
            elif self.round is not None and parsed.round_id == self.round.config.round_id:
                with contextlib.suppress(Exception):  # refused messages change nothing
                    self._send(self.round.handle(parsed))

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.mqtt.close()


def test_protocol_violations_are_rejected_and_honest_devices_finish(
    broker: Any, tmp_path: Path
) -> None:
    """Misbehaving cohort members and an outside attacker; the round still publishes."""
    from fededge.protocol.messages import CheckIn
    from fededge.secagg import crypto
    from fededge.secagg.messages import AdvertiseKeys

    task = new_task()
    # 8 honest devices and 4 rogues: t = 7 > 12/2, and rogue-a (whose one corrupted bundle leaves
    # one honest neighbour without its shares) still has 7 surviving neighbours to rebuild it.
    plan = sa_plan(cohort_size=12, min_cohort=12, threshold=7, stage_timeout=3.0)
    s = make_settings(broker.url, tmp_path / "agg", task=task)
    base = publish_task(s, plan)
    parts, _, _ = digits_split(8)
    topics = Topics("fededge", task)
    rb = f"{topics.base}/rounds"
    d = sum(w.size for w in base.weights.values())
    rng = np.random.default_rng(7)
    deltas = {}
    for name in ("rogue-a", "rogue-b", "rogue-c", "rogue-d"):
        v = rng.normal(size=d).astype(np.float32)
        deltas[name] = (v * (0.5 * plan.clip_norm / np.linalg.norm(v))).astype(np.float32)
    attacker = MqttClient(broker.settings(), f"attacker-{task}", persistent=False)
    attacker.connect()
    attacker.subscribe(f"{rb}/+/advertise/d00")
    attacker.subscribe(f"{rb}/+/config")
    rogues: list[Rogue] = []
    rogue_ids = {name: Ed25519PrivateKey.generate() for name in deltas}
    with running_aggregator(s) as agg, fleet(broker.url, tmp_path, task, {}, 8, rogue_ids) as f:
        try:
            wait_until(lambda: all(c.version == 0 for c in f.clients.values()), 30, "version 0")
            modes = {"rogue-a": "bad-ciphertext", "rogue-b": "wrong-stage",
                     "rogue-c": "wrong-length", "rogue-d": "unknown-shares"}  # fmt: skip
            wait_until(lambda: f.clients["d00"].core.secagg.roster is not None, 30, "roster")
            roster = f.clients["d00"].core.secagg._roster_keys
            rogues = [Rogue(broker.url, task, n, m, deltas[n], rogue_ids[n], roster)
                      for n, m in modes.items()]  # fmt: skip
            # A stale check-in and one for the wrong device are refused (or ignored).
            bad = CheckIn(task=task, device="d05", base_version=0, num_examples=5).to_bytes()
            attacker.publish(f"{rb}/checkin/d04", bad)
            feed(f, parts)
            rid, advert = None, None
            deadline = time.monotonic() + 30
            while advert is None and time.monotonic() < deadline:
                msg = attacker.messages.get(timeout=30)
                if msg.topic.endswith("/config") and msg.payload:
                    rid = msg.topic.split("/")[-2]
                elif msg.topic.endswith("/advertise/d00"):
                    advert = msg.payload
            assert rid is not None and advert is not None
            ghost = crypto.generate_keypair(crypto.system_random).public
            injected = [
                (f"{rb}/{rid}/advertise/ghost",  # not in the cohort
                 AdvertiseKeys(rid, "ghost", ghost, crypto.generate_keypair(
                     crypto.system_random).public, bytes(64)).to_json()),
                (f"{rb}/old-round/advertise/d00", advert),  # another round
                (f"{rb}/{rid}/advertise/d01", advert),  # d00's message under d01's name
                (f"{rb}/{rid}/share/d02", b"\x00garbage"),  # undecodable, on an honest topic
                (f"{rb}/{rid}/masked/d03", b"{}"),  # not safetensors
                (f"{rb}/{rid}/advertise/d00", advert),  # an identical replay: harmless
            ]  # fmt: skip
            for topic, payload in injected:
                attacker.publish(topic, payload, wait=True, timeout=5)
            wait_until(lambda: agg.version == 1, 40, "version 1 despite the violations")
            attacker.publish(f"{rb}/{rid}/advertise/d00", advert, wait=True, timeout=5)  # late
            wait_until(lambda: agg.rounds.rejected >= 9, 10, "late replay rejected")
        finally:
            for r in rogues:
                r.close()
            attacker.close()
        dropped = agg.rounds.last_dropped
        assert set(dropped) == {"rogue-b", "rogue-c", "rogue-d"}, dropped
        assert "stage" in dropped["rogue-b"]
        assert "masked vector" in dropped["rogue-c"]
        assert "wrong devices" in dropped["rogue-d"]
        assert agg.model is not None and agg.model.updates == 9  # 8 honest + rogue-a
        honest = [f.offered[n][-1] for n in f.clients]
        inputs = [*honest, ReadyInput(0, split_like(base, deltas["rogue-a"]), 32, ())]
        want = expected_version(base, inputs, plan)
        assert_close(agg.model, want, error_bound(12, plan, 32 * 9))
        assert all(c.core.secagg.masked_sent == 1 for c in f.clients.values())


def split_like(base: ModelVersion, flat: np.ndarray) -> dict[str, np.ndarray]:
    """A flat vector cut into the model's tensors by sorted name (how rounds flatten)."""
    out, offset = {}, 0
    for name in sorted(base.weights):
        w = base.weights[name]
        out[name] = flat[offset : offset + w.size].reshape(w.shape)
        offset += w.size
    return out
