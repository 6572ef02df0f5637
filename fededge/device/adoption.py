"""Which graph and model version a device uses: adoption rules, without I/O (part of the core).

A model version names the graph it was trained for (``graph_sha256``, or NO_GRAPH for "the
task's graph"): it waits until that graph is known, then replaces the current version as a
whole (one assignment, so a prediction sees either the old or the new version, never a mix).
The same version again (a retained copy after a reconnect) changes nothing. Whether a lower
version may replace the current one is the core's decision (plan generations, see
fededge/device/trust.py); here it is only logged. A version is persisted as it arrived (its
signed envelope included), so a restart can verify it again.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from fededge.device.effects import Adopted, Effect, Persist
from fededge.device.spec import BundleSpec
from fededge.errors import ProtocolError
from fededge.protocol import ModelVersion
from fededge.protocol.vocab import NO_GRAPH, RejectReason

if TYPE_CHECKING:
    from fededge.device.runtime import ModelRuntime

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Current:
    """The model version in use: replaced as a whole, never modified."""

    version: int
    weights: dict[str, np.ndarray]
    runtime: ModelRuntime
    model: ModelVersion


class ModelSlot:
    """The task's graph (spec and runtime), the current version and one that waits for its graph."""

    def __init__(self, task: str) -> None:
        self.task = task
        self.spec: BundleSpec | None = None
        self.runtime: ModelRuntime | None = None
        self.current: Current | None = None
        self.waiting: ModelVersion | None = None  # its graph has not arrived yet
        self._waiting_raw: bytes | None = None  # that version's message, as it arrived

    def is_new_graph(self, task: str, sha256: str) -> bool:
        """Whether a graph with this hash is worth validating; ProtocolError if for another task."""
        if task != self.task:
            raise ProtocolError(f"graph is for task {task!r}", reason=RejectReason.WRONG_TASK)
        return self.spec is None or sha256 != self.spec.graph_sha256

    def set_graph(self, spec: BundleSpec, runtime: ModelRuntime) -> list[Effect]:
        """Use a validated graph; adopt the version that waited for it."""
        if self.spec is not None and spec.graph_sha256 == self.spec.graph_sha256:
            return []
        self.spec, self.runtime = spec, runtime
        log.info("using graph sha256=%s (%s)", spec.graph_sha256[:12], spec.model)
        cur = self.current
        if cur is not None and weights_fit(cur.model, spec):
            # Same weights, new interpreter: swap the whole snapshot.
            self.current = Current(cur.version, cur.weights, runtime, cur.model)
        waiting = self.waiting
        if waiting is None:
            return []
        return self.adopt(waiting, self._waiting_raw)

    def adopt(self, mv: ModelVersion, raw: bytes | None) -> list[Effect]:
        """Make ``mv`` current if its graph is known (``raw`` is then persisted); else let it wait."""
        if mv.task != self.task:
            raise ProtocolError(
                f"model is for task {mv.task!r}, not {self.task!r}", reason=RejectReason.WRONG_TASK
            )
        spec, runtime = self.spec, self.runtime
        if spec is None or runtime is None or mv.graph_sha256 not in (NO_GRAPH, spec.graph_sha256):
            log.info("model version %d waits for its graph %s", mv.version, mv.graph_sha256[:12])
            self.waiting, self._waiting_raw = mv, raw
            return []
        if not weights_fit(mv, spec):
            raise ProtocolError(
                f"model version {mv.version} does not match graph {spec.model} "
                f"(weights {sorted(mv.weights)})",
                reason=RejectReason.WRONG_NAMES,
            )
        for name, arr in mv.weights.items():
            if not np.all(np.isfinite(arr)):
                raise ProtocolError(
                    f"model weight {name!r} has NaN or Inf", reason=RejectReason.NON_FINITE
                )
        old = self.current
        if old is not None and old.version == mv.version and old.model.time == mv.time:
            return []  # the same version again (retained copy after a reconnect)
        if old is not None and mv.version < old.version:
            log.warning("model version went back from %d to %d (generation %d: the task was "
                        "re-initialised)", old.version, mv.version, mv.generation)  # fmt: skip
        weights = {k: np.array(v, dtype=np.float32, copy=True) for k, v in mv.weights.items()}
        self.current = Current(mv.version, weights, runtime, mv)  # the atomic swap
        self.waiting, self._waiting_raw = None, None
        log.info("adopted model version %d", mv.version, extra={"version": mv.version})
        effects: list[Effect] = [] if raw is None else [Persist("model.bin", raw)]
        effects.append(Adopted(mv, old.version if old else None))
        return effects


def weights_fit(mv: ModelVersion, spec: BundleSpec) -> bool:
    """Whether the version's weights have exactly the graph's names and shapes."""
    if set(mv.weights) != set(spec.weight_names):
        return False
    return all(tuple(mv.weights[w.name].shape) == w.shape for w in spec.weights)
