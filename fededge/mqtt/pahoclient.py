"""paho's client with a cheaper receive path (the quirks it works around are paho 2.2's).

- Its plain TCP socket reads ahead (fededge/mqtt/readahead.py): one ``recv`` for many packets.
- A packet's body is received straight into a buffer of its announced length (paho receives
  it in pieces of new bytes objects and appends each to a growing bytearray).
- PUBLISH packets are decoded with one copy of the payload. paho's ``decode_publish`` peels
  the packet with ``struct.unpack(f"!H{n}s")`` and slicing, copying the rest of the packet at
  each field (topic length, topic, packet id, and under MQTT 5 twice more in the properties):
  four to five copies of every payload, i.e. milliseconds per 4 MB update. Here the fields
  are read from a memoryview and only the payload is copied out. QoS 2 goes paho's way.
"""

from __future__ import annotations

import importlib.metadata
from typing import Any, NamedTuple

import paho.mqtt.client as paho
from paho.mqtt.enums import MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.exception import MalformedPacket
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from fededge.mqtt.readahead import ReadAheadSocket, read_ahead

#: The overrides below are copies/adaptations of paho 2.2's private methods: used only there.
PAHO_RECEIVE_PATH = importlib.metadata.version("paho-mqtt").startswith("2.2.")
PREALLOCATE_MAX = 64 * 1024 * 1024  # larger bodies grow as they arrive, as in paho


class Publish(NamedTuple):
    """A decoded PUBLISH packet (paho's ``PublishPacket`` fields)."""

    dup: bool
    qos: int
    retain: bool
    topic: bytes
    mid: int
    properties: Properties | None
    payload: bytes


def decode_publish(header: int, packet: bytes | bytearray, v5: bool) -> Publish:
    """What paho's ``_packet.decode_publish`` returns, copying only the payload; malformed
    packets raise ``MalformedPacket`` as there."""
    mv = memoryview(packet)
    n = len(mv)
    qos = (header & 0x06) >> 1
    if n < 2:
        raise MalformedPacket("PUBLISH too short for its topic length")
    slen = mv[0] << 8 | mv[1]
    pos = 2 + slen
    if pos > n:
        raise MalformedPacket("PUBLISH topic runs past the packet")
    topic = bytes(mv[2:pos])
    if not v5 and slen == 0:
        raise MalformedPacket("topic can't be empty in MQTTv3")
    mid = 0
    if qos > 0:
        if pos + 2 > n:
            raise MalformedPacket("PUBLISH too short for its packet identifier")
        mid = mv[pos] << 8 | mv[pos + 1]
        pos += 2
    properties = None
    if v5:
        # The properties' length (a Variable Byte Integer), then paho parses just them.
        plen, mult, i = 0, 1, pos
        while True:
            if i - pos >= 4:
                raise MalformedPacket("Variable Byte Integer is more than four bytes long")
            if i >= n:
                raise MalformedPacket("PUBLISH ends inside its properties length")
            b = mv[i]
            plen += (b & 0x7F) * mult
            mult *= 128
            i += 1
            if not b & 0x80:
                break
        end = i + plen
        if end > n:
            raise MalformedPacket("PUBLISH properties run past the packet")
        properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        if plen:
            try:
                properties.unpack(bytes(mv[pos:end]))  # type: ignore[no-untyped-call]
            except MalformedPacket:
                raise
            except Exception as e:  # what paho's convert_exception turns into MalformedPacket
                raise MalformedPacket(str(e)) from e
        pos = end
    payload = bytes(mv[pos:])
    return Publish(bool(header & 0x08), qos, bool(header & 0x01), topic, mid, properties, payload)


class PahoClient(paho.Client):
    """``paho.Client`` with the receive path above."""

    def _create_socket(self) -> Any:
        return read_ahead(super()._create_socket())

    def _sock_recv_into(self, view: memoryview) -> int:
        sock = self._sock
        if isinstance(sock, ReadAheadSocket):
            return sock.recv_into(view)
        data = self._sock_recv(len(view))  # TLS, websockets: paho's way (its errors mapped)
        view[: len(data)] = data
        return len(data)

    def _packet_read(self) -> MQTTErrorCode:
        # paho 2.2's _packet_read, with the body received into a preallocated buffer.
        p = self._in_packet
        if p["command"] == 0:
            try:
                command = self._sock_recv(1)
            except BlockingIOError:
                return MQTTErrorCode.MQTT_ERR_AGAIN
            except TimeoutError as err:
                self._easy_log(paho.MQTT_LOG_ERR, "timeout on socket: %s", err)
                return MQTTErrorCode.MQTT_ERR_CONN_LOST
            except OSError as err:
                self._easy_log(paho.MQTT_LOG_ERR, "failed to receive on socket: %s", err)
                return MQTTErrorCode.MQTT_ERR_CONN_LOST
            if len(command) == 0:
                return MQTTErrorCode.MQTT_ERR_CONN_LOST
            p["command"] = command[0]
        if p["have_remaining"] == 0:
            while True:
                try:
                    byte = self._sock_recv(1)
                except BlockingIOError:
                    return MQTTErrorCode.MQTT_ERR_AGAIN
                except OSError as err:
                    self._easy_log(paho.MQTT_LOG_ERR, "failed to receive on socket: %s", err)
                    return MQTTErrorCode.MQTT_ERR_CONN_LOST
                if len(byte) == 0:
                    return MQTTErrorCode.MQTT_ERR_CONN_LOST
                byte_value = byte[0]
                p["remaining_count"].append(byte_value)
                # MQTT allows at most 4 bytes (268,435,455): never allocate more than that.
                if len(p["remaining_count"]) > 4:
                    return MQTTErrorCode.MQTT_ERR_PROTOCOL
                p["remaining_length"] += (byte_value & 127) * p["remaining_mult"]
                p["remaining_mult"] = p["remaining_mult"] * 128
                if (byte_value & 128) == 0:
                    break
            p["have_remaining"] = 1
            p["to_process"] = p["remaining_length"]
            # Preallocated up to a bound: a broker's announced length is not yet data.
            if p["remaining_length"] <= PREALLOCATE_MAX:
                p["packet"] = bytearray(p["remaining_length"])
        packet = p["packet"]
        count = 100  # as paho: do not get stuck in this loop on a huge message
        while p["to_process"] > 0:
            try:
                if len(packet) < p["remaining_length"]:  # not preallocated: paho's way
                    data = self._sock_recv(p["to_process"])
                    packet += data
                    n = len(data)
                else:
                    n = self._sock_recv_into(memoryview(packet)[len(packet) - p["to_process"] :])
            except BlockingIOError:
                return MQTTErrorCode.MQTT_ERR_AGAIN
            except OSError as err:
                self._easy_log(paho.MQTT_LOG_ERR, "failed to receive on socket: %s", err)
                return MQTTErrorCode.MQTT_ERR_CONN_LOST
            if n == 0:
                return MQTTErrorCode.MQTT_ERR_CONN_LOST
            p["to_process"] -= n
            with self._msgtime_mutex:
                self._last_bytes_received = paho.time_func()
            count -= 1
            if count == 0:
                return MQTTErrorCode.MQTT_ERR_AGAIN
        p["pos"] = 0
        try:
            rc = self._packet_handle()
        except MalformedPacket as exc:
            self._easy_log(paho.MQTT_LOG_DEBUG, "Received malformed packet: %s", exc)
            rc = MQTTErrorCode.MQTT_ERR_PROTOCOL
        self._in_packet = {
            "command": 0,
            "have_remaining": 0,
            "remaining_count": [],
            "remaining_mult": 1,
            "remaining_length": 0,
            "packet": bytearray(b""),
            "to_process": 0,
            "pos": 0,
        }
        with self._msgtime_mutex:
            self._last_bytes_received = paho.time_func()
        return rc

    def _handle_publish(self) -> MQTTErrorCode:
        header = self._in_packet["command"]
        if (header & 0x06) >> 1 == 2:
            return super()._handle_publish()
        r = decode_publish(header, self._in_packet["packet"],
                           self._protocol == MQTTProtocolVersion.MQTTv5)  # fmt: skip
        message = paho.MQTTMessage(mid=r.mid, topic=r.topic)
        message.dup = r.dup
        message.qos = r.qos
        message.retain = r.retain
        message.properties = r.properties
        message.payload = r.payload
        self._easy_log(paho.MQTT_LOG_DEBUG, "Received PUBLISH (d%d, q%d, r%d, m%d), %r, ...  "
                       "(%d bytes)", r.dup, r.qos, r.retain, r.mid, r.topic, len(r.payload))  # fmt: skip
        message.timestamp = paho.time_func()
        self._handle_on_message(message)
        if r.qos == 0 or self._manual_ack:
            return MQTTErrorCode.MQTT_ERR_SUCCESS
        return self._send_puback(message.mid)
