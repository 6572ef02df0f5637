"""The one exception hierarchy of fededge: every error a caller may want to catch.

Every error that carries a machine-readable ``reason`` takes it as a keyword argument.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fededge.protocol.vocab import RejectReason


class FededgeError(Exception):
    """Base of every error fededge raises on purpose."""


class ConfigError(FededgeError):
    """A configuration value (file, environment or argument) is wrong."""


class ProtocolError(FededgeError):
    """A message from the network is malformed, breaks a rule, or has an unknown version.

    ``reason`` is the :class:`~fededge.protocol.vocab.RejectReason` sent in receipts and used
    as a metric label; ``detail`` is the sentence for people.
    """

    def __init__(self, detail: str, *, reason: RejectReason | None = None) -> None:
        # Imported here: fededge.protocol imports this module.
        from fededge.protocol.vocab import RejectReason

        super().__init__(detail)
        self.reason: RejectReason = RejectReason.MALFORMED if reason is None else reason
        self.detail = detail


class InputError(FededgeError):
    """A local request (API call, ``Client.fit``) with inputs that break the model's rules.

    ``reason`` is a short code the local API returns (``bad_shape``, ``bad_label`` ...).
    """

    def __init__(self, detail: str, *, reason: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


class ModelError(FededgeError):
    """A model bundle, graph or weights file is missing, corrupt or inconsistent."""


class TransportError(FededgeError):
    """The MQTT connection failed or an MQTT operation was refused."""


class StorageError(FededgeError):
    """Stored state on disk is unreadable, inconsistent or cannot be written: fatal.

    A service stops on it rather than acknowledge anything that is not durable.
    """


class NotReadyError(FededgeError):
    """A call made at the wrong time: no model yet, started twice, stopped while starting.

    Not fatal: the caller may retry later; services never stop on it.
    """


class SignatureError(FededgeError):
    """A message that must be signed is unsigned, signed by an untrusted key, or forged.

    ``reason``: ``unsigned``, ``unknown_key``, ``bad_signature``, ``malformed`` or
    ``unsupported_version`` (of the envelope); used as a metric label.
    """

    def __init__(self, detail: str, *, reason: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


class SecAggError(FededgeError):
    """A secure-aggregation protocol violation or an aborted round."""


class LeaseError(FededgeError):
    """Another aggregator process holds (or took over) this role of the task: stop, fold nothing.

    Raised when a second ``fededge aggregator`` starts for a task that has one, and when a
    running one loses its lease; the message names the other instance.
    """
