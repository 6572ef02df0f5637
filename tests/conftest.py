"""Shared fixtures: one family of private Mosquitto brokers (see tests/broker.py)."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from broker import Mosquitto, find_mosquitto

BROKER_FIXTURES = {"broker", "fresh_broker", "mosquitto_factory"}

MosquittoFactory = Callable[..., Mosquitto]


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
    returns it unstarted.
    Every broker made is killed at the end of the test.
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
