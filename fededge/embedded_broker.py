"""A zero-setup MQTT broker for `fededge demo`: amqtt running in-process on its own thread.

amqtt is pure Python and speaks MQTT 3.1.1 only (no shared subscriptions, no redelivery of
unacknowledged messages, ~100 MiB/s) — fine for a demo on one machine, never for production
or the tests, which use Mosquitto.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from typing import Any

from fededge.errors import TransportError

log = logging.getLogger(__name__)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that nothing listens on right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class EmbeddedBroker:
    """Start with ``start()``, stop with ``stop()``; ``url`` is what clients connect to."""

    def __init__(self, host: str = "127.0.0.1", port: int | None = None) -> None:
        self.host = host
        self.port = port or free_port(host)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._broker: Any = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def start(self, timeout: float = 15.0) -> None:
        try:
            import amqtt.broker  # noqa: F401 - fail early with a clear message
        except ImportError as e:
            raise TransportError(
                f"the embedded broker needs amqtt: pip install 'fededge[demo]' ({e})"
            ) from None
        # amqtt logs every connection at INFO; keep the demo's output readable.
        for name in ("amqtt", "transitions"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
        self._thread = threading.Thread(target=self._run, name="embedded-broker", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TransportError(f"embedded broker did not start within {timeout:.0f} s")
        if self._error is not None:
            raise TransportError(f"embedded broker failed to start: {self._error}")
        log.info("embedded amqtt broker listening on %s", self.url)

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        # amqtt leaves failed QoS 1 retries as unretrieved task exceptions; keep them at debug
        # level instead of tracebacks in the demo's output.
        loop.set_exception_handler(lambda _l, ctx: log.debug("amqtt: %s", ctx.get("message")))
        self._loop = loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._start())
        except BaseException as e:  # reported to start() by _ready/_error
            self._error = e
            self._ready.set()
            return
        self._ready.set()
        loop.run_forever()
        loop.close()

    async def _start(self) -> None:
        from amqtt.broker import Broker

        config = {
            "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}"}},
            "plugins": {
                "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}
            },
        }
        self._broker = Broker(config)
        await self._broker.start()

    def stop(self, timeout: float = 10.0) -> None:
        loop = self._loop
        if loop is None or self._broker is None:
            return
        fut = asyncio.run_coroutine_threadsafe(self._broker.shutdown(), loop)
        try:
            fut.result(timeout)
        except Exception as e:
            log.warning("embedded broker shutdown: %s", e)
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(timeout)
        self._broker = None

    def __enter__(self) -> EmbeddedBroker:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
