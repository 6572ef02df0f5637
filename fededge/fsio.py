"""Crash-safe file writes: the one ``atomic_write`` every component uses."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["atomic_write", "fsync_dir"]


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes | list[bytes | memoryview], *, fsync: bool = True) -> None:
    """Write ``data`` (or its parts) so that a crash leaves either the old or the new file."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as f:
        for part in data if isinstance(data, list) else [data]:
            f.write(part)
        if fsync:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)
    if fsync:
        fsync_dir(path.parent)
