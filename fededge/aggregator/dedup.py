"""The deduplication memory: the update keys folded into every version still remembered.

Every update counts at most once. An update based on version ``b`` can only have been folded
into a version after ``b``; so if the keys of every version from ``floor`` on are in memory, a
resend of any update with ``base_version >= floor`` is recognised, and older ones are rejected
as ``stale``. The memory holds whole versions, never part of one: the ``recent_update_ids`` cap
drops the oldest version's keys *and raises the floor past it*, so it can never forget a key
that is still inside the window (it narrows the window instead). The newest version is never
dropped, so the window always admits updates based on the current version.
"""

from __future__ import annotations

import logging
from collections import OrderedDict

log = logging.getLogger(__name__)


class DedupMemory:
    """Update keys by the version they went into, for the versions from ``floor`` on."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self._versions: OrderedDict[int, list[str]] = OrderedDict()
        self._keys: dict[str, int] = {}

    @property
    def floor(self) -> int:
        """The oldest version whose keys are all remembered (0 before the first)."""
        return next(iter(self._versions), 0)

    def __contains__(self, key: str) -> bool:
        return key in self._keys

    def __len__(self) -> int:
        return len(self._keys)

    def version_of(self, key: str) -> int | None:
        return self._keys.get(key)

    def add_version(self, version: int, keys: list[str]) -> None:
        """Remember the keys folded into ``version`` (newer than every version remembered)."""
        self._versions[version] = list(keys)
        for key in keys:
            self._keys[key] = version
        while len(self._keys) > self.cap and len(self._versions) > 1:
            oldest, dropped = self._versions.popitem(last=False)
            for key in dropped:
                if self._keys.get(key) == oldest:
                    del self._keys[key]
            log.warning(
                "deduplication memory: recent_update_ids=%d reached; forgetting version %d, "
                "so updates based on versions before %d are now rejected as stale",
                self.cap,
                oldest,
                self.floor,
            )

    def keep_from(self, version: int) -> None:
        """Forget versions older than ``version`` (they left the store)."""
        while self._versions and next(iter(self._versions)) < version:
            oldest, dropped = self._versions.popitem(last=False)
            for key in dropped:
                if self._keys.get(key) == oldest:
                    del self._keys[key]
