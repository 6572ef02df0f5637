"""The threads and I/O that run a device core: MQTT, state files, the LiteRT runtime, training.

:class:`Driver` feeds :class:`~fededge.device.core.DeviceCore` messages, ticks (with the clock
read here) and training results, one call at a time under :attr:`Driver.lock`, and carries out
the effects it returns. It validates graphs (in a child process) and builds their runtimes,
since the core holds no I/O. :class:`~fededge.device.client.Client` wraps it in the public API.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np

from fededge.device.bundle import validate_graph
from fededge.device.core import DeviceCore
from fededge.device.effects import Adopted, Effect, Persist, Publish, WakeTrainer
from fededge.device.runtime import ModelRuntime
from fededge.device.secagg_client import configure_participant
from fededge.device.spec import BundleSpec, parse_spec
from fededge.device.training import local_update, update_noise_stddev
from fededge.device.trust import Refused, TrustRules
from fededge.errors import (
    FededgeError,
    ModelError,
    NotReadyError,
    ProtocolError,
    SignatureError,
    StorageError,
    TransportError,
)
from fededge.fsio import atomic_write
from fededge.mqtt import Message, MqttClient, Will
from fededge.protocol import Graph, ModelVersion, Plan, Receipt, decode_json
from fededge.protocol.clipping import clip_in_force, noised_bit
from fededge.protocol.signing import SignedKind
from fededge.settings import Settings

log = logging.getLogger("fededge.device.client")
MAX_GRAPH_MESSAGE = 80 * 1024 * 1024
# Not derived from the current spec: a version for a new, larger graph may arrive before that
# graph does. The broker's max_packet_size bounds it in practice.
MAX_MODEL_MESSAGE = 257 * 1024 * 1024
NewVersionCallback = Callable[[ModelVersion, "int | None", int], None]


class Driver:
    """The io and training loops of one device, and the lock that serializes its core."""

    def __init__(
        self, core: DeviceCore, settings: Settings, state_dir: Path, trust: TrustRules
    ) -> None:
        self.core = core
        self.trust = trust
        self.settings = settings
        self.cfg = settings.device
        self.device_id = core.device_id
        self.topics = core.topics
        self.state_dir = state_dir
        self.lock = threading.Lock()  # serializes every call into the core
        self.rng = np.random.default_rng(self.cfg.seed)
        self.callbacks: list[NewVersionCallback] = []
        self.stop = threading.Event()
        self.wake_trainer = threading.Event()
        self.connected = threading.Event()  # set by paho's thread, consumed by the io thread
        self.changed = threading.Condition()
        self.beat = time.monotonic()
        self.mqtt: MqttClient | None = None
        configure_participant(core.secagg, settings, state_dir)  # identity key, roster, floor

    # -- effects ------------------------------------------------------------------------------
    def apply(self, effects: list[Effect]) -> None:
        """Carry out the core's effects, in order (outside the core lock)."""
        for e in effects:
            if isinstance(e, Publish):
                mqtt = self.mqtt
                if mqtt is not None and mqtt.connected:
                    with contextlib.suppress(TransportError):  # the outbox resends
                        mqtt.publish(e.topic, e.payload, qos=e.qos, retain=e.retain)
            elif isinstance(e, Persist):
                atomic_write(self.state_dir / e.name, e.data)
            elif isinstance(e, WakeTrainer):
                self.wake_trainer.set()
            elif isinstance(e, Adopted):
                with self.changed:
                    self.changed.notify_all()
                for cb in list(self.callbacks):
                    try:
                        cb(e.model, e.old_version, e.model.version)
                    except Exception:
                        log.exception("on_new_version callback %r failed", cb)

    def use_graph(self, tflite: bytes, spec: BundleSpec, raw: bytes | None) -> None:
        runtime = ModelRuntime(tflite, spec)
        with self.lock:
            effects = self.core.on_graph(spec, runtime, raw)
        self.apply(effects)

    def load_cached(self) -> None:
        """Restore graph, plan and model from the state directory (works before the broker).

        They are kept as they arrived and verified again: a device given trust keys later does
        not go on using what it took from the broker unverified.
        """
        try:
            raw = (self.state_dir / "graph.bin").read_bytes()
            body = self.trust.open(SignedKind.GRAPH, raw)
            g = Graph.from_bytes(body, max_bytes=MAX_GRAPH_MESSAGE)
            spec = parse_spec(g.spec)
            if self.core.is_new_graph(g.task, g.sha256):
                validate_graph(g.tflite, spec, isolate=False)  # was probed when it arrived
                self.use_graph(g.tflite, spec, raw=None)
        except FileNotFoundError:
            pass
        except (FededgeError, OSError) as e:
            log.warning("ignoring the cached graph: %s", e)
        with contextlib.suppress(FileNotFoundError):
            try:
                raw = (self.state_dir / "plan.json").read_bytes()
                plan = decode_json(self.trust.open(SignedKind.PLAN, raw), Plan)
                self.apply(self.core.on_plan(plan, None))
            except (ProtocolError, SignatureError, Refused) as e:
                log.warning("ignoring the cached plan: %s", e)
        try:
            raw = (self.state_dir / "model.bin").read_bytes()
            body = self.trust.open(SignedKind.MODEL, raw)
            mv = ModelVersion.from_bytes(body, max_bytes=MAX_MODEL_MESSAGE)
            self.apply(self.core.on_model(mv, None))
        except FileNotFoundError:
            pass
        except (FededgeError, OSError) as e:
            log.warning("ignoring the cached model: %s", e)

    # -- io thread ----------------------------------------------------------------------------
    def connect(self) -> None:
        status = self.core.status_publish("offline", time.time())
        client_id = self.settings.broker.client_id or f"fededge-device-{self.device_id}"
        mqtt = MqttClient(
            self.settings.broker,
            client_id,
            persistent=True,
            will=Will(status.topic, status.payload, qos=1, retain=True),
            name=f"device.{self.device_id}",
        )
        mqtt.add_connect_listener(lambda session_present: self.connected.set())
        mqtt.connect()
        try:
            # QoS 0: round messages only matter while connected, and queueing them for an
            # offline device would crowd its session queue (and Mosquitto drops past the cap).
            mqtt.subscribe_all(self.core.secagg.subscriptions(), qos=0)
            # One SUBSCRIBE for the QoS 1 topics, last: a broker that waits for the PUBACK of a
            # retained message before it reads the next packet (amqtt) would otherwise hold each
            # later SUBACK until its PUBACK timeout (messages are acknowledged when taken).
            mqtt.subscribe_all([self.topics.graph, self.topics.plan, self.topics.model,
                                self.topics.receipt(self.device_id)], qos=1)  # fmt: skip
        except FededgeError:
            mqtt.close()
            raise
        self.mqtt = mqtt

    def io_loop(self) -> None:
        delay = self.settings.broker.reconnect_min_delay
        while not self.stop.is_set():
            self.beat = time.monotonic()
            mqtt = self.mqtt
            if mqtt is None:
                try:
                    self.connect()
                    delay = self.settings.broker.reconnect_min_delay
                except TransportError as e:
                    log.warning("cannot connect (retrying in %g s): %s", delay, e)
                    self.stop.wait(delay)
                    delay = min(delay * 2, self.settings.broker.reconnect_max_delay)
                continue
            if self.connected.is_set():  # before the messages the new session brings
                self.connected.clear()
                with self.lock:
                    self.core.on_connect()
            try:
                self.handle(mqtt.messages.get(timeout=0.2))
                for _ in range(50):
                    self.handle(mqtt.messages.get_nowait())
            except queue.Empty:
                pass
            try:
                with self.lock:
                    effects = self.core.tick(time.monotonic(), time.time(), mqtt.connected)
                self.apply(effects)
            except (TransportError, StorageError, NotReadyError) as e:
                log.warning("io: %s", e)
            except Exception:
                # A bug here must not end the thread (the outbox would stop); log, go on.
                log.exception("internal error in the io loop")
                self.stop.wait(1.0)

    def handle(self, msg: Message) -> None:
        t = self.topics
        try:
            with self.lock:
                if msg.topic == t.receipt(self.device_id):
                    body = self.trust.open(SignedKind.RECEIPT, msg.payload)
                    effects = self.core.on_receipt(decode_json(body, Receipt))
                elif msg.topic.startswith(f"{t.base}/rounds/") or msg.topic == t.roster:
                    effects = self.core.on_round_message(msg.topic, msg.payload, time.monotonic())
                elif not msg.payload or msg.topic not in (t.model, t.plan):
                    effects = []  # a cleared retained message, or the graph (below)
                elif msg.topic == t.model:
                    body = self.trust.open(SignedKind.MODEL, msg.payload)
                    mv = ModelVersion.from_bytes(body, max_bytes=MAX_MODEL_MESSAGE)
                    effects = self.core.on_model(mv, msg.payload)
                else:
                    body = self.trust.open(SignedKind.PLAN, msg.payload)
                    effects = self.core.on_plan(decode_json(body, Plan), msg.payload)
            self.apply(effects)
            if msg.topic == t.graph and msg.payload:
                self.on_graph(msg.payload)
        except (SignatureError, Refused) as e:
            # Never adopted, never acted on (a forged receipt settles nothing).
            kind = msg.topic.rsplit("/", 1)[-1] if msg.topic in (t.plan, t.graph, t.model) \
                else "receipt"  # fmt: skip
            self.core.metrics.refused.labels(kind, e.reason).inc()
            log.warning("refused %s message on %s reason=%s: %s", kind, msg.topic, e.reason,
                        e.detail, extra={"topic": msg.topic, "reason": e.reason})  # fmt: skip
        except (ProtocolError, ModelError) as e:
            self.core.metrics.bad_messages.inc()
            log.warning("rejected message on %s: %s", msg.topic, e, extra={"topic": msg.topic})
        except Exception:
            self.core.metrics.bad_messages.inc()
            log.exception("internal error handling a message on %s", msg.topic)

    def on_graph(self, payload: bytes) -> None:
        body = self.trust.open(SignedKind.GRAPH, payload)
        g = Graph.from_bytes(body, max_bytes=MAX_GRAPH_MESSAGE)
        with self.lock:
            if not self.core.is_new_graph(g.task, g.sha256):
                return
        spec = parse_spec(g.spec)
        validate_graph(g.tflite, spec, isolate=True)  # a hostile graph must not crash us
        self.use_graph(g.tflite, spec, raw=payload)

    # -- training thread ----------------------------------------------------------------------
    def train_loop(self) -> None:
        while not self.stop.is_set():
            self.wake_trainer.wait(1.0)
            self.wake_trainer.clear()
            try:
                while not self.stop.is_set() and self.train_once():
                    pass
            except Exception:
                # A failed run leaves its examples fresh; retry on the next wake-up, not in a
                # tight loop.
                log.exception("local training failed")
                self.stop.wait(5.0)
            finally:
                with self.lock:
                    self.core.end_training()

    def train_once(self) -> bool:
        """Run one training job the core asks for; False if there is none."""
        with self.lock:
            job = self.core.next_job()
        if job is None:
            return False
        cur, plan = job.current, job.plan
        clip = clip_in_force(plan, cur.model)  # the version's clip under adaptive clipping
        t0 = time.perf_counter()
        lu = local_update(
            cur.runtime, cur.weights, job.batch.x, job.batch.y,
            epochs=plan.epochs, batch_size=plan.batch_size, learning_rate=plan.learning_rate,
            clip_norm=clip, noise_stddev=update_noise_stddev(plan, clip), rng=self.rng,
            evaluate_first=self.cfg.evaluate_before_training and plan.evaluate,
        )  # fmt: skip
        if plan.secure_aggregation is None:  # in secure rounds the bit is masked, not noised
            lu = replace(lu, unclipped=noised_bit(plan, lu.delta_norm <= clip, self.rng))
        seconds = time.perf_counter() - t0
        mqtt = self.mqtt
        connected = mqtt is not None and mqtt.connected
        with self.lock:
            effects, more = self.core.trained(job, lu, seconds, time.monotonic(), connected)
        self.apply(effects)
        return more
