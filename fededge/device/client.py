"""The device client: predictions, local training and updates over MQTT, usable in-process.

``Client(settings)`` is what the daemon runs and what a Python app may embed (the seed's client
API: ``predict``, ``fit``, ``on_new_version``). It owns no global state, so many clients can run
in one process (the demo runs ten). Threads, all named after the device:

- ``fededge-device-<id>-io``: connects, takes messages (graph, plan, model, receipts) from the
  MQTT queue, adopts new versions, resends due outbox entries and publishes the status;
- ``fededge-device-<id>-train``: trains whenever ``examples_per_update`` fresh examples exist
  and stores the update in the outbox (see fededge/device/outbox.py) before publishing it;
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
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fededge import __version__
from fededge.device.bundle import Bundle, BundleSpec, load_bundle, parse_spec, validate_graph
from fededge.device.examples import ExampleStore, StateDb, validate_examples, validate_inputs
from fededge.device.metrics import DeviceMetrics
from fededge.device.outbox import Entry, Outbox
from fededge.device.runtime import ModelRuntime
from fededge.device.secagg_client import Participant, ReadyInput, handle_safely
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
from fededge.protocol import (
    DeviceStatus,
    Graph,
    ModelVersion,
    Plan,
    Receipt,
    Topics,
    Update,
    decode_json,
)
from fededge.protocol.vocab import NO_GRAPH, RejectReason
from fededge.settings import Settings

log = logging.getLogger(__name__)
MAX_GRAPH_MESSAGE = 80 * 1024 * 1024
MAX_MODEL_MESSAGE = 257 * 1024 * 1024
STATUS_INTERVAL = 30.0
NewVersionCallback = Callable[[ModelVersion, "int | None", int], None]


@dataclass(frozen=True)
class Current:
    """The model version in use: replaced as a whole, never modified."""

    version: int
    weights: dict[str, np.ndarray]
    runtime: ModelRuntime
    model: ModelVersion


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
        self.outbox = Outbox(self.db)
        self.plan = Plan()
        # Never train on built-in defaults (they may mean no noise): only on a plan that came
        # from the task's owner, live or cached from an earlier run.
        self._plan_known = False
        self._rng = np.random.default_rng(self.cfg.seed)
        self._graph: bytes | None = None
        self._spec: BundleSpec | None = None
        self._runtime: ModelRuntime | None = None
        self._current: Current | None = None
        self._waiting_model: ModelVersion | None = None  # its graph has not arrived yet
        self._callbacks: list[NewVersionCallback] = []
        self._stop = threading.Event()
        self._wake_trainer = threading.Event()
        self._changed = threading.Condition()
        self._send_lock = threading.Lock()
        self._resend_all = threading.Event()
        self._status_due = threading.Event()
        self._training = False
        self._updates_sent = 0
        self._beat = time.monotonic()
        self._threads: list[threading.Thread] = []
        self._mqtt: MqttClient | None = None
        self._started = False
        self._stale_window: tuple[int, int] | None = None
        # Secure-aggregation rounds, used when the plan has a secure_aggregation section.
        self._secagg = Participant(
            self.device_id, self.topics, self.db, self.metrics,
            version=lambda: self.version, plan=lambda: self.plan, on_spent=self._wake_trainer.set,
        )  # fmt: skip
        try:
            if bundle is not None:
                b = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
                self._set_graph(b.graph, b.spec)
            self._load_cached()
        except BaseException:
            self.db.close()
            os.close(self._lockfile)
            raise

    # -- public API ---------------------------------------------------------------------------
    @property
    def version(self) -> int | None:
        """The model version used for predictions and training (None before the first)."""
        cur = self._current
        return cur.version if cur else None

    @property
    def spec(self) -> BundleSpec | None:
        """The spec of the task's graph, once known."""
        return self._spec

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
        cur = self._current  # one read: weights and runtime of the same version
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
        spec = self._spec
        if spec is None:
            raise NotReadyError("the task's graph has not arrived yet: its input shape is unknown")
        xa, ya = validate_examples(x, y, spec.input_shape, spec.num_classes)
        added = self.examples.add(xa, ya)
        self.metrics.examples_added.inc(added)
        fresh = self.examples.fresh_count(int(np.prod(spec.input_shape)))
        self.metrics.fresh.set(fresh)
        if fresh >= self.plan.examples_per_update:
            self._wake_trainer.set()
        return AddResult(added, fresh)

    def status(self) -> dict[str, Any]:
        """A snapshot of the device's state (what the local API's /status returns)."""
        mqtt = self._mqtt
        return {
            "device": self.device_id,
            "task": self.task,
            "version": self.version,
            "state": "training" if self._training else "online",
            "connected": bool(mqtt is not None and mqtt.connected),
            "examples": self.examples.count(),
            "fresh": self.examples.fresh_count(),
            "examples_per_update": self.plan.examples_per_update,
            "outbox": len(self.outbox),
            "updates_sent": self._updates_sent + self._secagg.masked_sent,
            "graph_sha256": self._spec.graph_sha256 if self._spec else None,
            "software": f"fededge {__version__}",
        }

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
                    mqtt.publish(
                        self.topics.device_status(self.device_id),
                        self._status_message("offline").to_bytes(),
                        retain=True,
                        wait=True,
                        timeout=2,
                    )
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
            if not self._training and len(self.outbox) == 0 and not self._trainable():
                return True
            time.sleep(0.05)
        return False

    # -- graph and model ----------------------------------------------------------------------
    def _set_graph(self, graph: bytes, spec: BundleSpec) -> None:
        if self._spec is not None and spec.graph_sha256 == self._spec.graph_sha256:
            return
        runtime = ModelRuntime(graph, spec)
        self._graph, self._spec, self._runtime = graph, spec, runtime
        log.info("using graph sha256=%s (%s)", spec.graph_sha256[:12], spec.model)
        cur = self._current
        if cur is not None and _weights_fit(cur.model, spec):
            # Same weights, new interpreter: swap the whole snapshot.
            self._current = Current(cur.version, cur.weights, runtime, cur.model)

    def _load_cached(self) -> None:
        """Restore graph and model from the state directory (works before the broker answers)."""
        try:
            raw = (self.state_dir / "graph.bin").read_bytes()
            g = Graph.from_bytes(raw, max_bytes=MAX_GRAPH_MESSAGE)
            spec = parse_spec(g.spec)
            validate_graph(g.tflite, spec, isolate=False)  # was probed when it arrived
            self._set_graph(g.tflite, spec)
        except FileNotFoundError:
            pass
        except (FededgeError, OSError) as e:
            log.warning("ignoring the cached graph: %s", e)
        with contextlib.suppress(FileNotFoundError):
            try:
                self.plan = decode_json((self.state_dir / "plan.json").read_bytes(), Plan)
                self._plan_known = True
            except ProtocolError as e:
                log.warning("ignoring the cached plan: %s", e)
        try:
            raw = (self.state_dir / "model.bin").read_bytes()
            self._adopt(ModelVersion.from_bytes(raw, max_bytes=self._max_model_bytes()), raw=None)
        except FileNotFoundError:
            pass
        except (FededgeError, OSError) as e:
            log.warning("ignoring the cached model: %s", e)

    def _max_model_bytes(self) -> int:
        # Not derived from the current spec: a version for a new, larger graph may arrive
        # before that graph does. The broker's max_packet_size bounds it in practice.
        return MAX_MODEL_MESSAGE

    def _adopt(self, mv: ModelVersion, raw: bytes | None) -> None:
        """Make ``mv`` the current version if its graph is known; remember it otherwise."""
        if mv.task != self.task:
            raise ProtocolError(
                f"model is for task {mv.task!r}, not {self.task!r}", reason=RejectReason.WRONG_TASK
            )
        spec, runtime = self._spec, self._runtime
        if (
            spec is None
            or runtime is None
            or (mv.graph_sha256 not in (NO_GRAPH, spec.graph_sha256))
        ):
            log.info("model version %d waits for its graph %s", mv.version, mv.graph_sha256[:12])
            self._waiting_model = mv
            return
        if not _weights_fit(mv, spec):
            raise ProtocolError(
                f"model version {mv.version} does not match graph {spec.model} "
                f"(weights {sorted(mv.weights)})",
                reason=RejectReason.WRONG_NAMES,
            )
        for name, arr in mv.weights.items():
            if not np.all(np.isfinite(arr)):
                raise ProtocolError(
                    f"model weight {name!r} has NaN or Inf", reason=RejectReason.NON_FINITE
                )
        old = self._current
        if old is not None and old.version == mv.version and old.model.time == mv.time:
            return  # the same version again (retained copy after a reconnect)
        if old is not None and mv.version < old.version:
            log.warning("model version went back from %d to %d (task re-initialised?)",
                        old.version, mv.version)  # fmt: skip
        weights = {k: np.array(v, dtype=np.float32, copy=True) for k, v in mv.weights.items()}
        self._current = Current(mv.version, weights, runtime, mv)  # the atomic swap
        self._waiting_model = None
        self.metrics.version.set(mv.version)
        if raw is not None:
            atomic_write(self.state_dir / "model.bin", raw)
        log.info("adopted model version %d", mv.version, extra={"version": mv.version})
        with self._changed:
            self._changed.notify_all()
        self._status_due.set()
        self._wake_trainer.set()
        for cb in list(self._callbacks):
            try:
                cb(mv, old.version if old else None, mv.version)
            except Exception:
                log.exception("on_new_version callback %r failed", cb)

    # -- io thread ----------------------------------------------------------------------------
    def _connect(self) -> None:
        status = self._status_message("offline").to_bytes()
        client_id = self.settings.broker.client_id or f"fededge-device-{self.device_id}"
        mqtt = MqttClient(
            self.settings.broker,
            client_id,
            persistent=True,
            will=Will(self.topics.device_status(self.device_id), status, qos=1, retain=True),
            name=f"device.{self.device_id}",
        )
        mqtt.add_connect_listener(self._on_connect)
        mqtt.connect()
        try:
            for topic in (self.topics.graph, self.topics.plan, self.topics.model,
                          self.topics.receipt(self.device_id)):  # fmt: skip
                mqtt.subscribe(topic, qos=1)
            # QoS 0: round messages only matter while connected, and queueing them for an
            # offline device would crowd its session queue (and Mosquitto drops past the cap).
            for topic in self._secagg.subscriptions():
                mqtt.subscribe(topic, qos=0)
        except FededgeError:
            mqtt.close()
            raise
        self._mqtt = mqtt

    def _on_connect(self, session_present: bool) -> None:
        # Network thread: only flag work for the io thread.
        self._resend_all.set()
        self._status_due.set()

    def _io_loop(self) -> None:
        delay = self.settings.broker.reconnect_min_delay
        last_status = 0.0
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
            try:
                self._handle(mqtt.messages.get(timeout=0.2))
                for _ in range(50):
                    self._handle(mqtt.messages.get_nowait())
            except queue.Empty:
                pass
            try:
                self._pump_outbox(mqtt)
                self._secagg.tick(mqtt)
                if self._status_due.is_set() or time.monotonic() - last_status > STATUS_INTERVAL:
                    self._status_due.clear()
                    last_status = time.monotonic()
                    self._publish_status(mqtt)
            except (TransportError, StorageError, NotReadyError) as e:
                log.warning("io: %s", e)
            except Exception:
                # A bug here must not end the thread (the outbox would stop); log, go on.
                log.exception("internal error in the io loop")
                self._stop.wait(1.0)

    def _handle(self, msg: Message) -> None:
        try:
            if msg.topic == self.topics.receipt(self.device_id):
                self._on_receipt(decode_json(msg.payload, Receipt))
            elif msg.topic.startswith(f"{self.topics.base}/rounds/"):
                mqtt = self._mqtt
                if mqtt is not None and not handle_safely(self._secagg, mqtt, msg):
                    self.metrics.bad_messages.inc()
            elif not msg.payload:
                return  # a retained message was cleared
            elif msg.topic == self.topics.model:
                mv = ModelVersion.from_bytes(msg.payload, max_bytes=self._max_model_bytes())
                self._adopt(mv, msg.payload)
            elif msg.topic == self.topics.plan:
                self._on_plan(decode_json(msg.payload, Plan), msg.payload)
            elif msg.topic == self.topics.graph:
                self._on_graph(msg.payload)
        except (ProtocolError, ModelError) as e:
            self.metrics.bad_messages.inc()
            log.warning("rejected message on %s: %s", msg.topic, e, extra={"topic": msg.topic})
        except Exception:
            self.metrics.bad_messages.inc()
            log.exception("internal error handling a message on %s", msg.topic)

    def _on_graph(self, payload: bytes) -> None:
        g = Graph.from_bytes(payload, max_bytes=MAX_GRAPH_MESSAGE)
        if g.task != self.task:
            raise ProtocolError(f"graph is for task {g.task!r}", reason=RejectReason.WRONG_TASK)
        if self._spec is not None and g.sha256 == self._spec.graph_sha256:
            return
        spec = parse_spec(g.spec)
        validate_graph(g.tflite, spec, isolate=True)  # a hostile graph must not crash us
        self._set_graph(g.tflite, spec)
        atomic_write(self.state_dir / "graph.bin", payload)
        waiting = self._waiting_model
        if waiting is not None:
            self._adopt(waiting, waiting.to_bytes())

    def _on_plan(self, plan: Plan, payload: bytes) -> None:
        if plan != self.plan or not self._plan_known:
            log.info("adopting plan %s", plan.model_dump_json())
            self.plan = plan
            self._plan_known = True
            atomic_write(self.state_dir / "plan.json", payload)
            self._wake_trainer.set()

    def _on_receipt(self, r: Receipt) -> None:
        if r.device != self.device_id or r.task != self.task:
            return
        entry = self.outbox.settle(r.update_id)
        self.metrics.receipts.labels(r.status).inc()
        self.metrics.outbox.set(len(self.outbox))
        if entry is None:
            log.debug("receipt for %s, which is no longer in the outbox", r.update_id)
        elif r.status == "rejected":
            self.metrics.dropped.labels(r.reason or "rejected").inc()
            log.warning("update %s rejected by the aggregator: %s (%s)", r.update_id, r.reason,
                        r.detail, extra={"update_id": r.update_id, "reason": r.reason})  # fmt: skip
        else:
            log.info("update %s %s (aggregator version %d)", r.update_id, r.status, r.version)
        self._status_due.set()

    def _pump_outbox(self, mqtt: MqttClient) -> None:
        if not mqtt.connected:
            return
        if self._resend_all.is_set():
            self._resend_all.clear()
            self.outbox.reset()
        cur = self._current
        window = (cur.version, self.plan.max_staleness) if cur is not None else None
        if cur is not None and window != self._stale_window:
            self._stale_window = window  # only a new version or plan can make entries stale
            for e in self.outbox.drop_stale(cur.version, self.plan.max_staleness):
                self.metrics.dropped.labels("stale").inc()
                log.debug("dropped %s", e.update_id)
        with self._send_lock:
            for entry in self.outbox.due(self.cfg.receipt_timeout):
                self._send(mqtt, entry)
        self.metrics.outbox.set(len(self.outbox))

    def _send(self, mqtt: MqttClient, entry: Entry) -> None:
        if entry.attempts:
            log.info("resending update %s (attempt %d)", entry.update_id, entry.attempts + 1)
        mqtt.publish(self.topics.update(self.device_id), entry.payload, qos=1)
        self.outbox.mark_sent(entry.update_id)
        self.metrics.publishes.inc()

    def _status_message(self, state: str) -> DeviceStatus:
        return DeviceStatus(
            device=self.device_id,
            state=state,
            version=self.version,
            examples=self.examples.count() if state != "offline" else 0,
            outbox=len(self.outbox) if state != "offline" else 0,
            updates_sent=self._updates_sent + self._secagg.masked_sent,
            software=f"fededge {__version__}"[:64],
            time=time.time(),
        )

    def _publish_status(self, mqtt: MqttClient) -> None:
        if mqtt.connected:
            state = "training" if self._training else "online"
            msg = self._status_message(state).to_bytes()
            mqtt.publish(self.topics.device_status(self.device_id), msg, qos=1, retain=True)
        self.metrics.examples.set(self.examples.count())
        self.metrics.fresh.set(self.examples.fresh_count())

    # -- training thread ----------------------------------------------------------------------
    def _trainable(self) -> bool:
        cur = self._current
        if cur is None or not self._plan_known:
            return False
        dim = int(np.prod(cur.runtime.spec.input_shape))
        return self.examples.fresh_count(dim) >= self.plan.examples_per_update

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
                self._training = False

    def _train_once(self) -> bool:
        """Train on one batch of fresh examples and store+send the update; False if none."""
        cur, plan = self._current, self.plan
        if cur is None or not self._plan_known:
            return False  # no model yet, or no plan from the task's owner (see __init__)
        if plan.secure_aggregation is not None and self._secagg.busy():
            return False  # one update at a time waits for its round
        batch = self.examples.take(plan.examples_per_update, cur.runtime.spec.input_shape)
        if batch is None:
            return False
        self._training = True
        self._status_due.set()
        t0 = time.perf_counter()
        lu = local_update(
            cur.runtime, cur.weights, batch.x, batch.y,
            epochs=plan.epochs, batch_size=plan.batch_size, learning_rate=plan.learning_rate,
            clip_norm=plan.clip_norm, noise_stddev=plan.noise_stddev, rng=self._rng,
            evaluate_first=self.cfg.evaluate_before_training and plan.evaluate,
        )  # fmt: skip
        seconds = time.perf_counter() - t0
        self.metrics.train_seconds.inc(seconds)
        self.metrics.train_runs.inc()
        latest = self._current
        if latest is not None and latest.version - cur.version > self.plan.max_staleness:
            log.info("discarding an update on version %d: version %d arrived meanwhile",
                     cur.version, latest.version)  # fmt: skip
            return True  # the examples stay fresh and train again on the new version
        if plan.secure_aggregation is not None:
            # No plaintext update: the io thread checks in and masks it in a round; its
            # examples are marked used only when the masked input is sent.
            self._secagg.offer(ReadyInput(cur.version, lu.delta, lu.num_examples, batch.ids))
            log.info("trained on %d examples in %.3f s (loss %.4f): waiting for a round",
                     lu.num_examples, seconds, lu.train_loss)  # fmt: skip
            return False
        uid = uuid.uuid4().hex
        payload = Update(
            task=self.task, device=self.device_id, update_id=uid, base_version=cur.version,
            num_examples=lu.num_examples, delta=lu.delta, train_loss=lu.train_loss,
            eval_loss=lu.eval_loss, eval_accuracy=lu.eval_accuracy,
        ).to_bytes()  # fmt: skip
        with self.db.transaction() as c:  # the update and the use of its examples, atomically
            Outbox.put_in(c, uid, cur.version, lu.num_examples, payload)
            ExampleStore.mark_used_in(c, batch.ids)
        self._updates_sent += 1
        self.metrics.updates_sent.inc()
        log.info(
            "trained on %d examples in %.3f s (loss %.4f, norm %.3g): update %s on version %d",
            lu.num_examples, seconds, lu.train_loss, lu.delta_norm, uid, cur.version,
        )  # fmt: skip
        mqtt = self._mqtt
        if mqtt is not None and mqtt.connected:
            with self._send_lock:  # unless the io thread was quicker
                entry = self.outbox.get(uid)
                if entry is not None and not self.outbox.was_sent(uid):
                    with contextlib.suppress(TransportError):
                        self._send(mqtt, entry)
        self._status_due.set()
        return True


def _weights_fit(mv: ModelVersion, spec: BundleSpec) -> bool:
    if set(mv.weights) != set(spec.weight_names):
        return False
    return all(tuple(mv.weights[w.name].shape) == w.shape for w in spec.weights)


def _lock_state(state_dir: Path) -> int:
    """Hold an exclusive lock on the state directory for the life of the client."""
    fd = os.open(state_dir / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise StorageError(
            f"{state_dir} is in use by another fededge device process (same device_id and task)"
        ) from None
    return fd
