"""The pending version's durability without a broker: WAL, checkpoints, torn tails, recovery."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from fededge.aggregator.pending import PendingVersion
from fededge.aggregator.store import CHECKPOINT_SLOTS, Store, read_ids
from fededge.errors import StorageError
from fededge.protocol import ModelVersion, Update

D = 1000


def _base() -> ModelVersion:
    return ModelVersion(
        task="t",
        version=3,
        weights={"a": np.zeros(D, np.float32), "b": np.ones((2, 5), np.float32)},
        graph_sha256="0" * 64,
    )


def _update(i: int, rng: np.random.Generator, device: str = "d") -> tuple[Update, bytes]:
    u = Update(
        task="t",
        device=device,
        update_id=f"u{i}",
        base_version=3,
        num_examples=i + 1,
        delta={
            "a": rng.normal(size=D).astype(np.float32),
            "b": rng.normal(size=(2, 5)).astype(np.float32),
        },
        train_loss=0.5,
    )
    return u, u.to_bytes()


def _pending(store: Store, every: int = 100) -> PendingVersion:
    # No checkpoint overhead: groups of small test updates still exercise the checkpoint path.
    # Ids appended after every checkpoint (ids_flush_min 1) exercise the ids file at once.
    return PendingVersion(store, _base(), checkpoint_every=every, max_update_bytes=1 << 20,
                          checkpoint_overhead=0, ids_flush_min=1)  # fmt: skip


def _reference(updates: list[Update]) -> np.ndarray:
    acc = np.zeros(D + 10)
    for u in updates:
        acc += (u.num_examples) * np.concatenate([u.delta["a"], u.delta["b"].ravel()]).astype(
            np.float64
        )
    return acc


@pytest.mark.parametrize("groups", [[1, 1, 1], [3, 2], [1, 4, 1, 2], [9]])
@pytest.mark.parametrize("every", [1, 2, 100])
def test_recover_is_bit_identical(tmp_path, groups, every) -> None:
    # Groups of >= 3 updates exceed the accumulator's bytes and take the checkpoint path.
    rng = np.random.default_rng(sum(groups) * 7 + every)
    store = Store(tmp_path)
    p = _pending(store, every)
    done: list[Update] = []
    i = 0
    for size in groups:
        for _ in range(size):
            u, raw = _update(i, rng)
            p.stage(u, raw, float(u.num_examples), 1.0)
            i += 1
        done += p.commit()
    p.close()
    np.testing.assert_allclose(p.acc, _reference(done), rtol=1e-12)
    p.store.close()
    q = _pending(Store(tmp_path), every)
    q.recover()
    np.testing.assert_array_equal(q.acc, p.acc)
    assert q.sums.count == len(done) and q.sums.ids == p.sums.ids
    assert q.sums.total_weight == p.sums.total_weight
    assert all(q.has(f"d/{u.update_id}") for u in done)


def test_staged_but_uncommitted_is_not_recovered(tmp_path) -> None:
    rng = np.random.default_rng(1)
    p = _pending(Store(tmp_path))
    u, raw = _update(0, rng)
    p.stage(u, raw, 1.0, 1.0)
    p.commit()
    v, raw2 = _update(1, rng)
    p.stage(v, raw2, 1.0, 1.0)  # the process dies here: never acknowledged
    p.store.close()
    q = _pending(Store(tmp_path))
    q.recover()
    assert q.sums.ids == ["u0"]


def test_torn_tail_is_cut_and_earlier_records_survive(tmp_path) -> None:
    rng = np.random.default_rng(2)
    store = Store(tmp_path)
    p = _pending(store)
    for i in range(2):
        u, raw = _update(i, rng)
        p.stage(u, raw, 1.0, 1.0)
        p.commit()
    p.close()
    ((_, seg),) = store.segments(3)
    with seg.open("ab") as f:
        f.write(b"FEW1\x10\x00\x00\x00garbage")  # a record torn by a crash mid-write
    store.close()
    q = _pending(Store(tmp_path))
    assert q.recover() == 2
    assert q.sums.ids == ["u0", "u1"]
    np.testing.assert_array_equal(q.acc, p.acc)


def test_checkpoint_of_another_size_is_refused(tmp_path) -> None:
    store = Store(tmp_path)
    store.write_checkpoint(3, 0, np.zeros(5), {"count": 0})
    store.close()
    store = Store(tmp_path)
    with pytest.raises(StorageError, match="parameters"):
        _pending(store).recover()


def test_finalize_matches_numpy(tmp_path) -> None:
    rng = np.random.default_rng(3)
    p = _pending(Store(tmp_path))
    ups = []
    for i in range(4):
        u, raw = _update(i, rng)
        p.stage(u, raw, float(u.num_examples), 1.0)
        ups.append(u)
    p.commit()
    new = p.finalize(server_lr=0.7)
    mean = _reference(ups) / sum(u.num_examples for u in ups)
    np.testing.assert_array_equal(new["a"], (0.7 * mean[:D]).astype(np.float32))
    np.testing.assert_array_equal(new["b"].ravel(), (1.0 + 0.7 * mean[D:]).astype(np.float32))


def test_staged_update_is_not_a_duplicate_until_committed(tmp_path) -> None:
    rng = np.random.default_rng(4)
    p = _pending(Store(tmp_path))
    u, raw = _update(0, rng)
    p.stage(u, raw, 1.0, 1.0)
    assert p.is_staged("d/u0") and not p.has("d/u0")
    p.commit()
    assert p.has("d/u0") and not p.is_staged("d/u0")


def test_segments_covered_by_a_checkpoint_are_not_replayed(tmp_path) -> None:
    """kill -9 between the checkpoint's rename and the unlink of the segments it covers."""
    rng = np.random.default_rng(5)
    store = Store(tmp_path)
    p = _pending(store)
    for i in range(3):
        u, raw = _update(i, rng)
        p.stage(u, raw, 1.0, 1.0)
        p.commit()
    ((_, seg),) = store.segments(3)
    saved = seg.read_bytes()
    p.checkpoint()
    seg.write_bytes(saved)  # as if the unlink never happened
    store.close()
    q = _pending(Store(tmp_path))
    q.recover()
    assert q.sums.count == 3
    np.testing.assert_array_equal(q.acc, p.acc)
    assert not seg.exists()


def test_checkpoint_with_many_ids_reloads(tmp_path) -> None:
    store = Store(tmp_path)
    ids = [f"{i:064d}" for i in range(20_000)]  # a header well above the 1 MiB network limit
    devices = [f"d{i % 7}" for i in range(20_000)]
    state = {"count": len(ids), "ids": ids, "devices": devices}  # as before the ids file
    store.write_checkpoint(3, 0, np.zeros(D + 10), state)
    ck = store.load_checkpoint(3)
    assert ck is not None
    _seg, acc, state = ck
    assert state["ids"] == ids and state["devices"] == devices and acc.shape == (D + 10,)


def test_second_instance_is_refused_before_touching_files(tmp_path) -> None:
    store = Store(tmp_path)
    tmp = store.pending_dir / "checkpoint.safetensors.tmp"
    tmp.write_bytes(b"in flight")
    with pytest.raises(StorageError, match="in use by another aggregator"):
        Store(tmp_path)
    assert tmp.exists()
    store.close()
    Store(tmp_path).close()


def _three_records(tmp_path) -> tuple[Store, PendingVersion, list[int]]:
    """A segment with three committed records; the byte offset where each one starts."""
    rng = np.random.default_rng(5)
    store = Store(tmp_path)
    p = _pending(store)
    seg = store.segment_path(3, 0)
    offsets = []
    for i in range(3):
        offsets.append(seg.stat().st_size if seg.exists() else 0)
        u, raw = _update(i, rng)
        p.stage(u, raw, 1.0, 1.0)
        p.commit()
    p.close()
    store.close()
    return store, p, offsets


def test_bad_record_in_the_middle_stops_with_the_repair_command(tmp_path) -> None:
    store, _, offsets = _three_records(tmp_path)
    ((_, seg),) = store.segments(3)
    data = bytearray(seg.read_bytes())
    data[offsets[1] + 40] ^= 0xFF  # bit rot inside the second record; the third is intact
    seg.write_bytes(bytes(data))
    q = _pending(Store(tmp_path))
    with pytest.raises(StorageError) as e:
        q.recover()
    msg = str(e.value)
    assert str(seg) in msg and f"at byte {offsets[1]}" in msg and "1 valid record" in msg
    assert f"fededge aggregator repair-wal --state-dir {tmp_path.parent.parent}" in msg
    assert seg.read_bytes() == bytes(data)  # nothing was cut


def test_repair_wal_reports_then_truncates_keeping_a_copy(tmp_path) -> None:
    from fededge.cli import main

    state = tmp_path / "state"
    root = state / "aggregator" / "t"
    root.mkdir(parents=True)
    store, _, offsets = _three_records(root)
    ((_, seg),) = store.segments(3)
    data = bytearray(seg.read_bytes())
    data[offsets[1] + 40] ^= 0xFF
    seg.write_bytes(bytes(data))
    args = ["aggregator", "repair-wal", "--state-dir", str(state), "--task", "t"]
    assert main(args) == 1  # reported, not repaired
    assert seg.read_bytes() == bytes(data)
    assert main([*args, "--yes"]) == 0
    assert seg.stat().st_size == offsets[1]
    assert seg.with_name(seg.name + ".bad").read_bytes() == bytes(data)
    assert main(args) == 0  # clean now
    q = _pending(Store(root))
    assert q.recover() == 1 and q.sums.ids == ["u0"]  # the operator accepted losing u1, u2


def test_repair_wal_reports_a_damaged_ids_file_and_never_cuts_it(tmp_path, capsys) -> None:
    """The pending version's .ids file is checked too: a torn tail is reported as harmless, a
    bad record inside it as CORRUPT (exit 1, with or without --yes), and the file is left as
    it is (a checkpoint counts its bytes; without those ids updates could count twice)."""
    from fededge.cli import main

    state = tmp_path / "state"
    root = state / "aggregator" / "t"
    store = Store(root)
    p = PendingVersion(store, _base(), checkpoint_every=1, max_update_bytes=1 << 20,
                       ids_flush_min=1)  # fmt: skip
    rng = np.random.default_rng(3)
    for i in range(4):
        u, raw = _update(i, rng)
        p.stage(u, raw, 1.0, 1.0)
        p.commit()
    p.settle_checkpoints()
    p.close()
    store.close()
    ids = store.ids_path(3)
    args = ["aggregator", "repair-wal", "--state-dir", str(state), "--task", "t"]
    assert main(args) == 0
    assert f"{ids}: ok, " in capsys.readouterr().out
    good = ids.read_bytes()
    with ids.open("ab") as f:
        f.write(good[: len(good) // 8])  # an append cut short
    assert main(args) == 0
    assert "[torn tail]: an append cut by a crash" in capsys.readouterr().out
    data = bytearray(good)
    data[len(data) // 2] ^= 0xFF  # bit rot inside a counted record
    ids.write_bytes(bytes(data))
    assert main(args) == 1
    assert main([*args, "--yes"]) == 1
    out = capsys.readouterr().out
    assert f"{ids}: " in out and "[CORRUPT]: update ids of the pending version" in out
    assert ids.read_bytes() == bytes(data)


def test_torn_tail_after_a_torn_group_is_still_cut_silently(tmp_path) -> None:
    store, _, offsets = _three_records(tmp_path)
    ((_, seg),) = store.segments(3)
    size = seg.stat().st_size
    with seg.open("r+b") as f:  # the last record half written, as after a crash mid-append
        f.truncate(offsets[2] + (size - offsets[2]) // 2)
    q = _pending(Store(tmp_path))
    assert q.recover() == 2 and q.sums.ids == ["u0", "u1"]
    assert seg.stat().st_size == offsets[2]


def test_a_failed_background_checkpoint_is_raised_by_the_next_commit(tmp_path) -> None:
    rng = np.random.default_rng(5)
    store = Store(tmp_path)
    p = PendingVersion(store, _base(), checkpoint_every=1, max_update_bytes=1 << 20)

    def broken(*_a: object) -> None:
        raise OSError(28, "No space left on device")

    store.write_checkpoint = broken  # type: ignore[method-assign,assignment]  # a disk failure
    u, raw = _update(0, rng)
    p.stage(u, raw, 1.0, 1.0)
    assert p.commit() == [u]  # durable in the WAL; the checkpoint after it goes on in the back
    p._checkpoints[0].exception()  # wait for it (the worker thread has failed)
    u2, raw2 = _update(1, rng)
    p.stage(u2, raw2, 1.0, 1.0)
    with pytest.raises(StorageError, match="No space left"):
        p.commit()
    p.close()


@pytest.mark.parametrize("overhead", [0, 1 << 30])  # checkpoint path, WAL path
def test_pipelined_commit_recovers_bit_identical(tmp_path, overhead) -> None:
    rng = np.random.default_rng(11)
    store = Store(tmp_path)
    p = PendingVersion(store, _base(), checkpoint_every=4, max_update_bytes=1 << 20,
                       checkpoint_overhead=overhead)  # fmt: skip
    done: list[Update] = []
    for g in range(4):
        for i in range(3):
            u, raw = _update(3 * g + i, rng)
            p.stage(u, raw, float(u.num_examples), 1.0)
        done += p.finish_commit()  # the group before, durable now
        assert p.begin_commit()
        # In flight: counted once for the quota and the duplicate check, folded or not.
        assert p.device_count("d") == len(done) + 3 and p.is_staged(f"d/{u.update_id}")
    done += p.finish_commit()
    assert p.in_flight == 0 and len(done) == 12
    np.testing.assert_allclose(p.acc, _reference(done), rtol=1e-12)
    p.close()
    p.store.close()
    q = _pending(Store(tmp_path))
    q.recover()
    np.testing.assert_array_equal(q.acc, p.acc)
    assert q.sums.ids == p.sums.ids


def test_checkpoint_waits_for_enough_wal_bytes(tmp_path) -> None:
    rng = np.random.default_rng(3)
    store = Store(tmp_path)
    _, raw = _update(0, rng)
    p = PendingVersion(store, _base(), checkpoint_every=1, max_update_bytes=1 << 20,
                       checkpoint_min_bytes=3 * len(raw))  # fmt: skip
    for i in range(5):
        u, raw = _update(i, rng)
        p.stage(u, raw, 1.0, 1.0)
        p.commit()
        p.close()  # waits for a background checkpoint, if one was started
        # Every update is past checkpoint_every; only each third fills the bytes.
        assert (store.load_checkpoint(3) is not None) == (i >= 2), i
    p.close()


@pytest.mark.parametrize("weight", [1.0, 32.0, 0.1, 1e-300, 12345.678901234567])
@pytest.mark.parametrize("norm", [0.0, 0.9999999999999999, 1e20, 5e-324])
def test_update_header_is_the_json_encoders(weight: float, norm: float) -> None:
    # The WAL writes its update headers without the JSON encoder (ingest speed): same bytes.
    from fededge.aggregator.wal import update_header

    header = {"id": "dev-1.u_2", "weight": weight, "norm": norm, "group": 17}
    want = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
    assert update_header("dev-1.u_2", weight, norm, 17) == want
    assert update_header("u", float("inf"), norm, 0) is None
    assert update_header("u", 3, norm, 0) is None  # an int: the encoder writes it


def test_wal_records_are_zlib_crc32_whatever_computes_it(tmp_path) -> None:
    # wal.py uses ISA-L's CRC-32 when installed: the same checksum as zlib's, so segments
    # written by either read with either. Records are written as head + payload (no copy).
    import struct
    import zlib

    from fededge.aggregator import wal

    payload = np.arange(1000, dtype=np.float32).tobytes()
    header = {"id": "u1", "weight": 2.0, "norm": 0.5, "group": 3}
    rec = wal.encode_record(header, payload)
    magic, hlen, plen, crc = struct.unpack_from("<4sIQI", rec)
    h = rec[20 : 20 + hlen]
    assert (magic, plen, rec[20 + hlen :]) == (b"FEW1", len(payload), payload)
    assert crc == zlib.crc32(h + payload)
    w = wal.SegmentWriter(tmp_path / "seg", fsync=False)
    w.append(header, payload)
    w.append(wal.update_header("u2", 1.0, 0.25, 3) or b"", payload[:12])
    w.commit()
    w.close()
    records, damage = wal.scan_segment(tmp_path / "seg")
    assert damage is None and [r.payload for r in records] == [payload, payload[:12]]
    assert (tmp_path / "seg").read_bytes().startswith(rec)


@pytest.mark.parametrize("isal", [True, False])
@pytest.mark.parametrize("size", [0, 1, 5119, 5120, 5121, 10_240, 10_241, 65_535, 65_536, 200_000])
def test_wal_records_are_unchanged_bytes(tmp_path, size: int, isal: bool, monkeypatch) -> None:
    # Records go to the writev as head + payload (no copy); the CRC is ISA-L's or, without it,
    # zlib's with small payloads checksummed in pieces that keep the GIL: the same value, and
    # the file holds exactly what encode_record writes.
    import zlib

    from fededge.aggregator import wal

    if not isal:
        monkeypatch.setattr(wal, "_isal_crc32", None)
    else:  # the aggregator extra (and so the test extra) installs it
        assert wal._isal_crc32 is not None, "isal is not installed: pip install -e '.[test]'"

    from fededge.aggregator.wal import (
        _PREFIX,
        SegmentWriter,
        crc32,
        encode_record,
        read_segment,
    )

    payload = np.random.default_rng(size).bytes(size)
    assert crc32(payload) == zlib.crc32(payload)
    assert crc32(payload, 12345) == zlib.crc32(payload, 12345)
    header = {"id": "u", "weight": 1.0, "norm": 2.0, "group": 0}
    h = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
    want = _PREFIX.pack(b"FEW1", len(h), size, zlib.crc32(payload, zlib.crc32(h))) + h + payload
    assert encode_record(header, payload) == encode_record(h, payload) == want
    w = SegmentWriter(tmp_path / "s.wal", fsync=False)
    w.append(header, payload)
    w.append(h, payload)
    w.commit()
    w.close()
    assert (tmp_path / "s.wal").read_bytes() == want + want
    assert [r.payload for r in read_segment(tmp_path / "s.wal", repair=False)] == [payload] * 2


def test_a_failed_pipelined_fsync_is_raised_before_anything_is_acked(tmp_path, monkeypatch) -> None:
    import os

    rng = np.random.default_rng(8)
    p = PendingVersion(Store(tmp_path), _base(), checkpoint_every=100, max_update_bytes=1 << 20)
    u, raw = _update(0, rng)
    p.stage(u, raw, 1.0, 1.0)

    def broken(_fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fdatasync", broken)
    assert p.begin_commit() and p.in_flight == 1
    with pytest.raises(StorageError, match=r"making a group of updates durable failed: .*Input/o"):
        p.finish_commit()
    assert p.sums.count == 0  # not folded, not returned: never acknowledged
    monkeypatch.undo()
    u1, raw1 = _update(1, rng)
    p.stage(u1, raw1, 1.0, 1.0)
    assert p.begin_commit()
    assert [x.update_id for x in p.finish_commit()] == ["u1"]  # the thread goes on
    p.close()


def test_wal_sync_thread_ends_with_close_or_its_pending_version() -> None:
    import gc
    import threading

    from fededge.aggregator.pending import _SyncThread

    def alive() -> int:
        return sum(t.name == "fededge-test-sync" for t in threading.enumerate())

    s = _SyncThread("fededge-test-sync")
    s.submit(lambda: None).result()
    with pytest.raises(ZeroDivisionError):
        s.submit(lambda: 1 / 0).result()
    assert isinstance(s.exception(), ZeroDivisionError)  # kept until the next job
    s.shutdown()
    assert alive() == 0
    s = _SyncThread("fededge-test-sync")
    s.submit(lambda: None)
    thread = s._thread
    del s
    gc.collect()
    thread.join(10)
    assert not thread.is_alive()


def test_intake_takes_a_prepared_update_and_checks_it_as_any() -> None:
    # Shard workers and gateways take Message.prepared (intake.preparer's hook) like the
    # aggregator core: the update parsed ahead, the size limit and every check still applied.
    from fededge.aggregator.codec import Prepared
    from fededge.aggregator.intake import check, norms_of, parse_update, preparer
    from fededge.errors import ProtocolError
    from fededge.protocol import ModelVersion, Plan, Topics

    delta = {"b": np.full(7, 0.01, np.float32), "w": np.full(50_000, 1e-3, np.float32)}
    raw = Update(task="t", device="d1", update_id="u1", base_version=0, num_examples=3,
                 delta=delta).to_bytes()  # fmt: skip
    topics = Topics("fededge", "t")
    prepare = preparer(topics, lambda: len(raw))
    pre = prepare(topics.update("d1"), bytearray(raw))  # type: ignore[arg-type]
    assert type(pre) is Prepared and prepare(topics.plan, raw) is None
    assert prepare(topics.update("d1"), b"junk") is None
    # Over the update limit: not read at all (ingest refuses it as oversize, unparsed).
    assert preparer(topics, lambda: len(raw) - 1)(topics.update("d1"), raw) is None
    assert parse_update(raw, len(raw), pre) is pre.update
    with pytest.raises(ProtocolError) as e:
        parse_update(raw, len(raw) - 1, pre)
    assert e.value.reason == "oversize"
    model = ModelVersion(task="t", version=0, weights={k: np.zeros_like(v) for k, v in delta.items()},
                         graph_sha256="0" * 64)  # fmt: skip
    plan = Plan(clip_norm=1.0)
    assert norms_of(None) is None and norms_of(b"x") is None
    assert check(pre.update, "t", "d1", model, plan, norms_of(pre)) == check(
        parse_update(raw, len(raw)), "t", "d1", model, plan
    )


def test_in_place_payloads_read_like_bytes(tmp_path) -> None:
    # The aggregator's, shard workers' and gateway's clients hand large payloads over as the
    # bytearray the socket filled (fededge/mqtt/pahoclient.py, in_place_payloads): parsed,
    # logged and read back exactly as bytes, and the update's arrays are still read-only.
    from fededge.aggregator import wal
    from fededge.aggregator.intake import parse_update

    delta = {"b": np.ones(7, np.float32), "w": np.arange(50_000, dtype=np.float32)}
    raw = Update(task="t", device="d1", update_id="u1", base_version=0, num_examples=3,
                 delta=delta).to_bytes()  # fmt: skip
    inplace = bytearray(raw)
    a, b = parse_update(raw, 1 << 30), parse_update(inplace, 1 << 30)  # type: ignore[arg-type]
    assert (a.update_id, a.num_examples) == (b.update_id, b.num_examples)
    for name in delta:
        np.testing.assert_array_equal(a.delta[name], b.delta[name])
        assert not b.delta[name].flags.writeable
    with pytest.raises(ValueError):
        b.delta["w"][0] = 1.0
    w = wal.SegmentWriter(tmp_path / "seg", fsync=False)
    w.append(wal.update_header("u1", 3.0, 1.0, 0) or b"", inplace)  # type: ignore[arg-type]
    w.commit()
    w.close()
    records, damage = wal.scan_segment(tmp_path / "seg")
    assert damage is None and [r.payload for r in records] == [raw]
    # The other large messages these clients read: a signed model, a masked input, a partial
    # sum (kept on disk by the coordinator).
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from fededge.aggregator.partial import BatchSum, PartialSum
    from fededge.aggregator.policy import Layout
    from fededge.fsio import atomic_write
    from fededge.protocol.signing import open_message, sign
    from fededge.secagg.messages import MaskedInput, decode_payload

    key = Ed25519PrivateKey.generate()
    model = ModelVersion(task="t", version=1, weights=delta, graph_sha256="0" * 64)
    opened = open_message(bytearray(sign(model.to_bytes(), "model", key)), "model",  # type: ignore[arg-type]
                          [key.public_key()])  # fmt: skip
    got = ModelVersion.from_bytes(opened.payload, max_bytes=1 << 30)
    np.testing.assert_array_equal(got.weights["w"], delta["w"])
    masked = MaskedInput(round_id="r1", device="d1", vector=np.arange(50_000, dtype=np.uint32))
    back = decode_payload(bytearray(masked.to_bytes()), masked=True, max_length=50_001)  # type: ignore[arg-type]
    assert isinstance(back, MaskedInput) and np.array_equal(back.vector, masked.vector)
    batch = BatchSum(Layout.of(delta))
    batch.add(a, 3.0, 1.0)
    part = batch.message("t", "shard-0", 1, 0).to_bytes()
    assert PartialSum.from_bytes(bytearray(part), max_bytes=1 << 30).count == 1  # type: ignore[arg-type]
    atomic_write(tmp_path / "part", bytearray(part), fsync=False)  # type: ignore[arg-type]
    assert (tmp_path / "part").read_bytes() == part


@pytest.mark.parametrize("path", ["checkpoint", "wal"])
def test_background_checkpoints_write_the_sum_of_their_moment_without_fresh_copies(
    tmp_path, path: str
) -> None:
    """Checkpoint path (each group made durable by a checkpoint): written from the accumulator
    itself, which nothing folds into until the group is finished. WAL path (a checkpoint every
    2 updates while ingest goes on): written from a copy, and the copy of a finished one is
    reused for the next (no fresh 8 MB array per checkpoint), never while it is written. Either
    way each checkpoint holds exactly the sum folded when it was taken."""
    rng = np.random.default_rng(5)
    store = Store(tmp_path)
    overhead = 0 if path == "checkpoint" else 1 << 30
    p = PendingVersion(store, _base(), checkpoint_every=2, max_update_bytes=1 << 20,
                       checkpoint_overhead=overhead, ids_flush_min=1)  # fmt: skip
    written: list[np.ndarray] = []  # held: a new array cannot take a reused one's address
    sums: list[np.ndarray] = []  # what the accumulator held when each checkpoint was taken
    write = store.write_checkpoint

    def recording(base: int, seg: int, acc: np.ndarray, meta: dict[str, Any]) -> None:
        written.append(acc)
        sums.append(acc.copy())
        write(base, seg, acc, meta)

    store.write_checkpoint = recording  # type: ignore[method-assign,assignment]
    done: list[Update] = []
    for g in range(12):
        for i in range(2):
            u, raw = _update(2 * g + i, rng)
            p.stage(u, raw, float(u.num_examples), 1.0)
        done += p.finish_commit()  # the previous group is durable now
        if done and path == "checkpoint":
            _seg, acc, state = store.load_checkpoint(3)  # type: ignore[misc]
            np.testing.assert_array_equal(acc, p.acc)  # exactly the sum folded so far
            assert state["ids"] == [u.update_id for u in done]
        assert p.begin_commit()
        if path == "wal":
            p.settle_checkpoints()  # written: its copy is free for the next one
    done += p.finish_commit()
    p.settle_checkpoints()
    np.testing.assert_allclose(p.acc, _reference(done), rtol=1e-12)
    assert len(written) >= 11
    if path == "checkpoint":
        assert all(a is p.acc for a in written)  # no copy at all
        for k, acc in enumerate(sums):  # the sum of the first k + 1 groups, bit for bit
            np.testing.assert_allclose(acc, _reference(done[: 2 * (k + 1)]), rtol=1e-12)
    else:
        assert all(a is not p.acc for a in written)
        # one copy reused (two if a done-callback runs after the waiter wakes), not one each
        assert len({id(a) for a in written}) <= 2
    p.close()
    store.close()
    q = _pending(Store(tmp_path))
    q.recover()
    np.testing.assert_array_equal(q.acc, p.acc)


@pytest.mark.parametrize("isal", [True, False])
def test_a_groups_records_are_those_append_writes(tmp_path, isal: bool, monkeypatch) -> None:
    # SegmentWriter.append_updates (one call per group) writes each record as append does
    # with update_header's bytes, or the header dict where that is None (not a finite float).
    from fededge.aggregator import wal

    if not isal:
        monkeypatch.setattr(wal, "_isal_crc32", None)
    rng = np.random.default_rng(11)
    payloads = [rng.bytes(n) for n in (0, 1, 100, 6000, 70_000)] * 3
    values = [1.0, 32.0, 0.1, 5e-324, 1e300, 3, float("inf"), float("nan"), -0.0, True]
    records = [
        (f"u{i}", values[i % len(values)], values[(3 * i + 1) % len(values)], p)
        for i, p in enumerate(payloads)
    ]
    one = wal.SegmentWriter(tmp_path / "one", fsync=False)
    for uid, weight, norm, p in records:
        header = {"id": uid, "weight": weight, "norm": norm, "group": 42}
        one.append(wal.update_header(uid, weight, norm, 42) or header, p)
    one.commit()
    group = wal.SegmentWriter(tmp_path / "group", fsync=False)
    group.append_updates(42, records)
    group.commit()
    one.close()
    group.close()
    assert (tmp_path / "group").read_bytes() == (tmp_path / "one").read_bytes()
    assert len(wal.scan_segment(tmp_path / "group")[0]) == len(records)


@pytest.mark.parametrize("most", [1, 7, 20, 9999, 1 << 30])
@pytest.mark.parametrize("parts", [1, 3, 1024, 1025, 3000])
def test_short_writes_resume_where_they_stopped(
    tmp_path, most: int, parts: int, monkeypatch
) -> None:
    # A writev that writes less than asked (a full disk, a signal) resumes after what it
    # wrote: the file holds every part once, in order, whatever the parts and their count.
    import os

    from fededge.aggregator import wal

    rng = np.random.default_rng(parts)
    data = [rng.bytes(int(n)) for n in rng.integers(0, 12, parts)]
    calls: list[int] = []
    real = os.writev

    def short(fd: int, buffers: list[bytes]) -> int:
        assert len(buffers) <= 1024
        want = b"".join(bytes(b) for b in buffers)[:most]
        calls.append(len(want))
        return real(fd, [want])

    monkeypatch.setattr(os, "writev", short)
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT)
    try:
        wal._write_all(fd, data)
        wal._write_all(fd, [])
        wal._write_all(fd, [b"", b""])
    finally:
        os.close(fd)
    assert (tmp_path / "f").read_bytes() == b"".join(data)
    assert all(calls)  # no empty writev


# -- the ids file: checkpoints that do not grow with the version ---------------------------


def _old_format_checkpoint(store: Store, seg: int, acc: np.ndarray, sums: dict[str, Any]) -> None:
    """A checkpoint as fededge wrote it before the ids file (Store.write_checkpoint and
    PendingVersion._checkpoint_job of that version): every id and device in its state."""
    from fededge.fsio import atomic_write
    from fededge.protocol.tensors import encode_header

    state = {k: list(v) if isinstance(v, list) else v for k, v in sums.items()}
    header = {"base_version": "3", "segment": str(seg), "state": json.dumps(state)}
    acc = np.ascontiguousarray(acc, dtype=np.float64)
    head = encode_header([("acc", acc.dtype, acc.shape)], header)
    atomic_write(store.pending_dir / "checkpoint.safetensors", [head, acc.data.cast("B")])
    for slot in CHECKPOINT_SLOTS:  # that fededge wrote no slots
        (store.pending_dir / slot).unlink(missing_ok=True)
    for s, p in store.segments(3):
        if s <= seg:
            p.unlink()


def _same_state(q: PendingVersion, p: PendingVersion) -> None:
    np.testing.assert_array_equal(q.acc, p.acc)
    assert q.sums.__dict__ == p.sums.__dict__  # ids and devices in order, every sum
    assert q._ids == p._ids and q._per_device == p._per_device


def _run(p: PendingVersion, rng, groups: list[int], start: int = 0) -> list[Update]:
    done: list[Update] = []
    i = start
    for size in groups:
        for _ in range(size):
            u, raw = _update(i, rng, device=f"dev{i % 3}")
            p.stage(u, raw, float(u.num_examples), 1.0)
            i += 1
        done += p.commit()
    return done


def test_an_old_format_checkpoint_is_recovered_and_upgraded(tmp_path) -> None:
    """State left by the previous fededge (full id lists in the checkpoint, no ids file, later
    WAL segments) recovers the same state; the next checkpoint moves the ids to the file."""
    rng = np.random.default_rng(21)
    store = Store(tmp_path)
    p = _pending(store, every=3)
    _run(p, rng, [1] * 7)  # logged, a background checkpoint after each third
    p.close()
    # Rewrite what is on disk as the old code left it: its checkpoint held every id.
    ck = store.load_checkpoint(3)
    assert ck is not None and store.ids_path(3).exists()
    seg, acc, state = ck
    del state["ids_file"]
    assert len(state["ids"]) == 6 and len(store.segments(3)) == 1  # and u6 in the WAL
    _old_format_checkpoint(store, seg, acc, state)
    store.ids_path(3).unlink()
    store.close()

    store = Store(tmp_path)
    q = _pending(store, every=3)
    assert q.recover() == 1
    _same_state(q, p)
    assert q.sums.devices == [f"dev{i % 3}" for i in range(7)]
    done = _run(q, rng, [1, 1, 3, 1], start=7)  # background and checkpoint-path checkpoints
    q.close()
    ck = store.load_checkpoint(3)
    assert ck is not None and ck[2]["ids_file"][0] >= 7  # upgraded: the ids are in the file
    store.close()
    r = _pending(Store(tmp_path), every=3)
    r.recover()
    _same_state(r, q)
    assert r.sums.ids == [f"u{i}" for i in range(7)] + [u.update_id for u in done]


@pytest.mark.parametrize("flush_min", [1, 7])
def test_a_checkpoint_holds_only_the_ids_since_the_previous_one(tmp_path, flush_min) -> None:
    """What a checkpoint encodes does not grow with the version (it did: every id, each time):
    at most the ids since the last append to the ids file, which comes once ``flush_min``
    are waiting (IDS_FLUSH_MIN in production)."""
    rng = np.random.default_rng(22)
    store = Store(tmp_path)
    p = PendingVersion(store, _base(), checkpoint_every=5, max_update_bytes=1 << 20,
                       ids_flush_min=flush_min)  # fmt: skip
    states: list[dict[str, Any]] = []
    write = store.write_checkpoint

    def recording(base: int, seg: int, acc: np.ndarray, meta: dict[str, Any]) -> None:
        states.append(meta)
        write(base, seg, acc, meta)

    store.write_checkpoint = recording  # type: ignore[method-assign,assignment]
    _run(p, rng, [2, 1, 2] * 40)
    p.close()
    assert len(states) >= 40
    assert all(len(s["ids"]) == len(s["devices"]) <= 6 + flush_min - 1 for s in states)
    assert any(len(s["ids"]) > 6 for s in states) == (flush_min > 1)  # held across checkpoints
    sizes = [len(json.dumps(s)) for s in states]
    assert max(sizes[-10:]) < 2 * min(sizes[:10])
    assert states[-1]["ids_file"]["entries"] + len(states[-1]["ids"]) == states[-1]["count"]
    store.close()
    q = _pending(Store(tmp_path))
    q.recover()
    _same_state(q, p)


def _snapshot(pending_dir) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in pending_dir.iterdir()}


@pytest.mark.parametrize("flush_min", [1, 3])
def test_kill_at_any_point_between_file_operations_recovers_exactly_once(
    tmp_path, monkeypatch, flush_min
) -> None:
    """The pending directory as a kill -9 leaves it before every write, fsync, truncate, rename
    and unlink (and halfway through each ids append and checkpoint slot write) recovers exactly
    the updates that were
    acknowledged, or those plus the group being made durable, bit for bit; and goes on."""
    import os
    import pathlib
    import threading

    rng = np.random.default_rng(23)
    store = Store(tmp_path / "live")
    p = PendingVersion(store, _base(), checkpoint_every=2, max_update_bytes=1 << 20,
                       checkpoint_overhead=0, ids_flush_min=flush_min)  # fmt: skip
    snaps: list[tuple[dict[str, bytes], tuple[int, ...]]] = []
    may_hold: tuple[int, ...] = (0,)  # update counts a crash now may leave (set atomically)
    lock = threading.Lock()

    def snap() -> None:
        with lock:
            snaps.append((_snapshot(store.pending_dir), may_hold))

    def hooked(real: Callable[..., Any]) -> Callable[..., Any]:
        def call(*a: Any, **k: Any) -> Any:
            snap()
            return real(*a, **k)

        return call

    real_pwrite = os.pwrite

    def torn_pwrite(fd: int, data: bytes, offset: int) -> int:
        snap()
        n = real_pwrite(fd, data[: max(1, len(data) // 2)], offset)  # a short write...
        snap()  # ...is what a crash mid-append leaves; flush writes the rest
        return n

    real_pwritev = os.pwritev

    def torn_pwritev(fd: int, buffers: list[Any], offset: int) -> int:
        # A checkpoint slot written halfway (prefix and part of the body): fails its CRC.
        snap()
        data = b"".join(bytes(b) for b in buffers)
        n = real_pwritev(fd, [data[: max(1, len(data) // 2)]], offset)
        snap()
        return n

    for name in ("replace", "fsync", "fdatasync", "writev", "ftruncate"):
        monkeypatch.setattr(os, name, hooked(getattr(os, name)))
    monkeypatch.setattr(os, "pwrite", torn_pwrite)
    monkeypatch.setattr(os, "pwritev", torn_pwritev)
    monkeypatch.setattr(pathlib.Path, "unlink", hooked(pathlib.Path.unlink))
    refs = {0: (np.zeros(D + 10), 0.0)}  # count -> (accumulator, total weight)
    everything: list[Update] = []
    i = 0
    for size in [1, 1, 3, 1, 2, 1, 4, 1, 1, 3]:  # >= 3: the checkpoint path
        count = p.sums.count
        may_hold = (count, count + size)
        for _ in range(size):
            u, raw = _update(i, rng, device=f"dev{i % 3}")
            p.stage(u, raw, float(u.num_examples), 1.0)
            everything.append(u)
            i += 1
        assert len(p.commit()) == size
        may_hold = (p.sums.count,)
        refs[p.sums.count] = (p.acc.copy(), p.sums.total_weight)
        p.settle_checkpoints()  # one thread at a time writes: each snapshot is consistent
    p.close()
    snap()
    monkeypatch.undo()
    assert len(snaps) > 100

    for k, (files, allowed) in enumerate(snaps):
        root = tmp_path / f"crash{k}"
        (root / "pending").mkdir(parents=True)
        for name, data in files.items():
            (root / "pending" / name).write_bytes(data)
        q = _pending(Store(root), every=2)
        q.recover()
        q.store.close()  # the lock: recovery took it, r takes it again
        n = q.sums.count
        assert n in allowed, (k, n, allowed)
        acc, weight = refs[n]
        np.testing.assert_array_equal(q.acc, acc)
        assert q.sums.total_weight == weight
        assert q.sums.ids == [u.update_id for u in everything[:n]], k
        assert q.sums.devices == [u.device for u in everything[:n]], k
        # It goes on from there: a restart's checkpoints cut whatever tail the crash left.
        more = _run(q, rng, [1, 3], start=100)
        q.close()
        assert q.store.ids_path(3).stat().st_size == q._ids_file.size  # no torn tail left
        r = _pending(Store(root), every=2)
        r.recover()
        assert r.sums.ids == [u.update_id for u in everything[:n] + more], k
        _same_state(r, q)
        r.close()
        r.store.close()


def test_a_damaged_short_or_missing_ids_file_is_an_error_naming_it(tmp_path) -> None:
    rng = np.random.default_rng(24)
    store = Store(tmp_path)
    p = _pending(store, every=1)
    _run(p, rng, [1] * 6)
    p.close()
    store.close()
    path = store.ids_path(3)
    good = path.read_bytes()
    counted = Store(tmp_path).load_checkpoint(3)[2]["ids_file"][1]  # type: ignore[index]
    assert 0 < counted < len(good)  # the last append is not counted by the checkpoint

    def recover_fails(match: str) -> None:
        q = _pending(Store(tmp_path))
        with pytest.raises(StorageError, match=match) as e:
            q.recover()
        q.store.close()
        assert str(path) in str(e.value)

    data = bytearray(good)
    data[30] ^= 0x01  # bit rot inside the first record
    path.write_bytes(bytes(data))
    recover_fails("damaged at byte 0: CRC mismatch")
    path.write_bytes(good[: counted - 5])
    recover_fails(f"holds only {counted - 5} bytes")
    path.unlink()
    recover_fails("is missing")
    _base_v, seg, acc, state = store._read_checkpoint()  # type: ignore[misc]
    state["ids_file"]["bytes"] = 1 << 50  # a damaged count: refused, never a read of its size
    store.write_checkpoint(3, seg, acc, state)  # into the other slot, as the newer one
    damaged = store.checkpoint_path
    store.close()
    path.write_bytes(good)
    recover_fails(f"holds only {len(good)} bytes")
    damaged.unlink()  # the slot before it is the checkpoint again
    path.write_bytes(good + b"FEW1 torn append, never counted by a checkpoint" * 100)
    q = _pending(Store(tmp_path), every=1)
    q.recover()
    assert q.sums.ids == [f"u{i}" for i in range(6)]
    _run(q, rng, [1], start=6)
    q.close()
    assert path.stat().st_size == q._ids_file.size < len(good) + 100  # the next append cut it


def test_a_failed_ids_append_is_raised_and_loses_nothing(tmp_path, monkeypatch) -> None:
    import os

    rng = np.random.default_rng(25)
    store = Store(tmp_path)
    p = _pending(store, every=1)
    _run(p, rng, [1])
    p.settle_checkpoints()

    def full(*_a: object) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full)
    _run(p, rng, [1], start=1)  # its checkpoint lands (holding u1 itself); the append fails
    with pytest.raises(StorageError, match=r"writing a checkpoint failed: .*No space left"):
        p.settle_checkpoints()
    monkeypatch.undo()
    _run(p, rng, [1], start=2)  # the next checkpoint holds u1 and u2; its append has both
    p.close()
    store.close()
    q = _pending(Store(tmp_path))
    q.recover()
    _same_state(q, p)
    # The last checkpoint counts u0 in the file and holds u1, u2; the file has all three now.
    assert q.store.load_checkpoint(3)[2]["ids_file"][0] == 1  # type: ignore[index]
    path = q.store.ids_path(3)
    assert read_ids(path, 3, 3, path.stat().st_size)[0] == ["u0", "u1", "u2"]


def test_discard_pending_removes_the_ids_files_of_other_versions(tmp_path) -> None:
    store = Store(tmp_path)
    for v in (2, 3):
        store.ids_path(v).write_bytes(b"")
        store.segment_path(v, 0).write_bytes(b"")
    store.discard_pending(keep_base=3)
    assert sorted(f.name for f in store.pending_dir.iterdir()) == [
        "00000003-000000.wal", "00000003.ids"]  # fmt: skip
    store.discard_pending()
    assert list(store.pending_dir.iterdir()) == []


def test_a_fold_waits_for_a_checkpoint_written_from_the_accumulator(tmp_path) -> None:
    """The checkpoint path writes from the accumulator itself: a fold that came while that
    write is running (no caller does today: it is the guard) waits for it, so the checkpoint
    holds exactly the sum it was taken at."""
    import threading

    rng = np.random.default_rng(31)
    store = Store(tmp_path)
    p = _pending(store)  # overhead 0: the checkpoint path
    release, writing = threading.Event(), threading.Event()
    write = store.write_checkpoint

    def slow(base: int, seg: int, acc: np.ndarray, meta: dict[str, Any]) -> None:
        writing.set()
        assert release.wait(30)
        write(base, seg, acc, meta)

    store.write_checkpoint = slow  # type: ignore[method-assign,assignment]
    first = [_update(i, rng) for i in range(2)]
    for u, raw in first:
        p.stage(u, raw, float(u.num_examples), 1.0)
    assert p.begin_commit()
    assert writing.wait(30)
    u2, _ = _update(2, rng)
    folded = threading.Event()

    def fold() -> None:
        p._fold([(u2, 3.0, 1.0)])
        folded.set()

    t = threading.Thread(target=fold)
    t.start()
    assert not folded.wait(0.2)  # held while the checkpoint is written from the accumulator
    release.set()
    t.join(30)
    assert folded.is_set()
    _seg, acc, _state = store.load_checkpoint(3)  # type: ignore[misc]
    np.testing.assert_allclose(acc, _reference([u for u, _ in first]), rtol=1e-12)
    p.finish_commit()
    p.close()
    store.close()


# -- checkpoint slots: written in place, in turn ---------------------------------------------


def _slot_state(store: Store, seg: int) -> None:
    store.write_checkpoint(3, seg, np.full(D, float(seg)), {"count": seg, "ids": [], "devices": []})


def test_checkpoints_alternate_between_two_slots_and_survive_a_torn_write(tmp_path, caplog) -> None:
    """Each checkpoint overwrites the slot not holding the newest one; a write torn anywhere
    (prefix or body) fails its CRC and the slot before it is read; the next write goes over
    the torn one."""
    store = Store(tmp_path)
    slots = [store.pending_dir / name for name in CHECKPOINT_SLOTS]
    _slot_state(store, 1)
    assert store.checkpoint_path == slots[0] and not slots[1].exists()
    _slot_state(store, 2)
    assert store.checkpoint_path == slots[1]
    _slot_state(store, 3)
    assert store.checkpoint_path == slots[0]
    assert store.load_checkpoint(3)[0] == 3  # type: ignore[index]
    store.close()
    good = slots[0].read_bytes()
    n = len(good)
    # Torn at any point: the prefix, the header, the accumulator, or a bit flipped in it.
    for torn in (good[:10], good[:40], good[: n // 2], good[:-1], good[:-8] + b"\x01" * 8):
        slots[0].write_bytes(torn)
        s = Store(tmp_path)
        with caplog.at_level("WARNING"):
            ck = s.load_checkpoint(3)
        assert ck is not None and ck[0] == 2 and ck[1][0] == 2.0  # the slot before it
        assert "checkpoint-0.bin is not valid" in caplog.text
        caplog.clear()
        _slot_state(s, 4)  # over the torn slot, with the next sequence number
        assert s.checkpoint_path == slots[0]
        s.close()
        s = Store(tmp_path)
        assert s.load_checkpoint(3)[0] == 4  # type: ignore[index]
        s.close()
        slots[0].write_bytes(good)
    # A slot of a format this fededge does not know is not read as a checkpoint.
    other = bytearray(good)
    other[4] = 9
    slots[1].write_bytes(bytes(other))
    s = Store(tmp_path)
    assert s.load_checkpoint(3)[0] == 3  # type: ignore[index]
    s.close()


def test_a_torn_checkpoint_recovers_the_acknowledged_state(tmp_path) -> None:
    """Crash while a checkpoint-path group's checkpoint is written (it was never acknowledged):
    recovery is the state before that group, from the other slot and the WAL after it."""
    rng = np.random.default_rng(31)
    store = Store(tmp_path)
    p = _pending(store, every=2)
    _run(p, rng, [1, 1, 1])  # WAL appends, a background checkpoint after the second
    p.settle_checkpoints()
    before = store.checkpoint_path
    acked = (p.acc.copy(), list(p.sums.ids))
    wal = {path: path.read_bytes() for _, path in store.segments(3)}
    assert wal  # u2, logged after the checkpoint before
    p.checkpoint()  # the checkpoint the crash tears (the slot not holding the newest)
    torn = store.checkpoint_path
    assert torn != before
    p.close()
    store.close()
    # The crash came before the write was durable: the segments it covers are still there.
    torn.write_bytes(torn.read_bytes()[:-100])
    for path, data in wal.items():
        path.write_bytes(data)
    q = _pending(Store(tmp_path), every=2)
    q.recover()
    assert q.sums.ids == acked[1]
    np.testing.assert_array_equal(q.acc, acked[0])
    q.close()
    q.store.close()


def test_a_store_dropped_without_close_leaves_no_open_files(tmp_path) -> None:
    """Checkpoint slots stay open between writes; a Store that is never closed (an error path)
    must not leak them: a test suite that leaked ~850 descriptors pushed its MQTT sockets past
    select()'s limit of 1024, and clients stopped receiving their CONNACK."""
    import gc
    import os

    def open_fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    before = open_fds()
    for i in range(20):
        store = Store(tmp_path / str(i))
        _slot_state(store, 1)
        _slot_state(store, 2)
        del store
    gc.collect()
    assert open_fds() <= before


# --- checkpoints with direct I/O --------------------------------------------------------------


def _direct_io_supported(directory) -> bool:
    """Whether the file system under ``directory`` takes O_DIRECT (ext4, xfs: yes; tmpfs: no)."""
    import os

    probe = directory / ".direct-probe"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o644)
    except OSError:
        return False
    os.close(fd)
    probe.unlink()
    return True


def _ck(store: Store) -> tuple[int, np.ndarray, dict[str, Any]]:
    ck = store.load_checkpoint(3)
    assert ck is not None
    return ck


def _big_acc(n: int, seed: int) -> np.ndarray:
    from fededge.memory import page_aligned_zeros

    acc = page_aligned_zeros(n)
    acc[:] = np.random.default_rng(seed).normal(size=n)
    return acc


def test_large_checkpoints_use_direct_io_and_read_back_bitwise(tmp_path) -> None:
    """An accumulator of 256 KiB and more, page-aligned, is written with O_DIRECT from its own
    memory (the header padded so the data starts on a page; a last partial page padded with
    zeros after the body); it reads back bit for bit, from whichever slot is newest."""
    from fededge.memory import PAGE

    if not _direct_io_supported(tmp_path):
        pytest.skip(f"{tmp_path} has no O_DIRECT")
    store = Store(tmp_path / "s")
    n = 100_003  # 800,024 bytes: not a whole number of pages
    for k in range(3):
        acc = _big_acc(n, k)
        store.write_checkpoint(3, k, acc, {"count": k, "ids": [f"u{k}"], "devices": ["d"]})
        assert store.direct_writes == k + 1 and store.direct_io
        seg, got, state = _ck(store)
        assert seg == k and state["count"] == k and state["ids"] == [f"u{k}"]
        assert got.tobytes() == acc.tobytes()
        slot = store.checkpoint_path.read_bytes()
        assert len(slot) % PAGE == 0
        assert slot[-8:] == bytes(8)  # the zeros after the body
    store.close()
    # A new process (store) reads the newest, and keeps writing with direct I/O.
    again = Store(tmp_path / "s")
    assert _ck(again)[1].tobytes() == _big_acc(n, 2).tobytes()
    again.close()


def test_a_direct_checkpoint_torn_midway_falls_back_to_the_previous_one(tmp_path) -> None:
    """A crash during a direct write can leave any subset of its pages on disk: the slot
    fails its CRC and the other slot's checkpoint is read."""
    if not _direct_io_supported(tmp_path):
        pytest.skip(f"{tmp_path} has no O_DIRECT")
    store = Store(tmp_path / "s")
    n = 70_000
    store.write_checkpoint(3, 0, _big_acc(n, 0), {"count": 1, "ids": [], "devices": []})
    store.write_checkpoint(3, 1, _big_acc(n, 1), {"count": 2, "ids": [], "devices": []})
    assert store.direct_writes == 2
    newest = store.checkpoint_path
    store.close()
    data = bytearray(newest.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 4096] = bytes(4096)  # a page that never landed
    newest.write_bytes(bytes(data))
    again = Store(tmp_path / "s")
    seg, acc, state = _ck(again)
    assert seg == 0 and state["count"] == 1 and acc.tobytes() == _big_acc(n, 0).tobytes()
    again.close()


@pytest.mark.parametrize("refused_by", ["open", "write"])
def test_checkpoints_fall_back_to_the_page_cache_without_direct_io(
    tmp_path, monkeypatch, refused_by
) -> None:
    """Where the file system refuses O_DIRECT (EINVAL: when the file is opened, or at the
    first write, as for an alignment it does not take), direct I/O is off for the store, and
    that checkpoint and the next are written through the page cache and read back; an
    accumulator that is small or not page-aligned always is."""
    import errno
    import fcntl
    import os

    real_open, real_pwritev = os.open, os.pwritev

    def open_(path, flags, *a):
        if flags & os.O_DIRECT and refused_by == "open":
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *a)

    def pwritev(fd, buffers, offset):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_pwritev(fd, buffers, offset)

    monkeypatch.setattr(os, "open", open_)
    monkeypatch.setattr(os, "pwritev", pwritev)
    store = Store(tmp_path / "s")
    for k in range(2):
        acc = _big_acc(90_000, k)
        store.write_checkpoint(3, k, acc, {"count": k, "ids": [], "devices": []})
        assert not store.direct_io and store.direct_writes == 0
        assert _ck(store)[1].tobytes() == acc.tobytes()
    store.close()
    monkeypatch.undo()
    store = Store(tmp_path / "t")
    unaligned = np.zeros(90_001)[1:]  # 8 bytes past an aligned start at best
    unaligned[:] = 1.5
    store.write_checkpoint(3, 0, unaligned, {"count": 0, "ids": [], "devices": []})
    assert _ck(store)[1].tobytes() == unaligned.tobytes()
    store.write_checkpoint(3, 1, _big_acc(1000, 0), {"count": 0, "ids": [], "devices": []})
    assert store.direct_writes == 0 and store.direct_io
    assert _ck(store)[1].tobytes() == _big_acc(1000, 0).tobytes()
    store.close()


def test_with_direct_io_large_groups_take_the_checkpoint_path_and_recover_exactly(
    tmp_path,
) -> None:
    """With direct I/O a checkpoint's bytes cost ~0.3 of the WAL's: a group of two updates of
    a 300,000-parameter model (2.4 MB) is made durable by a checkpoint (2.4 MB of accumulator,
    costed 0.72 MB, plus the 1 MB overhead), where without it the WAL takes it; both recover
    the same state bit for bit after the process is gone."""
    d = 300_000
    base = ModelVersion(task="t", version=3, weights={"a": np.zeros(d, np.float32)},
                        graph_sha256="0" * 64)  # fmt: skip
    rng = np.random.default_rng(5)
    ups = []
    for i in range(6):
        u = Update(task="t", device=f"d{i}", update_id=f"u{i}", base_version=3,
                   num_examples=i + 1, delta={"a": rng.normal(size=d).astype(np.float32)})  # fmt: skip
        ups.append((u, u.to_bytes()))
    accs = {}
    for direct in (True, False):
        store = Store(tmp_path / f"s{direct}", direct_io=direct)
        p = PendingVersion(store, base, checkpoint_every=1000, max_update_bytes=1 << 24)
        for j in range(0, 6, 2):
            for u, raw in ups[j : j + 2]:
                p.stage(u, raw, float(u.num_examples), 1.0)
            assert len(p.commit()) == 2
        p.settle_checkpoints()
        wal = list(store.pending_dir.glob("*.wal"))
        if direct and _direct_io_supported(tmp_path):
            assert store.direct_writes == 3 and not wal  # every group: a direct checkpoint
        elif not direct:
            assert store.direct_writes == 0 and wal  # the WAL
        accs[direct] = p.acc.copy()
        p.close()
        store.close()
        again = Store(tmp_path / f"s{direct}", direct_io=direct)
        q = PendingVersion(again, base, checkpoint_every=1000, max_update_bytes=1 << 24)
        q.recover()
        assert q.sums.count == 6 and q.acc.tobytes() == accs[direct].tobytes()
        q.close()
        again.close()
    assert accs[True].tobytes() == accs[False].tobytes()
