"""Helpers for device tests: settings, a task published from a shipped bundle, digits splits."""

from __future__ import annotations

import http.client
import json
import socket
import time
import uuid
import zlib
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from fededge.device.bundle import Bundle, load_bundle, shipped_bundle_path
from fededge.device.datasets import dirichlet_partition, load_digits, train_test_split
from fededge.protocol import Graph, ModelVersion, Plan
from fededge.settings import Settings, load_settings
from fededge.tasks import publish_initial
from fededge.testing import wait_until

__all__ = ["wait_until"]  # re-exported: the one wait of the test suite

# The plan the device tests (and the demo) use for digits_mlp: measured to pass 0.85 held-out
# accuracy in ~6 versions with 5 non-IID devices (Dirichlet alpha 0.5).
DIGITS_PLAN = Plan(
    epochs=5,
    batch_size=16,
    learning_rate=0.3,
    examples_per_update=32,
    min_updates_per_version=5,
    clip_norm=5.0,
    noise_stddev=0.0,
    max_staleness=2,
)

_BUNDLE: dict[str, Bundle] = {}


def mlp_bundle() -> Bundle:
    """The shipped digits MLP bundle (loaded once per test process)."""
    if "mlp" not in _BUNDLE:
        _BUNDLE["mlp"] = load_bundle(shipped_bundle_path("digits_mlp"))
    return _BUNDLE["mlp"]


def new_task() -> str:
    return f"t{uuid.uuid4().hex[:8]}"


def broker_overrides(url: str) -> dict[str, Any]:
    return {"url": url, "connect_timeout": 5.0, "reconnect_min_delay": 0.1,
            "reconnect_max_delay": 1.0}  # fmt: skip


def device_settings(
    url: str, state_dir: Path, task: str, device_id: str, **device: Any
) -> Settings:
    dev = {
        "device_id": device_id,
        "metrics": False,
        "seed": zlib.crc32(device_id.encode()),
        **device,
    }
    return load_settings(
        None,
        {"broker": broker_overrides(url), "task": task, "state_dir": state_dir, "device": dev},
    )


def publish_task(
    settings: Settings,
    plan: Plan = DIGITS_PLAN,
    bundle: Bundle | None = None,
    *,
    sign_key: Any = None,
    force: bool = False,
) -> ModelVersion:
    """Publish graph, plan and version 0 of the digits MLP for ``settings.task`` (retained),
    signed with the owner's ``sign_key`` if given."""
    b = bundle or mlp_bundle()
    graph = Graph(task=settings.task, tflite=b.graph, spec=b.spec.to_json())
    mv = ModelVersion(task=settings.task, version=0, weights=dict(b.weights),
                      graph_sha256=graph.sha256, time=time.time())  # fmt: skip
    published = publish_initial(settings, graph, mv, plan, sign_key=sign_key, force=force)
    return replace(mv, generation=published.generation)


def digits_split(
    n_parts: int, seed: int = 0, alpha: float = 0.5
) -> tuple[list[tuple[np.ndarray, np.ndarray]], np.ndarray, np.ndarray]:
    """Non-IID parts of 80% of digits and the held-out 20%: (parts, x_test, y_test)."""
    x, y = load_digits()
    xtr, ytr, xte, yte = train_test_split(x, y, 0.2, np.random.default_rng(seed))
    idx = dirichlet_partition(ytr, n_parts, alpha, np.random.default_rng(seed + 1), min_size=40)
    return [(xtr[i], ytr[i]) for i in idx], xte, yte


def cycle(part: tuple[np.ndarray, np.ndarray], start: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` examples of a part from position ``start``, wrapping around."""
    idx = (start + np.arange(n)) % len(part[0])
    return part[0][idx], part[1][idx]


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float = 10) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = str(path)

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.unix_path)


def call(path: Path, method: str, url: str, body: Any = None) -> tuple[int, Any]:
    conn = UnixHTTPConnection(path)
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    conn.request(method, url, body=data, headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    raw = r.read()
    conn.close()
    return r.status, json.loads(raw) if raw.startswith(b"{") else raw
