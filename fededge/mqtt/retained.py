"""One-shot helpers over a throwaway client: read retained messages, end a stored session."""

from __future__ import annotations

import queue
import time
import uuid
from collections.abc import Iterable

from fededge.mqtt.chunked import with_chunk_filters
from fededge.mqtt.client import MqttClient
from fededge.settings import BrokerSettings

# Mosquitto sends a filter's retained messages right behind its SUBACK, so once every
# subscription is acknowledged they are already on the wire; this much silence after the last
# one means the broker has sent everything it holds.
RETAINED_QUIET = 0.3


def read_retained(
    broker: BrokerSettings,
    topic_filters: Iterable[str],
    *,
    wait: float,
    required: Iterable[str] = (),
    quiet: float = RETAINED_QUIET,
    name: str = "read",
    raw: bool = False,
) -> dict[str, bytes]:
    """The retained messages under ``topic_filters``, as {topic: payload}, via a throwaway client.

    Stop rule (the only one): after subscribing to every filter, return as soon as every topic
    in ``required`` has arrived and no retained message has arrived for ``quiet`` seconds; in any
    case return ``wait`` seconds after the SUBACK, with whatever arrived. Only messages the
    broker sends *as retained* count (a live publication in the meantime neither resets the
    silence nor replaces a value), and an empty payload (a cleared retained message) is left
    out. Chunked retained messages come reassembled (their chunk topics are subscribed to as
    well); ``raw`` returns chunk topics and manifests as they are. Raises TransportError if
    the broker is unreachable or refuses a subscription.
    """
    want = set(required)
    out: dict[str, bytes] = {}
    client = MqttClient(
        broker, f"fededge-{name}-{uuid.uuid4().hex[:10]}", persistent=False, name=name
    )
    with client:  # connects, and disconnects at the end
        # One SUBSCRIBE for all filters: its SUBACK comes before any retained message, however
        # many there are, so the bounded inbox cannot hold it up.
        client.messages.passthrough = raw
        filters = list(topic_filters)
        client.subscribe_all(filters if raw else with_chunk_filters(filters), qos=1)
        now = time.monotonic()
        deadline = now + wait
        last = now
        while now < deadline and not (want <= out.keys() and now - last >= quiet):
            try:
                msg = client.messages.get(timeout=min(0.05, deadline - now))
            except queue.Empty:
                now = time.monotonic()
                last = max(last, client.messages.retained_activity)
                continue
            now = time.monotonic()
            # reassembling a chunked message is retained traffic too
            last = max(last, client.messages.retained_activity)
            if not msg.retain:
                continue
            last = now
            if msg.payload:
                out[msg.topic] = msg.payload
            else:
                out.pop(msg.topic, None)
    return out


def discard_session(broker: BrokerSettings, client_id: str) -> None:
    """End the broker's persistent session of ``client_id``: its subscriptions and queue.

    Connecting once with a clean session does it (MQTT 3.1.1 ``clean_session``; MQTT 5
    ``clean_start`` with a session expiry of 0). A client connected under that id is
    disconnected by the broker (session takeover), so only call this for a stopped client.
    """
    with MqttClient(broker, client_id, persistent=False, name="session"):
        pass
