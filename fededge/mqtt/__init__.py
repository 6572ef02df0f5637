"""The MQTT transport: the one package that knows paho-mqtt 2.x.

paho's callbacks become a bounded inbox of received messages (:mod:`.inbox`), return and
reason codes become ``TransportError`` with readable text, and sessions (:mod:`.session`),
acknowledgements, TLS and authentication (:mod:`.security`), Last Will and reconnection are set
up the same way for every fededge process (:mod:`.client`); :mod:`.retained` holds the one-shot
readers.

Threading: paho's network thread (``loop_start``) runs every callback; ``publish``, ``ack``,
``subscribe`` and ``close`` may be called from any other thread. This is safe in paho 2.2
because, once its thread runs, paho only *queues* outgoing packets (``_packet_queue`` appends
to a deque and pokes a socketpair; only the network thread writes to the socket), the outgoing
message table is guarded by ``_out_message_mutex`` and message ids by ``_mid_generate_mutex``.
The one unguarded spot is ``reconnect()``, which iterates the packet deque while a foreign
append would raise ``RuntimeError`` inside the network thread and kill it; ``publish`` and
``subscribe`` cannot append then (paho refuses while the socket is down) and ``ack`` only
sends while connected (see ``Session.ack``). The network thread may wait in ``on_message`` for
room in the inbox (QoS>0 only, and only if the broker's in-flight window exceeds half the inbox,
see ``Inbox``): paho holds no lock another thread needs then (``_in_callback_mutex`` is only
taken by callbacks), so ``publish`` and ``ack`` still queue their packets, but nothing is read
or written until a message is taken: a ``publish(wait=True)`` or ``subscribe`` waits for that,
and past 1.5 keep-alive intervals the broker drops the connection (a persistent session then
redelivers what was not acknowledged).
"""

from fededge.mqtt.client import MAX_PAYLOAD, MqttClient, Will
from fededge.mqtt.inbox import DEFAULT_INBOX, Inbox, Message
from fededge.mqtt.retained import RETAINED_QUIET, discard_session, read_retained
from fededge.mqtt.session import MAX_INFLIGHT

__all__ = [
    "DEFAULT_INBOX",
    "MAX_INFLIGHT",
    "MAX_PAYLOAD",
    "RETAINED_QUIET",
    "Inbox",
    "Message",
    "MqttClient",
    "Will",
    "discard_session",
    "read_retained",
]
