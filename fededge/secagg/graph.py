"""The round stages, their guard, and the SecAgg+ neighbour graph shared by both roles."""

from __future__ import annotations

import hashlib
import itertools
import struct
from collections.abc import Collection, Mapping, Sequence
from enum import StrEnum

from fededge.errors import SecAggError
from fededge.secagg.crypto import deterministic_random


class Stage(StrEnum):
    """Stages of a SecAgg+ round; the device->server topic of a stage uses its value."""

    ADVERTISE = "advertise"
    SHARE = "share"
    MASKED = "masked"
    CONSISTENCY = "consistency"
    UNMASK = "unmask"
    DONE = "done"
    ABORTED = "aborted"


TERMINAL = frozenset({Stage.DONE, Stage.ABORTED})


def check_stage(current: Stage, *allowed: Stage, what: str) -> None:
    """The guard before every transition: raise SecAggError unless ``current`` is allowed."""
    if current not in allowed:
        names = ", ".join(a.value for a in allowed)
        raise SecAggError(f"{what} not allowed in stage {current.value!r} (only in {names})")


def _ring_order(round_id: str, members: list[str], k: int) -> list[str] | None:
    """The cohort's positions on the ring of the Harary graph (None: the complete graph)."""
    n = len(members)
    if k >= n - 1:
        return None
    if k < 1 or k % 2:
        raise SecAggError(f"neighbour count must be even and positive, got {k}")
    digest = hashlib.sha256(("\x00".join([round_id, *members])).encode()).digest()
    draw = deterministic_random(b"graph" + digest)
    order = list(members)
    # The draws are consecutive 4-byte big-endian words of one AES-CTR keystream; taking the
    # n - 1 words that suffice without a rejection in one call gives the same words.
    words = list(struct.unpack(f">{n - 1}I", draw(4 * (n - 1))))
    words.reverse()  # consumed from the end
    for i in range(n - 1, 0, -1):  # Fisher-Yates with rejection sampling: exactly uniform
        bound = (1 << 32) - (1 << 32) % (i + 1)
        while (r := words.pop() if words else int.from_bytes(draw(4), "big")) >= bound:
            pass
        j = r % (i + 1)
        order[i], order[j] = order[j], order[i]
    return order


def neighbour_graph(round_id: str, cohort: Sequence[str], k: int) -> dict[str, frozenset[str]]:
    """The SecAgg+ graph: a Harary graph of degree k over a permutation of the cohort.

    The permutation comes from SHA-256 of the round id and the sorted cohort, so every party
    derives the same graph and nobody (the server included) chooses who neighbours whom. With
    k >= n - 1 it is the complete graph of the original SecAgg.
    """
    members = sorted(cohort)
    order = _ring_order(round_id, members, k)
    if order is None:
        return {m: frozenset(x for x in members if x != m) for m in members}
    # Harary graph: position p neighbours positions p +- 1 .. k/2 (distinct: k/2 < n/2).
    n, half = len(order), k // 2
    steps = [s for s in range(-half, half + 1) if s]
    return {m: frozenset([order[(p + s) % n] for s in steps]) for p, m in enumerate(order)}


class Ring:
    """One party's view of :func:`neighbour_graph` without building it: the positions on the
    ring, one device's neighbours, and whether a set is connected (a device needs no more)."""

    def __init__(self, round_id: str, cohort: Sequence[str], k: int) -> None:
        self._members = sorted(cohort)
        order = _ring_order(round_id, self._members, k)
        self._n, self._half = len(self._members), k // 2
        self._order = order
        self._position = {m: p for p, m in enumerate(order)} if order is not None else {}

    def neighbours(self, member: str) -> frozenset[str]:
        """The neighbours of ``member`` (a cohort member), as in neighbour_graph."""
        if self._order is None:
            return frozenset(x for x in self._members if x != member)
        p, n, order = self._position[member], self._n, self._order
        return frozenset(order[(p + s) % n] for s in range(-self._half, self._half + 1) if s)

    def connected(self, nodes: Collection[str]) -> bool:
        """Whether the subgraph induced on ``nodes`` (cohort members) is connected.

        On the ring two members are adjacent iff their circular distance is at most k/2. Walk
        the members of ``nodes`` in ring order: consecutive ones less than k/2 + 1 apart are
        adjacent, so at most one larger gap leaves a path through all of them; two larger gaps
        cut the ring into two arcs whose members are all more than k/2 apart, so no edge joins
        them. The complete graph is connected on any non-empty set.
        """
        node_set = set(nodes)
        if not node_set:
            return False
        if self._order is None:
            return True
        spots = sorted(self._position[m] for m in node_set)
        gaps = [b - a for a, b in itertools.pairwise(spots)]
        gaps.append(spots[0] + self._n - spots[-1])
        return sum(1 for g in gaps if g > self._half) <= 1


def connected(graph: Mapping[str, Collection[str]], nodes: Collection[str]) -> bool:
    """Whether the subgraph induced on ``nodes`` is connected (masks cancel only within a part)."""
    node_set = set(nodes)
    if not node_set:
        return False
    start = next(iter(node_set))
    seen, todo = {start}, [start]
    while todo:
        for nb in graph[todo.pop()]:
            if nb in node_set and nb not in seen:
                seen.add(nb)
                todo.append(nb)
    return seen == node_set


def prune(graph: Mapping[str, Collection[str]], live: Collection[str], threshold: int) -> set[str]:
    """The live devices left after repeatedly removing those with fewer than ``threshold`` live
    neighbours (their secrets could never be reconstructed)."""
    alive = set(live)
    changed = True
    while changed:
        changed = False
        for m in sorted(alive):
            if sum(1 for nb in graph[m] if nb in alive) < threshold:
                alive.discard(m)
                changed = True
    return alive
