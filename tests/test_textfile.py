"""Device metrics for node_exporter's textfile collector (fededge/device/textfile.py)."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from fededge.device.metrics import DeviceMetrics
from fededge.device.textfile import TextfileWriter


def parse(path: Path) -> dict[str, float]:
    """Every sample of a textfile, by name (labels joined in), as Prometheus would read it."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(path.read_text()):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def test_writes_the_device_registry_atomically_and_parseably(tmp_path: Path) -> None:
    m = DeviceMetrics()
    m.version.set(7)
    m.receipts.labels("accepted").inc(3)
    m.train_seconds.inc(1.5)
    w = TextfileWriter(tmp_path / "fededge.prom", m.registry, interval=15)
    assert w.maybe_write(100.0)
    samples = parse(tmp_path / "fededge.prom")
    assert samples["fededge_device_model_version"] == 7
    assert samples["fededge_device_receipts_total{status=accepted}"] == 3
    assert samples["fededge_device_train_seconds_total"] == 1.5
    assert "fededge_device_outbox_depth" in samples
    assert [p.name for p in tmp_path.iterdir()] == ["fededge.prom"]  # no temporary file left


def test_interval_between_writes(tmp_path: Path) -> None:
    m = DeviceMetrics()
    w = TextfileWriter(tmp_path / "fededge.prom", m.registry, interval=15)
    assert w.maybe_write(100.0)
    m.version.set(1)
    assert not w.maybe_write(110.0)
    assert parse(w.path)["fededge_device_model_version"] == 0
    assert w.maybe_write(115.0)
    assert parse(w.path)["fededge_device_model_version"] == 1
    assert w.write() and w.writes == 3  # at exit: whatever the interval
    assert w.maybe_write(50.0)  # a clock that went back writes rather than never


def test_unwritable_folder_is_logged_once_and_retried(tmp_path: Path, caplog) -> None:
    m = DeviceMetrics()
    w = TextfileWriter(tmp_path / "missing" / "fededge.prom", m.registry, interval=1)
    with caplog.at_level(logging.WARNING, logger="fededge.device.textfile"):
        assert not w.maybe_write(0.0)
        assert not w.maybe_write(1.0)
    assert w.failures == 2
    assert len([r for r in caplog.records if "cannot write" in r.message]) == 1
    (tmp_path / "missing").mkdir()
    assert w.maybe_write(2.0)
    assert parse(w.path)["fededge_device_model_version"] == 0


def test_only_prom_files(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"\.prom"):
        TextfileWriter(tmp_path / "fededge.txt", DeviceMetrics().registry, interval=1)


def test_readable_by_node_exporter_under_the_units_umask(tmp_path: Path) -> None:
    old = os.umask(0o077)  # systemd/fededge-device.service sets UMask=0077
    try:
        w = TextfileWriter(tmp_path / "fededge.prom", DeviceMetrics().registry, interval=1)
        assert w.write()
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "fededge.prom").stat().st_mode) == 0o644
