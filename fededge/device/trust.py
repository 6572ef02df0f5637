"""What a device trusts: signed control messages, the plan generation, its privacy floor.

Pure rules, no I/O (part of the device core): the driver opens every plan, graph, model and
receipt through :meth:`TrustRules.open` before decoding it, and the core checks generations and
the privacy floor. See docs/security.md for the threats these answer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from fededge.errors import FededgeError
from fededge.protocol import Plan
from fededge.protocol.signing import SignedKind, open_message
from fededge.settings import PrivacySettings, Settings

if TYPE_CHECKING:  # cryptography is imported where a key is used
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

#: The state file that keeps the highest plan generation seen across restarts.
TRUST_FILE = "trust.json"


class Refused(FededgeError):
    """A verified control message the device will not use (an older generation or version).

    ``reason`` (``old_generation``, ``old_version``) is a metric label, like a
    :class:`~fededge.errors.SignatureError`'s.
    """

    def __init__(self, detail: str, *, reason: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class TrustRules:
    """The keys a device verifies control messages with (none: it trusts the broker)."""

    owner_keys: list[Ed25519PublicKey] = field(default_factory=list)
    aggregator_keys: list[Ed25519PublicKey] = field(default_factory=list)
    # A site gateway's keys sign the receipts of the devices behind it, nothing else.
    gateway_keys: list[Ed25519PublicKey] = field(default_factory=list)

    @classmethod
    def from_settings(cls, settings: Settings) -> TrustRules:
        t = settings.trust
        return cls(t.owner_keys(), t.aggregator_keys(), t.gateway_keys())

    def keys_for(self, kind: SignedKind) -> list[Ed25519PublicKey]:
        """Whose signature a message of ``kind`` needs (empty: it is not verified).

        Plans and graphs are the owner's. Models are the aggregator's, and the owner may sign
        one too (version 0 from ``fededge model init``), so a device can start before the
        aggregator has re-signed it; receipts are the aggregator's or a site gateway's.
        """
        if kind in (SignedKind.PLAN, SignedKind.GRAPH):
            return self.owner_keys
        if kind is SignedKind.MODEL:
            return [*self.aggregator_keys, *self.owner_keys] if self.aggregator_keys else []
        if kind is SignedKind.RECEIPT:
            return [*self.aggregator_keys, *self.gateway_keys]
        return []

    def open(self, kind: SignedKind, data: bytes) -> bytes:
        """The v1 message inside ``data``; SignatureError if it needs a signature it lacks."""
        return open_message(data, kind, self.keys_for(kind)).payload

    def untrusted(self) -> list[str]:
        """The settings left empty, for the start-up warning."""
        missing = []
        if not self.owner_keys:
            missing.append("trust.owner_key (plans and graphs)")
        if not self.aggregator_keys:
            missing.append("trust.aggregator_key (models and receipts)")
        return missing


def privacy_refusal(plan: Plan, floor: PrivacySettings) -> str | None:
    """Why ``plan`` is below the device's privacy floor, or None if it is not.

    The noise multiplier is sigma / C (``noise_stddev / clip_norm``), the quantity DP-SGD
    accounting is stated in.
    """
    problems = []
    multiplier = plan.effective_noise_multiplier  # noise_multiplier, or noise_stddev/clip_norm
    if multiplier < floor.min_noise_multiplier:
        problems.append(
            f"noise multiplier {multiplier:.4g} (sigma/clip_norm) is below "
            f"privacy.min_noise_multiplier={floor.min_noise_multiplier:g}"
        )
    if floor.max_clip_norm is not None and plan.clip_norm > floor.max_clip_norm:
        problems.append(
            f"clip_norm {plan.clip_norm:g} is above privacy.max_clip_norm={floor.max_clip_norm:g}"
        )
    sa = plan.secure_aggregation
    if sa is None:
        if floor.require_secure_aggregation:
            problems.append(
                "the plan has no secure_aggregation (privacy.require_secure_aggregation)"
            )
    else:
        if sa.threshold < floor.min_threshold:
            problems.append(
                f"secure_aggregation.threshold {sa.threshold} is below "
                f"privacy.min_threshold={floor.min_threshold}"
            )
        if sa.min_cohort < floor.min_cohort:
            problems.append(
                f"secure_aggregation.min_cohort {sa.min_cohort} is below "
                f"privacy.min_cohort={floor.min_cohort}"
            )
    if not problems:
        return None
    return ("privacy_floor: " + "; ".join(problems))[:256]


@dataclass(frozen=True)
class TrustState:
    """What a device remembers across restarts (``trust.json``) so it is never taken back.

    ``generation``: the highest plan generation seen; ``model``: (generation, version) of the
    newest model adopted - a model below it is refused even if ``model.bin`` is lost.
    """

    generation: int = 0
    model: tuple[int, int] | None = None

    def to_bytes(self) -> bytes:
        data: dict[str, object] = {"generation": self.generation}
        if self.model is not None:
            data["model"] = list(self.model)
        return json.dumps(data).encode()

    @classmethod
    def from_bytes(cls, raw: bytes | None) -> TrustState:
        """Parse ``trust.json``; an absent or unreadable file is the empty state (the plan and
        model files raise it again as they load)."""
        if not raw:
            return cls()
        try:
            obj = json.loads(raw)
        except (ValueError, RecursionError):
            return cls()
        if not isinstance(obj, dict):
            return cls()
        g, m = obj.get("generation", 0), obj.get("model")
        generation = g if type(g) is int and g >= 0 else 0
        model = None
        if isinstance(m, list) and len(m) == 2 and all(type(x) is int and x >= 0 for x in m):
            model = (m[0], m[1])
        return cls(generation, model)
