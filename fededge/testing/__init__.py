"""Public testing kit: what fededge's own tests use, for your tests too.

- :func:`wait_until` — the one way to wait for an event (never sleep-then-assert);
- ``fededge.testing.broker`` — a private Mosquitto on a free port;
- ``fededge.testing.pytest_plugin`` — its pytest fixtures: in your ``conftest.py`` write
  ``pytest_plugins = ["fededge.testing.pytest_plugin"]`` (the only module here that imports
  pytest);
- ``fededge.testing.fleet`` — in-process aggregator and device helpers;
- ``fededge.testing.secagg`` — a whole SecAgg+ round simulated in memory.
- ``fededge.testing.simulator`` — thousands of protocol-level devices in one process, against a
  real broker and aggregator, with exactly-once accounting.

Nothing here is imported by the device or aggregator services.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

__all__ = ["wait_until"]


def wait_until(
    cond: Callable[[], T | bool | None],
    timeout: float = 30.0,
    what: str = "a condition",
    *,
    interval: float = 0.02,
) -> T:
    """Poll ``cond`` until it returns something truthy and return that; TimeoutError otherwise.

    The timeout is a ceiling for a loaded machine, not an expectation: tests wait for events,
    so a generous value costs nothing when things work.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value  # type: ignore[return-value]
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)
