"""The gateway's durable batches (fededge/gateway/batches.py): every state survives a restart,
and a batch's sum is the same whether it was folded as updates came or read back from its log."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fededge.aggregator.policy import Layout
from fededge.errors import NotReadyError, StorageError
from fededge.gateway.batches import SiteBatches
from fededge.protocol import Update

LAYOUT = Layout.of({"w": np.zeros(4, np.float32)})


def _update(device: str, uid: str, value: float) -> Update:
    w = {"w": np.full(4, value, np.float32)}
    return Update(task="t", device=device, update_id=uid, base_version=0, num_examples=3, delta=w)


def _reopen(root: Path) -> SiteBatches:
    b = SiteBatches(root, fsync=True)
    b.bind(LAYOUT)
    return b


def test_site_batches_survive_a_restart_in_every_state(tmp_path: Path) -> None:
    b = SiteBatches(tmp_path, fsync=True)
    u1, u2, u3 = _update("d1", "a", 0.5), _update("d2", "b", -1.0), _update("d1", "c", 2.0)
    with pytest.raises(NotReadyError):
        b.append([((u1, 1.0, 0.1), u1.to_bytes())])
    b.bind(LAYOUT)
    b.append([((u1, 1.0, 0.1), u1.to_bytes()), ((u2, 2.0, 0.2), u2.to_bytes())])
    live = b.open_sum.message("t", "gateway-x", 0, 4)  # type: ignore[union-attr]
    b.close()
    b = _reopen(tmp_path)  # kill -9 with an open batch: it is reopened, the same sum
    assert (b.out_seq, b.open_seq, b.open_keys) == (None, 0, ["d1/a", "d2/b"]) and b.holds("d2/b")
    again = b.open_sum.message("t", "gateway-x", 0, 4)  # type: ignore[union-attr]
    assert again.to_bytes() == live.to_bytes()
    np.testing.assert_array_equal(again.sums["w"], np.full(4, 0.5 * 1.0 - 1.0 * 2.0))
    assert b.device_count("d1") == 1
    assert b.send(base=4) == 0 and b.device_count("d1") == 0
    b.append([((u3, 3.0, 0.3), u3.to_bytes())])
    b.close()
    b = _reopen(tmp_path)  # out and open: both come back
    assert (b.out_seq, b.out_keys, b.open_seq, b.open_keys) == (0, ["d1/a", "d2/b"], 1, ["d1/c"])
    assert b.exclude({"d2/b", "d9/zz"}) == 1 and not b.holds("d2/b") and b.holds("d1/a")
    p = b.out_sum.message("t", "gateway-x", 0, 4)  # type: ignore[union-attr]
    assert (p.count, p.weight, p.keys) == (1, 1.0, ["d1/a"])
    b.close()
    b = _reopen(tmp_path)
    assert b.out_keys == ["d1/a"]
    assert b.settle(wait=True) == ["d1/a"]
    b.close()
    b = _reopen(tmp_path)  # merged: forgotten, the open batch stays
    assert (b.out_seq, b.merged, b.gate, b.open_seq, b.open_keys) == (None, 0, 4, 1, ["d1/c"])
    assert sorted(p.name for p in tmp_path.glob("*.wal")) == ["batch-000000000001.wal"]
    b.close()


def test_site_batches_refuse_a_damaged_state_file(tmp_path: Path) -> None:
    (tmp_path / "state.json").write_text('{"merged": "x"}')
    with pytest.raises(StorageError, match="unreadable gateway state"):
        SiteBatches(tmp_path, fsync=False)


def test_merged_keys_survive_a_restart_until_below_the_floor(tmp_path: Path) -> None:
    b = _reopen(tmp_path)
    u1, u2, u3 = _update("d1", "a", 0.5), _update("d2", "b", -1.0), _update("d1", "c", 2.0)
    b.append([((u1, 1.0, 0.1), u1.to_bytes()), ((u2, 2.0, 0.2), u2.to_bytes())])
    b.send(base=3)
    b.append([((u3, 3.0, 0.3), u3.to_bytes())])
    assert b.settle(wait=True) == ["d1/a", "d2/b"] and b.remembers("d2/b")
    assert not b.remembers("d1/c") and b.holds("d1/c")
    b.send(base=5)
    assert b.exclude({"d1/c"}) == 1 and b.settle(wait=False) == []  # nothing merged: no file
    (tmp_path / "merged-000000000007.json.tmp").write_text('{"ba')  # a write cut short
    b.close()
    b = _reopen(tmp_path)  # kill -9: what was merged is still known
    assert b.remembers("d1/a") and b.remembers("d2/b") and not b.remembers("d1/c")
    assert sorted(p.name for p in tmp_path.glob("merged-*")) == ["merged-000000000000.json"]
    b.forget_before(3)  # batch 0 was sent on version 3: its updates are within the floor
    assert b.remembers("d1/a")
    b.forget_before(4)
    assert not b.remembers("d1/a") and not list(tmp_path.glob("merged-*"))
    b.close()
    assert not _reopen(tmp_path).remembers("d1/a")


def test_site_batches_refuse_a_damaged_merged_file(tmp_path: Path) -> None:
    (tmp_path / "merged-000000000000.json").write_text('{"base": 1, "keys": [3]}')
    with pytest.raises(StorageError, match="unreadable gateway state"):
        SiteBatches(tmp_path, fsync=False)


@pytest.mark.parametrize("name", ["state.json", "merged-000000000000.json"])
def test_site_batches_refuse_a_state_file_they_cannot_read(tmp_path: Path, name: str) -> None:
    (tmp_path / name).mkdir()  # read_text: IsADirectoryError, an OSError, named as the others
    with pytest.raises(StorageError, match=f"{name}: unreadable gateway state"):
        SiteBatches(tmp_path, fsync=False)
