"""Process memory policy of the services that receive large updates (aggregator, shard, gateway).

Quirk (glibc malloc, measured on the 1M-parameter ingest bench): every 4 MB update packet is a
fresh ``bytearray``; glibc serves blocks that large with ``mmap`` and unmaps them on ``free``,
so every packet's 1,000 pages are faulted in and zeroed again by the kernel, and so is every
8 MB copy of the accumulator a background checkpoint writes. That cost ~0.8 ms per update on
the network thread alone. Serving such blocks from the heap and keeping freed memory there
(up to a bound) lets the next packet reuse the pages already mapped: the aggregator's CPU per
1M-parameter update fell by about a quarter (docs/benchmarks.md).

The price is RSS: up to ``keep`` bytes of freed memory stay in the process instead of going
back to the kernel. Services call :func:`keep_freed_memory` once at start; libraries and
devices do not (a Raspberry Pi's memory is better returned).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import mmap
import platform
from typing import Any

import numpy as np
from numpy.typing import NDArray

log = logging.getLogger(__name__)

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: glibc refuses an mmap threshold above HEAP_MAX_SIZE / 2: 32 MiB on 64-bit systems.
MMAP_THRESHOLD = 32 << 20
#: Freed memory kept at the top of the heap (what the inbox bound lets through, about).
KEEP_BYTES = 256 << 20

_done = False


def keep_freed_memory(keep: int = KEEP_BYTES) -> bool:
    """Serve blocks up to 32 MiB from the heap and keep up to ``keep`` freed bytes there.

    Process-wide and idempotent; True once set. Only glibc has these knobs: elsewhere (musl,
    macOS) nothing changes and False is returned.
    """
    global _done
    if _done:
        return True
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        ok = bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1)
        ok = libc.mallopt(_M_TRIM_THRESHOLD, keep) == 1 and ok
    except (OSError, AttributeError) as e:  # no libc to load, or no mallopt in it
        log.debug("malloc policy unchanged: %s", e)
        return False
    _done = ok
    return ok


#: The same policy for a Mosquitto broker that carries large updates, set in its environment
#: (glibc reads these at start; systemd/mosquitto-memory.conf is the drop-in that sets them).
#: Quirk: with glibc's defaults a 4 MB message is served from the heap only after the first one
#: freed raised the mmap threshold, and the heap's top is trimmed whenever more than twice that
#: is free, so the broker faults in and zeroes its message buffers again and again, the more so
#: the longer a subscriber holds messages before its PUBACK (the aggregator acknowledges after
#: the fsync). Measured on the 1M-parameter ingest bench: 257,000 page faults in the broker per
#: 600 updates to the aggregator (157,000 to a raw subscriber), its top kernel symbol
#: ``clear_page_erms``. With these settings (600 updates, alternating runs, two each) raw paho
#: took 1.9-2.1 s instead of 2.5-2.7 and the aggregator 2.0-2.3 s instead of 3.4-3.9.
#: Whole bench runs did not confirm a change in the aggregator's ratio to raw paho
#: (docs/benchmarks.md has both tables). Setting both keeps glibc from adjusting either.
BROKER_MALLOC_ENV = {
    "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD),
    "MALLOC_TRIM_THRESHOLD_": str(KEEP_BYTES),
}


#: ``mmap.MADV_HUGEPAGE`` where Python and the platform have it (Linux).
_MADV_HUGEPAGE: int | None = getattr(mmap, "MADV_HUGEPAGE", None)

#: Page size, the alignment direct I/O (``O_DIRECT``) asks of buffers, offsets and lengths.
PAGE = 4096


#: Arrays at least this large are given transparent huge pages (x86-64's 2 MiB).
HUGE_PAGE = 2 << 20


def page_aligned_zeros(n: int, dtype: Any = np.float64) -> NDArray[Any]:
    """``np.zeros(n, dtype)`` whose data starts on a page boundary: a checkpoint writes such an
    accumulator to disk with direct I/O, from its own memory (fededge/aggregator/store.py).
    numpy's allocations are only 16- or 64-byte aligned.

    From ``HUGE_PAGE`` up, the array is a private anonymous mapping of its own, aligned to 2 MiB
    and advised ``MADV_HUGEPAGE`` (Linux; where transparent huge pages are on ``madvise`` or
    ``always``, as on Debian). Quirk: a direct-I/O write pins every page of its buffer; an 8 MB
    accumulator in 4 KiB pages is 2,048 pins, in huge pages 4. Measured here, an 8 MB write plus
    ``fdatasync``: 0.50 ms of CPU and 3.4 ms wall in 4 KiB pages, 0.15 ms and 2.3 ms in huge
    pages (the fold over it, and socket reads into such pages, were no faster). The mapping is
    released with the array."""
    dt = np.dtype(dtype)
    nbytes = n * dt.itemsize
    if nbytes >= HUGE_PAGE and _MADV_HUGEPAGE is not None:
        m = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        try:
            m.madvise(_MADV_HUGEPAGE)
        except OSError as e:  # a kernel without transparent huge pages: 4 KiB pages then
            log.debug("no huge pages for a %d-byte array: %s", nbytes, e)
        region = np.frombuffer(m, dtype=np.uint8)  # zeroed by the kernel; keeps m mapped
        start = -region.ctypes.data % HUGE_PAGE
        return region[start : start + nbytes].view(dt)
    raw = np.zeros(nbytes + PAGE, dtype=np.uint8)
    start = -raw.ctypes.data % PAGE
    return raw[start : start + nbytes].view(dt)


def page_aligned_copy(a: NDArray[Any]) -> NDArray[Any]:
    """A page-aligned, writable, contiguous copy of ``a``, of its shape (a checkpoint's
    accumulator of a wrong shape must still be refused as such)."""
    out = page_aligned_zeros(a.size, a.dtype).reshape(a.shape)
    np.copyto(out, a)
    return out


def is_page_aligned(a: NDArray[Any]) -> bool:
    return a.flags.c_contiguous and a.ctypes.data % PAGE == 0
