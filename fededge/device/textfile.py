"""The device's metrics as a file for node_exporter's textfile collector.

Devices behind NAT cannot be scraped; node_exporter on the same host can read a ``*.prom``
file and serve it with the host's metrics. Like ``prometheus_client.write_to_textfile``, it
writes a temporary file beside the target and renames it over, so the collector never reads
half a file (the temporary name does not end in ``.prom``, so it is never collected either);
unlike it, the file is made readable by others (0644) whatever the umask: the daemon's unit
runs with ``UMask=0077`` and node_exporter is another user.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest

log = logging.getLogger(__name__)


class TextfileWriter:
    """Write ``registry`` to ``path`` when ``interval`` seconds have passed, and on ``write()``.

    A failed write (full disk, missing folder, no permission) is logged once per kind of
    failure and retried at the next interval: metrics never stop the daemon.
    """

    def __init__(self, path: Path, registry: CollectorRegistry, interval: float) -> None:
        if path.suffix != ".prom":
            # node_exporter's textfile collector reads only *.prom: any other name is never read.
            raise ValueError(f"{path}: the textfile collector reads only files ending in .prom")
        self.path = path
        self.registry = registry
        self.interval = interval
        self.writes = 0
        self.failures = 0
        self._last: float | None = None
        self._last_error: str | None = None

    def maybe_write(self, now: float) -> bool:
        """Write if ``interval`` seconds passed since the last write (``now``: monotonic)."""
        if self._last is not None and 0 <= now - self._last < self.interval:
            return False
        self._last = now
        return self.write()

    def write(self) -> bool:
        """Write the file now; False (logged) if it could not be written."""
        try:
            write_textfile(self.path, generate_latest(self.registry))
        except OSError as e:
            self.failures += 1
            error = f"{type(e).__name__}: {e.strerror or e}"
            if error != self._last_error:
                log.warning("cannot write the metrics textfile %s (%s); retrying every %g s",
                            self.path, error, self.interval)  # fmt: skip
            self._last_error = error
            return False
        if self._last_error is not None:
            log.info("metrics textfile %s written again", self.path)
            self._last_error = None
        self.writes += 1
        return True


def write_textfile(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` atomically (temporary file, then rename), with ``mode``."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with open(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)  # the umask narrowed the mode given to open
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
