"""The private Mosquitto for tests now lives in the public kit: :mod:`fededge.testing.broker`.

Kept so that ``from broker import ...`` in tests and benchmarks keeps working.
"""

from fededge.testing.broker import (
    Mosquitto,
    TlsFiles,
    find_mosquitto,
    free_port,
    make_password_file,
    make_tls_files,
    wait_port,
)

__all__ = [
    "Mosquitto",
    "TlsFiles",
    "find_mosquitto",
    "free_port",
    "make_password_file",
    "make_tls_files",
    "wait_port",
]
