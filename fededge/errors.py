"""The one exception hierarchy of fededge: every error a caller may want to catch."""

from __future__ import annotations


class FededgeError(Exception):
    """Base of every error fededge raises on purpose."""


class ConfigError(FededgeError):
    """A configuration value (file, environment or argument) is wrong."""


class ProtocolError(FededgeError):
    """A message from the network is malformed, oversized or of an unknown version.

    ``reason`` is a short machine-readable code used in receipts and metric labels.
    """

    def __init__(self, detail: str, reason: str = "malformed") -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


class ValidationError(ProtocolError):
    """A well-formed message that breaks a rule (shape, norm, staleness ...)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail, reason)


class ModelError(FededgeError):
    """A model bundle, graph or weights file is missing, corrupt or inconsistent."""


class TransportError(FededgeError):
    """The MQTT connection failed or an MQTT operation was refused."""


class StateError(FededgeError):
    """Stored state on disk is unreadable or inconsistent."""


class SecAggError(FededgeError):
    """A secure-aggregation protocol violation or an aborted round."""
