"""In-process aggregators and devices against a broker, started and closed for you.

``Fleet`` starts real :class:`~fededge.aggregator.service.Aggregator` (stepping in a background
thread) and :class:`~fededge.device.client.Client` objects and closes them all in ``close`` (or
at the end of a ``with`` block); an exception raised in an aggregator's thread is raised again
there, never lost. The task itself (graph, plan, version 0) is published by the caller, as in
production (``fededge model init``).

The aggregator and device modules are imported only when used: importing ``fededge.testing``
needs neither Numba nor LiteRT.
"""

from __future__ import annotations

import threading
import uuid
import zlib
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from fededge.settings import Settings, load_settings

if TYPE_CHECKING:
    from fededge.aggregator.service import Aggregator
    from fededge.device.bundle import Bundle
    from fededge.device.client import Client

__all__ = ["Fleet", "aggregator_settings", "broker_overrides", "device_settings", "new_task"]


def new_task() -> str:
    """A fresh task name, so tests sharing a broker never see each other's retained messages."""
    return f"t{uuid.uuid4().hex[:8]}"


def broker_overrides(url: str) -> dict[str, Any]:
    """Broker settings with fast reconnects suited to tests."""
    return {"url": url, "connect_timeout": 5.0, "reconnect_min_delay": 0.1,
            "reconnect_max_delay": 1.0}  # fmt: skip


def aggregator_settings(
    url: str, state_dir: Path, task: str | None = None, **aggregator: Any
) -> Settings:
    """Aggregator settings for tests: no metrics server, a status every second."""
    agg = {"metrics": False, "status_interval": 1.0, **aggregator}
    return load_settings(
        None,
        {"broker": broker_overrides(url), "task": task or new_task(), "state_dir": state_dir,
         "aggregator": agg},
    )  # fmt: skip


def device_settings(
    url: str, state_dir: Path, task: str, device_id: str, **device: Any
) -> Settings:
    """Device settings for tests: no metrics server, a seed derived from the device id."""
    dev = {"device_id": device_id, "metrics": False, "seed": zlib.crc32(device_id.encode()),
           **device}  # fmt: skip
    return load_settings(
        None,
        {"broker": broker_overrides(url), "task": task, "state_dir": state_dir, "device": dev},
    )


class _Running:
    """One aggregator stepping in a thread until stopped."""

    def __init__(self, agg: Aggregator) -> None:
        self.agg = agg
        self.stop = threading.Event()
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._loop, name="aggregator", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        try:
            self.agg.run(self.stop.is_set)
        except BaseException as e:  # raised again by Fleet.close, never lost
            self.errors.append(e)

    def close(self) -> list[BaseException]:
        self.stop.set()
        self.thread.join(30)
        self.agg.close()
        return self.errors


class Fleet:
    """Aggregators and devices started in this process; ``close`` closes them all."""

    def __init__(self) -> None:
        self._aggregators: list[_Running] = []
        self._devices: list[Client] = []

    def aggregator(self, settings: Settings, *, wait_for_model: float = 30.0) -> Aggregator:
        """Start an aggregator (it waits up to ``wait_for_model`` s for version 0) in a thread."""
        from fededge.aggregator.service import Aggregator

        agg = Aggregator(settings)
        agg.start(wait_for_model=wait_for_model)
        self._aggregators.append(_Running(agg))
        return agg

    def device(
        self, settings: Settings, *, bundle: Bundle | str | Path | None = None, start: bool = True
    ) -> Client:
        """A device Client (started unless ``start=False``; closed by ``close`` either way)."""
        from fededge.device.client import Client

        c = Client(settings, bundle=bundle)
        self._devices.append(c)
        if start:
            c.start()
        return c

    def close(self) -> None:
        """Close every device, then every aggregator; raise the first aggregator thread error."""
        errors: list[BaseException] = []
        while self._devices:
            self._devices.pop().close()
        while self._aggregators:
            errors.extend(self._aggregators.pop().close())
        if errors:
            raise errors[0]

    def __enter__(self) -> Fleet:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
