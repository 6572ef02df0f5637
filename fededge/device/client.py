"""The device client: predictions, local training and updates over MQTT, usable in-process.

``Client(settings)`` is what the daemon runs and what a Python app may embed (the seed's client
API: ``predict``, ``fit``, ``on_new_version``). It owns no global state, so many clients can run
in one process (the demo runs ten). It is a thin shell: :class:`DeviceCore`
(fededge/device/core.py) makes every decision, and :class:`Driver` (fededge/device/driver.py)
feeds it messages, ticks and training results under one lock and carries out the effects it
returns. Threads, all named after the device:

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
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fededge.device.bundle import Bundle, load_bundle
from fededge.device.core import DeviceCore
from fededge.device.driver import Driver, NewVersionCallback
from fededge.device.examples import ExampleStore, StateDb, validate_examples, validate_inputs
from fededge.device.metrics import DeviceMetrics
from fededge.device.outbox import Outbox
from fededge.device.spec import BundleSpec
from fededge.device.trust import TRUST_FILE, TrustRules, TrustState
from fededge.errors import (
    FededgeError,
    NotReadyError,
    TransportError,
)
from fededge.protocol import Plan, Topics
from fededge.settings import Settings

log = logging.getLogger(__name__)


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
        try:
            trust = TrustRules.from_settings(settings)
            trust_state = TrustState.from_bytes((self.state_dir / TRUST_FILE).read_bytes())
        except FileNotFoundError:
            trust_state = TrustState()
        except BaseException:
            self.db.close()
            os.close(self._lockfile)
            raise
        self.core = DeviceCore(self.device_id, self.topics, self.db, self.examples, self.metrics,
                               receipt_timeout=self.cfg.receipt_timeout,
                               privacy=settings.privacy, trust=trust_state)  # fmt: skip
        self._driver = Driver(self.core, settings, self.state_dir, trust)
        self._threads: list[threading.Thread] = []
        self._started = False
        try:
            if bundle is not None:
                b = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
                self._driver.use_graph(b.graph, b.spec, raw=None)
            self._driver.load_cached()
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
        self._driver.callbacks.append(callback)

    def predict(self, x: Any) -> np.ndarray:
        """Class probabilities [n, classes] for inputs ``x`` from the current version."""
        return self.predict_versioned(x)[0]

    def predict_versioned(self, x: Any) -> tuple[np.ndarray, int]:
        """Model outputs and the version that produced them (one consistent snapshot)."""
        out, version, _ = self.predict_named(x)
        return out, version

    def predict_named(self, x: Any) -> tuple[np.ndarray, int, str]:
        """Outputs, version and the output's name (``probs``, or ``outputs`` for regression)."""
        cur = self.core.current  # one read: weights and runtime of the same version
        if cur is None:
            raise NotReadyError("no model version yet: waiting for the aggregator's model")
        xa = validate_inputs(x, cur.runtime.spec.input_shape)
        out = cur.runtime.infer(xa, cur.weights)
        self.metrics.predictions.inc(len(xa))
        return out, cur.version, cur.runtime.spec.task.output_name

    def fit(self, x: Any, y: Any) -> AddResult:
        """Add labelled examples; training starts in the background once enough are fresh."""
        return self.add_examples(x, y)

    def add_examples(self, x: Any, y: Any) -> AddResult:
        """Validate and store labelled examples, wake the trainer; see :meth:`fit`."""
        spec = self.core.spec
        if spec is None:
            raise NotReadyError("the task's graph has not arrived yet: its input shape is unknown")
        xa, ya = validate_examples(x, y, spec.input_shape, spec)
        added = self.examples.add(xa, ya)
        self.metrics.examples_added.inc(added)
        fresh = self.examples.fresh_count(int(np.prod(spec.input_shape)))
        self.metrics.fresh.set(fresh)
        if fresh >= self.core.plan.examples_per_update:
            self._driver.wake_trainer.set()
        return AddResult(added, fresh)

    def status(self) -> dict[str, Any]:
        """A snapshot of the device's state (what the local API's /status returns)."""
        mqtt = self._driver.mqtt
        return self.core.status(bool(mqtt is not None and mqtt.connected))

    def healthy(self, max_silence: float = 30.0) -> bool:
        """Whether every thread is alive and the io loop turned within ``max_silence`` s."""
        alive = all(t.is_alive() for t in self._threads)
        return alive and time.monotonic() - self._driver.beat < max_silence

    def start(self, *, retry: bool = False) -> None:
        """Connect, subscribe and start the threads.

        Without ``retry`` a failed first connection raises TransportError; with it (the
        daemon) the io thread keeps trying, and predictions from a cached model work meanwhile.
        """
        if self._started:
            raise NotReadyError("Client.start() called twice")
        self._started = True
        if missing := self._driver.trust.untrusted():
            log.warning("no %s set: this device trusts whoever can publish on the broker "
                        "for them (docs/security.md)", " and no ".join(missing))  # fmt: skip
        try:
            self._driver.connect()
        except TransportError as e:
            if not retry:
                self._started = False
                raise
            log.warning("broker unreachable, retrying in the background: %s", e)
        for name, target in (("io", self._driver.io_loop), ("train", self._driver.train_loop)):
            t = threading.Thread(target=target, name=f"fededge-device-{self.device_id}-{name}")
            t.daemon = True
            t.start()
            self._threads.append(t)

    def close(self, timeout: float = 30.0) -> None:
        """Stop training and io, publish the offline status, disconnect; state stays consistent.

        A training run in progress is finished (its examples are only marked used together
        with storing its update, so an abandoned run loses nothing).
        """
        self._driver.stop.set()
        self._driver.wake_trainer.set()
        for t in self._threads:
            t.join(timeout)
            if t.is_alive():
                log.warning("thread %s did not stop within %g s", t.name, timeout)
        mqtt = self._driver.mqtt
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

        d = self._driver
        with d.changed:
            d.changed.wait_for(lambda: reached() or d.stop.is_set(), timeout)
        return reached()

    def wait_idle(self, timeout: float) -> bool:
        """Block until no training is due or running and the outbox is empty."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._driver.lock:
                idle = not self.core.training and not len(self.outbox) and not self.core.trainable()
            if idle:
                return True
            time.sleep(0.05)
        return False


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
