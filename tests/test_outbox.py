"""The outbox: durable until a receipt, resend timing, staleness drops, restarts."""

from __future__ import annotations

import logging

import numpy as np

from fededge.device.examples import ExampleStore, StateDb
from fededge.device.outbox import Outbox


def _outbox(tmp_path, clock=None) -> Outbox:
    db = StateDb(tmp_path / "state.sqlite")
    return Outbox(db, clock=clock) if clock else Outbox(db)


def test_due_resend_after_timeout_and_reset(tmp_path) -> None:
    now = [0.0]
    ob = _outbox(tmp_path, clock=lambda: now[0])
    ob.put("u1", 3, 10, b"one")
    ob.put("u2", 4, 20, b"two")
    assert [e.update_id for e in ob.due(60)] == ["u1", "u2"]
    ob.mark_sent("u1")
    assert [e.update_id for e in ob.due(60)] == ["u2"]
    ob.mark_sent("u2")
    now[0] = 59.0
    assert ob.due(60) == []
    now[0] = 60.0
    assert [e.update_id for e in ob.due(60)] == ["u1", "u2"]
    ob.mark_sent("u1")
    assert ob.get("u1").attempts == 2  # type: ignore[union-attr]
    ob.reset()  # a reconnect: everything is due at once
    assert len(ob.due(60)) == 2


def test_settle_only_by_receipt_and_survives_restart(tmp_path) -> None:
    ob = _outbox(tmp_path)
    ob.put("u1", 0, 10, b"payload-1")
    ob.put("u2", 0, 10, b"payload-2")
    ob.mark_sent("u1")
    assert ob.settle("nope") is None
    e = ob.settle("u1")
    assert e is not None and e.payload == b"payload-1" and e.num_examples == 10
    assert ob.settle("u1") is None  # a duplicate receipt is harmless
    ob.db.close()
    ob2 = _outbox(tmp_path)
    assert ob2.ids() == ["u2"] and len(ob2) == 1
    assert [e.payload for e in ob2.due(60)] == [b"payload-2"]


def test_drop_only_when_too_stale_with_a_logged_reason(tmp_path, caplog) -> None:
    ob = _outbox(tmp_path)
    for v in range(5):
        ob.put(f"u{v}", v, 1, b"x")
    with caplog.at_level(logging.WARNING, logger="fededge.device.outbox"):
        assert ob.drop_stale(current_version=4, max_staleness=4) == []
        dropped = ob.drop_stale(current_version=5, max_staleness=2)
    assert [e.update_id for e in dropped] == ["u0", "u1", "u2"]
    assert ob.ids() == ["u3", "u4"]
    assert "too stale" in caplog.text and "u2" in caplog.text


def test_update_and_used_examples_commit_together(tmp_path) -> None:
    db = StateDb(tmp_path / "state.sqlite")
    ex = ExampleStore(db, max_examples=100, max_age=1e9)
    ex.add(np.zeros((4, 2), np.float32), np.zeros(4, np.int32))
    batch = ex.take(4, (2,))
    assert batch is not None
    try:
        with db.transaction() as c:
            Outbox.put_in(c, "u1", 0, 4, b"p")
            ExampleStore.mark_used_in(c, batch.ids)
            raise RuntimeError("crash before commit")
    except RuntimeError:
        pass
    assert ex.fresh_count() == 4 and len(Outbox(db)) == 0  # neither happened
    with db.transaction() as c:
        Outbox.put_in(c, "u1", 0, 4, b"p")
        ExampleStore.mark_used_in(c, batch.ids)
    assert ex.fresh_count() == 0 and len(Outbox(db)) == 1
