"""paho's client with a cheaper receive path (the quirks it works around are paho 2.2's).

- Its plain TCP socket reads ahead (fededge/mqtt/readahead.py): one ``recv`` for many packets.
- A packet's body is received straight into a buffer of its announced length (paho receives
  it in pieces of new bytes objects and appends each to a growing bytearray).
- PUBLISH packets are decoded with one copy of the payload. paho's ``decode_publish`` peels
  the packet with ``struct.unpack(f"!H{n}s")`` and slicing, copying the rest of the packet at
  each field (topic length, topic, packet id, and under MQTT 5 twice more in the properties):
  four to five copies of every payload, i.e. milliseconds per 4 MB update. Here the fields
  are read from a memoryview and only the payload is copied out. With ``in_place_payloads``
  (the aggregator's clients) not even that from ``IN_PLACE_MIN`` on: the payload is the
  packet's own buffer with its head cut off, a ``bytearray`` (reads like ``bytes``; nothing
  writes to a received payload). QoS 2 (and the invalid QoS 3) goes paho's way.
- Outgoing packets that need nothing but sending (everything except QoS 0 PUBLISH, whose
  ``on_publish`` paho calls when written, and DISCONNECT) go out together in one ``sendmsg``
  (``_packet_write``): paho makes one ``send`` system call per packet, and a receiver that
  answers each update with a receipt and a PUBACK sends two packets per update.
- Small packets are handled in batches (``_read_batch``): every whole packet in the read-ahead
  buffer is parsed in one loop; a run of PUBLISHes (QoS 0/1, no MQTT 5 properties, UTF-8
  topic) goes to ``on_publish_batch`` in one call, so the receiver takes its lock and wakes its
  reader once per batch instead of once per message; a PUBACK without properties or a failure
  code is matched to its message without paho's decoder, new ``ReasonCode``/``Properties``
  objects and its scan of every outgoing message. Anything else (CONNACK, SUBACK, QoS 2,
  properties, a malformed or incomplete packet) is left in the buffer for paho's own path,
  which reads it and decides exactly as before (tests/test_mqtt_batch.py feeds both paths the
  same byte streams, cut anywhere).
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.metadata
import math
import select
import struct
import threading
from collections.abc import Callable
from typing import Any, NamedTuple, cast

import paho.mqtt.client as paho
from paho.mqtt.enums import MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.exception import MalformedPacket
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from fededge.mqtt.readahead import ReadAheadSocket, read_ahead

#: The overrides below are copies/adaptations of paho 2.2's private methods: used only there.
PAHO_RECEIVE_PATH = importlib.metadata.version("paho-mqtt").startswith("2.2.")
PREALLOCATE_MAX = 64 * 1024 * 1024  # larger bodies grow as they arrive, as in paho
#: Bytes and packets gathered into one ``sendmsg`` (IOV_MAX is 1024 on Linux).
GATHER_BYTES = 1 << 20
GATHER_PACKETS = 512
#: From this size a PUBLISH's payload is the packet's buffer (a ``bytearray``), not a copy,
#: in clients made with ``in_place_payloads`` (decode_publish).
IN_PLACE_MIN = 64 * 1024


_PUBACK = struct.Struct("!BBH")  # paho's _send_command_with_mid


#: select()'s limit: descriptors from this on need poll() (``PahoClient._loop``).
FD_SETSIZE = 1024


def poll_select(rlist: list[Any], wlist: list[Any], timeout: float) -> tuple[list[Any], list[Any]]:
    """``select.select(rlist, wlist, [], timeout)[:2]`` by ``poll()``, for any descriptor
    number: an error or hang-up counts as readable and writable, as in select(); ValueError
    for a closed socket (a negative or invalid descriptor), where select() raises too."""
    masks: dict[int, int] = {}
    objs: dict[int, Any] = {}
    for objs_of, flag in ((rlist, select.POLLIN), (wlist, select.POLLOUT)):
        for obj in objs_of:
            fd = obj.fileno()
            if fd < 0:
                raise ValueError("file descriptor cannot be a negative integer")
            masks[fd] = masks.get(fd, 0) | flag
            objs[fd] = obj
    poller = select.poll()
    for fd, mask in masks.items():
        poller.register(fd, mask)
    readable: list[Any] = []
    writable: list[Any] = []
    broken = select.POLLERR | select.POLLHUP
    for fd, events in poller.poll(math.ceil(max(timeout, 0.0) * 1000)):
        if events & select.POLLNVAL:
            raise ValueError(f"file descriptor {fd} is not open")
        if masks[fd] & select.POLLIN and events & (select.POLLIN | broken):
            readable.append(objs[fd])
        if masks[fd] & select.POLLOUT and events & (select.POLLOUT | broken):
            writable.append(objs[fd])
    return readable, writable


#: From this size a packet's buffer is allocated without zeroing it first (every byte of it
#: is received into before the packet is handled; a connection lost midway drops it).
UNFILLED_MIN = 16 * 1024

_bytearray_of: Callable[[None, int], object] | None
try:
    _bytearray_of = ctypes.pythonapi.PyByteArray_FromStringAndSize
    _bytearray_of.restype = ctypes.py_object
    _bytearray_of.argtypes = (ctypes.c_void_p, ctypes.c_ssize_t)
except (AttributeError, OSError):  # not CPython: zeroed, as bytearray(n) makes it
    _bytearray_of = None


def unfilled_bytearray(n: int) -> bytearray:
    """A bytearray of ``n`` bytes whose content is undefined, for the caller to fill.

    Quirk: ``bytearray(n)`` zeroes its memory, which for a 400 KB body the socket then
    overwrites took ~15% of the network thread's time (py-spy, 100k-parameter ingest);
    CPython's ``PyByteArray_FromStringAndSize(NULL, n)`` leaves it as allocated.
    """
    if n < UNFILLED_MIN or _bytearray_of is None:
        return bytearray(n)
    return cast(bytearray, _bytearray_of(None, n))


class Received(NamedTuple):
    """A PUBLISH taken by the batch path: what ``on_publish_batch`` receives."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    mid: int
    dup: bool


#: What a plain PUBACK reports to ``on_publish``: shared, never changed by the callback. An
#: MQTT 5 PUBACK may carry a reason code; these two are not failures (0x10: no subscribers).
_PUBACK_OK = ReasonCode(PacketTypes.PUBACK)
_OK = {code: ReasonCode(PacketTypes.PUBACK, identifier=code) for code in (0x00, 0x10)}
_NO_PROPERTIES = Properties(PacketTypes.PUBACK)  # type: ignore[no-untyped-call]
#: What a PUBLISH without properties reports in ``message.properties``: shared, read-only.
_NO_PUBLISH_PROPERTIES = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]


class Publish(NamedTuple):
    """A decoded PUBLISH packet (paho's ``PublishPacket`` fields)."""

    dup: bool
    qos: int
    retain: bool
    topic: bytes
    mid: int
    properties: Properties | None
    payload: bytes


def decode_publish(
    header: int, packet: bytes | bytearray, v5: bool, *, in_place: bool = False
) -> Publish:
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
        if plen:
            properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            try:
                properties.unpack(bytes(mv[pos:end]))  # type: ignore[no-untyped-call]
            except MalformedPacket:
                raise
            except Exception as e:  # what paho's convert_exception turns into MalformedPacket
                raise MalformedPacket(str(e)) from e
        else:  # none: one shared empty set (paho's Properties() costs ~10 us to make)
            properties = _NO_PUBLISH_PROPERTIES
        pos = end
    if in_place and n - pos >= IN_PLACE_MIN and isinstance(packet, bytearray):
        # The packet's own buffer becomes the payload: deleting a bytearray's head moves its
        # start (no copy), so a large payload is never copied after the socket filled it.
        mv.release()
        del packet[:pos]
        payload = cast(bytes, packet)  # a bytearray: see the module docstring
    else:
        payload = bytes(mv[pos:])
    return Publish(bool(header & 0x08), qos, bool(header & 0x01), topic, mid, properties, payload)


class SharedInfo(paho.MQTTMessageInfo):
    """An ``MQTTMessageInfo`` whose condition is one shared by all of them.

    Quirk: paho makes a ``threading.Condition`` (and its lock) for every message published,
    which the sender of a receipt per update never waits on; most of them are never used. The
    shared one is notified to all its waiters, and each checks its own message.
    """

    __slots__ = ()
    _shared = threading.Condition()

    def __init__(self, mid: int) -> None:  # paho's fields, without a Condition of its own
        self.mid = mid
        self._published = False
        self._condition = SharedInfo._shared
        self.rc = MQTTErrorCode.MQTT_ERR_SUCCESS
        self._iterpos = 0

    def _set_as_published(self) -> None:
        with self._condition:
            self._published = True
            self._condition.notify_all()


class PahoClient(paho.Client):
    """``paho.Client`` with the receive path above."""

    #: Takes a batch of received PUBLISHes (set by the session; None: paho's ``on_message``).
    #: Batches are read only with ``manual_ack``: this client never acknowledges them itself.
    on_publish_batch: Callable[[list[Received]], None] | None = None
    #: Large payloads are the received packet's buffer, a bytearray (``decode_publish``).
    in_place_payloads = False

    def _create_socket(self) -> Any:
        return read_ahead(super()._create_socket())

    def _loop(self, timeout: float = 1.0) -> MQTTErrorCode:
        # Quirk: paho 2.2's _loop waits in select(), which refuses descriptors from 1024 on
        # (ValueError, which paho takes for a lost connection: it reconnects, gets another
        # descriptor as high, and never gets through). A process with many files open (a test
        # run, an application embedding fededge) gets there. Below 1024, paho's own loop;
        # from there on, the same steps waiting in poll().
        sock, pair = self._sock, self._sockpairR
        if sock is None or (
            sock.fileno() < FD_SETSIZE and (pair is None or pair.fileno() < FD_SETSIZE)
        ):
            return super()._loop(timeout)
        if timeout < 0.0:
            raise ValueError("Invalid timeout.")
        wlist = [sock] if self.want_write() else []
        pending = sock.pending() if hasattr(sock, "pending") else 0  # TLS: bytes already in
        rlist = [sock] if pair is None else [sock, pair]
        try:
            readable, writable = poll_select(rlist, wlist, 0.0 if pending > 0 else timeout)
        except (TypeError, ValueError):  # closed meanwhile (as paho's select() raises then)
            states = paho._ConnectionState  # type: ignore[attr-defined]
            if self._state not in (states.MQTT_CS_DISCONNECTING, states.MQTT_CS_DISCONNECTED):
                self._state = states.MQTT_CS_CONNECTION_LOST
            return MQTTErrorCode.MQTT_ERR_CONN_LOST
        except Exception:  # paho's answer to anything else
            return MQTTErrorCode.MQTT_ERR_UNKNOWN
        if sock in readable or pending > 0:
            rc = self.loop_read()
            if rc or self._sock is None:
                return rc
        if pair is not None and pair in readable:
            writable.insert(0, sock)  # a publish() from another thread: write it
            with contextlib.suppress(BlockingIOError):
                pair.recv(10000)
        if sock in writable:
            rc = self.loop_write()
            if rc or self._sock is None:
                return rc
        return self.loop_misc()

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
        if p["command"] == 0 and self.on_publish_batch is not None and self._manual_ack:
            sock = self._sock
            if isinstance(sock, ReadAheadSocket):
                rc = self._read_batch(sock)
                if rc is not None:
                    return rc
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
                p["packet"] = unfilled_bytearray(p["remaining_length"])
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
        if header & 0x06 in (0x04, 0x06):  # QoS 2, or 3 (a protocol error): paho decides
            return super()._handle_publish()
        r = decode_publish(header, self._in_packet["packet"],
                           self._protocol == MQTTProtocolVersion.MQTTv5,
                           in_place=self.in_place_payloads)  # fmt: skip
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

    def _packet_queue(
        self,
        command: int,
        packet: bytes | bytearray,
        mid: int,
        qos: int,
        info: paho.MQTTMessageInfo | None = None,
    ) -> MQTTErrorCode:
        # paho 2.2's _packet_queue writes a byte to its socket pair for every packet, to wake
        # the network thread out of select(). Queued by the network thread itself (a PUBACK
        # that frees room for queued receipts: one PUBLISH each) there is nothing to wake: its
        # loop selects for writing next because want_write() is true. One system call per
        # packet saved, and the reads of those bytes.
        thread = self._thread
        if thread is None or thread.ident != threading.get_ident():
            return super()._packet_queue(command, packet, mid, qos, info)
        self._out_packet.append({"command": command, "mid": mid, "qos": qos, "pos": 0,
                                 "to_process": len(packet), "packet": packet, "info": info})  # fmt: skip
        self._call_socket_register_write()
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    def publish_qos1(self, topic: str, payload: bytes, retain: bool = False) -> SharedInfo:
        """``publish(topic, payload, qos=1, retain=retain)`` as paho 2.2 does it, with a
        ``SharedInfo``; ValueError for what paho refuses."""
        return self.publish_many_qos1([(topic, payload)], retain=retain)[0]

    def publish_many_qos1(
        self, items: list[tuple[str, bytes]], *, retain: bool = False
    ) -> list[SharedInfo]:
        """``publish(topic, payload, qos=1, retain=retain)`` for each (topic, payload), in
        order, as paho 2.2 does it: the same mids, states, return codes and bytes on the wire,
        with one hold of the outgoing-message lock, and the PUBLISH packets sent now queued as
        one packet (the aggregator answers a group of updates with a receipt each; one by one
        through paho, each took ~30 Python calls). ValueError for what paho refuses, before
        anything is queued. Not connected: kept, and sent after the reconnect (rc NO_CONN)."""
        v5 = self._protocol == MQTTProtocolVersion.MQTTv5
        encoded = [(topic.encode(), payload) for topic, payload in items]
        for topic_bytes, payload in encoded:
            if not topic_bytes and not v5:
                raise ValueError("Invalid topic.")
            self._raise_for_invalid_topic(topic_bytes)
            if len(payload) > 268435455:
                raise ValueError("Payload too large.")
        infos: list[SharedInfo] = []
        sent: list[SharedInfo] = []
        parts: list[bytes | bytearray] = []
        with self._out_message_mutex:
            out = self._out_messages
            for topic_bytes, payload in encoded:
                mid = self._mid_generate()
                message = _qos1_message(mid, topic_bytes, payload, retain)
                info = cast(SharedInfo, message.info)
                infos.append(info)
                if (0 < self._max_queued_messages <= len(out)) or mid in out:
                    info.rc = MQTTErrorCode.MQTT_ERR_QUEUE_SIZE
                    continue
                out[mid] = message
                if self._max_inflight_messages and (
                    self._inflight_messages >= self._max_inflight_messages
                ):
                    message.state = paho.mqtt_ms_queued
                elif self._sock is None:  # what paho's _send_publish answers: resent later
                    message.state = paho.mqtt_ms_publish
                    info.rc = MQTTErrorCode.MQTT_ERR_NO_CONN
                else:
                    self._inflight_messages += 1
                    message.state = paho.mqtt_ms_wait_for_puback
                    parts += (self._publish_head(topic_bytes, mid, len(payload), False, retain),
                              payload)  # fmt: skip
                    sent.append(info)
            if parts:
                # One packet for all: nothing is done per packet once written (_paho_acts_on).
                rc = self._packet_queue(paho.PUBLISH | 0x02, b"".join(parts), sent[0].mid, 1)
                for info in sent:  # paho's rc of the queueing (not SUCCESS without a thread
                    info.rc = rc  # whose write failed)
        return infos

    def _publish_head(self, topic: bytes, mid: int, size: int, dup: bool, retain: bool) -> bytes:
        """A QoS 1 PUBLISH up to its payload of ``size`` bytes, as paho's ``_send_publish``
        packs it: fixed header, remaining length, topic, packet id, (MQTT 5) no properties."""
        props = b"\x00" if self._protocol == MQTTProtocolVersion.MQTTv5 else b""
        head = bytearray((paho.PUBLISH | dup << 3 | 0x02 | retain,))
        self._pack_remaining_length(head, 2 + len(topic) + 2 + len(props) + size)
        head += len(topic).to_bytes(2, "big")
        head += topic
        head += mid.to_bytes(2, "big")
        head += props
        return bytes(head)

    def queue_pubacks(self, mids: list[int]) -> MQTTErrorCode:
        """``ack(mid, 1)`` for each of ``mids`` (``manual_ack``), queued as one packet: the same
        bytes as paho's one PUBACK packet each."""
        if not self._manual_ack or not mids:
            return MQTTErrorCode.MQTT_ERR_SUCCESS
        pack = _PUBACK.pack
        blob = b"".join([pack(paho.PUBACK, 2, mid) for mid in mids])
        return self._packet_queue(paho.PUBACK, blob, mids[0], 1)

    def _update_inflight(self) -> MQTTErrorCode:
        # paho 2.2's _update_inflight (the caller holds the outgoing-message lock): queued
        # messages get the room in the window, in order. Those of QoS 1 without MQTT 5
        # properties (receipts: an aggregator answering a group has more than the broker's
        # window) are packed here and queued as one packet; paho packs each in _send_publish
        # (its log call, the topic decoded and encoded again: ~12 us each on the network
        # thread) and queues it alone. Others go paho's way, in order; the bytes are paho's.
        if self._sock is None:
            return super()._update_inflight()
        parts: list[bytes | bytearray] = []
        first = 0
        rc = MQTTErrorCode.MQTT_ERR_SUCCESS
        for m in self._out_messages.values():
            if self._inflight_messages >= self._max_inflight_messages:
                break
            if m.qos == 0 or m.state != paho.mqtt_ms_queued:
                continue
            if m.qos != 1 or m.properties is not None:
                if parts:  # what is packed so far goes first
                    self._packet_queue(paho.PUBLISH | 0x02, b"".join(parts), first, 1)
                    parts = []
                self._inflight_messages += 1
                m.state = (
                    paho.mqtt_ms_wait_for_puback if m.qos == 1 else paho.mqtt_ms_wait_for_pubrec
                )
                rc = self._send_publish(m.mid, m._topic, m.payload, m.qos, m.retain, m.dup,
                                        properties=m.properties)  # fmt: skip
                if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                    return rc
                continue
            self._inflight_messages += 1
            m.state = paho.mqtt_ms_wait_for_puback
            if not parts:
                first = m.mid
            parts += (
                self._publish_head(m._topic, m.mid, len(m.payload), m.dup, m.retain),
                m.payload,
            )
        if parts:
            self._packet_queue(paho.PUBLISH | 0x02, b"".join(parts), first, 1)
        return rc

    def _packet_write(self) -> MQTTErrorCode:
        # paho 2.2's _packet_write, with runs of plain packets gathered into one sendmsg.
        sock = self._sock
        out = self._out_packet
        if not isinstance(sock, ReadAheadSocket):
            return super()._packet_write()  # TLS, websockets: paho's way
        while out:
            if _paho_acts_on(out[0]):
                return super()._packet_write()
            batch: list[Any] = []
            size = 0
            while out and size < GATHER_BYTES and len(batch) < GATHER_PACKETS:
                p = out.popleft()  # other threads only append: popleft/appendleft are safe
                if _paho_acts_on(p):
                    out.appendleft(p)
                    break
                batch.append(p)
                size += p["to_process"]
            views = [memoryview(p["packet"])[p["pos"] :] for p in batch]
            try:
                n = sock.raw.sendmsg(views)
            except BlockingIOError:
                out.extendleft(reversed(batch))
                self._call_socket_register_write()
                return MQTTErrorCode.MQTT_ERR_AGAIN
            except OSError as err:
                out.extendleft(reversed(batch))
                self._easy_log(paho.MQTT_LOG_ERR, "failed to receive on socket: %s", err)
                return MQTTErrorCode.MQTT_ERR_CONN_LOST
            finally:
                for v in views:
                    v.release()
            i = 0
            while i < len(batch) and n >= batch[i]["to_process"]:
                n -= batch[i]["to_process"]
                batch[i]["pos"] += batch[i]["to_process"]
                batch[i]["to_process"] = 0
                i += 1
            if i < len(batch):  # the socket took part of it: the rest goes first next time
                batch[i]["pos"] += n
                batch[i]["to_process"] -= n
                out.extendleft(reversed(batch[i:]))
                if n == 0 and i == 0:
                    break
        with self._msgtime_mutex:
            self._last_msg_out = paho.time_func()
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    def _read_batch(self, sock: ReadAheadSocket) -> MQTTErrorCode | None:
        """Handle the whole packets at the start of the read-ahead buffer that the batch path
        takes (module docstring); None if the first is not one of them (paho's path reads it).
        """
        try:
            if sock.fill() == 0:
                return MQTTErrorCode.MQTT_ERR_CONN_LOST
        except BlockingIOError:
            return MQTTErrorCode.MQTT_ERR_AGAIN
        except OSError as err:
            self._easy_log(paho.MQTT_LOG_ERR, "failed to receive on socket: %s", err)
            return MQTTErrorCode.MQTT_ERR_CONN_LOST
        buf, pos = sock.buffered()
        end = len(buf)
        v5 = self._protocol == MQTTProtocolVersion.MQTTv5
        batch: list[Received] = []
        start = pos
        rc = MQTTErrorCode.MQTT_ERR_SUCCESS
        room = False  # PUBACKs freed room in the window for queued messages
        # The outgoing messages stay locked from the first PUBACK until the room it frees is
        # given to queued messages (below): a publish() from another thread meanwhile would
        # find room and overtake them (paho frees and refills under one lock, per PUBACK).
        with self._out_message_mutex:
            while pos < end:
                header = buf[pos]
                # Remaining length: at most 4 bytes; anything odd is left to paho's path.
                i, length, shift = pos + 1, 0, 0
                while i < end and shift < 28:
                    b = buf[i]
                    length |= (b & 0x7F) << shift
                    shift += 7
                    i += 1
                    if not b & 0x80:
                        break
                else:
                    break
                body_end = i + length
                if body_end > end:
                    break  # incomplete: paho's path reads the rest
                kind = header & 0xF0
                if kind == 0x30 and header & 0x06 != 0x06 and header & 0x06 != 0x04:
                    r = _publish_fields(buf, header, i, body_end, v5)
                    if r is None:
                        break
                    batch.append(r)
                elif header == 0x40 and (length == 2 or (length == 3 and v5 and buf[i + 2] in _OK)):
                    reason = _PUBACK_OK if length == 2 else _OK[buf[i + 2]]
                    mid = buf[i] << 8 | buf[i + 1]
                    if room and _is_queued(self._out_messages.get(mid)):
                        # Acknowledged before it was sent (a broker's error): paho would
                        # have sent it at an earlier PUBACK, so give out the room first.
                        room = False
                        rc = self._update_inflight()
                    room |= self._plain_puback(mid, reason)
                    if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                        pos = body_end
                        break
                else:
                    break
                pos = body_end
            if room and rc == MQTTErrorCode.MQTT_ERR_SUCCESS:
                rc = self._update_inflight()  # one scan for the whole run of PUBACKs
        if pos == start:
            return None
        sock.consume(pos)
        with self._msgtime_mutex:
            self._last_bytes_received = paho.time_func()
        if batch:
            deliver = self.on_publish_batch
            if deliver is not None:
                deliver(batch)
        return rc

    def _plain_puback(self, mid: int, reason: ReasonCode) -> bool:
        # paho's _handle_pubackcomp + _do_on_publish for a PUBACK without properties or failure.
        # True if queued messages wait for the room it freed: the caller then runs paho's
        # _update_inflight (a scan of every outgoing message) once for all PUBACKs it read.
        with self._out_message_mutex:
            msg = self._out_messages.get(mid)
            if msg is None:
                return False
            on_publish = self.on_publish
            if on_publish is not None:
                with self._in_callback_mutex:
                    try:
                        on_publish(self, self._userdata, mid, reason, _NO_PROPERTIES)  # type: ignore[call-arg]
                    except Exception as err:
                        self._easy_log(paho.MQTT_LOG_ERR, "Caught exception in on_publish: %s",
                                       err)  # fmt: skip
                        if not self.suppress_exceptions:
                            raise
            del self._out_messages[mid]
            msg.info._set_as_published()
            if msg.qos > 0:
                self._inflight_messages -= 1
                return self._max_inflight_messages > 0 and (
                    len(self._out_messages) > self._inflight_messages
                )
        return False


def _is_queued(message: paho.MQTTMessage | None) -> bool:
    return message is not None and message.state == paho.mqtt_ms_queued


def _paho_acts_on(packet: Any) -> bool:
    """Whether paho does something once this outgoing packet is written (``on_publish`` of a
    QoS 0 PUBLISH, closing after DISCONNECT): such packets go paho's way, one ``send`` each."""
    kind = packet["command"] & 0xF0
    return bool(kind == paho.DISCONNECT or (kind == paho.PUBLISH and packet["qos"] == 0))


def _qos1_message(mid: int, topic: bytes, payload: bytes, retain: bool) -> paho.MQTTMessage:
    """What paho's ``publish`` stores for a QoS 1 message, with a ``SharedInfo``."""
    message = paho.MQTTMessage.__new__(paho.MQTTMessage)
    message.timestamp = paho.time_func()
    message.state = paho.mqtt_ms_invalid
    message.dup = False
    message.mid = mid
    message._topic = topic
    message.payload = payload
    message.qos = 1
    message.retain = retain
    message.properties = None
    message.info = SharedInfo(mid)
    return message


def _publish_fields(buf: bytes, header: int, i: int, end: int, v5: bool) -> Received | None:
    """The PUBLISH whose body is ``buf[i:end]``, or None if paho's path must take it (empty or
    non-UTF-8 topic, MQTT 5 properties, anything malformed)."""
    if end - i < 2:
        return None
    pos = i + 2 + (buf[i] << 8 | buf[i + 1])
    if pos == i + 2 or pos > end:
        return None
    try:
        topic = buf[i + 2 : pos].decode()
    except UnicodeDecodeError:
        return None
    qos = (header & 0x06) >> 1
    mid = 0
    if qos:
        if pos + 2 > end:
            return None
        mid = buf[pos] << 8 | buf[pos + 1]
        if mid == 0:
            return None
        pos += 2
    if v5:
        if pos >= end or buf[pos] != 0:
            return None  # properties (or none at all: malformed): paho decides
        pos += 1
    return Received(topic, buf[pos:end], qos, bool(header & 0x01), mid, bool(header & 0x08))
