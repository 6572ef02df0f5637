"""A task's life on the broker: publish its version 0, and clear what it left behind.

Used by ``fededge model init`` and by the demo (which must not import the CLI). The only
transport it needs is :mod:`fededge.mqtt`; what it publishes is built by :mod:`fededge.protocol`.
"""

from __future__ import annotations

import dataclasses
import logging
import uuid
from collections.abc import Iterable
from typing import TYPE_CHECKING

from fededge.errors import ConfigError, FededgeError
from fededge.mqtt import MqttClient, discard_session, read_retained
from fededge.mqtt.chunked import effective_limit
from fededge.protocol import AggregatorStatus, Graph, ModelVersion, Plan, Topics, decode_json
from fededge.protocol.signing import SignedKind, open_message, sign
from fededge.settings import Settings

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

log = logging.getLogger(__name__)
MAX_MESSAGE = 1 << 31
# `model init` concludes that a task has no model only after this much silence from the
# broker: publishing over a live task because a large model was slow to arrive would be
# far worse than a slow `model init`.
INIT_WAIT = 1.5


def aggregator_client_id(settings: Settings) -> str:
    """The MQTT client id (and so the persistent session) of the task's aggregator."""
    return settings.broker.client_id or f"fededge-aggregator-{settings.task}"


def publish_initial(
    settings: Settings,
    graph: Graph | None,
    mv: ModelVersion,
    plan: Plan,
    *,
    force: bool = False,
    sign_key: Ed25519PrivateKey | None = None,
) -> Plan:
    """Publish graph, plan and version 0 retained, as documented for ``fededge model init``.

    With ``sign_key`` (the model owner's) the three are signed (kinds graph, plan, model).
    The plan's ``generation`` is at least the retained plan's, and one above it with
    ``force``: a re-initialisation that devices accept although its version 0 is lower than
    the version they have (docs/protocol.md, "plan"). Returns the plan as published.

    A task that already has a model is refused unless ``force``. With ``force`` the task is
    reset, which needs its aggregator stopped (a running one restores its own model over
    ours): an aggregator whose retained status says ``online`` is refused, and the
    aggregator's persistent session is discarded, so that at its next start it adopts this
    version 0 and not a model message still queued for it from before the reset.
    """
    topics = Topics(settings.topic_prefix, settings.task)
    held = read_retained(
        settings.broker,
        [topics.model, topics.plan, topics.aggregator_status],
        wait=10 * INIT_WAIT,
        quiet=INIT_WAIT,
        name="init",
    )
    existing = held.get(topics.model)
    if existing is not None and not force:
        try:
            body = open_message(existing, SignedKind.MODEL, None).payload
            v = ModelVersion.from_bytes(body, max_bytes=MAX_MESSAGE).version
            what = f"version {v}"
        except FededgeError:
            what = "an unreadable model message"
        raise ConfigError(
            f"task {settings.task!r} already has {what} on {topics.model}; use --force to replace "
            "it (stop the aggregator and remove its state directory first)"
        )
    if force:
        status = held.get(topics.aggregator_status)
        try:
            online = status is not None and decode_json(status, AggregatorStatus).state == "online"
        except FededgeError:
            online = False  # an unreadable status says nothing about a running aggregator
        if online:
            raise ConfigError(
                f"the aggregator of task {settings.task!r} is online (retained status on "
                f"{topics.aggregator_status}) and would restore its own model over version 0: "
                "stop it and remove its state directory first"
            )
        discard_session(settings.broker, aggregator_client_id(settings))
    generation = plan.generation
    if (old := _retained_generation(held.get(topics.plan))) is not None:
        generation = max(generation, old + 1 if force and existing is not None else old)
    if generation != plan.generation:
        log.info("plan generation %d (the retained plan has %s)", generation, old)
        plan = plan.model_copy(update={"generation": generation})
    mv = dataclasses.replace(mv, generation=generation)

    def signed(payload: bytes, kind: SignedKind) -> bytes:
        return payload if sign_key is None else sign(payload, kind, sign_key)

    client = MqttClient(settings.broker, f"fededge-init-{uuid.uuid4().hex[:10]}", persistent=False)
    client.max_message_bytes = effective_limit(settings.broker.max_message_bytes,
                                               plan.max_message_bytes)  # fmt: skip
    with client:  # connects, and disconnects at the end
        if graph is not None:
            payload = signed(graph.to_bytes(), SignedKind.GRAPH)
            client.publish(topics.graph, payload, retain=True, wait=True, timeout=30)
        payload = signed(plan.to_bytes(), SignedKind.PLAN)
        client.publish(topics.plan, payload, retain=True, wait=True, timeout=30)
        payload = signed(mv.to_bytes(), SignedKind.MODEL)
        client.publish(topics.model, payload, retain=True, wait=True, timeout=30)
    return plan


def _retained_generation(raw: bytes | None) -> int | None:
    """The generation of the retained plan (None if there is none or it is unreadable)."""
    if not raw:
        return None
    try:
        return decode_json(open_message(raw, SignedKind.PLAN, None).payload, Plan).generation
    except FededgeError:
        return None


def clear_task(settings: Settings, client_ids: Iterable[str] = (), *, wait: float = 5.0) -> int:
    """Remove every retained message of the task and the persistent sessions of ``client_ids``.

    For a task that is finished for good (the demo's own task at its end): its aggregator and
    devices must be stopped. Returns how many retained messages were cleared.
    """
    topics = Topics(settings.topic_prefix, settings.task)
    # raw: chunk topics of chunked retained messages are cleared one by one too
    held = read_retained(settings.broker, [topics.all_filter], wait=wait, name="clear", raw=True)
    client = MqttClient(settings.broker, f"fededge-clear-{uuid.uuid4().hex[:10]}", persistent=False)
    with client:
        for topic in held:
            client.publish(topic, b"", retain=True, wait=True, timeout=30)
    for cid in client_ids:
        discard_session(settings.broker, cid)
    log.info("cleared task %s: %d retained messages", settings.task, len(held))
    return len(held)


__all__ = ["aggregator_client_id", "clear_task", "publish_initial"]
