"""The aggregator's durable state machine: plan, graph, current version, pending version.

Part of the sans-IO core (see fededge/aggregator/core.py): it reads and writes the
:class:`~fededge.aggregator.store.Store` itself (durable writes are the state machine's own
transitions, and must be done before anything is acknowledged), but publishes nothing: every
method that changes what devices should see returns :class:`Publish` effects.
"""

from __future__ import annotations

import hashlib
import logging
from collections import deque
from typing import Any

import numpy as np
from numpy.typing import NDArray

from fededge.aggregator.dedup import DedupMemory
from fededge.aggregator.effects import Effect, Publish
from fededge.aggregator.metrics import AggregatorMetrics
from fededge.aggregator.pending import PendingVersion
from fededge.aggregator.privacy import Ledger, accounted_multiplier, finite_or_none
from fededge.aggregator.published import published_model
from fededge.aggregator.robust import enabled as robust_enabled
from fededge.aggregator.store import Store
from fededge.errors import NotReadyError, ProtocolError, StorageError
from fededge.keys import load_private
from fededge.protocol import Graph, ModelVersion, Plan, Topics, VersionMetrics, decode_json
from fededge.protocol.clipping import clip_in_force, next_clip
from fededge.protocol.messages import Weights
from fededge.protocol.signing import SignedKind, open_message, sign
from fededge.protocol.tensors import decode_tensors, encode_tensors
from fededge.protocol.vocab import NO_GRAPH, RejectReason
from fededge.settings import Settings

# Largest model message adopted from the broker when max_update_bytes is not set; also the
# bound for replaying the WAL (local data that was accepted under the limit of its time).
MAX_MODEL_MESSAGE = 257 * 1024 * 1024
# What an update may carry beyond the model's own bytes (metadata, header): the default
# max_update_bytes is 2x the model message plus this.
UPDATE_SLACK = 64 * 1024

# The service's logger: log lines keep the name they had before the core was split out.
log = logging.getLogger("fededge.aggregator.service")


class VersionState:
    """What the aggregator knows and has stored: plan, graph, model, pending, dedup memory."""

    def __init__(self, settings: Settings, store: Store, metrics: AggregatorMetrics) -> None:
        self.settings = settings
        self.cfg = settings.aggregator
        self.topics = Topics(settings.topic_prefix, settings.task)
        self.store = store
        self.metrics = metrics
        self.plan = Plan()
        self.graph: Graph | None = None
        self.model: ModelVersion | None = None
        self.pending: PendingVersion | None = None
        self.dedup = DedupMemory(self.cfg.recent_update_ids)
        self._model_sha = ""
        self._model_bytes = 0  # size of the current version's (unsigned) message
        self._published: deque[str] = deque(maxlen=8)  # sha256 of model payloads we published
        self.version_started = 0.0  # wall-clock time the current version was published
        # Trust (docs/security.md): our signing key, and the keys whose plan, graph and first
        # model we accept. The owner's messages are kept as received (plan_raw, graph_raw) and
        # republished byte for byte: re-encoding a signed message would break its signature.
        self.signer = load_private(self.cfg.signing_key, "aggregator.signing_key") if (
            self.cfg.signing_key is not None) else None  # fmt: skip
        self.owner_keys = settings.trust.owner_keys()
        self.model_keys = [*self.owner_keys, *settings.trust.aggregator_keys()]
        if self.signer is not None and self.model_keys:
            self.model_keys.append(self.signer.public_key())
        self.plan_raw: bytes | None = None  # the plan message as received (None: defaults)
        self.graph_raw: bytes | None = None
        # The server optimizer's O(d) state (m, v) that produced the current version; None:
        # zeros (after sgd versions, an adopted model, or a first version).
        self.opt_state: tuple[NDArray[np.float64], NDArray[np.float64]] | None = None
        self.ledger = Ledger()  # privacy spent by the versions so far (privacy.json)

    def ready(self) -> tuple[ModelVersion, PendingVersion]:
        """The current model and its pending version; NotReadyError before the first model."""
        if self.model is None or self.pending is None:
            raise NotReadyError(f"no model for task {self.settings.task!r} yet")
        return self.model, self.pending

    # -- state on disk ----------------------------------------------------------------------
    def restore(self, now: float) -> int | None:
        """Load plan, graph, versions and the pending version; the WAL records replayed."""
        # Our own files, verified when they arrived: unwrapped without checking again.
        if (raw := self.store.read_blob("plan.json")) is not None:
            self.plan = decode_json(open_message(raw, SignedKind.PLAN, None).payload, Plan)
            self.plan_raw = raw
        if (raw := self.store.read_blob("graph.bin")) is not None:
            body = open_message(raw, SignedKind.GRAPH, None).payload
            self.graph = Graph.from_bytes(body, max_bytes=1 << 31)
            self.graph_raw = raw
        try:
            self.ledger = Ledger.from_bytes(self.store.read_blob("privacy.json"))
        except ValueError:
            raise StorageError("privacy.json is corrupt: refusing to forget spent epsilon") from (
                None
            )
        self._privacy_gauges()
        versions = self.store.version_numbers()
        if not versions:
            return None
        for v in versions:
            self.dedup.add_version(v, self.store.version_info(v).get("update_keys", []))
        latest = versions[-1]
        self._set_model(self.store.load_version(latest), self.store.read_version_bytes(latest))
        self.opt_state = self._load_opt_state(latest)
        model, pending = self.ready()
        replayed = pending.recover()
        self.version_started = model.time if model.time else now
        return replayed

    @property
    def update_limit(self) -> int:
        """The largest update accepted: what the model's size implies, capped by the setting."""
        implied = 2 * self._model_bytes + UPDATE_SLACK if self._model_bytes else MAX_MODEL_MESSAGE
        cap = self.cfg.max_update_bytes
        return implied if cap is None else min(implied, cap)

    def sign(self, kind: SignedKind, payload: bytes) -> bytes:
        """``payload`` in a signed envelope for ``kind`` (unchanged without a signing key)."""
        return payload if self.signer is None else sign(payload, kind, self.signer)

    def _set_model(self, model: ModelVersion, payload: bytes) -> None:
        self.model = model
        self._model_sha = hashlib.sha256(payload).hexdigest()
        self._model_bytes = len(payload)
        self.pending = PendingVersion(
            self.store,
            model,
            checkpoint_every=self.cfg.checkpoint_every,
            checkpoint_min_bytes=self.cfg.checkpoint_min_bytes,
            parallel=self.cfg.parallel_kernels,
            max_update_bytes=max(MAX_MODEL_MESSAGE, self.update_limit),
            rotated=self.plan.update_rotation == "hadamard",
        )
        self.pending.keep_log = robust_enabled(self.plan)
        self.metrics.version.set(model.version)
        self.metrics.pending.set(0)
        self.metrics.pending_examples.set(0)

    # -- versions ---------------------------------------------------------------------------
    def publish_version(
        self,
        weights: Weights,
        metrics: dict[str, Any],
        update_ids: list[str],
        update_keys: list[str] | None,
        *,
        round_id: str | None,
        now: float,
        opt_state: tuple[NDArray[np.float64], NDArray[np.float64]] | None = None,
    ) -> tuple[ModelVersion, list[Effect]]:
        """Store the version after the current one; the publications that announce it.

        ``opt_state`` is the server optimizer's state after this version's step: it is stored
        (atomically, before the version itself) so a restart continues from it bit for bit.
        """
        old, pending = self.ready()
        new_version = old.version + 1
        # Adaptive clipping: the clip moves with the noised unclipped fraction that went in.
        clip = next_clip(self.plan, clip_in_force(self.plan, old), metrics.get("unclipped"))
        metrics = {**metrics, "unclipped": metrics.get("unclipped") if clip is not None else None}
        model = ModelVersion(
            task=self.settings.task,
            version=new_version,
            weights=weights,
            graph_sha256=self.graph.sha256 if self.graph else NO_GRAPH,
            parent=old.version,
            updates=metrics["updates"],
            examples=metrics["examples"],
            time=now,
            generation=self.plan.generation,
            clip=clip,
        )
        payload = model.to_bytes()
        seconds = max(0.0, now - self.version_started)  # the wall clock may step back (NTP)
        privacy: dict[str, float | None] = {}
        if self.plan.dp:
            # Charged before the version is stored: a crash in between over-counts, never under.
            self.ledger.charge(accounted_multiplier(self.plan))
            self.store.write_blob("privacy.json", self.ledger.to_bytes())
            eps = finite_or_none(self.ledger.epsilon(self.plan.delta))
            privacy = {"epsilon": eps, "delta": self.plan.delta}
            self._privacy_gauges()
        info: dict[str, Any] = {
            "metrics": metrics,
            "seconds": seconds,
            "update_ids": update_ids,
            "update_keys": update_keys or [],
        }
        if round_id is not None:
            info["round_id"] = round_id
        if opt_state is not None:
            m, v = opt_state
            self.store.write_blob(
                _opt_file(new_version),
                encode_tensors({"m": m, "v": v}, {"version": str(new_version)}),
            )
        self.store.write_version(payload, new_version, info, keep=self.cfg.versions_kept)
        self.opt_state = opt_state
        (self.store.root / _opt_file(old.version)).unlink(missing_ok=True)
        self.dedup.add_version(new_version, update_keys or [])
        self.dedup.keep_from(self.store.version_numbers()[0])
        pending.close()
        self._set_model(model, payload)
        self.store.discard_pending(keep_base=new_version)
        self.version_started = now
        self.metrics.versions.inc()
        log.info(
            "published version %d: updates=%d examples=%d train_loss=%s%s",
            new_version,
            metrics["updates"],
            metrics["examples"],
            metrics["train_loss"],
            (f" epsilon={privacy['epsilon']} delta={self.plan.delta:g}" if privacy else "")
            + (f" clip={clip:.6g}" if clip is not None else ""),
        )
        # The version is durable from here on: its announcement is best effort.
        vm = VersionMetrics(
            task=self.settings.task,
            version=new_version,
            seconds=seconds,
            time=now,
            **metrics,
            **privacy,
            clip=clip,
        )
        effects: list[Effect] = [
            self._publish_model(payload),
            Publish(self.topics.version_metrics(new_version), vm.to_bytes(), retain=True),
        ]
        expired = new_version - self.cfg.versions_kept
        if expired >= 0:  # keep the broker's retained store bounded
            effects.append(Publish(self.topics.version_metrics(expired), b"", retain=True))
        return model, effects

    # -- privacy ----------------------------------------------------------------------------
    def epsilon(self) -> float | None:
        """Epsilon spent at the plan's delta by the versions so far (None: no DP accounted)."""
        if not self.ledger.events:
            return None
        return finite_or_none(self.ledger.epsilon(self.plan.delta))

    def budget_refusal(self) -> str | None:
        """Why the next version must not be published (the budget), or None; remembered."""
        plan = self.plan
        why: str | None = None
        if plan.max_epsilon is None:
            pass
        elif not plan.dp:
            why = "the plan has a max_epsilon but no noise: no version can be private"
        elif plan.max_updates_per_device != 1:
            why = "max_epsilon needs max_updates_per_device = 1 (user-level accounting)"
        else:
            nxt = self.ledger.epsilon_after(accounted_multiplier(plan), plan.delta)
            if nxt > plan.max_epsilon:
                why = (
                    f"privacy budget: the next version would spend epsilon={nxt:.4g} > "
                    f"max_epsilon={plan.max_epsilon:g} at delta={plan.delta:g}"
                )
        if self.ledger.stopped != why:
            if why is not None:
                log.warning("no more versions for task %s: %s", self.settings.task, why)
            else:
                log.info("the plan allows new versions again for task %s", self.settings.task)
            self.ledger.stopped = why
            self.store.write_blob("privacy.json", self.ledger.to_bytes())
            self._privacy_gauges()
        return why

    def _privacy_gauges(self) -> None:
        eps = self.epsilon()
        self.metrics.epsilon.set(eps if eps is not None else (-1.0 if self.ledger.events else 0))
        self.metrics.privacy_stopped.set(1 if self.ledger.stopped else 0)

    def current(self) -> list[Effect]:
        """Republish plan, graph and model (retained copies on the broker are ours)."""
        model, _ = self.ready()
        out: list[Effect] = [self.plan_publish()]
        if self.graph_raw is not None:
            out.append(Publish(self.topics.graph, self.graph_raw, retain=True))
        out.append(self._publish_model(self.store.read_version_bytes(model.version)))
        return out

    def plan_publish(self) -> Publish:
        """The plan as the owner published it (our built-in defaults before any)."""
        raw = self.plan_raw if self.plan_raw is not None else self.plan.to_bytes()
        return Publish(self.topics.plan, raw, retain=True)

    def _publish_model(self, payload: bytes) -> Publish:
        payload = published_model(payload, self.plan.model_encoding)  # f16: half the bytes
        signed = self.sign(SignedKind.MODEL, payload)
        self._published.append(hashlib.sha256(signed).hexdigest())
        return Publish(self.topics.model, signed, retain=True)

    # -- control topics ---------------------------------------------------------------------
    def on_plan(self, payload: bytes) -> bool:
        """Adopt a new plan; True if the pending version is now complete."""
        if not payload or payload == self.plan_raw:
            return False
        body = open_message(payload, SignedKind.PLAN, self.owner_keys).payload
        plan = decode_json(body, Plan)
        if plan.generation < self.plan.generation:
            raise ProtocolError(
                f"plan generation {plan.generation} is older than the current "
                f"{self.plan.generation} (a replayed plan?)",
                reason=RejectReason.STALE,
            )
        if plan != self.plan:
            log.info("adopting new plan: %s", plan.model_dump_json())
        self.plan, self.plan_raw = plan, payload
        if self.pending is not None:
            self.pending.keep_log = robust_enabled(plan)
        self.store.write_blob("plan.json", payload)
        return self.pending is not None and self.pending.sums.count >= plan.min_updates_per_version

    def on_graph(self, payload: bytes) -> None:
        if not payload or payload == self.graph_raw:
            return
        body = open_message(payload, SignedKind.GRAPH, self.owner_keys).payload
        graph = Graph.from_bytes(body, max_bytes=1 << 31)
        if graph.task != self.settings.task:
            raise ProtocolError(f"graph is for task {graph.task!r}", reason=RejectReason.WRONG_TASK)
        if self.graph is None or graph.sha256 != self.graph.sha256:
            log.info("adopting graph sha256=%s (%d bytes)", graph.sha256, len(graph.tflite))
        self.graph, self.graph_raw = graph, payload
        self.store.write_blob("graph.bin", payload)

    def on_model(self, payload: bytes, now: float) -> list[Effect]:
        if self.model is not None:
            # Our own publications come back to us (we subscribe to the topic); only a payload
            # we never published is foreign. An empty one cleared ours: restore it.
            sha = hashlib.sha256(payload).hexdigest() if payload else ""
            if payload and (sha in self._published or sha == self._model_sha):
                return []
            ours = self._publish_model(self.store.read_version_bytes(self.model.version))
            if sha == hashlib.sha256(ours.payload).hexdigest():
                return []  # our signed copy, retained from before a restart
            if payload:
                log.warning("a foreign model message was published on %s; restoring ours",
                            self.topics.model)  # fmt: skip
            return [ours]
        if not payload:
            return []
        # The first model (from `fededge model init`): signed by the owner (or by us, if our
        # state was lost) when we trust keys. Stored unwrapped; we sign what we publish.
        payload = open_message(payload, SignedKind.MODEL, self.model_keys).payload
        model = ModelVersion.from_bytes(
            payload, max_bytes=self.cfg.max_update_bytes or MAX_MODEL_MESSAGE
        )
        if model.task != self.settings.task:
            raise ProtocolError(f"model is for task {model.task!r}", reason=RejectReason.WRONG_TASK)
        log.info("adopting model version %d from the broker", model.version)
        self.store.write_version(
            payload, model.version, {"adopted": True}, keep=self.cfg.versions_kept
        )
        if self.store.read_blob("plan.json") is None:
            self.store.write_blob("plan.json", self.plan_publish().payload)
        # No update keys of the adopted version are known: updates based on older versions
        # could be resends of ones folded into it, so the window starts here.
        self.dedup.add_version(model.version, [])
        self._set_model(model, payload)
        self.opt_state = None  # a new model starts a new optimizer trajectory
        self.version_started = now
        return []

    # -- server optimizer state -------------------------------------------------------------
    def optimizer_state(self, size: int) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        """(m, v) for the next step: the stored state, or zeros."""
        if self.opt_state is not None and self.opt_state[0].shape == (size,):
            return self.opt_state
        return np.zeros(size, dtype=np.float64), np.zeros(size, dtype=np.float64)

    def _load_opt_state(
        self, version: int
    ) -> tuple[NDArray[np.float64], NDArray[np.float64]] | None:
        raw = self.store.read_blob(_opt_file(version))
        if raw is None:
            return None
        try:
            p = decode_tensors(raw, max_bytes=1 << 40, max_header=1 << 20)
            if p.metadata.get("version") != str(version):
                raise ValueError(f"it is for version {p.metadata.get('version')!r}")
            m, v = (np.array(p.tensors[k], dtype=np.float64) for k in ("m", "v"))
        except (ProtocolError, KeyError, ValueError) as e:
            raise StorageError(f"optimizer state of version {version} is unreadable: {e}") from None
        return m, v


def _opt_file(version: int) -> str:
    """The file holding the server optimizer state after ``version``."""
    return f"optimizer-{version:08d}.safetensors"
