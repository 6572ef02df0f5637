"""The pending version: a streaming weighted sum that is durable before anything is acknowledged.

Protocol of one group commit (see docs/decisions.md, "Durability"):
1. ``stage(update, raw, weight)`` holds each accepted update of the current batch;
2. ``commit()`` appends the group's raw bytes to the WAL segment and fsyncs once, then folds
   the group into the float64 accumulator with the Numba kernel — or, for a group larger
   than the accumulator, folds first and writes a checkpoint instead (fewer bytes to disk);
   only after ``commit()`` returns may the caller acknowledge;
3. every ``checkpoint_every`` records the accumulator is checkpointed and a new segment begins.
After ``kill -9``, ``recover()`` loads the checkpoint and replays the later segments in their
original order, so the recovered sum is bit-identical to the one that was acknowledged.

A checkpoint holds the update ids and devices folded since the previous one; the earlier ones
are appended to the version's ids file (``store.IdsFile``) after each checkpoint, so its cost
does not grow with the version.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import weakref
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from fededge.aggregator import kernels
from fededge.aggregator.policy import Layout
from fededge.aggregator.rotated import Domain
from fededge.aggregator.store import DIRECT_MIN, IdsFile, Store
from fededge.aggregator.wal import SegmentWriter, read_segment
from fededge.errors import NotReadyError, ProtocolError, StorageError
from fededge.memory import is_page_aligned, page_aligned_copy, page_aligned_zeros
from fededge.protocol import ModelVersion, Plan, Update
from fededge.protocol.clipping import unclipped_fraction

log = logging.getLogger(__name__)

# What a checkpoint costs beyond its bytes, in bytes of WAL: its state (JSON with the ids not
# yet in the ids file), the CRC of the whole slot, and (when it was a new file renamed into
# place, two fsyncs and metadata writes) the latency. Without it a group of small updates (2.4k
# parameters: 20 x 10 KB > 19 KB of accumulator) took the checkpoint path at every commit.
CHECKPOINT_OVERHEAD = 1 << 20
#: Ids a checkpoint holds itself before they are appended to the ids file (bounds its state).
IDS_FLUSH_MIN = 512
#: CPU of a checkpoint's byte written with direct I/O, against one through the page cache
#: (8 MB with fdatasync: 0.30 ms against 1.04; ext4 on this machine's virtual disk).
DIRECT_COST = 0.3


class _SyncThread:
    """Runs one job at a time (a WAL group's fsync) on its own thread.

    What ``ThreadPoolExecutor(1).submit`` did per group, without its per-call Future (a
    Condition and its lock), work item, queue and thread-count check: two locks hand the job
    over and back. ``submit`` returns the thread itself as the job's handle, with the part of
    the Future interface the pending version uses: ``exception()`` waits for the job and
    returns what it raised (None if nothing), ``result()`` waits and raises it. The thread ends
    at ``shutdown()``, or once this object is garbage (as an executor's would).
    """

    def __init__(self, name: str) -> None:
        self._go = threading.Lock()
        self._go.acquire()
        self._done = threading.Lock()
        self._done.acquire()
        self._job: Callable[[], object] | None = None
        self._busy = False  # a job submitted and not yet waited for
        self._error: BaseException | None = None
        self._thread = threading.Thread(
            target=_sync_worker, args=(weakref.ref(self), self._go, self._done), name=name,
            daemon=True,
        )  # fmt: skip
        weakref.finalize(self, _wake, self._go)
        self._thread.start()

    def submit(self, job: Callable[[], object]) -> _SyncThread:
        if self._busy:
            raise NotReadyError("a job is still running on the WAL sync thread")
        self._busy, self._error, self._job = True, None, job
        self._go.release()
        return self

    def exception(self) -> BaseException | None:
        if self._busy:
            self._done.acquire()
            self._busy = False
        return self._error

    def result(self) -> None:
        error = self.exception()
        if error is not None:
            raise error

    def shutdown(self) -> None:
        """Wait for the job running, if any, and end the thread."""
        self.exception()
        self._job = None
        self._go.release()
        self._thread.join()


def _sync_worker(ref: weakref.ref[_SyncThread], go: threading.Lock, done: threading.Lock) -> None:
    while True:
        go.acquire()
        owner = ref()
        if owner is None:  # garbage: nobody waits for anything
            return
        job, owner._job = owner._job, None
        if job is None:  # shutdown
            return
        try:
            job()
        except BaseException as e:  # as a Future: raised to whoever waits for it
            owner._error = e
        del owner
        done.release()


def _wake(go: threading.Lock) -> None:
    """Let the worker of a collected _SyncThread see that it is gone."""
    with contextlib.suppress(RuntimeError):  # a job handed over, not yet taken: it wakes anyway
        go.release()


def dedup_key(device: str, update_id: str) -> str:
    """The key under which an update is remembered (names cannot contain '/')."""
    return f"{device}/{update_id}"


@dataclass
class _Sums:
    """Everything about the pending version apart from the accumulator itself."""

    count: int = 0
    examples: int = 0
    total_weight: float = 0.0
    loss_w: float = 0.0  # sum of weight * train_loss over updates that reported one
    loss_wsum: float = 0.0
    eval_loss_w: float = 0.0
    eval_acc_w: float = 0.0
    eval_wsum: float = 0.0
    norm_sum: float = 0.0
    domain: str = "none"  # the accumulator's rotation (fededge/aggregator/rotated.py)
    bit_sum: float = 0.0  # adaptive clipping: sum of the centred noised bits (count: bit_count)
    bit_count: int = 0
    ids: list[str] = field(default_factory=list)
    devices: list[str] = field(default_factory=list)  # the sender of each id, same order
    started: float = field(default_factory=time.time)

    def add_group(self, group: Sequence[tuple[Update, float, float]]) -> None:
        """``add`` each (update, weight, norm) in order: the same sums, bit for bit (each is
        added in the same order), with the fields read and written once per group."""
        count, examples, total_weight, norm_sum = (
            self.count, self.examples, self.total_weight, self.norm_sum)  # fmt: skip
        ids, devices = self.ids, self.devices
        for update, weight, norm in group:
            count += 1
            examples += update.num_examples
            total_weight += weight
            norm_sum += norm
            if not (
                update.train_loss is None
                and update.eval_loss is None
                and update.eval_accuracy is None
                and update.unclipped is None
            ):
                self._add_metrics(update, weight)
            ids.append(update.update_id)
            devices.append(update.device)
        self.count, self.examples, self.total_weight, self.norm_sum = (
            count, examples, total_weight, norm_sum)  # fmt: skip

    def _add_metrics(self, update: Update, weight: float) -> None:
        if update.train_loss is not None:
            self.loss_w += weight * update.train_loss
            self.loss_wsum += weight
        if update.eval_loss is not None and update.eval_accuracy is not None:
            self.eval_loss_w += weight * update.eval_loss
            self.eval_acc_w += weight * update.eval_accuracy
            self.eval_wsum += weight
        if update.unclipped is not None:  # range-checked by policy.check_bit
            self.bit_sum += update.unclipped
            self.bit_count += 1

    def add(self, update: Update, weight: float, norm: float) -> None:
        self.add_group(((update, weight, norm),))

    def keys(self) -> list[str]:
        """Deduplication keys: an update id counts per device, so no device can squat another's."""
        return [dedup_key(d, u) for d, u in zip(self.devices, self.ids, strict=True)]


class PendingVersion:
    """The accumulator of the version after ``base``, with its WAL and checkpoints."""

    def __init__(
        self,
        store: Store,
        base: ModelVersion,
        *,
        checkpoint_every: int,
        checkpoint_min_bytes: int = 0,
        parallel: bool = False,
        max_update_bytes: int,
        rotated: bool = False,
        checkpoint_overhead: int = CHECKPOINT_OVERHEAD,
        ids_flush_min: int = IDS_FLUSH_MIN,
    ) -> None:
        self.store = store
        self._overhead = checkpoint_overhead
        self.base = base
        self.layout = Layout.of(base.weights)
        self.domain = Domain(base, self.layout.size, rotated)
        self.acc: NDArray[np.float64] = page_aligned_zeros(self.domain.acc_size)
        self.sums = _Sums(domain=self.domain.name)
        self._ids: set[str] = set()
        # The ids and devices of sums handed to checkpoints go to the ids file (on the
        # checkpoint thread); _ids_given: how many so far.
        self._ids_file = IdsFile(store.ids_path(base.version), base.version, fsync=store.fsync)
        self._ids_given = 0
        # Ids handed to checkpoints up to here are in the ids file or in a flush job queued
        # already: the next flush job is queued once ids_flush_min more have been handed on.
        self._ids_flush_from = 0
        self._ids_flush_min = ids_flush_min
        self._checkpoint_every = checkpoint_every
        self._checkpoint_min_bytes = checkpoint_min_bytes
        self._wal_bytes = 0  # logged since the last checkpoint
        self._parallel = parallel
        self._max = max_update_bytes
        self._segment = 0
        self._since_checkpoint = 0
        self._group = 0
        self._staged: list[tuple[Update, float, float]] = []
        self._staged_raw: list[bytes] = []
        self._writer: SegmentWriter | None = None
        # A group written to the WAL whose fsync runs in the background (``begin_commit``).
        self._inflight: list[tuple[Update, float, float]] = []
        self._inflight_folded = False  # checkpoint path: folded already, its checkpoint runs
        # Staged and in-flight updates by key, and those not folded yet by device: the
        # duplicate and quota checks of every update look here (sets, not scans of the groups).
        self._waiting_keys: set[str] = set()
        self._unfolded_devices: Counter[str] = Counter()
        self._sync: Future[None] | _SyncThread | None = None
        self._syncer: _SyncThread | None = None
        self._checkpointer: ThreadPoolExecutor | None = None
        self._checkpoints: list[Future[None]] = []  # background checkpoints not yet checked
        self._spare_accs: list[NDArray[np.float64]] = []  # copies written already (reused)
        self._acc_reader: Future[None] | None = None  # a checkpoint written from self.acc
        self._per_device: Counter[str] = Counter()  # folded updates by device (from the WAL)
        # Robust aggregation (fededge/aggregator/robust.py) reads every update of the version
        # back from the WAL: while set, nothing is checkpointed (which would delete segments);
        # segments still roll every checkpoint_every records, so recovery reads one at a time.
        self.keep_log = False

    # -- recovery ---------------------------------------------------------------------------
    def recover(self) -> int:
        """Restore the acknowledged state from checkpoint + WAL; return the records replayed."""
        version = self.base.version
        self.store.discard_pending(keep_base=version)
        ck = self.store.load_checkpoint(version)
        covered = -1  # segments up to this one are inside the checkpoint
        if ck is not None:
            seg, acc, state = ck
            covered = seg
            if state.get("domain", "none") != self.domain.name:  # the plan changed meanwhile
                self.domain = Domain(self.base, self.layout.size, not self.domain.rotation)
            if acc.shape != (self.domain.acc_size,):
                raise StorageError(
                    f"checkpoint holds {acc.size} parameters, the model has {self.domain.acc_size}"
                )
            self.acc = acc
            entries, size = state.pop("ids_file")
            try:
                self.sums = _Sums(**state)
            except TypeError as e:  # a key this version does not know (a newer fededge's)
                path = self.store.checkpoint_path
                raise StorageError(f"checkpoint {path} is unreadable: {e}") from None
            self._ids = set(self.sums.keys())
            self._per_device = Counter(self.sums.devices)
            self._segment = seg + 1
            # The ids the checkpoint held itself are queued for the ids file (all of them
            # after a checkpoint written before there were ids files: the next one upgrades).
            ids, devices = self.sums.ids, self.sums.devices
            self._ids_file = IdsFile(
                self.store.ids_path(version), version, fsync=self.store.fsync,
                entries=entries, size=size, ids=ids[entries:], devices=devices[entries:],
            )  # fmt: skip
            self._ids_given = len(ids)
            self._ids_flush_from = entries
        replayed = 0
        for seg, path in self.store.segments(version):
            if seg <= covered:
                # A crash between writing the checkpoint and unlinking the segments it covers
                # leaves them behind: replaying them would count their updates twice.
                path.unlink()
                continue
            group: list[tuple[Update, float, float]] = []
            group_id = None
            for rec in read_segment(path, repair=True):
                try:
                    update = Update.from_bytes(rec.payload, max_bytes=self._max)
                except ProtocolError as e:
                    raise StorageError(f"WAL {path}: logged update is undecodable: {e}") from None
                if rec.header["group"] != group_id and group:
                    self._fold(group)
                    group = []
                group_id = rec.header["group"]
                self._adopt_domain(rec.header.get("domain", "none"))
                group.append((update, float(rec.header["weight"]), float(rec.header["norm"])))
                replayed += 1
            if group:
                self._fold(group)
            self._segment = max(self._segment, seg + 1)
            self._group = max(self._group, int(group_id or 0) + 1)
        self._since_checkpoint = replayed
        self._wal_bytes = sum(p.stat().st_size for _, p in self.store.segments(version))
        return replayed

    def _adopt_domain(self, name: str) -> None:
        """Before anything is folded, switch to the domain the WAL was written in (the plan
        may have changed rotation between the commit and this restart)."""
        if name != self.domain.name and self.sums.count == 0 and not self.acc.any():
            self.domain = Domain(self.base, self.layout.size, name == "hadamard")
            self.acc = page_aligned_zeros(self.domain.acc_size)
            self.sums.domain = self.domain.name

    # -- ingest -----------------------------------------------------------------------------
    def has(self, key: str) -> bool:
        """Whether the update with this dedup key is folded into durable state."""
        return key in self._ids

    def is_staged(self, key: str) -> bool:
        """Whether the update with this dedup key waits in the current group commit."""
        return key in self._waiting_keys

    def device_count(self, device: str) -> int:
        """Updates of ``device`` in this version, folded or staged (max_updates_per_device).

        Derived from durable state: the checkpoint's ``devices`` and the replayed WAL rebuild
        it after a crash, so the quota survives ``kill -9``.
        """
        return self._per_device[device] + self._unfolded_devices[device]

    def stage(self, update: Update, raw: bytes, weight: float, norm: float) -> None:
        """Hold an accepted update for the next group commit (not yet durable, not folded)."""
        self._staged.append((update, weight, norm))
        self._waiting_keys.add(dedup_key(update.device, update.update_id))
        self._unfolded_devices[update.device] += 1
        self._staged_raw.append(raw)

    def commit(self) -> list[Update]:
        """Make the staged group durable and fold it; return the updates now safe to ack.

        Two durable paths, whichever costs less: a group smaller than the accumulator (plus
        ``CHECKPOINT_OVERHEAD``) is appended to the WAL (one fsync), then folded; a larger
        group is folded first and the accumulator checkpointed (one atomic file), which makes
        the WAL so far redundant.
        """
        if self._inflight:
            raise NotReadyError("commit() with a group in flight: finish_commit() it first")
        self._raise_failed_checkpoint()
        if not self._staged:
            return []
        group, raws = self._staged, self._staged_raw
        self._staged, self._staged_raw = [], []
        if self._checkpoint_path(raws):
            self._fold(group)
            self.checkpoint()
            return self._settled(group)
        self._append_group(group, raws)
        assert self._writer is not None
        self._writer.commit()
        self._fold(group)
        self._after_fold(len(group))
        return self._settled(group)

    @property
    def in_flight(self) -> int:
        """Updates written by ``begin_commit`` and not yet finished."""
        return len(self._inflight)

    def begin_commit(self) -> bool:
        """Start writing the staged group to the WAL and its fsync, in the background.

        The pipelined form of ``commit``: while the disk works (the fsync releases the GIL),
        the caller validates and stages the next group; ``finish_commit`` then waits for the
        fsync and folds. Nothing may be acknowledged before ``finish_commit`` returns. A group
        on the checkpoint path is folded now and its checkpoint written in the background
        (from a copy of the accumulator) instead.
        """
        if self._inflight:
            raise NotReadyError("begin_commit() with a group in flight: finish_commit() it first")
        self._raise_failed_checkpoint()
        if not self._staged:
            return True
        if self._checkpoint_path(self._staged_raw):
            self._fold(self._staged)
            # Written from the accumulator itself, not a copy: nothing folds until this group
            # is finished, and _fold waits for the write if anything tried.
            self._sync = self._checkpoint_job(background=True, direct=True)
            self._inflight, self._inflight_folded = self._staged, True
            self._staged, self._staged_raw = [], []
            return True
        self._append_group(self._staged, self._staged_raw)
        assert self._writer is not None
        if self._syncer is None:
            self._syncer = _SyncThread("fededge-wal-sync")
        # The writev too, not only the fsync: each system call on this thread releases the
        # GIL, and taking it back from a busy MQTT network thread can take a switch interval
        # (5 ms). Nothing appends to the writer before finish_commit has waited for this.
        self._sync = self._syncer.submit(self._writer.commit)
        self._inflight = self._staged
        self._staged, self._staged_raw = [], []
        return True

    def finish_commit(self) -> list[Update]:
        """Wait for the fsync of the group in flight and fold it; return its updates."""
        if not self._inflight:
            return []
        assert self._sync is not None
        group, self._inflight = self._inflight, []
        sync, self._sync = self._sync, None
        try:
            sync.result()  # an OSError of the fsync is raised here, before anything is acked
        except OSError as e:
            raise StorageError(f"making a group of updates durable failed: {e}") from e
        if self._inflight_folded:
            self._inflight_folded = False
            return self._settled(group)
        self._fold(group)
        self._after_fold(len(group))
        return self._settled(group)

    def _checkpoint_path(self, raws: list[bytes]) -> bool:
        """Whether a group is cheaper to make durable by a checkpoint than by the WAL (never
        while ``keep_log``: robust aggregation reads every update back from the WAL)."""
        if self.keep_log:
            return False
        # Written with direct I/O, a checkpoint's bytes cost less than the WAL's (no copy into
        # the page cache, no writeback): 1M parameters then take it at every group commit.
        cost = self.acc.nbytes
        if self.store.direct_io and cost >= DIRECT_MIN and is_page_aligned(self.acc):
            cost = int(cost * DIRECT_COST)
        return sum(len(r) for r in raws) >= cost + self._overhead

    def _after_fold(self, n: int) -> None:
        """Count a folded group; checkpoint when due (``keep_log``: start a new segment)."""
        self._since_checkpoint += n
        if not self._checkpoint_due():
            return
        if self.keep_log:  # a new segment, no checkpoint: the version's updates stay on disk
            if self._writer is not None:
                self._writer.close()
                self._writer = None
            self._segment += 1
            self._since_checkpoint = self._wal_bytes = 0
        else:
            self.checkpoint(background=True)

    def _checkpoint_due(self) -> bool:
        # Both: a checkpoint bounds replay, and below a few MiB of WAL replay is quick while a
        # checkpoint costs a new file, two fsyncs and a segment (small models: every 32
        # updates of 10 KB was a checkpoint per 320 KB).
        return (
            self._since_checkpoint >= self._checkpoint_every
            and self._wal_bytes >= self._checkpoint_min_bytes
        )

    def _settled(self, group: list[tuple[Update, float, float]]) -> list[Update]:
        """The updates of a group now durable and folded (no longer waiting)."""
        self._waiting_keys.difference_update(dedup_key(u.device, u.update_id) for u, _, _ in group)
        return [u for u, _, _ in group]

    def _append_group(self, group: list[tuple[Update, float, float]], raws: list[bytes]) -> None:
        """Append a group's records to the current WAL segment (not written yet)."""
        if self._writer is None:
            self._writer = SegmentWriter(
                self.store.segment_path(self.base.version, self._segment), fsync=self.store.fsync
            )
        self._wal_bytes += sum(map(len, raws))
        if self.domain.rotation is None:
            self._writer.append_updates(
                self._group,
                [(u.update_id, w, n, raw) for (u, w, n), raw in zip(group, raws, strict=True)],
            )
        else:
            for (update, weight, norm), raw in zip(group, raws, strict=True):
                header = {"id": update.update_id, "weight": weight, "norm": norm,
                          "group": self._group, "domain": self.domain.name}  # fmt: skip
                self._writer.append(header, raw)  # the domain: a replay sums in the same one
        self._group += 1

    def checkpoint(self, *, background: bool = False) -> None:
        """Persist the accumulator and start a new WAL segment.

        ``background``: for a checkpoint that only bounds replay (the updates it covers are
        durable in the WAL already), written by a worker thread from a copy of the state while
        ingest goes on; a crash before it lands replays the segments instead. Checkpoints are
        written in order by one thread; a failed one is raised by the next commit.
        """
        job = self._checkpoint_job(background=background, track=background)
        if not background:
            job.result()

    def _checkpoint_job(
        self, *, background: bool, track: bool = False, direct: bool = False
    ) -> Future[None]:
        """Queue a checkpoint of the state now (a copy if ``background``) on the one thread
        (``track``: a failure is raised by a later commit, not by waiting for the job;
        ``direct``: in the background, but from the accumulator itself, which ``_fold`` then
        leaves alone until the write is done: 8 MB less to copy per 1M-parameter group).

        The copy holds the ids and devices folded since the previous checkpoint, not the whole
        lists (the main thread goes on appending to those): the checkpoint thread queues them
        in the ids file, writes the checkpoint with those not in the file yet, then appends
        them to the file (a second job, waited for by nobody; a failure is raised as a failed
        checkpoint's). What a checkpoint encodes is the model and the updates since the last.
        """
        self._raise_failed_checkpoint()
        # The segment's file is closed by the checkpoint thread: close() releases the GIL,
        # and taking it back from a busy MQTT network thread took the main thread ~8 ms per
        # checkpoint at 2,410 parameters (no fsync runs on it: none is in flight here).
        writer, self._writer = self._writer, None
        sums = self.sums
        state = {k: v for k, v in sums.__dict__.items() if k not in ("ids", "devices")}
        first, self._ids_given = self._ids_given, len(sums.ids)
        ids, devices = sums.ids[first:], sums.devices[first:]
        copy = background and not direct
        acc = self._copy_of_acc() if copy else self.acc
        if self._checkpointer is None:
            self._checkpointer = ThreadPoolExecutor(1, thread_name_prefix="fededge-checkpoint")
        job = self._checkpointer.submit(
            _write_checkpoint, self.store, self._ids_file, self.base.version, self._segment, acc,
            state, first, ids, devices, writer,
        )  # fmt: skip
        if copy:  # its copy is free again once written (or failed)
            job.add_done_callback(lambda _job: self._spare_accs.append(acc))
        elif background:
            self._acc_reader = job
        if track:
            self._checkpoints.append(job)
        # After the checkpoint (which holds them): a crash in between tears only this append.
        # Only once IDS_FLUSH_MIN are queued: on the checkpoint path (large models) there is a
        # checkpoint per group, and an fsync more per group queued before the next group's
        # checkpoint doubled the time to durability (1M parameters: 0.83 -> 0.59 of raw).
        # Counted here, so that no job is queued that would find too few (each queued job
        # wakes the checkpoint thread: ~0.3 ms of the main thread per 1M-parameter group).
        if self._ids_given - self._ids_flush_from >= self._ids_flush_min:
            self._ids_flush_from = self._ids_given
            self._checkpoints.append(
                self._checkpointer.submit(self._ids_file.flush, self._ids_flush_min)
            )
        self._segment += 1
        self._since_checkpoint = self._wal_bytes = 0
        return job

    def _copy_of_acc(self) -> NDArray[np.float64]:
        """A copy of the accumulator for a background checkpoint, into a buffer a finished one
        gave back if there is one: a fresh 8 MB array (1M parameters) per checkpoint is 2,048
        pages the kernel faults in and zeroes first."""
        spare = self._spare_accs
        while spare:
            buf = spare.pop()
            if buf.shape == self.acc.shape:
                np.copyto(buf, self.acc)
                return buf
        return page_aligned_copy(self.acc)  # direct I/O writes it from its own pages

    def settle_checkpoints(self) -> None:
        """Wait for the background checkpoints (they delete WAL segments they cover); raise
        a failed one. For readers of the segments, such as robust aggregation."""
        for job in self._checkpoints:
            job.exception()  # waits
        self._raise_failed_checkpoint()

    def _raise_failed_checkpoint(self) -> None:
        while self._checkpoints and self._checkpoints[0].done():
            error = self._checkpoints.pop(0).exception()
            if error is not None:
                raise StorageError(f"writing a checkpoint failed: {error}") from error

    def _fold(self, group: Sequence[tuple[Update, float, float]]) -> None:
        # One pass over the accumulator per 8 updates; bitwise equal to folding one at a time,
        # so WAL replay with other group boundaries reproduces the same sum.
        # Encoded updates (f16, int8) go through fused dequantise-accumulate kernels.
        pairs = [(u, w) for u, w, _ in group]
        reader, self._acc_reader = self._acc_reader, None
        if reader is not None:  # a checkpoint is being written from the accumulator
            reader.exception()  # waits; its error is raised by whoever waits for its result
        self.domain.fold(self.acc, self.layout, pairs, parallel=self._parallel)
        self.sums.add_group(group)
        ids, per_device, waiting = self._ids, self._per_device, self._waiting_keys
        unfolded = self._unfolded_devices
        for update, _, _ in group:
            device = update.device
            key = dedup_key(device, update.update_id)
            ids.add(key)
            per_device[device] += 1
            if key in waiting:  # not during recovery
                unfolded[device] -= 1

    # -- completion -------------------------------------------------------------------------
    def finalize(self, server_lr: float) -> dict[str, NDArray[np.float32]]:
        """The next version's weights: base + server_lr * weighted mean delta."""
        if self.sums.total_weight <= 0:
            raise NotReadyError("cannot finalize a version without updates")
        out: dict[str, NDArray[np.float32]] = {}
        acc = self.domain.delta_sum(self.acc)  # unrotated once (issue 13)
        for (name, sl), shape in zip(self.layout.slices(), self.layout.shapes, strict=True):
            base = np.ascontiguousarray(self.base.weights[name], dtype=np.float32).reshape(-1)
            new = kernels.finalize(base, acc[sl], self.sums.total_weight, server_lr)
            out[name] = new.reshape(shape)
        return out

    def finalize_with(
        self, plan: Plan, m: NDArray[np.float64], v: NDArray[np.float64]
    ) -> tuple[dict[str, NDArray[np.float32]], NDArray[np.float64], NDArray[np.float64]]:
        """The next version under ``plan.server_optimizer`` (not ``sgd``), from state (m, v).

        One fused Numba pass per tensor computes the mean delta, the new optimizer state and
        the next weights (``kernels.server_step``); returns (weights, new m, new v), leaving
        ``m`` and ``v`` untouched.
        """
        if self.sums.total_weight <= 0:
            raise NotReadyError("cannot finalize a version without updates")
        acc = self.domain.delta_sum(self.acc)
        return server_step_tensors(
            self.base.weights, self.layout, acc, self.sums.total_weight, plan, m, v
        )

    def metrics(self) -> dict[str, Any]:
        s = self.sums
        return {
            "updates": s.count,
            "examples": s.examples,
            "train_loss": s.loss_w / s.loss_wsum if s.loss_wsum else None,
            "eval_loss": s.eval_loss_w / s.eval_wsum if s.eval_wsum else None,
            "eval_accuracy": s.eval_acc_w / s.eval_wsum if s.eval_wsum else None,
            "mean_update_norm": s.norm_sum / s.count if s.count else None,
            "unclipped": unclipped_fraction(s.bit_sum, s.bit_count) if s.bit_count else None,
        }

    def close(self) -> None:
        if self._sync is not None:
            # Written, maybe not durable, never acknowledged: let the fsync end before the
            # file is closed (recovery replays it, and the resent updates are duplicates).
            self._sync.exception()
        if self._syncer is not None:
            self._syncer.shutdown()  # waits for the fsync
        if self._checkpointer is not None:
            self._checkpointer.shutdown()  # waits for the checkpoints queued
        self._syncer = self._checkpointer = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _write_checkpoint(
    store: Store,
    ids_file: IdsFile,
    base_version: int,
    seg: int,
    acc: NDArray[np.float64],
    state: dict[str, Any],
    first: int,
    ids: list[str],
    devices: list[str],
    writer: SegmentWriter | None = None,
) -> None:
    """On the checkpoint thread: the checkpoint of ``state`` and ``acc``, whose ids and devices
    are those durable in ``ids_file`` plus the ones queued there, ``ids`` (from ``first``) last;
    first closes ``writer``, the segment the checkpoint covers."""
    if writer is not None:
        writer.close()
    ids_file.add(first, ids, devices)
    meta = {
        **state,
        "ids": list(ids_file.ids),  # not in the file yet: the checkpoint holds them itself
        "devices": list(ids_file.devices),
        "ids_file": {"entries": ids_file.entries, "bytes": ids_file.size},
    }
    store.write_checkpoint(base_version, seg, acc, meta)


def server_step_tensors(
    base_weights: dict[str, NDArray[np.float32]],
    layout: Layout,
    acc: NDArray[np.float64],
    total_weight: float,
    plan: Plan,
    m: NDArray[np.float64],
    v: NDArray[np.float64],
) -> tuple[dict[str, NDArray[np.float32]], NDArray[np.float64], NDArray[np.float64]]:
    """Apply the plan's server optimizer to ``acc / total_weight`` over the flat layout."""
    out: dict[str, NDArray[np.float32]] = {}
    m2 = np.empty_like(m)
    v2 = np.empty_like(v)
    for (name, sl), shape in zip(layout.slices(), layout.shapes, strict=True):
        base = np.ascontiguousarray(base_weights[name], dtype=np.float32).reshape(-1)
        new, m2[sl], v2[sl] = kernels.server_step(
            base,
            acc[sl],
            total_weight,
            plan.server_learning_rate,
            plan.server_optimizer,
            m[sl],
            v[sl],
            b1=plan.server_momentum,
            b2=plan.server_beta2,
            eps=plan.server_epsilon,
        )
        out[name] = new.reshape(shape)
    return out, m2, v2
