"""The systemd service protocol: sd_notify, the watchdog, and SIGTERM/SIGINT as a shutdown request.

Everything here is a no-op outside systemd (no ``$NOTIFY_SOCKET``), needs no dependency, and
does nothing at import time. A daemon's ``main()`` uses it like this::

    shutdown = install_signal_handlers()      # main thread only
    dog = Watchdog()
    ready("waiting for the broker")
    try:
        while True:
            shutdown.check()                  # raises ShutdownRequested at a safe point
            item = work.get(timeout=dog.poll_timeout(1.0))
            ...
            dog.tick()
    except ShutdownRequested as e:
        stopping(f"signal {e.signal_name}")
        ...                                   # flush, close, leave state consistent
        return 0
    finally:
        shutdown.restore()

Why a flag checked at safe points rather than an exception raised from the handler: Python runs
a signal handler in the main thread between two arbitrary bytecodes, so an exception raised
there can land in the middle of a write-ahead-log append or between a file write and its fsync.
The handler below only records the request (and wakes any ``wait()``); the loop turns it into
:class:`ShutdownRequested` where the state is consistent. ``queue.get(timeout=...)`` and
``Event.wait`` are interruptible on POSIX, so a loop blocking with a timeout of about a second
reacts promptly. A second signal is an operator insisting (Ctrl-C twice, or ``systemctl kill``):
it raises immediately.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterable
from types import FrameType
from typing import Any

__all__ = [
    "Shutdown",
    "ShutdownRequested",
    "Watchdog",
    "extend_timeout",
    "install_signal_handlers",
    "notify",
    "ready",
    "status",
    "stopping",
    "watchdog",
    "watchdog_interval",
]

log = logging.getLogger(__name__)

# What signal.signal() returns and accepts.
_Handler = Callable[[int, FrameType | None], Any] | int | signal.Handlers | None


def _address(value: str) -> str | bytes | None:
    """The AF_UNIX address named by ``$NOTIFY_SOCKET``: a path, or ``@name`` (abstract)."""
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        # Linux abstract namespace: a leading NUL byte instead of the '@'.
        return b"\0" + value[1:].encode()
    # systemd >= 254 also accepts vsock:CID:PORT (VMs); not needed on a device or broker host.
    return None


def notify(*lines: str) -> bool:
    """Send ``KEY=value`` lines to the service manager as one datagram.

    Returns True when the datagram was sent, False when not running under a service manager
    (no ``$NOTIFY_SOCKET``) or when sending failed: a daemon never stops over a lost notification
    (a lost READY=1 makes systemd time the start out; a lost WATCHDOG=1 is retried next tick).
    """
    for line in lines:
        if "=" not in line or "\n" in line:
            raise ValueError(f"a notification line is KEY=value without newlines, got {line!r}")
    target = os.environ.get("NOTIFY_SOCKET")
    if not target or not lines:
        return False
    address = _address(target)
    if address is None:
        log.debug("NOTIFY_SOCKET=%r is not a unix socket address; not notifying", target)
        return False
    payload = "\n".join(lines).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(payload, address)
    except OSError as e:
        log.debug("sd_notify to %s failed: %s", target, e)
        return False
    return True


def _one_line(text: str) -> str:
    # STATUS= is a single line of the datagram; a newline would start a bogus assignment.
    return " ".join(text.split())


def ready(status_text: str | None = None) -> bool:
    """Tell systemd the service is up (``Type=notify`` units stay "activating" until this)."""
    lines = ["READY=1"]
    if status_text:
        lines.append(f"STATUS={_one_line(status_text)}")
    return notify(*lines)


def status(text: str) -> bool:
    """Set the one-line status shown by ``systemctl status``."""
    return notify(f"STATUS={_one_line(text)}")


def watchdog() -> bool:
    """Ping the service watchdog (``WatchdogSec=``) once."""
    return notify("WATCHDOG=1")


def stopping(status_text: str | None = None) -> bool:
    """Tell systemd a graceful shutdown has begun (so slow stops are not mistaken for hangs)."""
    lines = ["STOPPING=1"]
    if status_text:
        lines.append(f"STATUS={_one_line(status_text)}")
    return notify(*lines)


def extend_timeout(seconds: float) -> bool:
    """Ask for ``seconds`` more before the start/stop timeout fires (long recovery, JIT warm-up)."""
    return notify(f"EXTEND_TIMEOUT_USEC={max(1, round(seconds * 1e6))}")


def watchdog_interval() -> float | None:
    """The watchdog timeout in seconds if systemd expects pings from this process, else None.

    Follows sd_watchdog_enabled(3): ``$WATCHDOG_USEC`` must be a positive integer and, when
    ``$WATCHDOG_PID`` is set, it must be this process (a child inheriting the environment must
    not ping on its parent's behalf).
    """
    usec = os.environ.get("WATCHDOG_USEC")
    if not usec:
        return None
    try:
        value = int(usec)
    except ValueError:
        log.warning("ignoring WATCHDOG_USEC=%r: not an integer", usec)
        return None
    if value <= 0:
        return None
    pid = os.environ.get("WATCHDOG_PID")
    if pid:
        try:
            if int(pid) != os.getpid():
                return None
        except ValueError:
            log.warning("ignoring WATCHDOG_PID=%r: not an integer", pid)
            return None
    return value / 1e6


class Watchdog:
    """Rate-limited watchdog pings, called from the main loop on every iteration.

    Pinging from the loop itself (not from a timer thread) is the point: a loop that hangs stops
    pinging and systemd restarts the service. ``tick()`` sends at most one ping per third of the
    timeout; a loop that also blocks for at most :meth:`poll_timeout` pings at least every
    two thirds of it.
    """

    def __init__(
        self,
        interval: float | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        send: Callable[[], bool] = watchdog,
    ) -> None:
        """``interval`` is the watchdog timeout in seconds; None reads it from the environment."""
        self.interval = watchdog_interval() if interval is None else interval
        if self.interval is not None and self.interval <= 0:
            raise ValueError(f"watchdog interval must be positive, got {self.interval}")
        self._clock = clock
        self._send = send
        self._last: float | None = None

    @property
    def enabled(self) -> bool:
        """Whether systemd expects pings from this process."""
        return self.interval is not None

    def poll_timeout(self, default: float) -> float:
        """How long a loop iteration may block: ``default``, capped at a third of the timeout."""
        if self.interval is None:
            return default
        return min(default, self.interval / 3)

    def tick(self) -> bool:
        """Ping if a third of the timeout has passed since the last ping; True if one was sent."""
        if self.interval is None:
            return False
        now = self._clock()
        if self._last is not None and now - self._last < self.interval / 3:
            return False
        self._last = now
        return self._send()


class ShutdownRequested(Exception):
    """SIGTERM or SIGINT arrived: the daemon should stop gracefully and return an exit code."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        self.signal_name = signal.Signals(signum).name
        super().__init__(f"shutdown requested by {self.signal_name}")


class Shutdown:
    """A shutdown request: set by a signal handler (or by code, e.g. the demo), checked by loops."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.signum: int | None = None
        self._previous: dict[int, _Handler] = {}

    @property
    def requested(self) -> bool:
        """Whether a shutdown has been requested."""
        return self._event.is_set()

    def request(self, signum: int = signal.SIGTERM) -> None:
        """Request a shutdown (what the signal handler does; also usable from other threads)."""
        if self.signum is None:
            self.signum = signum
        self._event.set()

    def check(self) -> None:
        """Raise :class:`ShutdownRequested` if a shutdown was requested; call at safe points."""
        if self._event.is_set():
            raise ShutdownRequested(self.signum if self.signum is not None else signal.SIGTERM)

    def wait(self, timeout: float | None = None) -> bool:
        """Sleep until a shutdown is requested or ``timeout`` passes; True if requested."""
        return self._event.wait(timeout)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self._event.is_set():
            # Second signal: the operator insists; stop where we are.
            raise ShutdownRequested(signum)
        self.request(signum)

    def restore(self) -> None:
        """Reinstall the handlers that were in place before :func:`install_signal_handlers`."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()


def install_signal_handlers(
    signals: Iterable[int] = (signal.SIGTERM, signal.SIGINT),
) -> Shutdown:
    """Route ``signals`` to a new :class:`Shutdown`; call from the main thread, in ``main()``.

    Never called at import time: a library embedding fededge keeps its own handlers unless it
    asks for these. Undo with :meth:`Shutdown.restore`.
    """
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("install_signal_handlers() must be called from the main thread")
    shutdown = Shutdown()
    for signum in signals:
        shutdown._previous[signum] = signal.signal(signum, shutdown._handle)
    return shutdown
