"""The aggregator service: the driver of the sans-IO core over MQTT.

Everything the aggregator decides is in :class:`~fededge.aggregator.core.AggregatorCore`; this
module owns what the core must not: the MQTT client, the loop, group-commit batching (a group
is what has arrived, grown while updates keep arriving: ``Inbox.linger``; under load its
fsync overlaps the next batch),
start-up and connection retries, clocks, the metrics endpoint and the ``on_new_version``
callbacks. It carries out the core's effects in the order returned.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import time
from collections.abc import Callable, Iterator
from typing import Any

from fededge.aggregator import kernels, robust
from fededge.aggregator.core import AggregatorCore
from fededge.aggregator.effects import Ack, Effect, Incoming, NewVersion, Publish, incoming
from fededge.aggregator.intake import preparer
from fededge.aggregator.metrics import AggregatorMetrics
from fededge.aggregator.pending import PendingVersion
from fededge.aggregator.rounds import RoundDriver
from fededge.aggregator.store import Store, task_root
from fededge.errors import (
    ConfigError,
    FededgeError,
    LeaseError,
    NotReadyError,
    ProtocolError,
    StorageError,
    TransportError,
)
from fededge.memory import keep_freed_memory
from fededge.mqtt import Message, MqttClient, Will
from fededge.mqtt.chunked import effective_limit, register_chunk_metrics, with_chunk_filters
from fededge.protocol import Graph, ModelVersion, Plan, Topics
from fededge.protocol.messages import Weights
from fededge.protocol.roster import trusted_keys
from fededge.settings import Settings

log = logging.getLogger(__name__)
NewVersionCallback = Callable[[ModelVersion, int, int], object]


def _incoming(msg: Message) -> Incoming:
    return Incoming(msg.topic, msg.payload, msg, msg.qos)


def connect_with_retry(
    client: MqttClient,
    settings: Settings,
    tick: Callable[[], object],
    should_stop: Callable[[], bool],
) -> None:
    """Connect, retrying with exponential backoff until connected or ``should_stop()``."""
    delay = settings.broker.reconnect_min_delay
    while True:
        try:
            client.connect()
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
        delay = min(delay * 2, settings.broker.reconnect_max_delay)


def carry_out(
    client: MqttClient,
    effects: list[Effect],
    callbacks: list[NewVersionCallback],
    *,
    strict: bool = False,
) -> None:
    """Carry out the core's effects in order; a failed publication is logged unless ``strict``.

    Acknowledgements are sent together after the publications (each still after its receipt).
    A run of QoS 1 publications (a group's receipts) goes out with one ``publish_many``.
    """
    acks: list[Message] = []
    run: list[tuple[str, bytes]] = []
    for e in effects:
        if isinstance(e, Ack):
            if isinstance(e.handle, Message):
                acks.append(e.handle)
        elif isinstance(e, Publish):
            if e.qos == 1 and not e.retain:
                run.append((e.topic, e.payload))
                continue
            _publish_run(client, run, strict)
            try:
                client.publish(e.topic, e.payload, qos=e.qos, retain=e.retain)
            except FededgeError as err:
                if strict:
                    raise
                log.warning("publication on %s failed: %s", e.topic, err)
        elif isinstance(e, NewVersion):
            _publish_run(client, run, strict)
            client.ack_many(acks)
            acks = []
            for cb in callbacks:
                try:
                    cb(e.model, e.old, e.new)
                except Exception:  # logged with its traceback; the service goes on
                    log.exception("on_new_version callback %r failed", cb)
    _publish_run(client, run, strict)
    client.ack_many(acks)


def _publish_run(client: MqttClient, run: list[tuple[str, bytes]], strict: bool) -> None:
    """Publish a run of QoS 1 messages (and empty the list); log or raise the failures."""
    if not run:
        return
    failures = client.publish_many(run)
    run.clear()
    for topic, err in failures:
        if strict:
            raise err
        # A lost receipt: the device resends and gets a "duplicate" receipt.
        log.warning("publication on %s failed: %s", topic, err)


class _RoundHost:
    """The narrow view of the aggregator a :class:`RoundDriver` gets (``rounds.RoundHost``)."""

    def __init__(self, agg: Aggregator) -> None:
        self._agg = agg
        self.topics = agg.topics
        self.publish_version = agg.publish_version
        self.publish_status = agg.publish_status

    @property
    def task(self) -> str:
        return self._agg.settings.task

    @property
    def model(self) -> ModelVersion | None:
        return self._agg.model

    @property
    def plan(self) -> Plan:
        return self._agg.plan

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> None:
        self._agg.client.publish(topic, payload, qos=qos, retain=retain)

    def bad_round_message(self) -> None:
        self._agg.metrics.bad_control.inc()


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
        self.store = Store(task_root(settings.state_dir, settings.task), fsync=self.cfg.fsync,
                           direct_io=self.cfg.direct_io)  # fmt: skip
        self.metrics = AggregatorMetrics()
        register_chunk_metrics(self.metrics.registry, "fededge_chunks_refused",
                               lambda: getattr(self, "client", None))  # fmt: skip
        self.metrics_port: int | None = None
        self.core = AggregatorCore(settings, self.store, self.metrics)
        # secure aggregation, when the plan asks for it; the roster is verified with the owner key
        self.rounds = RoundDriver(
            _RoundHost(self),
            owner_keys=trusted_keys(settings.trust.owner_key),
            unmask_threads=self.cfg.unmask_threads,
        )
        self.core.rounds = self.rounds
        self._callbacks: list[NewVersionCallback] = []
        # Called before anything is written (a batch folded, a version): raises once this
        # process may no longer be the task's writer (the lease of `fededge aggregator`).
        self.fence: Callable[[], object] = lambda: None
        # Sharded aggregation (coordinator.py): the coordinator takes no device updates, but
        # subscribes to the workers' partial sums and handles them first (True: handled).
        self.update_filter: str | None = self.topics.updates_filter
        self.extra_subscriptions: list[tuple[str, int]] = []
        self.on_other: Callable[[Message], bool] = lambda _msg: False
        self._deferred: list[Message] = []
        self._last_tick = 0.0
        self._client_id = (
            client_id or settings.broker.client_id or f"fededge-aggregator-{settings.task}"
        )
        # Built after the state is loaded (in start) so the Last Will names the real version.
        self.client = self._make_client()

    def _make_client(self) -> MqttClient:
        client = MqttClient(
            self.settings.broker,
            self._client_id,
            persistent=True,
            manual_ack=True,
            will=Will(self.topics.aggregator_status, self._offline()),
            name="aggregator",
            exclusive=True,  # another process with our id: stop, never kick it back (lease.py)
            in_place_payloads=True,  # 4 MB updates are not copied after the socket read
        )
        # Large updates parsed and measured while in the cache (the limit: an int, read racily)
        client.messages.prepare = preparer(self.topics, lambda: self.core.state.update_limit)
        return client

    # -- public API -------------------------------------------------------------------------
    def on_new_version(self, callback: NewVersionCallback) -> None:
        """Call ``callback(model, old_version, new_version)`` after each new version."""
        self._callbacks.append(callback)

    @property
    def version(self) -> int | None:
        return self.model.version if self.model else None

    @property
    def model(self) -> ModelVersion | None:
        return self.core.state.model

    @property
    def plan(self) -> Plan:
        return self.core.state.plan

    @property
    def graph(self) -> Graph | None:
        return self.core.state.graph

    @property
    def pending(self) -> PendingVersion | None:
        return self.core.state.pending

    @property
    def accepted_total(self) -> int:
        return self.core.accepted_total

    @property
    def rejected_total(self) -> int:
        return self.core.rejected_total

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
        keep_freed_memory()  # large packets and checkpoints reuse mapped pages (memory.py)
        kernels.warmup(parallel=self.cfg.parallel_kernels)
        robust.warmup(parallel=self.cfg.parallel_kernels)
        replayed = self.core.state.restore(time.time())
        if replayed is not None and self.model is not None and self.pending is not None:
            log.info("restored version %d with %d pending updates (%d replayed from the WAL)",
                     self.model.version, self.pending.sums.count, replayed)  # fmt: skip
        self.client = self._make_client()
        if self.cfg.metrics:
            try:
                self.metrics_port = self.metrics.serve(self.cfg.metrics_host, self.cfg.metrics_port)
            except OSError as e:
                raise ConfigError(
                    f"aggregator.metrics_port={self.cfg.metrics_port}: cannot listen on "
                    f"{self.cfg.metrics_host}: {e.strerror}"
                ) from None
        connect_with_retry(self.client, self.settings, tick, should_stop)
        on_connected()
        # One SUBSCRIBE: a broker that waits for the PUBACK of a retained message before it
        # reads the next packet (amqtt does) would otherwise hold each later SUBACK for its
        # PUBACK timeout, while this thread, waiting for the SUBACK, cannot take the message.
        self._subscribe(with_chunk_filters([self.topics.plan, self.topics.graph,
                        self.topics.model]), 1, tick, should_stop)  # fmt: skip
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
        self._execute([*self.core.state.current(), self.core.status_publish(time.time())],
                      strict=True)  # fmt: skip
        own = [(self.update_filter, 1)] if self.update_filter else []
        subs = [*own, *self.extra_subscriptions, *self.rounds.subscriptions(),
                (self.topics.device_status_filter, 0)]  # fmt: skip
        for qos in (0, 1):  # QoS 0 first: no PUBACK a broker could wait for (see above)
            self._subscribe([t for t, q in subs if q == qos], qos, tick, should_stop)
        log.info(
            "aggregator ready: task=%s version=%s pending=%d/%d",
            self.settings.task,
            self.version,
            self.pending.sums.count if self.pending else 0,
            self.plan.min_updates_per_version,
        )

    def _subscribe(
        self,
        filters: list[str],
        qos: int,
        tick: Callable[[], object],
        should_stop: Callable[[], bool],
    ) -> None:
        """Subscribe, riding out a connection lost meanwhile: wait for the reconnect and retry.

        A SUBSCRIBE sent while disconnected never reaches the broker (and a resumed session
        would not bring it), so it is sent again once paho has reconnected.
        """
        while True:
            try:
                self.client.subscribe_all(filters, qos=qos)
                return
            except TransportError as e:
                if self.client.connected:
                    raise  # refused by a live broker: a configuration (ACL) problem
                log.warning("subscribing needs the broker, which is gone (%s); waiting", e)
            while not self.client.wait_connected(0.2):
                tick()
                if should_stop():
                    raise NotReadyError("stopped while waiting for the broker")

    def run(
        self, should_stop: Callable[[], bool], *, tick: Callable[[], object] = lambda: None
    ) -> None:
        """Process messages until ``should_stop()``; ``tick`` runs every loop (the watchdog)."""
        self.core.progress = tick  # and during a long robust aggregation
        while not should_stop():
            tick()
            self.step(timeout=0.2)

    def close(self, *, offline: bool = True) -> None:
        """Publish the offline status and disconnect; on-disk state is always consistent.

        ``offline=False`` after losing the lease: the status topic is the new writer's, and a
        pipelined group is left unanswered (its devices resend to the new writer).
        """
        if offline and self.core.in_flight and self.client.connected:
            # A pipelined group: answer it once durable, so its devices need not resend.
            self._execute(self.core.flush(time.time()))
        try:
            if offline and self.client.connected:
                self.client.publish(self.topics.aggregator_status, self._offline(), retain=True,
                                    wait=True, timeout=2)  # fmt: skip
        except FededgeError as e:
            log.warning("could not publish offline status: %s", e)
        if self.pending is not None:
            self.pending.close()
        self.client.close()
        self.store.close()

    # -- main loop --------------------------------------------------------------------------
    def step(self, timeout: float) -> int:
        """Process one batch (at most ``group_commit_max`` messages); return how many."""
        self.fence()
        batch = self._deferred[: self.cfg.group_commit_max]
        del self._deferred[: len(batch)]
        inbox = self.client.messages
        if not batch and self.core.in_flight:
            try:
                batch.append(inbox.get_nowait())
            except queue.Empty:
                self._execute(self.core.flush(time.time()))  # nothing to overlap it with
        if not batch:
            try:
                batch.append(inbox.get(timeout=timeout))
            except queue.Empty:
                self._tick()
                return 0
        # Group commit: take what has already arrived, up to group_commit_max, then let the
        # group grow while updates keep arriving, for at most ``commit_delay`` (Inbox.linger:
        # it stops at once when nothing more comes, e.g. the broker's in-flight window is
        # full, and once the group holds 16 MiB). Larger groups share one fsync and the
        # per-group work; at 2,410 parameters 5 ms took ~25% of the CPU per update off.
        limit = self.cfg.group_commit_max
        if len(batch) < limit:
            batch += inbox.take(limit - len(batch))
        inbox.linger(batch, limit, self.cfg.commit_delay)
        controls: list[Message] = []
        is_update, ingest = self.core.is_update, self.core.ingest
        for msg in batch:
            if not is_update(msg.topic):
                # After the commit: a new plan may complete the version, which must not happen
                # while this batch's updates are staged against it.
                controls.append(msg)
                continue
            try:  # _guard, inline: this runs once per update
                effects = ingest(incoming(msg.topic, msg.payload, msg, msg.qos, msg.prepared))
                if effects:  # most updates are answered by the commit
                    self._execute(effects)
            except (StorageError, OSError, LeaseError):
                raise  # as in _guard
            except Exception:
                self._internal_error(msg)
        self.fence()
        # More updates waiting: pipeline, i.e. fsync this group in the background while the
        # next step validates them (its commit sends this group's receipts and PUBACKs). Not
        # across control messages or timer work, which must see every update folded (device
        # statuses only feed the fleet gauges: they do not count).
        now = time.time()
        folded_first = any(self.topics.device_of(m.topic, "devices") is None for m in controls)
        pipeline = not folded_first and inbox.qsize() > 0 and now - self._last_tick < 1.0
        self._execute(self.core.commit(now, pipeline=pipeline))
        for msg in controls:
            self._control(msg)
        if not self.core.in_flight:
            self._tick()
        return len(batch)

    def _tick(self) -> None:
        self._last_tick = time.time()
        self.rounds.tick()
        self._execute(self.core.tick(time.time()))

    @contextlib.contextmanager
    def _guard(self, msg: Message) -> Iterator[None]:
        """Run the handling of one message so that a bug in it cannot stop the service."""
        try:
            yield
        except (StorageError, OSError, LeaseError):
            raise  # the disk failed, or another process is the writer: stop, write nothing
        except Exception:
            self._internal_error(msg)

    def _internal_error(self, msg: Message) -> None:
        # A bug (NotReadyError, a misuse, included) must not take the service down or wedge
        # the message: count it, log the traceback, send the documented internal_error
        # receipt if the update can be named, acknowledge and go on.
        log.exception("internal error on a message on %s; dropped", msg.topic)
        self._execute(self.core.internal_error(_incoming(msg)))

    def _control(self, msg: Message) -> None:
        with self._guard(msg):
            if self.on_other(msg):
                return
            if self.topics.parse_round(msg.topic) is not None or msg.topic == self.topics.roster:
                try:
                    self.rounds.on_message(msg)
                except ProtocolError as e:
                    self.metrics.bad_control.inc()
                    log.warning("rejected message on %s reason=%s: %s",
                                msg.topic, e.reason, e.detail)  # fmt: skip
                self.client.ack(msg)
            else:
                self._execute(self.core.control(_incoming(msg), time.time()))

    def _handle_control_batch(self, timeout: float) -> bool:
        try:
            msg = self.client.messages.get(timeout=timeout)
        except queue.Empty:
            return False
        if self.core.is_update(msg.topic):
            # A persistent session delivers updates before we are ready; keep them for later.
            # QoS 1 is bounded by the broker's in-flight window; QoS 0 is not, so cap it.
            if msg.qos > 0 or len(self._deferred) < 4 * self.cfg.group_commit_max:
                self._deferred.append(msg)
            return False  # only control messages keep the start-up window open
        self._control(msg)
        return True

    # -- effects ----------------------------------------------------------------------------
    def _execute(self, effects: list[Effect], *, strict: bool = False) -> None:
        # chunked transfer: the broker's limit, or the plan's if smaller (fededge/mqtt/chunked.py)
        self.client.max_message_bytes = effective_limit(
            self.settings.broker.max_message_bytes, self.plan.max_message_bytes
        )
        if len(effects) < 3:
            carry_out(self.client, effects, self._callbacks, strict=strict)
            return
        # A group's receipts and PUBACKs with one wake-up of the network thread; callbacks
        # after the block (one may publish and wait, which needs the network thread).
        callbacks: list[Effect] = [e for e in effects if isinstance(e, NewVersion)]
        with self.client.batched():
            carry_out(self.client, [e for e in effects if not isinstance(e, NewVersion)],
                      self._callbacks, strict=strict)  # fmt: skip
        carry_out(self.client, callbacks, self._callbacks, strict=strict)

    # -- publishing ---------------------------------------------------------------------------
    def publish_version(
        self,
        weights: Weights,
        metrics: dict[str, Any],
        update_ids: list[str],
        update_keys: list[str] | None = None,
        *,
        round_id: str | None = None,
    ) -> ModelVersion:
        """Store, publish (retained) and announce the version after the current one."""
        model, effects = self.core.new_version(
            weights, metrics, update_ids, update_keys, round_id=round_id, now=time.time()
        )
        self._execute(effects)
        return model

    def publish_status(self) -> None:
        """Publish the retained status now (e.g. when a secure-aggregation round changes)."""
        self._execute([self.core.status_publish(time.time())])

    def _offline(self) -> bytes:
        return self.core.status("offline", time.time()).to_bytes()
