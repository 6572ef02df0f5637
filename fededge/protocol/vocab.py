"""The words of the wire protocol that are not messages: names, sentinels and reason codes.

Everything that puts one of these on the wire, in a log line or in a metric label asks this
module, so the documentation can be checked against it (tests/test_vocab.py).
"""

from __future__ import annotations

import re
from enum import StrEnum
from typing import TypeGuard

#: The ``graph_sha256`` of a model version published before any graph (all zeros).
NO_GRAPH = "0" * 64

#: Task, device, client and round names: safe inside a topic level (no ``/``, ``+``, ``#``).
NAME_PATTERN = r"[A-Za-z0-9_.-]{1,64}"
NAME_RE = re.compile(NAME_PATTERN)


def is_name(value: object) -> TypeGuard[str]:
    """Whether ``value`` is a valid task/device/round name."""
    return isinstance(value, str) and NAME_RE.fullmatch(value) is not None


def check_name(value: str, what: str) -> str:
    """Return ``value`` if it is a valid name, else raise ValueError naming ``what``."""
    if not is_name(value):
        raise ValueError(f"{what} must be 1-64 characters of A-Z a-z 0-9 _ . -, got {value!r}")
    return value


class RejectReason(StrEnum):
    """Why an update was refused: the ``reason`` of a rejected receipt and a metric label.

    docs/protocol.md and docs/operations.md list exactly these (tests/test_vocab.py).
    """

    OVERSIZE = "oversize"
    MALFORMED = "malformed"
    UNSUPPORTED_VERSION = "unsupported_version"
    WRONG_TASK = "wrong_task"
    WRONG_DEVICE = "wrong_device"
    UNKNOWN_VERSION = "unknown_version"
    STALE = "stale"
    BAD_METRICS = "bad_metrics"
    SECURE_AGGREGATION = "secure_aggregation"
    WRONG_NAMES = "wrong_names"
    WRONG_SHAPE = "wrong_shape"
    WRONG_DTYPE = "wrong_dtype"
    NON_FINITE = "non_finite"
    NORM_TOO_LARGE = "norm_too_large"
    INTERNAL_ERROR = "internal_error"
    DEVICE_QUOTA = "device_quota"
