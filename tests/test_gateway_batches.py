"""The gateway's durable batches (fededge/gateway/batches.py): every state survives a restart."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fededge.errors import StorageError
from fededge.gateway.batches import SiteBatches
from fededge.protocol import Update


def _update(device: str, uid: str) -> Update:
    w = {"w": np.full(4, 0.5, np.float32)}
    return Update(task="t", device=device, update_id=uid, base_version=0, num_examples=3, delta=w)


def test_site_batches_survive_a_restart_in_every_state(tmp_path: Path) -> None:
    b = SiteBatches(tmp_path, fsync=True)
    u1, u2, u3 = _update("d1", "a"), _update("d2", "b"), _update("d1", "c")
    b.append([((u1, 1.0, 0.1), u1.to_bytes()), ((u2, 2.0, 0.2), u2.to_bytes())])
    b.close()
    b = SiteBatches(tmp_path, fsync=True)  # kill -9 with an open batch: it is reopened
    assert (b.out_seq, b.open_seq, len(b.open)) == (None, 0, 2) and b.holds("d2/b")
    assert b.send(base=4) == 0
    b.append([((u3, 3.0, 0.3), u3.to_bytes())])
    b.close()
    b = SiteBatches(tmp_path, fsync=True)  # out and open: both come back
    assert (b.out_seq, len(b.out), b.open_seq, len(b.open)) == (0, 2, 1, 1)
    assert b.exclude({"d2/b"}) == 1 and not b.holds("d2/b") and b.holds("d1/a")
    b.close()
    b = SiteBatches(tmp_path, fsync=True)
    assert [u.update_id for u, _, _ in b.out] == ["a"]
    assert b.settle(wait=True) == ["d1/a"]
    b.close()
    b = SiteBatches(tmp_path, fsync=True)  # merged: forgotten, the open batch stays
    assert (b.out_seq, b.merged, b.gate, b.open_seq, len(b.open)) == (None, 0, 4, 1, 1)
    assert sorted(p.name for p in tmp_path.glob("*.wal")) == ["batch-000000000001.wal"]
    b.close()


def test_site_batches_refuse_a_damaged_state_file(tmp_path: Path) -> None:
    (tmp_path / "state.json").write_text('{"merged": "x"}')
    with pytest.raises(StorageError, match="unreadable gateway state"):
        SiteBatches(tmp_path, fsync=False)
