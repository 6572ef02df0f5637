"""Shared fixtures: private Mosquitto brokers (the public pytest plugin of ``fededge.testing``)
and factories for in-process aggregators and devices against the session's broker."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from fededge.testing.broker import Mosquitto
from fededge.testing.fleet import Fleet, aggregator_settings, device_settings

if TYPE_CHECKING:
    from fededge.aggregator.service import Aggregator
    from fededge.device.client import Client

pytest_plugins = ["fededge.testing.pytest_plugin"]

AggregatorFactory = Callable[..., "Aggregator"]
DeviceFactory = Callable[..., "Client"]


@pytest.fixture
def fleet() -> Iterator[Fleet]:
    """Aggregators and devices started in this process, all closed when the test ends."""
    with Fleet() as f:
        yield f


@pytest.fixture
def aggregator(broker: Mosquitto, tmp_path: Path, fleet: Fleet) -> AggregatorFactory:
    """``make(task, *, url=None, wait_for_model=30, **aggregator_settings)``: a started Aggregator.

    Against the session's broker unless ``url`` is given; its state in a folder of its own
    under ``tmp_path``. The task's version 0 must be published first (``publish_task``).
    """
    counter = itertools.count()

    def make(
        task: str, *, url: str | None = None, wait_for_model: float = 30.0, **agg: Any
    ) -> Aggregator:
        settings = aggregator_settings(
            url or broker.url, tmp_path / f"agg{next(counter)}", task=task, **agg
        )
        return fleet.aggregator(settings, wait_for_model=wait_for_model)

    return make


@pytest.fixture
def device(broker: Mosquitto, tmp_path: Path, fleet: Fleet) -> DeviceFactory:
    """``make(task, device_id, *, url=None, bundle=None, start=True, **device_settings)``.

    A device Client against the session's broker unless ``url`` is given, with its state
    under ``tmp_path / "devices"``; closed when the test ends.
    """

    def make(
        task: str,
        device_id: str,
        *,
        url: str | None = None,
        bundle: Any = None,
        start: bool = True,
        **dev: Any,
    ) -> Client:
        settings = device_settings(url or broker.url, tmp_path / "devices", task, device_id, **dev)
        return fleet.device(settings, bundle=bundle, start=start)

    return make
