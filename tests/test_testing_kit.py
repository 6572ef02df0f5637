"""The public testing kit (``fededge.testing``) as a user's tests would use it."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import numpy as np
import pytest
from conftest import AggregatorFactory, DeviceFactory
from devtools import DIGITS_PLAN, cycle, digits_split, mlp_bundle, new_task, publish_task

from fededge.secagg.graph import Stage
from fededge.testing import wait_until
from fededge.testing.broker import Mosquitto
from fededge.testing.fleet import aggregator_settings
from fededge.testing.secagg import Simulation, make_config

PLAN = DIGITS_PLAN.model_copy(update={"min_updates_per_version": 2, "examples_per_update": 8})


def test_wait_until_returns_the_value_and_times_out() -> None:
    values: Iterator[object] = iter([None, 0, [], {"v": 1}])
    assert wait_until(lambda: next(values), 5, "a value", interval=0) == {"v": 1}
    with pytest.raises(TimeoutError, match="waiting for nothing"):
        wait_until(lambda: False, 0.05, "nothing")


def test_importing_the_kit_loads_neither_pytest_nor_the_services() -> None:
    code = (
        "import sys, fededge.testing, fededge.testing.broker, fededge.testing.fleet;"
        "print(sorted(m for m in sys.modules if m == 'pytest' or m.startswith("
        "('fededge.aggregator', 'fededge.device', 'numba'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_services_do_not_import_the_kit() -> None:
    code = (
        "import sys, fededge.aggregator.service, fededge.device.client, fededge.cli;"
        "print([m for m in sys.modules if m.startswith('fededge.testing')])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_fresh_broker_restarts_on_its_port_and_logs(fresh_broker: Mosquitto) -> None:
    port = fresh_broker.port
    fresh_broker.kill()
    assert not fresh_broker.running
    fresh_broker.start()
    assert fresh_broker.port == port and fresh_broker.running
    assert fresh_broker.wait_log("running")


def test_aggregator_and_device_fixtures_make_a_version(
    broker: Mosquitto, tmp_path, aggregator: AggregatorFactory, device: DeviceFactory
) -> None:
    task = new_task()
    publish_task(aggregator_settings(broker.url, tmp_path / "pub", task=task), PLAN)
    agg = aggregator(task)
    parts, _, _ = digits_split(2)
    clients = [device(task, f"d{i}", bundle=mlp_bundle()) for i in range(2)]
    for c in clients:
        assert c.wait_for_version(0, 30)
    for c, part in zip(clients, parts, strict=True):
        c.fit(*cycle(part, 0, PLAN.examples_per_update))
    wait_until(lambda: agg.version == 1, 60, "version 1")
    assert agg.model is not None and agg.model.version == 1


def test_secagg_simulation_from_the_kit() -> None:
    devices = [f"d{i}" for i in range(5)]
    rng = np.random.default_rng(0)
    inputs = {d: (rng.uniform(-0.1, 0.1, 16).astype(np.float32), 1.0) for d in devices}
    sim = Simulation(make_config("r1", devices, 16, threshold=3, neighbours=4), inputs)
    server = sim.run()
    assert server.stage == Stage.DONE and server.result is not None
    total, weight = server.result
    want = np.mean([x.astype(np.float64) for x, _ in inputs.values()], axis=0)
    assert weight == pytest.approx(5.0, abs=1e-3)
    np.testing.assert_allclose(total / weight, want, atol=1e-4)


def test_version_comes_from_the_package_metadata() -> None:
    from importlib.metadata import version

    import fededge

    assert fededge.__version__ == version("fededge")
