"""A read-ahead wrapper for paho's plain TCP socket: one ``recv`` system call for many packets.

Quirk: paho reads each packet with several ``recv`` calls (the command byte, each byte of the
remaining length, then the body), and each call releases and retakes the GIL. For a receiver
of small messages that is three to four system calls per message, and in a busy process each
GIL release can hand the interpreter to another thread and wait for it back. paho asks a
socket for ``pending()`` (SSL sockets have it) and reads again without waiting in ``select``
while bytes are pending, so a socket that reads ahead into a buffer and reports what is left
there is all it takes. TLS sockets buffer records themselves and are left alone.
"""

from __future__ import annotations

import socket
import ssl
from typing import Any

# One read takes what the socket holds, up to this: at 10 KB updates a 64 KiB read left one
# packet in seven cut at its end, and each cut one goes paho's slower path (bench: 14.5% of
# PUBLISHes, 2.1% at 256 KiB, and half the reads).
READ_AHEAD = 256 * 1024
#: The rest of a body at least this long is received straight into its buffer: through the
#: read-ahead it was a 256 KiB ``recv`` into a new bytes object, a slice of it and a copy of
#: that into the body (three copies of the tail of every 100 KB-4 MB update, one now). The
#: packets after it are read ahead again by the next ``fill``.
DIRECT_MIN = 64 * 1024
#: The read-ahead after such a body (the packets after it are small, or the start of the next
#: large one, whose rest is then received straight into place).
AFTER_DIRECT = 16 * 1024


class ReadAheadSocket:
    """``sock`` with ``recv`` served from a read-ahead buffer; everything else is ``sock``'s."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._buf = b""
        self._pos = 0
        self._ahead = READ_AHEAD  # the next read-ahead's size (see recv_into)

    def recv(self, bufsize: int) -> bytes:
        buf, pos = self._buf, self._pos
        if pos < len(buf):
            end = min(pos + bufsize, len(buf))
            if end == len(buf):
                self._buf, self._pos = b"", 0
            else:
                self._pos = end
            return buf[pos:end] if pos or end < len(buf) else buf
        if bufsize >= READ_AHEAD:  # a large body: straight into paho's hands, no copy
            return self._sock.recv(bufsize)
        data = self._sock.recv(self._next_read())  # BlockingIOError, b"" (closed) pass through
        if len(data) <= bufsize:
            return data
        self._buf, self._pos = data, bufsize
        return data[:bufsize]

    def recv_into(self, view: memoryview) -> int:
        """Fill the start of ``view`` as ``recv`` would return bytes; how many bytes."""
        buf, pos = self._buf, self._pos
        want = len(view)
        if pos < len(buf):
            end = min(pos + want, len(buf))
            view[: end - pos] = memoryview(buf)[pos:end]
            if end == len(buf):
                self._buf, self._pos = b"", 0
            else:
                self._pos = end
            return end - pos
        if want >= DIRECT_MIN:  # the rest of a large body: straight into its place
            # Large updates come in runs: the next read-ahead is small, so that most of the
            # next large body is received straight into its buffer too rather than copied
            # out of 256 KiB read ahead (the small packets between them fit in it).
            self._ahead = AFTER_DIRECT
            return self._sock.recv_into(view)
        data = self.recv(want)
        view[: len(data)] = data
        return len(data)

    def fill(self) -> int:
        """Read ahead once if nothing is buffered; how many bytes are buffered now.

        0 means the peer closed the connection; BlockingIOError and OSError pass through.
        """
        if self._pos < len(self._buf):
            return len(self._buf) - self._pos
        data = self._sock.recv(self._next_read())
        self._buf, self._pos = data, 0
        return len(data)

    def _next_read(self) -> int:
        ahead, self._ahead = self._ahead, READ_AHEAD
        return ahead

    def buffered(self) -> tuple[bytes, int]:
        """The read-ahead buffer and the position of its first unread byte (see ``consume``)."""
        return self._buf, self._pos

    def consume(self, pos: int) -> None:
        """Mark the buffer read up to ``pos`` (a position in what ``buffered`` returned)."""
        if pos >= len(self._buf):
            self._buf, self._pos = b"", 0
        else:
            self._pos = pos

    @property
    def raw(self) -> socket.socket:
        """The wrapped socket."""
        return self._sock

    def pending(self) -> int:
        """Bytes read ahead and not yet returned (paho reads them without waiting)."""
        return len(self._buf) - self._pos

    def fileno(self) -> int:
        return self._sock.fileno()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


def read_ahead(sock: Any) -> Any:
    """``sock`` wrapped if it is a plain (not TLS) socket, else ``sock`` itself."""
    if isinstance(sock, socket.socket) and not isinstance(sock, ssl.SSLSocket):
        return ReadAheadSocket(sock)
    return sock
