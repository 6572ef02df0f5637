"""The local API: HTTP/1.1 with JSON bodies on a Unix socket, for apps in any language.

::

    curl --unix-socket /run/fededge/api.sock http://x/status
    curl --unix-socket S -d '{"x": [[0, 0.5, ...]]}' http://x/predict
    curl --unix-socket S -d '{"x": [[...]], "y": [3]}' http://x/examples

Every request is untrusted: bodies need a Content-Length no larger than ``max_request_bytes``
(413 without reading the body otherwise), JSON must be plain (no NaN/Infinity), inputs are
checked against the model spec, and each error is a 4xx JSON object ``{"error": reason,
"detail": text}``. Slow clients are cut off: every socket read times out after
``read_timeout`` and a reaper thread shuts down any connection whose request is not finished
within ``request_deadline``; at most ``max_connections`` connections are served at once.
"""

from __future__ import annotations

import contextlib
import grp
import itertools
import json
import logging
import os
import socket
import socketserver
import stat
import threading
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fededge.errors import ConfigError, InputError, NotReadyError, StorageError

if TYPE_CHECKING:
    from fededge.device.client import Client

log = logging.getLogger(__name__)
ROUTES = {
    "/predict": "POST",
    "/examples": "POST",
    "/add_examples": "POST",  # the name for /examples
    "/status": "GET",
}
# sun_path is 108 bytes on Linux, including the terminating NUL.
MAX_SOCKET_PATH = 107
# How much of an unwanted body is read and discarded before closing (see _lingering_close).
LINGER_BYTES = 1 << 20
LINGER_SECONDS = 2.0


class ApiError(Exception):
    """An HTTP error answer: status code, short reason code and a detail for people."""

    def __init__(self, code: int, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.code, self.reason, self.detail = code, reason, detail


def _no_constants(name: str) -> Any:
    raise ApiError(400, "non_finite", f"JSON constant {name} is not allowed")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "fededge"
    sys_version = ""
    server: ApiServer

    def setup(self) -> None:
        super().setup()
        self.connection.settimeout(self.server.read_timeout)
        self._linger = False
        self._body_read = False

    def finish(self) -> None:
        super().finish()
        if self._linger:
            self._lingering_close()

    def _lingering_close(self) -> None:
        """Discard (a bounded amount of) an unread body before closing, as HTTP servers do.

        Closing a socket with unread input resets the connection, and a client still sending
        its body would see the reset instead of our 4xx answer.
        """
        sock = self.connection
        deadline = time.monotonic() + LINGER_SECONDS
        left = LINGER_BYTES
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_WR)
            while left > 0 and (remaining := deadline - time.monotonic()) > 0:
                sock.settimeout(remaining)
                chunk = sock.recv(min(left, 1 << 16))
                if not chunk:
                    break
                left -= len(chunk)

    def handle_one_request(self) -> None:
        self.server.arm(self.connection)
        try:
            super().handle_one_request()
        except OSError:
            self.close_connection = True  # reset by peer, timed out or shut down by the reaper
        finally:
            self.server.disarm(self.connection)

    # Unix sockets have no client address; the base class would index into "".
    def address_string(self) -> str:
        return "unix"

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("api: " + format, *args)

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_OPTIONS(self) -> None:
        self._dispatch("OPTIONS")

    def _dispatch(self, method: str) -> None:
        path = self.path.split("?", 1)[0]
        label = path if path in ROUTES else "other"
        try:
            if path not in ROUTES:
                raise ApiError(404, "not_found", f"no endpoint {path!r}; try {sorted(ROUTES)}")
            if method != ROUTES[path]:
                raise ApiError(405, "method_not_allowed", f"{path} takes {ROUTES[path]}")
            if method == "GET":
                self._reply(200, self.server.client.status())
            elif path == "/predict":
                body = self._json_body()
                out, version, name = self.server.client.predict_named(_field(body, "x"))
                values = out.tolist()
                reply: dict[str, Any] = {name: values, "version": version}
                if name != "probs":  # deprecated alias (0.1 answered "probs" for every task)
                    reply["probs"] = values
                self._reply(200, reply)
            else:
                body = self._json_body()
                r = self.server.client.add_examples(_field(body, "x"), _field(body, "y"))
                self._reply(200, {"added": r.added, "fresh": r.fresh})
        except ApiError as e:
            self._error(e.code, e.reason, e.detail, label)
            return
        except InputError as e:
            self._error(400, e.reason, e.detail, label)
            return
        except NotReadyError as e:
            self._error(503, "not_ready", str(e), label)
            return
        except StorageError as e:
            log.error("device state failed serving %s %s: %s", method, path, e)
            self._error(503, "storage_error", str(e), label)
            return
        except OSError:
            self.close_connection = True
            return
        except Exception:
            log.exception("internal error serving %s %s", method, path)
            self._error(500, "internal_error", "see the daemon's log", label)
            return
        self.server.count(label, 200)

    def _json_body(self) -> Any:
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            raise ApiError(411, "length_required", "chunked bodies are not supported")
        raw = self.headers.get("Content-Length")
        if raw is None:
            self.close_connection = True
            raise ApiError(411, "length_required", "a Content-Length header is required")
        if not raw.strip().isdigit() or len(raw) > 18:
            self.close_connection = True
            raise ApiError(400, "bad_length", f"Content-Length {raw[:40]!r} is not a number")
        length = int(raw)
        limit = self.server.max_request_bytes
        if length > limit:
            # Refuse without reading: the connection closes, the rest is never received.
            self.close_connection = True
            raise ApiError(413, "too_large", f"body of {length} bytes exceeds {limit}")
        data = self.rfile.read(length)
        self._body_read = True
        if len(data) != length:
            self.close_connection = True
            raise ApiError(400, "short_body", f"got {len(data)} of {length} body bytes")
        try:
            return json.loads(data, parse_constant=_no_constants)
        except ValueError as e:  # bad JSON or UTF-8, and integers of over 4300 digits
            raise ApiError(400, "bad_json", f"body is not valid JSON: {str(e)[:200]}") from None
        except RecursionError:
            raise ApiError(400, "bad_json", "JSON nested too deeply") from None

    def _reply(self, code: int, obj: Any) -> None:
        data = json.dumps(obj, separators=(",", ":")).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _error(self, code: int, reason: str, detail: str, label: str) -> None:
        self.server.count(label, code)
        # An unread body would be parsed as the next request: close after every error.
        self.close_connection = True
        self._linger = not self._body_read and self.command in ("POST", "PUT", "PATCH")
        with contextlib.suppress(OSError):
            self._reply(code, {"error": reason, "detail": detail})


def _field(body: Any, key: str) -> Any:
    if not isinstance(body, dict):
        raise ApiError(400, "bad_request", "body must be a JSON object")
    if key not in body:
        raise ApiError(400, "bad_request", f"body lacks {key!r}")
    return body[key]


class ApiServer(socketserver.UnixStreamServer):
    """The local API server of one Client, on a Unix socket, one thread per connection."""

    def __init__(
        self,
        client: Client,
        path: Path | str,
        *,
        mode: int = 0o660,
        group: str | None = None,
        max_request_bytes: int = 8 << 20,
        read_timeout: float = 10.0,
        request_deadline: float = 30.0,
        max_connections: int = 64,
    ) -> None:
        self.client = client
        self.path = Path(path)
        self.max_request_bytes = max_request_bytes
        self.read_timeout = read_timeout
        self.request_deadline = request_deadline
        self._slots = threading.BoundedSemaphore(max_connections)
        self._serving = 0  # connections being served now (see :attr:`connections`)
        self._deadlines: dict[socket.socket, float] = {}
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._threads: list[threading.Thread] = []
        self._closed = threading.Event()
        if len(os.fsencode(self.path)) > MAX_SOCKET_PATH - 8:
            raise ConfigError(
                f"device.socket_path = {str(self.path)!r} is too long for a Unix socket "
                f"(at most {MAX_SOCKET_PATH - 8} bytes here)"
            )
        super().__init__(str(self.path), _Handler, bind_and_activate=False)
        try:
            self._bind(mode, group)
            self.server_activate()
        except BaseException:
            self.server_close()
            raise

    def _bind(self, mode: int, group: str | None) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists() or self.path.is_symlink():
            if not stat.S_ISSOCK(self.path.lstat().st_mode):
                raise ConfigError(f"device.socket_path {self.path} exists and is not a socket")
            with socket.socket(socket.AF_UNIX) as probe, contextlib.suppress(OSError):
                probe.settimeout(1.0)
                probe.connect(str(self.path))
                raise ConfigError(f"another process serves {self.path} (is a daemon running?)")
        gid = -1
        if group is not None:
            try:
                gid = grp.getgrnam(group).gr_gid
            except KeyError:
                raise ConfigError(f"device.socket_group = {group!r}: no such group") from None
        # Bind under a temporary name, set mode and group, then rename into place: the socket
        # is never reachable with the wrong permissions, without touching the process umask.
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        self.socket.bind(str(tmp))
        try:
            os.chmod(tmp, mode)
            if gid != -1:
                os.chown(tmp, -1, gid)
            os.replace(tmp, self.path)
        except OSError as e:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise ConfigError(f"cannot set up the API socket {self.path}: {e}") from None
        self._inode = self.path.stat().st_ino
        self.server_address = str(self.path)

    # -- connection handling -------------------------------------------------------------------
    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            with contextlib.suppress(OSError):
                request.setblocking(False)
                request.recv(1 << 16)  # what already arrived; avoids a reset before our answer
            with contextlib.suppress(OSError):
                request.setblocking(True)
                request.sendall(
                    b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n"
                    b"Connection: close\r\n\r\n"
                )
            self.shutdown_request(request)
            return
        with self._lock:
            self._serving += 1
        t = threading.Thread(
            target=self._serve_connection,
            args=(request, client_address),
            name=f"fededge-api-{next(self._ids)}",
            daemon=True,
        )
        t.start()

    def _serve_connection(self, request: Any, client_address: Any) -> None:
        try:
            self.finish_request(request, client_address)
        except Exception:
            log.exception("api connection failed")
        finally:
            self.shutdown_request(request)
            with self._lock:
                self._serving -= 1
            self._slots.release()

    @property
    def connections(self) -> int:
        """How many connections are being served now (at most ``max_connections``)."""
        with self._lock:
            return self._serving

    def arm(self, sock: socket.socket) -> None:
        """Start the deadline of the request about to be read on ``sock``."""
        with self._lock:
            self._deadlines[sock] = time.monotonic() + self.request_deadline

    def disarm(self, sock: socket.socket) -> None:
        with self._lock:
            self._deadlines.pop(sock, None)

    def _reap(self) -> None:
        while not self._closed.wait(0.25):
            now = time.monotonic()
            with self._lock:
                late = [s for s, d in self._deadlines.items() if d < now]
                for s in late:
                    del self._deadlines[s]
            for s in late:
                log.info("api: closing a connection that exceeded %g s", self.request_deadline)
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def count(self, path: str, code: int) -> None:
        self.client.metrics.api_requests.labels(path, str(code)).inc()

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        """Serve in background threads (``fededge-api``, ``fededge-api-reaper``)."""
        for name, target in (
            ("fededge-api", self.serve_forever),
            ("fededge-api-reaper", self._reap),
        ):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        log.info("local API listening on %s", self.path)

    @property
    def alive(self) -> bool:
        """Whether the serving threads run."""
        return bool(self._threads) and all(t.is_alive() for t in self._threads)

    def close(self) -> None:
        """Stop accepting, close the socket and remove its file (if it is still ours)."""
        if self._threads:
            self.shutdown()
        self._closed.set()
        self.server_close()
        with contextlib.suppress(OSError):
            if self.path.stat().st_ino == self._inode:
                self.path.unlink()
