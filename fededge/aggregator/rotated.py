"""Folding in the rotated domain (plan ``update_rotation = "hadamard"``; docs/protocol.md).

The pending version built on base version ``c`` keeps its accumulator in the domain of
``seed(task, generation, c)``: a float64 vector of ``P`` values. An update rotated with that
seed (trained on ``c``) is folded as it comes, encoded, by the fused kernels (rotation is
linear: sum_j w_j H D x_j = H D sum_j w_j x_j). Any other update is converted first, one at a
time, on a float64 copy: a stale rotated update (base ``b < c``, its own seed) is unrotated
with ``b``'s seed and rotated with ``c``'s; an unrotated update (a plan changed mid-version) is
rotated. A rotated update reaching an unrotated accumulator is unrotated. Finalize unrotates
the sum once. All of this is deterministic, so a WAL replay gives the same accumulator bit for
bit.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray

from fededge.aggregator import codec
from fededge.aggregator.policy import Layout
from fededge.native import hadamard as _h
from fededge.protocol import ModelVersion, Plan, Update
from fededge.protocol.encoding import decode_delta
from fededge.protocol.rotation import ROTATED, chunks, padded_size, seed, signs


class Rotation:
    """H D for one seed over a model of ``d`` parameters (Numba kernels, O(P log P))."""

    def __init__(self, seed_bytes: bytes, d: int) -> None:
        self.d = d
        self.p = padded_size(d)
        self.seed = seed_bytes
        self.signs = signs(seed_bytes, self.p)
        blocks = chunks(self.p)
        self._off = np.array([o for o, _ in blocks], dtype=np.int64)
        self._size = np.array([n for _, n in blocks], dtype=np.int64)

    def rotate(self, x: NDArray[np.float64]) -> NDArray[np.float64]:
        """H D [x; 0] for a float64 vector of d values (a new array of P)."""
        y = np.zeros(self.p, dtype=np.float64)
        y[: self.d] = x
        _h.apply_signs(y, self.signs)
        _h.hadamard_blocks(y, self._off, self._size)
        return y

    def unrotate(self, y: NDArray[np.float64]) -> NDArray[np.float64]:
        """(D H y)[:d] for a float64 vector of P values (a new array of d)."""
        x = np.array(y, dtype=np.float64)
        _h.hadamard_blocks(x, self._off, self._size)
        _h.apply_signs(x, self.signs)
        return x[: self.d].copy()


class Domain:
    """The accumulator's domain for the pending version on ``base``: rotated or not."""

    def __init__(self, base: ModelVersion, size: int, rotated: bool) -> None:
        self.task = base.task
        self.generation = base.generation
        self.version = base.version
        self.d = size
        self.rotation = Rotation(self._seed(base.version), size) if rotated else None
        self._cache: dict[int, Rotation] = {}

    @classmethod
    def for_plan(cls, plan: Plan, base: ModelVersion, size: int) -> Domain:
        return cls(base, size, plan.update_rotation == "hadamard")

    @property
    def name(self) -> str:
        return "hadamard" if self.rotation is not None else "none"

    @property
    def acc_size(self) -> int:
        return self.rotation.p if self.rotation is not None else self.d

    def _seed(self, version: int) -> bytes:
        return seed(self.task, self.generation, version)

    def rotation_of(self, version: int) -> Rotation:
        """The rotation of updates trained on ``version`` (a few cached: max_staleness)."""
        if self.rotation is not None and version == self.version:
            return self.rotation
        rot = self._cache.get(version)
        if rot is None:
            if len(self._cache) >= 4:
                self._cache.pop(next(iter(self._cache)))
            rot = self._cache[version] = Rotation(self._seed(version), self.d)
        return rot

    def direct(self, update: Update) -> bool:
        """Whether the update folds as it is (same domain, same seed)."""
        if self.rotation is None:
            return update.rotation == "none"
        return update.rotation == "hadamard" and update.base_version == self.version

    def converted(self, update: Update, layout: Layout) -> NDArray[np.float64]:
        """The update's decoded values in the accumulator's domain (float64, a copy)."""
        dec = decode_delta(update.delta, update.encoding, update.block)
        if update.rotation == "hadamard":
            x = self.rotation_of(update.base_version).unrotate(dec[ROTATED].reshape(-1))
        else:
            x = np.concatenate([dec[n].reshape(-1) for n in layout.names])
        return self.rotation.rotate(x) if self.rotation is not None else x

    def fold(
        self,
        acc: NDArray[np.float64],
        layout: Layout,
        group: Sequence[tuple[Update, float]],
        *,
        parallel: bool = False,
    ) -> None:
        """Fold (update, weight) pairs into ``acc`` in order; runs of direct ones by kernels."""
        if self.rotation is None and all([u.rotation == "none" for u, _ in group]):
            # The usual group (self.direct(u) for every update): one run, found in one pass.
            for name, sl in layout.slices():
                codec.fold(acc[sl], name, group, parallel=parallel)
            return
        i = 0
        while i < len(group):
            if not self.direct(group[i][0]):
                u, w = group[i]
                acc += w * self.converted(u, layout)
                i += 1
                continue
            j = i
            while j < len(group) and self.direct(group[j][0]):
                j += 1
            run = group[i:j]
            if self.rotation is None:
                for name, sl in layout.slices():
                    codec.fold(acc[sl], name, run, parallel=parallel)
            else:
                codec.fold(acc, ROTATED, run, parallel=parallel)
            i = j

    def delta_sum(self, acc: NDArray[np.float64]) -> NDArray[np.float64]:
        """The weighted sum of the deltas in the model's layout (unrotated once, if rotated)."""
        return acc if self.rotation is None else self.rotation.unrotate(acc)


def round_rotation(plan: Plan, model: ModelVersion, d: int) -> Rotation | None:
    """The rotation of a secure round on ``model`` (None: the plan does not rotate).

    Every device of the round trained on ``model``, so one seed covers them all; the unmasked
    sum is unrotated once.
    """
    if plan.update_rotation != "hadamard":
        return None
    return Rotation(seed(model.task, model.generation, model.version), d)
