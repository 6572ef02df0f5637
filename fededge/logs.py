"""Logging set-up for the daemons and the CLI: text or JSON lines, made for journald.

Structured fields: pass them as ``extra`` and they are printed as ``key=value`` after the
message (text) or as members of the object (JSON)::

    log.warning("update rejected", extra={"device": dev, "topic": topic, "reason": e.reason})
    # <4>fededge.aggregator: update rejected device=pi-07 topic=fl/digits/updates/pi-07 reason=stale

Fields shared by every line of a component (the task, the device id) are bound once with
:func:`bind`. ``extra`` keys must not collide with LogRecord attributes (``name``, ``msg``,
``args``, ``message``...); the standard library raises ``KeyError`` for those.

Under systemd (``$JOURNAL_STREAM`` names our stderr) text lines carry no timestamp, since the
journal stamps every line itself, and every line starts with a ``<N>`` syslog priority that
journald strips and stores, so ``journalctl -p warning -u fededge-aggregator`` works.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Mapping, MutableMapping
from typing import IO, Any, Literal

__all__ = ["JsonFormatter", "TextFormatter", "bind", "journal_stream_active", "setup_logging"]

Format = Literal["text", "json"]

# Attributes every LogRecord has; anything else on a record came from ``extra``.
_RESERVED = frozenset(
    {
        *logging.LogRecord("", 0, "", 0, "", None, None).__dict__,
        "message",
        "asctime",
        "taskName",
    }
)

# Python levels to syslog priorities (sd-daemon(3)): what journald files the line under.
_PRIORITY = {
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}


def _priority(levelno: int) -> int:
    for level, prio in _PRIORITY.items():  # highest level first
        if levelno >= level:
            return prio
    return 7


def fields_of(record: logging.LogRecord) -> dict[str, Any]:
    """The structured fields a record carries (everything that came in through ``extra``)."""
    return {
        k: v for k, v in record.__dict__.items() if k not in _RESERVED and not k.startswith("_")
    }


def _kv_value(value: Any) -> str:
    text = value if isinstance(value, str) else str(value)
    if text and not any(c.isspace() or c in '"=\\' for c in text):
        return text
    # Quote like JSON so values with spaces or '=' stay one unambiguous field.
    return json.dumps(text, ensure_ascii=False)


def _utc(record: logging.LogRecord) -> str:
    # UTC with milliseconds: a fleet's devices sit in many time zones.
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
    return f"{stamp}.{int(record.msecs):03d}Z"


def journal_stream_active(stream: IO[str] | None = None) -> bool:
    """Whether ``stream`` (default stderr) is connected to journald.

    ``$JOURNAL_STREAM`` is ``device:inode`` of the journal's stream socket; it is inherited by
    children whose stderr may have been redirected, so it only counts if it names this stream
    (systemd.exec(5) recommends exactly this check).
    """
    value = os.environ.get("JOURNAL_STREAM")
    if not value:
        return False
    stream = sys.stderr if stream is None else stream
    try:
        dev, ino = (int(part) for part in value.split(":"))
        st = os.fstat(stream.fileno())
    except (ValueError, OSError, AttributeError):
        return False
    return st.st_dev == dev and st.st_ino == ino


class TextFormatter(logging.Formatter):
    """``time LEVEL logger: message key=value ...``; ``<N>logger: message ...`` for journald."""

    def __init__(self, *, journal: bool = False) -> None:
        super().__init__()
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        line = f"{record.name}: {record.getMessage()}"
        if fields := fields_of(record):
            line += " " + " ".join(f"{k}={_kv_value(v)}" for k, v in fields.items())
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        if record.stack_info:
            line += "\n" + self.formatStack(record.stack_info)
        if self.journal:
            # journald splits on newlines: prefix every line so a traceback keeps its priority.
            prefix = f"<{_priority(record.levelno)}>"
            return "\n".join(prefix + part for part in line.split("\n"))
        return f"{_utc(record)} {record.levelname:<7} {line}"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, the extra fields, exc (if any)."""

    def __init__(self, *, journal: bool = False) -> None:
        super().__init__()
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        obj: dict[str, Any] = {
            "ts": _utc(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in fields_of(record).items():
            obj[key if key not in obj else f"field_{key}"] = value
        if record.exc_info:
            obj["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            obj["stack"] = self.formatStack(record.stack_info)
        text = json.dumps(obj, default=str, ensure_ascii=False)
        # json.dumps escapes newlines, so the object is one line; journald strips the prefix.
        return f"<{_priority(record.levelno)}>{text}" if self.journal else text


class _Handler(logging.StreamHandler):  # type: ignore[type-arg]
    """Marks the handler setup_logging installed, so a second call replaces it."""


def setup_logging(
    level: str | int = "info",
    fmt: Format = "text",
    *,
    stream: IO[str] | None = None,
    journal: bool | None = None,
) -> None:
    """Configure the root logger once per process, from ``main()`` (never at import).

    ``level`` is a name (``"debug"``, ``"info"``...) or a number; ``journal`` defaults to
    :func:`journal_stream_active` for ``stream`` (stderr by default). Calling again replaces the
    handler this function installed and leaves other handlers (pytest's, an embedding app's).
    """
    if isinstance(level, str):
        levelno = logging.getLevelName(level.upper())
        if not isinstance(levelno, int):
            raise ValueError(f"unknown log level {level!r}; expected debug, info, warning, error")
    else:
        levelno = level
    if fmt not in ("text", "json"):
        raise ValueError(f"unknown log format {fmt!r}; expected 'text' or 'json'")
    stream = sys.stderr if stream is None else stream
    if journal is None:
        journal = journal_stream_active(stream)
    handler = _Handler(stream)
    handler.setFormatter(
        JsonFormatter(journal=journal) if fmt == "json" else TextFormatter(journal=journal)
    )
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _Handler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(levelno)
    # Numba logs every compiler pass at DEBUG: thousands of lines that drown ours.
    logging.getLogger("numba").setLevel(max(levelno, logging.INFO))
    logging.captureWarnings(True)


class _BoundLogger(logging.LoggerAdapter):  # type: ignore[type-arg]
    """A logger with fields added to every record; per-call ``extra`` wins over bound fields."""

    def process(
        self, msg: Any, kwargs: MutableMapping[str, Any]
    ) -> tuple[Any, MutableMapping[str, Any]]:
        kwargs["extra"] = {**(self.extra or {}), **(kwargs.get("extra") or {})}
        return msg, kwargs


def bind(logger: logging.Logger | str, **fields: Any) -> logging.LoggerAdapter:  # type: ignore[type-arg]
    """A logger that adds ``fields`` (e.g. ``task="digits"``) to every line it writes."""
    base = logging.getLogger(logger) if isinstance(logger, str) else logger
    bound: Mapping[str, object] = fields
    return _BoundLogger(base, bound)
