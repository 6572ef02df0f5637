"""pytest fixtures for a private Mosquitto, for fededge's tests and yours.

Enable it in a ``conftest.py``::

    pytest_plugins = ["fededge.testing.pytest_plugin"]

Fixtures:

- ``broker``: one broker for the whole session (tests must not stop or restart it);
- ``fresh_broker``: a broker of the test's own, free to be stopped, killed and restarted;
- ``mosquitto_factory``: ``make(extra_config_lines, start=True, **Mosquitto keywords)`` makes
  as many brokers as a test needs; all are killed when it ends.

A test that uses one of them is marked ``broker``; without the ``mosquitto`` binary it is
skipped. Not registered as an automatic (``pytest11``) plugin, so that installing fededge adds
no fixtures to anyone's test session uninvited.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from fededge.testing.broker import Mosquitto, find_mosquitto

__all__ = ["BROKER_FIXTURES", "MosquittoFactory", "broker", "fresh_broker", "mosquitto_factory"]

BROKER_FIXTURES = {"broker", "fresh_broker", "mosquitto_factory"}

MosquittoFactory = Callable[..., Mosquitto]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "broker: needs a private Mosquitto (the mosquitto binary)")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # A test that uses a broker fixture is a broker test even if it forgot the marker.
    for item in items:
        if BROKER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.broker)


def _require_mosquitto() -> None:
    if find_mosquitto() is None:
        pytest.skip("mosquitto is not installed (apt-get install mosquitto)")


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    """A broker shared by the whole session; tests must not stop or restart it."""
    _require_mosquitto()
    m = Mosquitto(tmp_path_factory.mktemp("mosquitto-shared"))
    m.start()
    try:
        yield m
    finally:
        m.kill()


def _factory(base: Path) -> tuple[MosquittoFactory, list[Mosquitto]]:
    started: list[Mosquitto] = []
    counter = itertools.count()

    def make(extra_config: Sequence[str] = (), *, start: bool = True, **kw: Any) -> Mosquitto:
        m = Mosquitto(base / f"mosquitto{next(counter)}", extra_config=extra_config, **kw)
        started.append(m)
        if start:
            m.start()
        return m

    return make, started


@pytest.fixture
def mosquitto_factory(tmp_path: Path) -> Iterator[MosquittoFactory]:
    """Make private brokers for one test: ``make(extra_config_lines, allow_anonymous=...)``.

    Keyword arguments go to ``Mosquitto`` (allow_anonymous, max_queued_messages,
    max_inflight_messages, max_packet_size, autosave_interval, port); ``start=False``
    returns it unstarted. Every broker made is killed at the end of the test.
    """
    _require_mosquitto()
    make, started = _factory(tmp_path)
    try:
        yield make
    finally:
        for m in started:
            m.kill()


@pytest.fixture
def fresh_broker(mosquitto_factory: MosquittoFactory) -> Mosquitto:
    """A broker of this test's own, free to be stopped, killed and restarted."""
    return mosquitto_factory()
