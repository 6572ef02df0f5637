"""Update intake shared by the processes that receipt updates outside the aggregator core.

Shard workers (fededge/aggregator/shard.py) and site gateways (fededge/gateway/) take device
updates off the broker, check them exactly as the aggregator does (``check_update``), make them
durable in their own batches and answer with a signed receipt. The parts that must not differ
between them live here: the size limit, parsing, the secure-plan refusal, the per-device quota
and the receipt bytes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING

from fededge.aggregator.codec import Prepared, prepare_update
from fededge.aggregator.policy import Layout, check_update
from fededge.aggregator.versions import UPDATE_SLACK
from fededge.errors import ProtocolError
from fededge.protocol import ModelVersion, Plan, Receipt, Topics, Update
from fededge.protocol.signing import SignedKind, sign
from fededge.protocol.vocab import RejectReason

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey


def update_limit(model_bytes: int, max_update_bytes: int | None) -> int:
    """The largest update accepted: twice the model message plus slack, or the setting if lower."""
    limit = 2 * model_bytes + UPDATE_SLACK
    return limit if max_update_bytes is None else min(limit, max_update_bytes)


def preparer(topics: Topics, limit: Callable[[], int]) -> Callable[[str, bytes], Prepared | None]:
    """The ``Inbox.prepare`` hook of a process that ingests updates (the aggregator, its shard
    workers, site gateways): a large update parsed and measured on the network thread while it
    is in the cache (``codec.prepare_update``); nothing for other topics, nor for a payload over
    ``limit()`` (the update limit, which ingest refuses unread: not worth a pass over it)."""

    def prepare(topic: str, payload: bytes) -> Prepared | None:
        if len(payload) > limit() or topics.device_of(topic, "updates") is None:
            return None
        return prepare_update(payload)

    return prepare


def parse_update(payload: bytes, limit: int, prepared: object = None) -> Update:
    """Parse an update message, refusing oversize ones (``prepared``: the message's
    ``Message.prepared``, the update parsed ahead by ``preparer``'s hook, if any)."""
    if len(payload) > limit:
        raise ProtocolError(
            f"{len(payload)} bytes exceed the update limit of {limit} bytes",
            reason=RejectReason.OVERSIZE,
        )
    if type(prepared) is Prepared:
        return prepared.update
    return Update.from_bytes(payload, max_bytes=limit)


def norms_of(prepared: object) -> Mapping[str, float] | None:
    """The tensor norms measured ahead with a message's update, if any (for ``check``)."""
    return prepared.norms if type(prepared) is Prepared else None


def refuse_secure(plan: Plan, detail: str) -> None:
    """Plain updates are refused under a secure plan (after parsing: the device gets a receipt)."""
    if plan.secure_aggregation is not None:
        raise ProtocolError(detail, reason=RejectReason.SECURE_AGGREGATION)


def check_quota(held: int, device: str, plan: Plan, where: str) -> None:
    """Refuse a device's update when ``held`` of its updates already wait in ``where``."""
    quota = plan.max_updates_per_device
    if held >= quota:
        raise ProtocolError(
            f"device {device} already has {quota} update(s) in {where} (max_updates_per_device)",
            reason=RejectReason.DEVICE_QUOTA,
        )


def check(
    update: Update,
    task: str,
    device: str,
    model: ModelVersion,
    plan: Plan,
    norms: Mapping[str, float] | None = None,
) -> tuple[float, float]:
    """The aggregator's own checks (``check_update``): the update's weight and norm
    (``norms``: ``norms_of`` the message, measured ahead)."""
    return check_update(
        update,
        task=task,
        device=device,
        current_version=model.version,
        plan=plan,
        layout=Layout.of(model.weights),
        norms=norms,
    )


def receipt_bytes(
    task: str,
    update: Update,
    status: str,
    version: int,
    signer: Ed25519PrivateKey | None,
    reason: RejectReason | None = None,
    detail: str | None = None,
) -> bytes:
    """A receipt for ``update`` against model ``version``, signed when there is a key."""
    r = Receipt(
        task=task,
        device=update.device,
        update_id=update.update_id,
        status=status,
        reason=reason.value if reason else None,
        detail=detail[:1024] if detail else None,
        version=version,
        pending=version + 1 if status == "accepted" else None,
    )
    payload = r.to_bytes()
    return payload if signer is None else sign(payload, SignedKind.RECEIPT, signer)


def count_device(device: str, devices: Iterable[str]) -> int:
    """How many of ``devices`` are ``device``."""
    return sum(1 for d in devices if d == device)
