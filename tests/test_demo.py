"""`fededge demo` end to end: embedded broker or Mosquitto, real aggregator and device clients."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from fededge.demo import DemoConfig, VersionRow, run_demo, write_outputs
from fededge.mqtt import read_retained
from fededge.protocol import Topics


@pytest.mark.slow
def test_demo_defaults_learn_digits(tmp_path) -> None:
    """The README's main command, on its defaults (embedded amqtt broker, 10 devices)."""
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fededge.cli",
            "demo",
            "-o",
            str(out),
            "--json",
            str(out / "summary.json"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == {
        "task",
        "broker",
        "devices",
        "secure_aggregation",
        "final_accuracy",
        "versions",
    }
    assert summary["devices"] == 10 and summary["secure_aggregation"] is False
    versions = summary["versions"]
    assert [v["version"] for v in versions] == list(range(41))
    assert set(versions[1]) == {"version", "accuracy", "loss", "updates", "seconds"}
    assert all(v["updates"] >= 10 for v in versions[1:])
    # Asynchronous updates make the last points wobble by a few hundredths; the curve must
    # have climbed from chance (~0.1) to >= 0.9 and stay close to it.
    assert versions[0]["accuracy"] < 0.3
    assert max(v["accuracy"] for v in versions[-5:]) >= 0.90
    assert summary["final_accuracy"] >= 0.85
    assert versions[-1]["loss"] < versions[0]["loss"] / 3
    assert (out / "accuracy.png").stat().st_size > 10_000
    assert "final held-out accuracy" in proc.stdout


def test_demo_on_mosquitto_mqtt5(broker, tmp_path) -> None:
    cfg = DemoConfig(
        devices=4,
        versions=3,
        broker=broker.url,
        mqtt_version="5",
        min_updates_per_version=4,
        task="demo-m5",
        out_dir=tmp_path,
        json_path=tmp_path / "s.json",
    )
    seen: list[VersionRow] = []
    summary = run_demo(cfg, seen.append)
    assert [r.version for r in seen] == [0, 1, 2, 3]
    assert summary.broker == broker.url
    png = write_outputs(summary, cfg)
    assert png.exists()
    assert json.loads((tmp_path / "s.json").read_text())["versions"][-1]["version"] == 3


def test_two_demo_runs_in_a_row_on_one_broker_each_start_fresh(broker, tmp_path) -> None:
    """A second run on the same broker reports its own versions, not the first run's."""
    runs = []
    for i in range(2):
        cfg = DemoConfig(
            devices=3,
            versions=3,
            broker=broker.url,
            min_updates_per_version=3,
            out_dir=tmp_path / str(i),
        )
        seen: list[VersionRow] = []
        summary = run_demo(cfg, seen.append)
        assert [r.version for r in seen] == [0, 1, 2, 3]
        assert all(r.seconds >= 0 for r in seen)
        assert all(r.updates >= 3 for r in seen[1:])
        runs.append(summary)
        # What the run leaves behind on the broker: nothing of its task.
        topics = Topics("fededge", summary.task)
        assert read_retained(broker.settings(), [topics.all_filter], wait=10) == {}
    assert runs[0].task != runs[1].task
    assert all(s.task.startswith("digits-demo-") for s in runs)


@pytest.mark.parametrize("name", ["diabetes_regression", "multilabel", "transfer_digits"])
def test_demo_example_reports_the_tasks_metric(broker, tmp_path, name: str) -> None:
    """`demo --example`: the prebuilt bundle trains on 10 non-IID devices (float and multi-hot
    labels through Client.fit), evaluated by the task's metric; no TensorFlow involved."""
    from fededge.demo_examples import get_example

    ex = get_example(name)
    cfg = DemoConfig(
        devices=10, versions=2, broker=broker.url, example=name, out_dir=tmp_path,
        learning_rate=ex.learning_rate, json_path=tmp_path / "s.json",
    )  # fmt: skip
    seen: list[VersionRow] = []
    summary = run_demo(cfg, seen.append)
    assert [r.version for r in seen] == [0, 1, 2]
    metric = {"diabetes_regression": "mse", "multilabel": "accuracy"}.get(name, "accuracy")
    assert summary.metric == metric and summary.task.startswith(name.replace("_", "-"))
    assert all(metric in r.metrics and "loss" in r.metrics for r in seen)
    assert summary.final_metric == seen[-1].metrics[metric]
    # Two versions of ten devices' updates already improve on the initial weights.
    assert seen[-1].metrics["loss"] < seen[0].metrics["loss"]
    write_outputs(summary, cfg)
    doc = json.loads((tmp_path / "s.json").read_text())
    assert doc["example"] == name and doc["metric"] == metric
    assert set(doc["versions"][1]) == {"version", "loss", "updates", "seconds", "metrics"}


def test_demo_example_cli_prints_metric_per_version(tmp_path) -> None:
    """The anomaly example on the embedded broker: MSE and detection AUC printed per version."""
    proc = subprocess.run(
        [sys.executable, "-m", "fededge.cli", "demo", "--example", "sensor_autoencoder",
         "--versions", "2", "-o", str(tmp_path)],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "mse" in out and "auc" in out and "(held-out)" in out
    rows = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert [r[0] for r in rows[:3]] == ["0", "1", "2"]
    assert "final held-out mse" in out and "final held-out auc" in out
