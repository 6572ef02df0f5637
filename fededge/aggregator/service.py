"""The aggregator service: MQTT in, validated durable folds, retained model versions out."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import queue
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from typing import Any, Literal

from fededge import kernels
from fededge.aggregator.metrics import AggregatorMetrics
from fededge.aggregator.pending import PendingVersion, dedup_key
from fededge.aggregator.policy import check_update
from fededge.aggregator.rounds import RoundDriver
from fededge.aggregator.store import Store, task_root
from fededge.errors import (
    ConfigError,
    FededgeError,
    NotReadyError,
    ProtocolError,
    StorageError,
    TransportError,
)
from fededge.mqtt import Message, MqttClient, Will
from fededge.protocol import (
    AggregatorStatus,
    Graph,
    ModelVersion,
    Plan,
    Receipt,
    Topics,
    Update,
    VersionMetrics,
    decode_json,
)
from fededge.protocol.messages import Weights
from fededge.protocol.vocab import NO_GRAPH, RejectReason
from fededge.settings import Settings

log = logging.getLogger(__name__)
NewVersionCallback = Callable[[ModelVersion, int, int], object]


class Aggregator:
    """Asynchronous buffered FedAvg over MQTT (the seed's server, durable and validated).

    ``start()`` connects and restores state, ``step()`` processes one batch of messages,
    ``run(stop)`` loops until ``stop`` is set. Callbacks registered with ``on_new_version``
    run on the aggregator's thread after each version is durable and published.
    """

    def __init__(self, settings: Settings, *, client_id: str | None = None) -> None:
        self.settings = settings
        self.cfg = settings.aggregator
        self.topics = Topics(settings.topic_prefix, settings.task)
        self.store = Store(task_root(settings.state_dir, settings.task), fsync=self.cfg.fsync)
        self.metrics = AggregatorMetrics()
        self.metrics_port: int | None = None
        self.plan = Plan()
        self.graph: Graph | None = None
        self.model: ModelVersion | None = None
        self._model_sha = ""
        self.pending: PendingVersion | None = None
        # dedup key (device/update id) -> version it went into
        self._recent: OrderedDict[str, int] = OrderedDict()
        self._oldest_kept = 0  # updates based on older versions cannot be deduplicated
        self._callbacks: list[NewVersionCallback] = []
        self._deferred: list[Message] = []
        self._after_commit: list[tuple[Message, str, str]] = []  # copies of staged updates
        self._published: deque[str] = deque(maxlen=8)  # sha256 of model payloads we published
        self._last_status = 0.0
        self._version_started = time.time()
        self.accepted_total = 0
        self.rejected_total = 0
        self.rounds = RoundDriver(self)  # secure aggregation, when the plan asks for it
        self._client_id = (
            client_id or settings.broker.client_id or f"fededge-aggregator-{settings.task}"
        )
        # Built after the state is loaded (in start) so the Last Will names the real version.
        self.client = self._make_client()

    def _make_client(self) -> MqttClient:
        return MqttClient(
            self.settings.broker,
            self._client_id,
            persistent=True,
            manual_ack=True,
            will=Will(self.topics.aggregator_status, self._status("offline").to_bytes()),
            name="aggregator",
        )

    # -- public API -------------------------------------------------------------------------
    def on_new_version(self, callback: NewVersionCallback) -> None:
        """Call ``callback(model, old_version, new_version)`` after each new version."""
        self._callbacks.append(callback)

    @property
    def version(self) -> int | None:
        return self.model.version if self.model else None

    def start(
        self,
        *,
        wait_for_model: float | None = None,
        tick: Callable[[], object] = lambda: None,
        should_stop: Callable[[], bool] = lambda: False,
        on_connected: Callable[[], object] = lambda: None,
    ) -> None:
        """Restore state, connect, and (without local state) adopt the retained model.

        ``wait_for_model`` bounds the wait for ``fededge model init`` (None waits forever);
        ``tick`` is called while waiting (the systemd watchdog); ``on_connected`` once the
        broker answered (the service is up, possibly still waiting for a model). A broker that
        is down is retried with backoff until ``should_stop()``.
        """
        kernels.warmup(parallel=self.cfg.parallel_kernels)
        self._load_local()
        self.client = self._make_client()
        if self.cfg.metrics:
            try:
                self.metrics_port = self.metrics.serve(self.cfg.metrics_host, self.cfg.metrics_port)
            except OSError as e:
                raise ConfigError(
                    f"aggregator.metrics_port={self.cfg.metrics_port}: cannot listen on "
                    f"{self.cfg.metrics_host}: {e.strerror}"
                ) from None
        self._connect(tick, should_stop)
        on_connected()
        for t in (self.topics.plan, self.topics.graph, self.topics.model):
            self.client.subscribe(t, qos=1)
        deadline = None if wait_for_model is None else time.monotonic() + wait_for_model
        if self.model is None:
            log.info(
                "no local state for task %s: waiting for `fededge model init`", self.settings.task
            )
        # Take in the retained plan/graph/model first, so that republishing ours below never
        # overwrites something newer an operator published while we were down.
        quiet_until = time.monotonic() + 0.3
        while self.model is None or time.monotonic() < quiet_until:
            tick()
            if should_stop():
                raise NotReadyError("stopped before the aggregator was ready")
            if self.model is None and deadline is not None and time.monotonic() > deadline:
                raise NotReadyError(
                    f"no model for task {self.settings.task!r}: run `fededge model init`"
                )
            if self._handle_control_batch(timeout=0.1):
                quiet_until = time.monotonic() + 0.3
        # Retained copies on the broker are ours: restore any the broker lost.
        self._publish_current(startup=True)
        self.client.subscribe(self.topics.updates_filter, qos=1)
        for topic, qos in self.rounds.subscriptions():
            self.client.subscribe(topic, qos=qos)
        log.info(
            "aggregator ready: task=%s version=%s pending=%d/%d",
            self.settings.task,
            self.version,
            self.pending.sums.count if self.pending else 0,
            self.plan.min_updates_per_version,
        )

    def _connect(self, tick: Callable[[], object], should_stop: Callable[[], bool]) -> None:
        delay = self.settings.broker.reconnect_min_delay
        while True:
            try:
                self.client.connect()
                return
            except TransportError as e:
                if should_stop():
                    raise
                log.warning("broker not reachable (%s); retrying in %.1f s", e, delay)
            end = time.monotonic() + delay
            while time.monotonic() < end:
                tick()
                if should_stop():
                    raise TransportError("stopped while waiting for the broker")
                time.sleep(min(0.2, delay))
            delay = min(delay * 2, self.settings.broker.reconnect_max_delay)

    def run(
        self, should_stop: Callable[[], bool], *, tick: Callable[[], object] = lambda: None
    ) -> None:
        """Process messages until ``should_stop()``; ``tick`` runs every loop (the watchdog)."""
        while not should_stop():
            tick()
            self.step(timeout=0.2)

    def close(self) -> None:
        """Publish the offline status and disconnect; on-disk state is always consistent."""
        try:
            if self.client.connected:
                self.client.publish(
                    self.topics.aggregator_status,
                    self._status("offline").to_bytes(),
                    retain=True,
                    wait=True,
                    timeout=2,
                )
        except FededgeError as e:
            log.warning("could not publish offline status: %s", e)
        if self.pending is not None:
            self.pending.close()
        self.client.close()
        self.store.close()

    # -- main loop --------------------------------------------------------------------------
    def step(self, timeout: float) -> int:
        """Process one batch (at most ``group_commit_max`` messages); return how many."""
        batch = self._deferred[: self.cfg.group_commit_max]
        del self._deferred[: len(batch)]
        if not batch:
            try:
                batch.append(self.client.messages.get(timeout=timeout))
            except queue.Empty:
                self.rounds.tick()
                self._maybe_status()
                return 0
        # Group commit with a short delay (like PostgreSQL's commit_delay): under load, waiting a
        # few ms gathers up to group_commit_max updates for one fsync.
        deadline = time.monotonic() + self.cfg.commit_delay
        while len(batch) < self.cfg.group_commit_max:
            try:
                batch.append(
                    self.client.messages.get(timeout=max(0.0, deadline - time.monotonic()))
                )
            except queue.Empty:
                break
        staged: list[Message] = []
        controls: list[Message] = []
        for msg in batch:
            if self.topics.device_of(msg.topic, "updates") is None:
                # After the commit: a new plan may complete the version, which must not happen
                # while this batch's updates are staged against it.
                controls.append(msg)
                continue
            with self._guard(msg):
                if self._ingest(msg):
                    staged.append(msg)
        if staged:
            self._commit(staged)
        for msg, device, uid in self._after_commit:
            self.metrics.duplicates.inc()
            self._answer(msg, device, uid, "duplicate")
        self._after_commit.clear()
        for msg in controls:
            with self._guard(msg):
                self._control(msg)
                self.client.ack(msg)
        self.rounds.tick()
        self._maybe_status()
        return len(batch)

    @contextlib.contextmanager
    def _guard(self, msg: Message) -> Iterator[None]:
        """Run the handling of one message so that a bug in it cannot stop the service."""
        try:
            yield
        except (StorageError, OSError):
            raise  # the disk failed: stop rather than acknowledge what is not durable
        except Exception:
            # A bug in validation must not take the service down or wedge the message:
            # count it, log it with the traceback, acknowledge and go on.
            self.metrics.internal_errors.inc()
            log.exception("internal error on a message on %s; dropped", msg.topic)
            self.client.ack(msg)

    def _ingest(self, msg: Message) -> bool:
        """Validate one update; stage it (True) or answer it now (False)."""
        assert self.model is not None and self.pending is not None
        device = self.topics.device_of(msg.topic, "updates") or "?"
        self.metrics.bytes_in.inc(len(msg.payload))
        t0 = time.perf_counter()
        update: Update | None = None
        try:
            if len(msg.payload) > self.cfg.max_update_bytes:
                raise ProtocolError(
                    f"{len(msg.payload)} bytes exceed max_update_bytes={self.cfg.max_update_bytes}",
                    reason=RejectReason.OVERSIZE,
                )
            update = Update.from_bytes(msg.payload, max_bytes=self.cfg.max_update_bytes)
            if self.plan.secure_aggregation is not None:
                raise ProtocolError(
                    "the plan asks for secure aggregation: send masked inputs in rounds",
                    reason=RejectReason.SECURE_AGGREGATION,
                )
            uid = update.update_id
            key = dedup_key(device, uid)
            if self.pending.is_staged(key):
                # A second copy in the same batch: answer only once the first is durable, or
                # a crash before the commit would leave the device holding a false receipt.
                self._after_commit.append((msg, device, uid))
                return False
            if key in self._recent or self.pending.has(key):
                self.metrics.duplicates.inc()
                log.info("duplicate update device=%s update_id=%s: answered again", device, uid)
                self._answer(msg, device, uid, "duplicate")
                return False
            if update.base_version < self._oldest_kept:
                raise ProtocolError(
                    f"base version {update.base_version} is older than the oldest version kept "
                    f"({self._oldest_kept}), whose update ids are the deduplication memory",
                    reason=RejectReason.STALE,
                )
            weight, norm = check_update(
                update,
                task=self.settings.task,
                device=device,
                current_version=self.model.version,
                plan=self.plan,
                layout=self.pending.layout,
            )
        except ProtocolError as e:
            self.rejected_total += 1
            self.metrics.rejected.labels(e.reason).inc()
            rejected_id = update.update_id if update is not None else None
            log.warning(
                "rejected update device=%s topic=%s reason=%s: %s",
                device,
                msg.topic,
                e.reason,
                e.detail,
            )
            self._answer(msg, device, rejected_id, "rejected", e.reason, e.detail)
            return False
        finally:
            self.metrics.kernel_seconds.inc(time.perf_counter() - t0)
        self.pending.stage(update, msg.payload, weight, norm)
        return True

    def _commit(self, staged: list[Message]) -> None:
        assert self.pending is not None and self.model is not None
        t0 = time.perf_counter()
        updates = self.pending.commit()
        self.metrics.commit_seconds.inc(time.perf_counter() - t0)
        target = self.model.version + 1
        for msg, update in zip(staged, updates, strict=True):
            self.accepted_total += 1
            self.metrics.accepted.inc()
            self._answer(msg, update.device, update.update_id, "accepted", pending=target)
        self.metrics.pending.set(self.pending.sums.count)
        self.metrics.pending_examples.set(self.pending.sums.examples)
        if self.pending.sums.count >= self.plan.min_updates_per_version:
            self._complete_version()

    def _answer(
        self,
        msg: Message,
        device: str,
        update_id: str | None,
        status: Literal["accepted", "duplicate", "rejected"],
        reason: str | None = None,
        detail: str | None = None,
        pending: int | None = None,
    ) -> None:
        """Send the receipt (if the update can be named), then acknowledge the MQTT message."""
        assert self.model is not None
        if update_id is not None and device != "?":
            receipt = Receipt(
                task=self.settings.task,
                device=device,
                update_id=update_id,
                status=status,
                reason=reason,
                detail=detail[:1024] if detail else None,
                version=self.model.version,
                pending=pending,
            )
            try:
                self.client.publish(self.topics.receipt(device), receipt.to_bytes(), qos=1)
            except FededgeError as e:
                # The device resends after its receipt timeout and gets a "duplicate" receipt.
                log.warning("receipt to device=%s not sent: %s", device, e)
        self.client.ack(msg)

    # -- versions ---------------------------------------------------------------------------
    def _complete_version(self) -> None:
        assert self.pending is not None and self.model is not None
        t0 = time.perf_counter()
        weights = self.pending.finalize(self.plan.server_learning_rate)
        self.metrics.kernel_seconds.inc(time.perf_counter() - t0)
        self.publish_version(
            weights, self.pending.metrics(), self.pending.sums.ids, self.pending.sums.keys()
        )

    def publish_version(
        self,
        weights: Weights,
        metrics: dict[str, Any],
        update_ids: list[str],
        update_keys: list[str] | None = None,
        *,
        round_id: str | None = None,
    ) -> ModelVersion:
        """Store, publish (retained) and announce the version after the current one.

        The one path for both modes: async FedAvg (``_complete_version``) and secure rounds
        (fededge/aggregator/rounds.py, with the round id recorded in the version's info).
        """
        assert self.pending is not None and self.model is not None
        old = self.model
        new_version = old.version + 1
        now = time.time()
        model = ModelVersion(
            task=self.settings.task,
            version=new_version,
            weights=weights,
            graph_sha256=self.graph.sha256 if self.graph else NO_GRAPH,
            parent=old.version,
            updates=metrics["updates"],
            examples=metrics["examples"],
            time=now,
        )
        payload = model.to_bytes()
        seconds = max(0.0, now - self._version_started)  # the wall clock may step back (NTP)
        info: dict[str, Any] = {
            "metrics": metrics,
            "seconds": seconds,
            "update_ids": update_ids,
            "update_keys": update_keys or [],
        }
        if round_id is not None:
            info["round_id"] = round_id
        self.store.write_version(payload, new_version, info, keep=self.cfg.versions_kept)
        for key in update_keys or []:
            self._remember(key, new_version)
        self._oldest_kept = self.store.version_numbers()[0]
        self.pending.close()
        self._set_model(model, payload)
        self.store.discard_pending(keep_base=new_version)
        self._version_started = now
        self.metrics.versions.inc()
        log.info(
            "published version %d: updates=%d examples=%d train_loss=%s",
            new_version,
            metrics["updates"],
            metrics["examples"],
            metrics["train_loss"],
        )
        # The version is durable from here on: nothing below may take the service down.
        try:
            self._publish_model(payload)
            vm = VersionMetrics(
                task=self.settings.task, version=new_version, seconds=seconds, time=now, **metrics
            )
            self.client.publish(
                self.topics.version_metrics(new_version), vm.to_bytes(), retain=True
            )
            expired = new_version - self.cfg.versions_kept
            if expired >= 0:  # keep the broker's retained store bounded
                self.client.publish(self.topics.version_metrics(expired), b"", retain=True)
            self._publish_status()
        except Exception:
            log.exception("version %d is stored but announcing it failed", new_version)
        for cb in self._callbacks:
            try:
                cb(model, old.version, new_version)
            except Exception:  # logged with its traceback; the service goes on
                log.exception("on_new_version callback %r failed", cb)
        return model

    def _set_model(self, model: ModelVersion, payload: bytes) -> None:
        self.model = model
        self._model_sha = hashlib.sha256(payload).hexdigest()
        self.pending = PendingVersion(
            self.store,
            model,
            checkpoint_every=self.cfg.checkpoint_every,
            parallel=self.cfg.parallel_kernels,
            max_update_bytes=self.cfg.max_update_bytes,
        )
        self.metrics.version.set(model.version)
        self.metrics.pending.set(0)
        self.metrics.pending_examples.set(0)

    def _remember(self, update_id: str, version: int) -> None:
        self._recent[update_id] = version
        while len(self._recent) > self.cfg.recent_update_ids:
            self._recent.popitem(last=False)

    # -- state on disk ----------------------------------------------------------------------
    def _load_local(self) -> None:
        if (raw := self.store.read_blob("plan.json")) is not None:
            self.plan = decode_json(raw, Plan)
        if (raw := self.store.read_blob("graph.bin")) is not None:
            self.graph = Graph.from_bytes(raw, max_bytes=1 << 31)
        versions = self.store.version_numbers()
        if not versions:
            return
        for v in versions:
            for key in self.store.version_info(v).get("update_keys", []):
                self._remember(key, v)
        self._oldest_kept = versions[0]
        latest = versions[-1]
        self._set_model(self.store.load_version(latest), self.store.read_version_bytes(latest))
        assert self.pending is not None
        replayed = self.pending.recover()
        self._version_started = self.model.time if self.model and self.model.time else time.time()
        log.info(
            "restored version %d with %d pending updates (%d replayed from the WAL)",
            latest,
            self.pending.sums.count,
            replayed,
        )

    # -- control topics (model, plan, graph) ------------------------------------------------
    def _handle_control_batch(self, timeout: float) -> bool:
        try:
            msg = self.client.messages.get(timeout=timeout)
        except queue.Empty:
            return False
        if self.topics.device_of(msg.topic, "updates") is not None:
            # A persistent session delivers updates before we are ready; keep them for later.
            # QoS 1 is bounded by the broker's in-flight window; QoS 0 is not, so cap it.
            if msg.qos > 0 or len(self._deferred) < 4 * self.cfg.group_commit_max:
                self._deferred.append(msg)
            return False  # only control messages keep the start-up window open
        with self._guard(msg):
            self._control(msg)
            self.client.ack(msg)
        return True

    def _control(self, msg: Message) -> None:
        try:
            if msg.topic == self.topics.plan:
                self._on_plan(msg)
            elif msg.topic == self.topics.graph:
                self._on_graph(msg)
            elif msg.topic == self.topics.model:
                self._on_model(msg)
            elif msg.topic.startswith(f"{self.topics.base}/rounds/"):
                self.rounds.on_message(msg)
            else:
                log.debug("ignoring message on %s", msg.topic)
        except ProtocolError as e:
            self.metrics.bad_control.inc()
            log.warning("rejected message on %s reason=%s: %s", msg.topic, e.reason, e.detail)
            if msg.topic == self.topics.plan and self.model is not None:
                # An invalid retained plan would leave devices on defaults (e.g. no noise):
                # put the last valid one back.
                self.client.publish(self.topics.plan, self.plan.to_bytes(), qos=1, retain=True)

    def _on_plan(self, msg: Message) -> None:
        if not msg.payload:
            return
        plan = decode_json(msg.payload, Plan)
        if plan != self.plan:
            log.info("adopting new plan: %s", plan.model_dump_json())
            self.plan = plan
            self.store.write_blob("plan.json", plan.to_bytes())
            if self.pending is not None and self.pending.sums.count >= plan.min_updates_per_version:
                self._complete_version()

    def _on_graph(self, msg: Message) -> None:
        if not msg.payload:
            return
        graph = Graph.from_bytes(msg.payload, max_bytes=1 << 31)
        if graph.task != self.settings.task:
            raise ProtocolError(f"graph is for task {graph.task!r}", reason=RejectReason.WRONG_TASK)
        if self.graph is None or graph.sha256 != self.graph.sha256:
            log.info("adopting graph sha256=%s (%d bytes)", graph.sha256, len(graph.tflite))
            self.graph = graph
            self.store.write_blob("graph.bin", msg.payload)

    def _on_model(self, msg: Message) -> None:
        if not msg.payload:
            if self.model is not None:
                self._publish_model(self.store.read_version_bytes(self.model.version))
            return
        if self.model is not None:
            # Our own publications come back to us (we subscribe to the topic); only a payload
            # we never published is foreign.
            sha = hashlib.sha256(msg.payload).hexdigest()
            if sha not in self._published and sha != self._model_sha:
                log.warning(
                    "a foreign model message was published on %s; restoring ours", msg.topic
                )
                self._publish_model(self.store.read_version_bytes(self.model.version))
            return
        model = ModelVersion.from_bytes(msg.payload, max_bytes=self.cfg.max_update_bytes)
        if model.task != self.settings.task:
            raise ProtocolError(f"model is for task {model.task!r}", reason=RejectReason.WRONG_TASK)
        log.info("adopting model version %d from the broker", model.version)
        self.store.write_version(
            msg.payload, model.version, {"adopted": True}, keep=self.cfg.versions_kept
        )
        if self.store.read_blob("plan.json") is None:
            self.store.write_blob("plan.json", self.plan.to_bytes())
        self._set_model(model, msg.payload)
        self._version_started = time.time()

    # -- publishing -------------------------------------------------------------------------
    def _publish_model(self, payload: bytes) -> None:
        self._published.append(hashlib.sha256(payload).hexdigest())
        self.client.publish(self.topics.model, payload, qos=1, retain=True)

    def _publish_current(self, *, startup: bool) -> None:
        assert self.model is not None
        self.client.publish(self.topics.plan, self.plan.to_bytes(), qos=1, retain=True)
        if self.graph is not None:
            self.client.publish(self.topics.graph, self.graph.to_bytes(), qos=1, retain=True)
        self._publish_model(self.store.read_version_bytes(self.model.version))
        self._publish_status()

    def _status(self, state: Literal["online", "offline"]) -> AggregatorStatus:
        return AggregatorStatus(
            task=self.settings.task,
            state=state,
            version=self.version,
            pending_updates=self.pending.sums.count if self.pending else 0,
            pending_examples=self.pending.sums.examples if self.pending else 0,
            min_updates_per_version=self.plan.min_updates_per_version,
            accepted_total=self.accepted_total,
            rejected_total=self.rejected_total,
            time=time.time(),
            round_id=self.rounds.round_id,
            round_stage=self.rounds.stage,
            checked_in=self.rounds.checked_in if self.rounds.stage is not None else None,
        )

    def publish_status(self) -> None:
        """Publish the retained status now (e.g. when a secure-aggregation round changes)."""
        self._publish_status()

    def _publish_status(self) -> None:
        self._last_status = time.monotonic()
        try:
            self.client.publish(
                self.topics.aggregator_status, self._status("online").to_bytes(), retain=True
            )
        except FededgeError as e:
            log.warning("status not published: %s", e)

    def _maybe_status(self) -> None:
        if time.monotonic() - self._last_status > self.cfg.status_interval:
            self._publish_status()
