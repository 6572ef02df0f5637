"""One writer per role: a lease on the broker that one aggregator process holds at a time.

A task has one process that publishes versions (role ``writer``: a single aggregator or the
coordinator) and, when sharded, one per shard (role ``shard-{id}``). Before a process opens
its state or connects with the task's persistent-session client id, it claims the role on the
retained topic ``{prefix}/{task}/aggregator/lease/{role}`` over a connection of its own (a
unique client id) whose Last Will clears that topic, so the broker frees the lease the moment
the holder's connection dies (kill -9, crash, host gone after 1.5 keep-alives).

Claiming: subscribe, read the retained claim; if another live instance holds it, refuse
(:class:`~fededge.errors.LeaseError`) or, as a standby, wait until it is cleared. Otherwise
publish our claim (retained) and listen for ``settle`` seconds: two processes that claimed at
once both see both claims, and the lower instance id wins (the other backs off). While running,
a claim by a lower instance id, or our connection coming back to find another holder, means the
lease is lost: :meth:`Lease.check` raises and the aggregator stops before it writes anything.
MQTT has no compare-and-set, so this is advisory: docs/operations.md states the window left.
"""

from __future__ import annotations

import logging
import os
import queue
import re
import secrets
import socket
import threading
import time
from collections.abc import Callable
from enum import StrEnum

from fededge.errors import FededgeError, LeaseError, NotReadyError, ProtocolError, TransportError
from fededge.mqtt import RETAINED_QUIET, Message, MqttClient, Will
from fededge.protocol import AggregatorLease, Topics, decode_json
from fededge.settings import Settings

log = logging.getLogger(__name__)

WRITER = "writer"


def shard_role(shard_id: int) -> str:
    """The lease role of shard worker ``shard_id``."""
    return f"shard-{shard_id}"


def new_instance_id() -> str:
    """A fresh instance id: random first (the lowest wins a race: no host is favoured), then
    host and pid, so that a person reading a refusal knows where the other process runs."""
    host = re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname())[:40] or "host"
    return f"{secrets.token_hex(4)}-{host}-{os.getpid()}"[:64]


class LeaseState(StrEnum):
    IDLE = "idle"  # not claimed yet (or standby)
    HELD = "held"
    SUSPENDED = "suspended"  # our lease connection is down: not sure we still hold it
    LOST = "lost"


class Lease:
    """The claim of this process to one role of a task (see the module docstring)."""

    def __init__(
        self, settings: Settings, role: str = WRITER, *, instance: str | None = None
    ) -> None:
        self.settings = settings
        self.role = role
        self.instance = instance or new_instance_id()
        self.topic = Topics(settings.topic_prefix, settings.task).aggregator_lease(role)
        cfg = settings.aggregator
        self.settle = cfg.lease_settle
        self.refresh = cfg.lease_refresh
        self.ttl = 3 * cfg.lease_refresh
        self.client = MqttClient(
            settings.broker,
            f"fededge-lease-{self.instance}",
            persistent=False,
            will=Will(self.topic, b"", qos=1, retain=True),
            name="lease",
        )
        self._cond = threading.Condition()
        self.state = LeaseState.IDLE
        self.lost_reason = ""
        self.holder: AggregatorLease | None = None  # the claim the topic holds, as last seen
        self._heard: dict[str, float] = {}  # instance -> monotonic time of its last claim
        self._rivals: dict[str, AggregatorLease] = {}  # claims of others seen while settling
        self._watched: list[Callable[[], MqttClient]] = []
        self._thread: threading.Thread | None = None
        self._closing = False
        self._since = time.monotonic()

    # -- public API ---------------------------------------------------------------------------
    def acquire(
        self,
        *,
        standby: bool = False,
        tick: Callable[[], object] = lambda: None,
        should_stop: Callable[[], bool] = lambda: False,
        on_standby: Callable[[AggregatorLease], object] = lambda _h: None,
    ) -> None:
        """Hold the lease, or raise LeaseError (held by another, and not ``standby``).

        A standby waits until the holder is gone (``on_standby(holder)`` once it starts
        waiting); NotReadyError if ``should_stop()`` meanwhile.
        """
        from fededge.aggregator.service import connect_with_retry

        connect_with_retry(self.client, self.settings, tick, should_stop)
        self.client.subscribe(self.topic, qos=1)
        self._since = time.monotonic()
        self._drain(RETAINED_QUIET, tick)
        announced = False
        while True:
            if should_stop():
                raise NotReadyError("stopped while waiting for the aggregator lease")
            h = self.holder
            if h is not None and h.instance != self.instance and not self._stale(h):
                if not standby:
                    raise LeaseError(self._held_message(h))
                if not announced:
                    log.warning("standby: %s; waiting to take over", self._describe(h))
                    on_standby(h)
                    announced = True
                self._take(0.2)
                tick()
                continue
            if h is not None and h.instance != self.instance:
                log.warning("taking over a stale lease (no refresh for %.0f s): %s",
                            self.ttl, self._describe(h))  # fmt: skip
            winner = self._claim(tick)
            if winner is None:
                break
            if not standby:
                raise LeaseError(self._held_message(winner))
            log.warning("lost the race for the lease to %s; waiting as standby", winner.instance)
            self.holder = winner
        with self._cond:
            self.state = LeaseState.HELD
        log.info("holding the %s lease of task %s as instance %s", self.role,
                 self.settings.task, self.instance)  # fmt: skip
        self._thread = threading.Thread(target=self._watch, name=f"lease-{self.role}", daemon=True)
        self._thread.start()

    def watch_session(self, client: Callable[[], MqttClient]) -> None:
        """Treat ``client()`` (the one with the task's client id) taken over as a lost lease."""
        self._watched.append(client)

    def check(self, tick: Callable[[], object] = lambda: None) -> None:
        """Return if the lease is held; wait while it is suspended; raise LeaseError if lost.

        Called before anything is written (a version, a partial sum): nothing is written once
        another instance may be the writer.
        """
        while True:
            for c in self._watched:
                if c().taken_over:
                    self._lose("another process connected with this aggregator's client id "
                               "(MQTT session taken over)")  # fmt: skip
            with self._cond:
                if self.state == LeaseState.HELD:
                    return
                if self.state == LeaseState.LOST:
                    raise LeaseError(self.lost_reason)
                if self.state == LeaseState.IDLE:
                    raise NotReadyError("lease not acquired")
                self._cond.wait(0.2)
            tick()

    @property
    def held(self) -> bool:
        return self.state == LeaseState.HELD

    def release(self) -> None:
        """Clear our claim (if it is still ours) and disconnect."""
        self._closing = True
        if self._thread is not None:
            self._thread.join(5)
        try:
            if self.state == LeaseState.HELD and self.client.connected:
                self.client.publish(self.topic, b"", retain=True, wait=True, timeout=2)
        except FededgeError as e:
            log.warning("could not clear the lease: %s", e)
        self.client.close()

    # -- claiming -------------------------------------------------------------------------------
    def _claim_message(self) -> bytes:
        return AggregatorLease(
            task=self.settings.task,
            role=self.role,
            instance=self.instance,
            host=socket.gethostname()[:253],
            pid=os.getpid(),
            time=time.time(),
        ).to_bytes()

    def _publish_claim(self, *, wait: bool) -> None:
        self.client.publish(self.topic, self._claim_message(), retain=True, wait=wait,
                            timeout=self.settings.broker.connect_timeout)  # fmt: skip

    def _claim(self, tick: Callable[[], object]) -> AggregatorLease | None:
        """Publish our claim and settle; the winning rival's claim if one with a lower id
        claimed meanwhile, else None (ours), with the retained copy made ours."""
        self._rivals.clear()
        self._publish_claim(wait=True)
        self._drain(self.settle, tick, until_quiet=False)
        lower = sorted(i for i in self._rivals if i < self.instance)
        if lower:
            return self._rivals[lower[0]]
        if self.holder is None or self.holder.instance != self.instance:
            self._publish_claim(wait=True)  # a rival's claim came after ours: retain ours
        return None

    # -- the watch, after acquiring (its own thread) -------------------------------------------
    def _watch(self) -> None:
        next_refresh = time.monotonic() + self.refresh
        while not self._closing and self.state != LeaseState.LOST:
            try:
                self._take(0.2)
                now = time.monotonic()
                if self.state == LeaseState.HELD and not self.client.connected:
                    self._set(LeaseState.SUSPENDED)
                    log.warning("lease connection lost: suspended until it is back and the "
                                "lease is still ours")  # fmt: skip
                elif self.state == LeaseState.SUSPENDED and self.client.connected:
                    self._reclaim()
                elif self.state == LeaseState.HELD and now >= next_refresh:
                    self._publish_claim(wait=False)
                    next_refresh = now + self.refresh
            except TransportError as e:
                log.warning("lease: %s", e)  # the connection check above handles it
            except Exception:
                log.exception("internal error in the lease watch")

    def _reclaim(self) -> None:
        """Back after a lost lease connection: ours again only if nobody else took it."""
        self._since = time.monotonic()
        self._drain(RETAINED_QUIET, lambda: None)
        h = self.holder
        if h is not None and h.instance != self.instance and not self._stale(h):
            self._lose(f"while our lease connection was down, {self._describe(h)}")
            return
        winner = self._claim(lambda: None)
        if winner is not None:
            self._lose(f"lost the lease to {self._describe(winner)} after a reconnect")
            return
        self._set(LeaseState.HELD)
        log.info("lease connection back; still holding the %s lease", self.role)

    # -- messages -------------------------------------------------------------------------------
    def _drain(
        self, seconds: float, tick: Callable[[], object], *, until_quiet: bool = True
    ) -> None:
        """Take messages for ``seconds`` (``until_quiet``: of silence), on this thread."""
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            if self._take(min(0.05, max(0.0, end - time.monotonic()))) and until_quiet:
                end = time.monotonic() + seconds
            tick()

    def _take(self, timeout: float) -> bool:
        try:
            msg = self.client.messages.get(timeout=timeout)
        except queue.Empty:
            return False
        self._on_message(msg)
        return True

    def _on_message(self, msg: Message) -> None:
        if msg.topic != self.topic:
            return
        if not msg.payload:
            self.holder = None
            if self.state == LeaseState.HELD and not self._closing:
                # Cleared behind our back (an operator, or our own will after a blip the
                # client has already recovered from): we are alive, so claim it again.
                self._publish_claim(wait=False)
            return
        try:
            claim = decode_json(msg.payload, AggregatorLease)
        except ProtocolError as e:
            log.warning("ignoring a malformed lease on %s: %s", msg.topic, e)
            return
        if claim.task != self.settings.task or claim.role != self.role:
            log.warning("ignoring a lease for %s/%s on %s", claim.task, claim.role, msg.topic)
            return
        self.holder = claim
        if not msg.retain:
            self._heard[claim.instance] = time.monotonic()
        if claim.instance == self.instance:
            return
        self._rivals[claim.instance] = claim
        if self.state == LeaseState.HELD:
            if claim.instance < self.instance:
                self._lose(f"{self._describe(claim)} claimed it (the lower instance id wins)")
            else:
                log.warning("rival claim by %s (higher instance id): keeping the lease",
                            self._describe(claim))  # fmt: skip
                self._publish_claim(wait=False)

    # -- helpers --------------------------------------------------------------------------------
    def _stale(self, h: AggregatorLease) -> bool:
        """A claim whose holder vanished without its will being sent (e.g. lost by a broker
        restart): older than ``ttl`` by its own clock and not refreshed while we listened."""
        now = time.monotonic()
        if time.time() - h.time < self.ttl:
            return False
        return now - max(self._since, self._heard.get(h.instance, 0.0)) > self.ttl

    def _set(self, state: LeaseState) -> None:
        with self._cond:
            self.state = state
            self._cond.notify_all()

    def _lose(self, why: str) -> None:
        with self._cond:
            if self.state == LeaseState.LOST:
                return
            self.state = LeaseState.LOST
            self.lost_reason = f"lost the {self.role} lease of task {self.settings.task!r}: {why}"
            self._cond.notify_all()
        log.error("%s; stopping without writing anything more", self.lost_reason)

    def _describe(self, h: AggregatorLease) -> str:
        age = max(0.0, time.time() - h.time)
        return (f"instance {h.instance} (host {h.host or '?'}, pid {h.pid}) holds the {h.role} "
                f"lease (claimed or refreshed {age:.0f} s ago)")  # fmt: skip

    def _held_message(self, h: AggregatorLease) -> str:
        return (
            f"task {self.settings.task!r} already has an aggregator: {self._describe(h)}. "
            "One task has one writer: stop that process first, or start this one with "
            "--standby to take over when it is gone"
        )
