"""The device client: predictions, local training and updates over MQTT, usable in-process.

``Client(settings)`` is what the daemon runs and what a Python app may embed (the seed's client
API: ``predict``, ``fit``, ``on_new_version``). It owns no global state, so many clients can run
in one process (the demo runs ten). It is a thin driver of :class:`DeviceCore`
(fededge/device/core.py), which makes every decision: the client feeds it messages, ticks and
training results under one lock and carries out the effects it returns. Threads, all named after
the device:

- ``fededge-device-<id>-io``: connects, takes messages (graph, plan, model, receipts, rounds)
  from the MQTT queue, ticks the core (outbox resends, rounds, status) and publishes;
- ``fededge-device-<id>-train``: asks the core for a training job, runs it outside the lock and
  hands the result back (the core stores the update in the outbox before it is published);
- paho's network thread, inside ``MqttClient``.

Inference weights are swapped atomically: the current version, its weights and the runtime
that runs them are one immutable object replaced by a single assignment, so a prediction sees
either the old or the new version, never a mix; training runs on its own interpreter, so
predictions keep coming while it runs.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fededge.device.bundle import Bundle, load_bundle, validate_graph
from fededge.device.core import DeviceCore
from fededge.device.effects import Adopted, Effect, Persist, Publish, WakeTrainer
from fededge.device.examples import ExampleStore, StateDb, validate_examples, validate_inputs
from fededge.device.metrics import DeviceMetrics
from fededge.device.outbox import Outbox
from fededge.device.runtime import ModelRuntime
from fededge.device.spec import BundleSpec, parse_spec
from fededge.device.training import local_update
from fededge.errors import (
    FededgeError,
    ModelError,
    NotReadyError,
    ProtocolError,
    StorageError,
    TransportError,
)
from fededge.fsio import atomic_write
from fededge.mqtt import Message, MqttClient, Will
from fededge.protocol import Graph, ModelVersion, Plan, Receipt, Topics, decode_json
from fededge.settings import Settings

log = logging.getLogger(__name__)
MAX_GRAPH_MESSAGE = 80 * 1024 * 1024
# Not derived from the current spec: a version for a new, larger graph may arrive before that
# graph does. The broker's max_packet_size bounds it in practice.
MAX_MODEL_MESSAGE = 257 * 1024 * 1024
NewVersionCallback = Callable[[ModelVersion, "int | None", int], None]


@dataclass(frozen=True)
class AddResult:
    """What ``fit``/``add_examples`` did: examples stored and fresh examples now waiting."""

    added: int
    fresh: int


class Client:
    """A federated-learning device: serves predictions, learns from examples, sends updates."""

    def __init__(self, settings: Settings, *, bundle: Bundle | str | Path | None = None) -> None:
        self.settings = settings
        self.cfg = settings.device
        self.device_id = self.cfg.device_id
        self.task = settings.task
        self.topics = Topics(settings.topic_prefix, settings.task)
        self.metrics = DeviceMetrics()
        self.state_dir = Path(settings.state_dir) / "device" / self.device_id / self.task
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._lockfile = _lock_state(self.state_dir)
        self.db = StateDb(self.state_dir / "state.sqlite")
        self.examples = ExampleStore(
            self.db, max_examples=self.cfg.max_examples, max_age=self.cfg.max_example_age
        )
        self.core = DeviceCore(self.device_id, self.topics, self.db, self.examples, self.metrics,
                               receipt_timeout=self.cfg.receipt_timeout)  # fmt: skip
        self._lock = threading.Lock()  # serializes every call into the core
        self._rng = np.random.default_rng(self.cfg.seed)
        self._callbacks: list[NewVersionCallback] = []
        self._stop = threading.Event()
        self._wake_trainer = threading.Event()
        self._connected = threading.Event()  # set by paho's thread, consumed by the io thread
        self._changed = threading.Condition()
        self._beat = time.monotonic()
        self._threads: list[threading.Thread] = []
        self._mqtt: MqttClient | None = None
        self._started = False
        try:
            if bundle is not None:
                b = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
                self._use_graph(b.graph, b.spec, raw=None)
            self._load_cached()
        except BaseException:
            self.db.close()
            os.close(self._lockfile)
            raise

    # -- public API ---------------------------------------------------------------------------
    @property
    def version(self) -> int | None:
        """The model version used for predictions and training (None before the first)."""
        return self.core.version

    @property
    def spec(self) -> BundleSpec | None:
        """The spec of the task's graph, once known."""
        return self.core.spec

    @property
    def plan(self) -> Plan:
        """The task's plan in use (built-in defaults until the task's owner publishes one)."""
        return self.core.plan

    @property
    def outbox(self) -> Outbox:
        """Updates awaiting their receipt."""
        return self.core.outbox

    def on_new_version(self, callback: NewVersionCallback) -> None:
        """Call ``callback(model, old_version, new_version)`` after each adopted version.

        Callbacks run on the client's io thread; an exception is logged with its traceback.
        """
        self._callbacks.append(callback)

    def predict(self, x: Any) -> np.ndarray:
        """Class probabilities [n, classes] for inputs ``x`` from the current version."""
        return self.predict_versioned(x)[0]

    def predict_versioned(self, x: Any) -> tuple[np.ndarray, int]:
        """Probabilities and the version that produced them (one consistent snapshot)."""
        cur = self.core.current  # one read: weights and runtime of the same version
        if cur is None:
            raise NotReadyError("no model version yet: waiting for the aggregator's model")
        xa = validate_inputs(x, cur.runtime.spec.input_shape)
        probs = cur.runtime.infer(xa, cur.weights)
        self.metrics.predictions.inc(len(xa))
        return probs, cur.version

    def fit(self, x: Any, y: Any) -> AddResult:
        """Add labelled examples; training starts in the background once enough are fresh."""
        return self.add_examples(x, y)

    def add_examples(self, x: Any, y: Any) -> AddResult:
        """Validate and store labelled examples, wake the trainer; see :meth:`fit`."""
        spec = self.core.spec
        if spec is None:
            raise NotReadyError("the task's graph has not arrived yet: its input shape is unknown")
        xa, ya = validate_examples(x, y, spec.input_shape, spec.num_classes)
        added = self.examples.add(xa, ya)
        self.metrics.examples_added.inc(added)
        fresh = self.examples.fresh_count(int(np.prod(spec.input_shape)))
        self.metrics.fresh.set(fresh)
        if fresh >= self.core.plan.examples_per_update:
            self._wake_trainer.set()
        return AddResult(added, fresh)

    def status(self) -> dict[str, Any]:
        """A snapshot of the device's state (what the local API's /status returns)."""
        mqtt = self._mqtt
        return self.core.status(bool(mqtt is not None and mqtt.connected))

    def healthy(self, max_silence: float = 30.0) -> bool:
        """Whether every thread is alive and the io loop turned within ``max_silence`` s."""
        alive = all(t.is_alive() for t in self._threads)
        return alive and time.monotonic() - self._beat < max_silence

    def start(self, *, retry: bool = False) -> None:
        """Connect, subscribe and start the threads.

        Without ``retry`` a failed first connection raises TransportError; with it (the
        daemon) the io thread keeps trying, and predictions from a cached model work meanwhile.
        """
        if self._started:
            raise NotReadyError("Client.start() called twice")
        self._started = True
        try:
            self._connect()
        except TransportError as e:
            if not retry:
                self._started = False
                raise
            log.warning("broker unreachable, retrying in the background: %s", e)
        for name, target in (("io", self._io_loop), ("train", self._train_loop)):
            t = threading.Thread(target=target, name=f"fededge-device-{self.device_id}-{name}")
            t.daemon = True
            t.start()
            self._threads.append(t)

    def close(self, timeout: float = 30.0) -> None:
        """Stop training and io, publish the offline status, disconnect; state stays consistent.

        A training run in progress is finished (its examples are only marked used together
        with storing its update, so an abandoned run loses nothing).
        """
        self._stop.set()
        self._wake_trainer.set()
        for t in self._threads:
            t.join(timeout)
            if t.is_alive():
                log.warning("thread %s did not stop within %g s", t.name, timeout)
        mqtt = self._mqtt
        if mqtt is not None:
            with contextlib.suppress(FededgeError):
                if mqtt.connected:
                    p = self.core.status_publish("offline", time.time())
                    mqtt.publish(p.topic, p.payload, retain=True, wait=True, timeout=2)
            mqtt.close()
        self.db.close()
        with contextlib.suppress(OSError):
            os.close(self._lockfile)

    def __enter__(self) -> Client:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def wait_for_version(self, version: int, timeout: float) -> bool:
        """Block until the current version is at least ``version``; False on timeout."""

        def reached() -> bool:
            v = self.version
            return v is not None and v >= version

        with self._changed:
            self._changed.wait_for(lambda: reached() or self._stop.is_set(), timeout)
        return reached()

    def wait_idle(self, timeout: float) -> bool:
        """Block until no training is due or running and the outbox is empty."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                idle = not self.core.training and not len(self.outbox) and not self.core.trainable()
            if idle:
                return True
            time.sleep(0.05)
        return False

    # -- effects ------------------------------------------------------------------------------
    def _apply(self, effects: list[Effect]) -> None:
        """Carry out the core's effects, in order (outside the core lock)."""
        for e in effects:
            if isinstance(e, Publish):
                mqtt = self._mqtt
                if mqtt is not None and mqtt.connected:
                    with contextlib.suppress(TransportError):  # the outbox resends
                        mqtt.publish(e.topic, e.payload, qos=e.qos, retain=e.retain)
            elif isinstance(e, Persist):
                atomic_write(self.state_dir / e.name, e.data)
            elif isinstance(e, WakeTrainer):
                self._wake_trainer.set()
            elif isinstance(e, Adopted):
                with self._changed:
                    self._changed.notify_all()
                for cb in list(self._callbacks):
                    try:
                        cb(e.model, e.old_version, e.model.version)
                    except Exception:
                        log.exception("on_new_version callback %r failed", cb)

    def _use_graph(self, tflite: bytes, spec: BundleSpec, raw: bytes | None) -> None:
        runtime = ModelRuntime(tflite, spec)
        with self._lock:
            effects = self.core.on_graph(spec, runtime, raw)
        self._apply(effects)

    def _load_cached(self) -> None:
        """Restore graph, plan and model from the state directory (works before the broker)."""
        try:
            raw = (self.state_dir / "graph.bin").read_bytes()
            g = Graph.from_bytes(raw, max_bytes=MAX_GRAPH_MESSAGE)
            spec = parse_spec(g.spec)
            if self.core.is_new_graph(g.task, g.sha256):
                validate_graph(g.tflite, spec, isolate=False)  # was probed when it arrived
                self._use_graph(g.tflite, spec, raw=None)
        except FileNotFoundError:
            pass
        except (FededgeError, OSError) as e:
            log.warning("ignoring the cached graph: %s", e)
        with contextlib.suppress(FileNotFoundError):
            try:
                plan = decode_json((self.state_dir / "plan.json").read_bytes(), Plan)
                self._apply(self.core.on_plan(plan, None))
            except ProtocolError as e:
                log.warning("ignoring the cached plan: %s", e)
        try:
            raw = (self.state_dir / "model.bin").read_bytes()
            mv = ModelVersion.from_bytes(raw, max_bytes=MAX_MODEL_MESSAGE)
            self._apply(self.core.on_model(mv, None))
        except FileNotFoundError:
            pass
        except (FededgeError, OSError) as e:
            log.warning("ignoring the cached model: %s", e)

    # -- io thread ----------------------------------------------------------------------------
    def _connect(self) -> None:
        status = self.core.status_publish("offline", time.time())
        client_id = self.settings.broker.client_id or f"fededge-device-{self.device_id}"
        mqtt = MqttClient(
            self.settings.broker,
            client_id,
            persistent=True,
            will=Will(status.topic, status.payload, qos=1, retain=True),
            name=f"device.{self.device_id}",
        )
        mqtt.add_connect_listener(lambda session_present: self._connected.set())
        mqtt.connect()
        try:
            for topic in (self.topics.graph, self.topics.plan, self.topics.model,
                          self.topics.receipt(self.device_id)):  # fmt: skip
                mqtt.subscribe(topic, qos=1)
            # QoS 0: round messages only matter while connected, and queueing them for an
            # offline device would crowd its session queue (and Mosquitto drops past the cap).
            for topic in self.core.secagg.subscriptions():
                mqtt.subscribe(topic, qos=0)
        except FededgeError:
            mqtt.close()
            raise
        self._mqtt = mqtt

    def _io_loop(self) -> None:
        delay = self.settings.broker.reconnect_min_delay
        while not self._stop.is_set():
            self._beat = time.monotonic()
            mqtt = self._mqtt
            if mqtt is None:
                try:
                    self._connect()
                    delay = self.settings.broker.reconnect_min_delay
                except TransportError as e:
                    log.warning("cannot connect (retrying in %g s): %s", delay, e)
                    self._stop.wait(delay)
                    delay = min(delay * 2, self.settings.broker.reconnect_max_delay)
                continue
            if self._connected.is_set():  # before the messages the new session brings
                self._connected.clear()
                with self._lock:
                    self.core.on_connect()
            try:
                self._handle(mqtt.messages.get(timeout=0.2))
                for _ in range(50):
                    self._handle(mqtt.messages.get_nowait())
            except queue.Empty:
                pass
            try:
                with self._lock:
                    effects = self.core.tick(time.monotonic(), time.time(), mqtt.connected)
                self._apply(effects)
            except (TransportError, StorageError, NotReadyError) as e:
                log.warning("io: %s", e)
            except Exception:
                # A bug here must not end the thread (the outbox would stop); log, go on.
                log.exception("internal error in the io loop")
                self._stop.wait(1.0)

    def _handle(self, msg: Message) -> None:
        t = self.topics
        try:
            with self._lock:
                if msg.topic == t.receipt(self.device_id):
                    effects = self.core.on_receipt(decode_json(msg.payload, Receipt))
                elif msg.topic.startswith(f"{t.base}/rounds/"):
                    effects = self.core.on_round_message(msg.topic, msg.payload, time.monotonic())
                elif not msg.payload or msg.topic not in (t.model, t.plan):
                    effects = []  # a cleared retained message, or the graph (below)
                elif msg.topic == t.model:
                    mv = ModelVersion.from_bytes(msg.payload, max_bytes=MAX_MODEL_MESSAGE)
                    effects = self.core.on_model(mv, msg.payload)
                else:
                    effects = self.core.on_plan(decode_json(msg.payload, Plan), msg.payload)
            self._apply(effects)
            if msg.topic == t.graph and msg.payload:
                self._on_graph(msg.payload)
        except (ProtocolError, ModelError) as e:
            self.metrics.bad_messages.inc()
            log.warning("rejected message on %s: %s", msg.topic, e, extra={"topic": msg.topic})
        except Exception:
            self.metrics.bad_messages.inc()
            log.exception("internal error handling a message on %s", msg.topic)

    def _on_graph(self, payload: bytes) -> None:
        g = Graph.from_bytes(payload, max_bytes=MAX_GRAPH_MESSAGE)
        with self._lock:
            if not self.core.is_new_graph(g.task, g.sha256):
                return
        spec = parse_spec(g.spec)
        validate_graph(g.tflite, spec, isolate=True)  # a hostile graph must not crash us
        self._use_graph(g.tflite, spec, raw=payload)

    # -- training thread ----------------------------------------------------------------------
    def _train_loop(self) -> None:
        while not self._stop.is_set():
            self._wake_trainer.wait(1.0)
            self._wake_trainer.clear()
            try:
                while not self._stop.is_set() and self._train_once():
                    pass
            except Exception:
                # A failed run leaves its examples fresh; retry on the next wake-up, not in a
                # tight loop.
                log.exception("local training failed")
                self._stop.wait(5.0)
            finally:
                with self._lock:
                    self.core.end_training()

    def _train_once(self) -> bool:
        """Run one training job the core asks for; False if there is none."""
        with self._lock:
            job = self.core.next_job()
        if job is None:
            return False
        cur, plan = job.current, job.plan
        t0 = time.perf_counter()
        lu = local_update(
            cur.runtime, cur.weights, job.batch.x, job.batch.y,
            epochs=plan.epochs, batch_size=plan.batch_size, learning_rate=plan.learning_rate,
            clip_norm=plan.clip_norm, noise_stddev=plan.noise_stddev, rng=self._rng,
            evaluate_first=self.cfg.evaluate_before_training and plan.evaluate,
        )  # fmt: skip
        seconds = time.perf_counter() - t0
        mqtt = self._mqtt
        connected = mqtt is not None and mqtt.connected
        with self._lock:
            effects, more = self.core.trained(job, lu, seconds, time.monotonic(), connected)
        self._apply(effects)
        return more


def _lock_state(state_dir: Path) -> int:
    """Hold an exclusive lock on the state directory for the life of the client."""
    fd = os.open(state_dir / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise NotReadyError(  # misuse (a second process), not a disk failure
            f"{state_dir} is in use by another fededge device process (same device_id and task)"
        ) from None
    return fd
