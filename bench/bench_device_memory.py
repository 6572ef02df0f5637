"""Resident memory of the `fededge device` daemon: idle, and while it trains.

Run from the repository root (needs the `mosquitto` binary):

    python -m bench.bench_device_memory            # writes the device_memory section

For each shipped bundle a private Mosquitto is started, the task published (graph, plan,
version 0), and a real daemon process started. "Idle" is VmRSS once the daemon serves the
model, has answered predictions and sits waiting; "training" is the peak (VmHWM) after apps
handed in enough examples for several training runs (the plan asks for 512 examples per update,
5 epochs), sampled every 5 ms as well. No aggregator runs, so updates wait in the outbox.

"Libraries" is the baseline the daemon is judged against: a bare Python process that imports
what a device needs (numpy, LiteRT, pydantic-settings, paho, cryptography, sqlite3,
prometheus_client, click) and nothing else, measured in the same run; the table shows the
daemon's idle RSS, the baseline, their difference and ratio. ``--print`` prints the section
instead of writing docs/benchmarks.md.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # also runnable as `python bench/bench_device_memory.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np

from bench._report import machine, write_section
from fededge.device.bundle import load_bundle, shipped_bundle_path
from fededge.device.datasets import load_digits
from fededge.protocol import Graph, ModelVersion, Plan
from fededge.settings import load_settings
from fededge.tasks import publish_initial
from fededge.testing.broker import Mosquitto

RUNS = 6
# No aggregator runs here: the device trains RUNS times on version 0, so the plan must allow
# that many updates of one device per version.
PLAN = Plan(epochs=5, batch_size=32, learning_rate=0.1, examples_per_update=512,
            min_updates_per_version=5, clip_norm=5.0, noise_stddev=0.001,
            max_updates_per_device=RUNS)  # fmt: skip
LIBRARIES = (
    "numpy",
    "ai_edge_litert.interpreter",
    "pydantic_settings",
    "paho.mqtt.client",
    "cryptography.hazmat.primitives.asymmetric.x25519",
    "cryptography.hazmat.primitives.ciphers.aead",
    "sqlite3",
    "prometheus_client",
    "click",
)


def baseline_mib(modules: tuple[str, ...] = LIBRARIES) -> float:
    """VmRSS of a Python process that imported ``modules`` together and nothing else."""
    code = (
        "import importlib, sys\n"
        f"for m in {list(modules)!r}: importlib.import_module(m)\n"
        "print('ready', flush=True)\n"
        "sys.stdin.read()\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE)  # fmt: skip
    try:
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != b"ready":
            raise RuntimeError("baseline process failed")
        return _proc_kib(proc.pid, "VmRSS") / 1024
    finally:
        proc.kill()
        proc.wait(10)


def _proc_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def _call(sock: Path, method: str, url: str, body: Any = None) -> Any:
    data = b"" if body is None else json.dumps(body).encode()
    req = (f"{method} {url} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(data)}\r\n"
           "Connection: close\r\n\r\n").encode() + data  # fmt: skip
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(30)
        s.connect(str(sock))
        s.sendall(req)
        out = b""
        while chunk := s.recv(1 << 16):
            out += chunk
    head, _, payload = out.partition(b"\r\n\r\n")
    if b" 200 " not in head.split(b"\r\n", 1)[0]:
        raise RuntimeError(f"{url}: {head[:80]!r} {payload[:200]!r}")
    return json.loads(payload)


def measure(bundle_name: str, work: Path) -> dict[str, float]:
    broker = Mosquitto(work / "mosquitto")
    broker.start()
    proc = None
    try:
        task = bundle_name.replace("_", "-")
        settings = load_settings(None, {"broker": {"url": broker.url}, "task": task,
                                        "state_dir": work / "agg"})  # fmt: skip
        b = load_bundle(shipped_bundle_path(bundle_name))
        graph = Graph(task=task, tflite=b.graph, spec=b.spec.to_json())
        mv = ModelVersion(task=task, version=0, weights=dict(b.weights),
                          graph_sha256=graph.sha256)  # fmt: skip
        publish_initial(settings, graph, mv, PLAN)
        state = work / f"dev-{bundle_name}"
        env = {**os.environ, "FEDEDGE_DEVICE__METRICS": "false"}
        args = [sys.executable, "-m", "fededge.cli", "device", "--broker", broker.url,
                "--task", task, "--state-dir", str(state), "--device-id", "bench"]  # fmt: skip
        proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        sock = state / "api.sock"
        deadline = time.monotonic() + 60
        while True:
            try:
                if _call(sock, "GET", "/status")["version"] == 0:
                    break
            except (OSError, RuntimeError, ValueError):
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("daemon did not come up")
            time.sleep(0.05)
        x, y = load_digits()
        for i in range(20):
            _call(sock, "POST", "/predict", {"x": x[i * 8 : i * 8 + 8].tolist()})
        time.sleep(2.0)
        idle = _proc_kib(proc.pid, "VmRSS")
        idle_hwm = _proc_kib(proc.pid, "VmHWM")
        rng = np.random.default_rng(0)
        peak = 0
        t0 = time.monotonic()
        for _ in range(RUNS):
            idx = rng.choice(len(x), PLAN.examples_per_update, replace=False)
            _call(sock, "POST", "/examples", {"x": x[idx].tolist(), "y": y[idx].tolist()})
        while _call(sock, "GET", "/status")["updates_sent"] < RUNS:
            peak = max(peak, _proc_kib(proc.pid, "VmRSS"))
            time.sleep(0.005)
            if time.monotonic() - t0 > 120:
                raise RuntimeError("training did not finish")
        train_s = time.monotonic() - t0
        after = _proc_kib(proc.pid, "VmRSS")
        hwm = _proc_kib(proc.pid, "VmHWM")
        return {"idle": idle / 1024, "idle_hwm": idle_hwm / 1024, "peak": max(peak, hwm) / 1024,
                "after": after / 1024, "seconds": train_s,
                "params": float(b.spec.num_parameters)}  # fmt: skip
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)
        broker.kill()


def main() -> None:
    rows = []
    base = min(baseline_mib() for _ in range(3))
    bare = min(baseline_mib(()) for _ in range(3))
    with tempfile.TemporaryDirectory(prefix="fededge-bench-") as tmp:
        for name in ("digits_mlp", "digits_cnn"):
            r = measure(name, Path(tmp) / name)
            rows.append(
                f"| {name} | {int(r['params']):,} | {r['idle']:.1f} | {base:.1f} | "
                f"{r['idle'] - base:+.1f} | {r['idle'] / base:.2f} | {r['peak']:.1f} | "
                f"{r['peak'] - r['idle']:+.1f} | {r['after']:.1f} | {r['seconds']:.2f} |"
            )
    md = "\n".join([
        "## Device daemon resident memory",
        "",
        f"Machine: {machine()}",
        "",
        "`python -m bench.bench_device_memory`: a real `fededge device` process (Python, numpy, "
        "LiteRT, paho, SQLite, the local API) against a private Mosquitto. Idle = VmRSS after "
        "adopting version 0 and answering 20 predictions; peak = VmHWM/sampled VmRSS over "
        f"{RUNS} training runs of {PLAN.examples_per_update} examples x {PLAN.epochs} epochs "
        "(each run handed in over the local API as one JSON batch, which also costs memory). "
        "Libraries = VmRSS of a bare Python process that imported numpy, LiteRT, "
        "pydantic-settings, paho, cryptography, sqlite3, prometheus_client and click together "
        f"(min of 3; the interpreter alone: {bare:.1f} MiB).",
        "",
        "| bundle | parameters | idle RSS MiB | libraries MiB | idle - libraries MiB | "
        "idle / libraries | peak RSS MiB | training - idle MiB | RSS after MiB | "
        "time for all runs s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        *rows,
    ])  # fmt: skip
    if "--print" in sys.argv[1:]:
        print(md)
    else:
        write_section("device_memory", md)


if __name__ == "__main__":
    main()
