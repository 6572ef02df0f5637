"""Protocol v1 messages: JSON control messages and safetensors tensor messages (no I/O)."""

from __future__ import annotations

import hashlib
import json
import math
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, TypeVar

import numpy as np
import pydantic
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from fededge.errors import ProtocolError
from fededge.protocol.tensors import (
    F32_ENTRIES,
    MAX_HEADER_BYTES,
    decode_parts,
    decode_tensors,
    encode_tensors,
    f32_tensors,
)
from fededge.protocol.vocab import NAME_PATTERN, RejectReason, is_name

PROTOCOL_VERSION = 1
MAX_JSON_BYTES = 256 * 1024
Name = Annotated[str, StringConstraints(pattern=rf"^{NAME_PATTERN}$")]
Sha256 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
Version = Annotated[int, Field(ge=0, lt=1 << 53)]


class _Json(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    v: Literal[1] = 1

    def to_bytes(self) -> bytes:
        """Compact UTF-8 JSON with keys in declaration order (what the test vectors fix)."""
        return self.model_dump_json(exclude_none=True).encode()


class SecureAggregation(BaseModel):
    """The plan's secure-aggregation section: synchronous SecAgg+ rounds instead of async FedAvg.

    See docs/protocol.md (secure aggregation). A round starts as soon as ``cohort_size`` devices with an update
    on the current version checked in, or ``checkin_window`` s after the first check-in if at
    least ``min_cohort`` did. ``neighbours`` = 0 means the complete graph (plain SecAgg).
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    cohort_size: int = Field(10, ge=3, le=10_000)
    min_cohort: int = Field(7, ge=3, le=10_000)
    threshold: int = Field(6, ge=2, le=10_000)
    neighbours: int = Field(0, ge=0, le=10_000)
    stage_timeout: float = Field(30.0, gt=0, le=3600)
    checkin_window: float = Field(10.0, ge=0, le=3600)
    checkin_interval: float = Field(5.0, gt=0, le=3600)
    bits: int = Field(32, ge=16, le=32)
    max_weight: float = Field(1000.0, gt=0, le=1e9)

    @model_validator(mode="after")
    def _consistent(self) -> SecureAggregation:
        if self.min_cohort > self.cohort_size:
            raise ValueError("min_cohort must be <= cohort_size")
        if self.threshold >= self.min_cohort:
            raise ValueError("threshold must be < min_cohort (a round needs t < cohort size)")
        if self.neighbours and (self.neighbours % 2 or self.neighbours < self.threshold):
            raise ValueError("neighbours must be 0 (complete graph) or even and >= threshold")
        # Devices refuse t <= k/2 (t <= n/2 on the complete graph): a plan must not ask for it.
        k = self.cohort_size if self.neighbours == 0 else min(self.neighbours, self.cohort_size)
        if 2 * self.threshold <= k:
            raise ValueError(f"threshold must be more than half of {k} (cohort size or neighbours)")
        return self


class Plan(_Json):
    """Hyperparameters of a task, published retained; seed names in comments."""

    kind: Literal["plan"] = "plan"
    epochs: int = Field(1, ge=1, le=1000)
    batch_size: int = Field(32, ge=1, le=65536)
    learning_rate: float = Field(0.1, gt=0, le=100)
    examples_per_update: int = Field(32, ge=1, le=10_000_000)  # seed: examplesPerUpdate
    min_updates_per_version: int = Field(5, ge=1, le=1_000_000)  # seed: minUpdatesPerVersion
    clip_norm: float = Field(1.0, gt=0, le=1e9)
    noise_stddev: float = Field(0.0, ge=0, le=1e6)  # seed: weightNoiseStddev, on the clipped delta
    max_staleness: int = Field(0, ge=0, le=1000)
    staleness_exponent: float = Field(0.5, ge=0, le=10)
    server_learning_rate: float = Field(1.0, gt=0, le=100)
    max_examples_weight: int = Field(10_000, ge=1)
    evaluate: bool = True
    secure_aggregation: SecureAggregation | None = None  # None: asynchronous buffered FedAvg
    # Trust (protocol.md, "plan"): each omitted from the JSON while it has its default, so a
    # plan that does not use them keeps its v1 bytes.
    generation: int = Field(0, ge=0, lt=1 << 53)  # raised by the owner to re-initialise a task
    max_updates_per_device: int = Field(1, ge=1, le=1_000_000)  # per device per version
    max_weight: int | None = Field(None, ge=1)  # weight cap; None: examples_per_update
    # Differential privacy (docs/privacy.md), omitted while at their defaults. noise_multiplier
    # z: each update's noise is sigma = z * clip_norm (DP-FedAvg); when it is 0 the old
    # absolute noise_stddev applies. max_epsilon: the budget at delta; None: no budget.
    noise_multiplier: float = Field(0.0, ge=0, le=1e6)
    delta: float = Field(1e-5, gt=0, lt=1)
    max_epsilon: float | None = Field(None, gt=0, le=1e6)
    target_unclipped_quantile: float | None = Field(None, gt=0, lt=1)  # adaptive clipping
    # Server optimizer (issue 13, Reddi et al. 2021) acting on the weighted mean delta; each
    # omitted from the JSON at its default.
    server_optimizer: Literal["sgd", "avgm", "adam", "yogi", "adagrad"] = "sgd"
    server_momentum: float = Field(0.9, ge=0, lt=1)  # beta1 (avgm: momentum)
    server_beta2: float = Field(0.99, ge=0, lt=1)
    server_epsilon: float = Field(1e-3, gt=0, le=1e3)  # tau, the adaptivity floor
    # Compressed updates (fededge/protocol/encoding.py): f32, f16 or int8 with one scale per
    # tensor (update_block 0) or per update_block elements; omitted at the defaults.
    update_encoding: Literal["f32", "f16", "int8"] = "f32"
    update_block: int = Field(0, ge=0, le=1 << 30)
    # Randomized Hadamard rotation before encoding (fededge/protocol/rotation.py) and the dtype
    # of published model versions (f16: half the download); omitted at the defaults.
    update_rotation: Literal["none", "hadamard"] = "none"
    model_encoding: Literal["f32", "f16"] = "f32"
    # Robust aggregation of asynchronous versions (fededge/aggregator/robust.py): a
    # coordinate-wise statistic over the version's updates instead of the weighted mean, and
    # zeroing of updates whose norm exceeds robust_zeroing x the version's median update norm
    # (None: off). Omitted at the defaults; refused with secure_aggregation (only sums exist).
    robust: Literal["none", "trimmed_mean", "median"] = "none"
    robust_beta: float = Field(0.1, ge=0, lt=0.5)  # trimmed at each end, per coordinate
    robust_zeroing: float | None = Field(None, ge=1, le=1e6)
    # Chunked transfer (protocol.md): the broker's message limit, so devices learn it; None
    # (omitted): devices use their own broker.max_message_bytes, if any.
    max_message_bytes: int | None = Field(None, ge=4096, le=1 << 28)

    @model_validator(mode="after")
    def _robust_needs_single_updates(self) -> Plan:
        robust = self.robust != "none" or self.robust_zeroing is not None
        if robust and self.secure_aggregation is not None:
            raise ValueError(
                f"robust={self.robust!r}/robust_zeroing={self.robust_zeroing!r} cannot be "
                "combined with secure_aggregation: a secure round reveals only the sum of the "
                "cohort's updates, never one update, so no per-update statistic exists"
            )
        if robust and self.update_rotation != "none":
            raise ValueError(
                f"robust={self.robust!r}/robust_zeroing={self.robust_zeroing!r} cannot be "
                f"combined with update_rotation={self.update_rotation!r}: coordinate-wise "
                "statistics need the updates' own coordinates, a rotation mixes them"
            )
        return self

    def to_bytes(self) -> bytes:
        omit = {k for k, d in _PLAN_OMITTED.items() if getattr(self, k) == d}
        return self.model_dump_json(exclude_none=True, exclude=omit).encode()

    @property
    def noise_sigma(self) -> float:
        """The standard deviation of the noise on one update: z * C, or the old noise_stddev."""
        if self.noise_multiplier > 0:
            return self.noise_multiplier * self.clip_norm
        return self.noise_stddev

    @property
    def effective_noise_multiplier(self) -> float:
        """sigma / C: the quantity the accountant and the devices' privacy floor use."""
        return self.noise_sigma / self.clip_norm

    @property
    def dp(self) -> bool:
        """Whether updates are noised (DP mode: device metrics are not sent raw)."""
        return self.noise_sigma > 0


_PLAN_OMITTED: dict[str, object] = {
    "generation": 0,
    "max_updates_per_device": 1,
    "noise_multiplier": 0.0,
    "delta": 1e-5,
    "server_optimizer": "sgd",
    "server_momentum": 0.9,
    "server_beta2": 0.99,
    "server_epsilon": 1e-3,
    "update_encoding": "f32",
    "update_block": 0,
    "update_rotation": "none",
    "model_encoding": "f32",
    "robust": "none",
    "robust_beta": 0.1,
}


class Receipt(_Json):
    """The aggregator's answer to one update: the only proof a device may trust."""

    kind: Literal["receipt"] = "receipt"
    task: Name
    device: Name
    update_id: Name
    status: Literal["accepted", "duplicate", "rejected"]
    reason: str | None = Field(None, max_length=64)
    detail: str | None = Field(None, max_length=1024)
    version: Version  # the aggregator's current version when it answered
    pending: Version | None = None  # the version this update will contribute to


class DeviceStatus(_Json):
    """Retained per-device status; the Last Will publishes ``state="offline"``."""

    kind: Literal["device_status"] = "device_status"
    device: Name
    state: Literal["online", "training", "offline"]
    version: Version | None = None
    examples: int = Field(0, ge=0)
    outbox: int = Field(0, ge=0)
    updates_sent: int = Field(0, ge=0)
    software: str = Field("", max_length=64)
    time: float = Field(0.0, ge=0)
    refused: str | None = Field(None, max_length=256)  # why the device does not take part


class AggregatorStatus(_Json):
    """Retained aggregator status: where the pending version stands."""

    kind: Literal["aggregator_status"] = "aggregator_status"
    task: Name
    state: Literal["online", "offline"]
    version: Version | None = None
    pending_updates: int = Field(0, ge=0)
    pending_examples: int = Field(0, ge=0)
    min_updates_per_version: int = Field(0, ge=0)
    accepted_total: int = Field(0, ge=0)
    rejected_total: int = Field(0, ge=0)
    time: float = Field(0.0, ge=0)
    # Secure aggregation only: the current round and its stage ("checkin" between rounds).
    round_id: Name | None = None
    round_stage: str | None = Field(None, max_length=16)
    checked_in: int | None = Field(None, ge=0)
    # Differential privacy (plans with noise): epsilon spent at delta by the versions so far,
    # the budget, and why no more versions are published (None while they are).
    epsilon: float | None = Field(None, ge=0)
    delta: float | None = Field(None, gt=0, lt=1)
    max_epsilon: float | None = Field(None, gt=0)
    stopped: str | None = Field(None, max_length=256)


class AggregatorLease(_Json):
    """Retained claim of one aggregator process to a role of a task (docs/operations.md).

    ``role`` is ``writer`` (the one process that publishes versions: a single aggregator or the
    coordinator) or ``shard-{id}`` (a shard worker). The holder's lease connection has a Last
    Will that clears the topic, so the broker frees the lease when the holder dies.
    """

    kind: Literal["aggregator_lease"] = "aggregator_lease"
    task: Name
    role: Name
    instance: Name
    host: str = Field("", max_length=253)
    pid: int = Field(0, ge=0)
    time: float = Field(0.0, ge=0)


class BatchAck(_Json):
    """The coordinator's answer to a worker's partial sum ``(worker, seq)``.

    ``merged``: stored durably, it will be in the next version; ``duplicate``: already stored or
    published; ``conflict``: some of its updates are already counted (a resend another worker
    took): the worker sends the batch again without the ``exclude`` keys; ``refused``: the
    worker is not in the coordinator's shard set (it stops).
    """

    kind: Literal["batch_ack"] = "batch_ack"
    task: Name
    worker: Name
    seq: int = Field(ge=0, lt=1 << 53)
    status: Literal["merged", "duplicate", "conflict", "refused"]
    exclude: list[Annotated[str, StringConstraints(max_length=200)]] = Field(
        default_factory=list, max_length=100_000
    )
    detail: str | None = Field(None, max_length=1024)  # why, for "refused"


class CheckIn(_Json):
    """A device with an update on ``base_version`` ready for a secure-aggregation round."""

    kind: Literal["checkin"] = "checkin"
    task: Name
    device: Name
    base_version: Version
    num_examples: int = Field(ge=1, le=1 << 40)
    time: float = Field(0.0, ge=0)


class VersionMetrics(_Json):
    """What the aggregator knows about one version: what went in and the devices' own metrics."""

    kind: Literal["version_metrics"] = "version_metrics"
    task: Name
    version: Version
    updates: int = Field(ge=0)
    examples: int = Field(ge=0)
    train_loss: float | None = None  # weighted mean of the devices' reported training losses
    eval_loss: float | None = None  # weighted mean of pre-training local evaluation
    eval_accuracy: float | None = None
    mean_update_norm: float | None = None
    seconds: float = Field(0.0, ge=0)  # since the previous version
    time: float = Field(0.0, ge=0)
    # Differential privacy: epsilon at delta for all versions up to this one (docs/privacy.md).
    epsilon: float | None = Field(None, ge=0)
    delta: float | None = Field(None, gt=0, lt=1)
    # Adaptive clipping: the noised fraction of unclipped updates that went in, and the clip
    # published with this version (fededge/protocol/clipping.py).
    unclipped: float | None = None
    clip: float | None = Field(None, gt=0)


M = TypeVar("M", bound=_Json)


def decode_json(payload: bytes, model: type[M], *, max_bytes: int = MAX_JSON_BYTES) -> M:
    """Parse and validate an untrusted JSON control message; ProtocolError says what is wrong."""
    if len(payload) > max_bytes:
        raise ProtocolError(f"JSON message of {len(payload)} bytes exceeds {max_bytes}")
    try:
        obj = json.loads(payload)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, bad UTF-8, >4300-digit ints
        raise ProtocolError(f"not valid JSON: {str(e)[:200]}") from None
    if not isinstance(obj, dict):
        raise ProtocolError("message is not a JSON object")
    if type(obj.get("v")) is not int or obj.get("v") != PROTOCOL_VERSION:
        raise ProtocolError(
            f"unsupported protocol version {obj.get('v')!r} (this is v1)",
            reason=RejectReason.UNSUPPORTED_VERSION,
        )
    try:
        return model.model_validate(obj)
    except pydantic.ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(p) for p in first["loc"]) or "(root)"
        raise ProtocolError(f"{model.__name__}.{loc}: {first['msg']}") from None


# ---------------------------------------------------------------------------------------------
# Tensor messages: safetensors whose __metadata__ carries the protocol fields (all strings).

Weights = dict[str, NDArray[np.float32]]


def _meta_int(meta: Mapping[str, str], key: str, lo: int = 0, hi: int = 1 << 53) -> int:
    raw = meta.get(key)
    if (
        raw is None
        or not (raw.isascii() and raw.isdigit())  # "²" and "١" are digits to str.isdigit
        or len(raw) > 16
        or not lo <= int(raw) < hi
    ):
        raise ProtocolError(f"metadata {key!r} must be an integer in [{lo}, {hi}), got {raw!r}")
    return int(raw)


def _meta_name(meta: Mapping[str, str], key: str) -> str:
    raw = meta.get(key, "")
    if not is_name(raw):
        raise ProtocolError(f"metadata {key!r} must be a name of 1-64 [A-Za-z0-9_.-], got {raw!r}")
    return raw


def _meta_float(
    meta: Mapping[str, str], key: str, lo: float = -1e6, hi: float = 1e6
) -> float | None:
    raw = meta.get(key)
    if raw is None:
        return None
    try:
        value = float(raw) if len(raw) <= 64 else math.nan
    except ValueError:
        raise ProtocolError(f"metadata {key!r} must be a number, got {raw[:64]!r}") from None
    # Bounded, not just finite: the aggregator sums weighted losses, and 1e308 would overflow.
    if not (math.isfinite(value) and lo <= value <= hi):
        raise ProtocolError(
            f"metadata {key!r} must be a number in [{lo:g}, {hi:g}], got {raw[:64]!r}"
        )
    return value


def _check_header(meta: Mapping[str, str], kind: str) -> None:
    if meta.get("fededge") != str(PROTOCOL_VERSION):
        raise ProtocolError(
            f"unsupported protocol version {meta.get('fededge')!r} (this is v1)",
            reason=RejectReason.UNSUPPORTED_VERSION,
        )
    if meta.get("kind") != kind:
        raise ProtocolError(f"expected a {kind!r} message, got kind {meta.get('kind')!r}")
    for reserved in ("chunk", "signature"):
        if reserved in meta:
            raise ProtocolError(f"metadata {reserved!r} is reserved and not supported in v1")


def _float32(tensors: Mapping[str, NDArray[np.generic]], what: str) -> Weights:
    out: Weights = {}
    for name, arr in tensors.items():
        if arr.dtype != np.float32:
            raise ProtocolError(f"{what} tensor {name!r} has dtype {arr.dtype}, expected float32")
        out[name] = arr  # type: ignore[assignment]
    if not out:
        raise ProtocolError(f"{what} carries no tensors")
    return out


def _any_tensors(tensors: Mapping[str, NDArray[np.generic]]) -> Weights:
    # Dtypes of updates are checked by the aggregator's policy, which rejects with its own
    # reason ("wrong_dtype"); here only emptiness is a decoding error.
    if not tensors:
        raise ProtocolError("update carries no tensors")
    return dict(tensors)  # type: ignore[arg-type]


@dataclass(frozen=True)
class ModelVersion:
    """One model version: the weights plus what a device needs to trust and use them."""

    task: str
    version: int
    weights: Weights
    graph_sha256: str
    parent: int | None = None
    updates: int = 0
    examples: int = 0
    time: float = 0.0
    generation: int = 0  # the plan generation it belongs to (omitted when 0)
    # "f16": the tensors travel as F16 (plan model_encoding); ``weights`` are float32 either
    # way (decoded on arrival). Omitted from the bytes when f32.
    encoding: str = "f32"
    clip: float | None = None  # adaptive clipping: the clip devices use on it (omitted: None)

    def to_bytes(self) -> bytes:
        meta = {
            "fededge": str(PROTOCOL_VERSION),
            "kind": "model",
            "task": self.task,
            "version": str(self.version),
            "graph_sha256": self.graph_sha256,
            "updates": str(self.updates),
            "examples": str(self.examples),
            "time": repr(float(self.time)),
        }
        if self.parent is not None:
            meta["parent"] = str(self.parent)
        if self.generation:
            meta["generation"] = str(self.generation)
        if self.clip is not None:
            meta["clip"] = repr(float(self.clip))
        if self.encoding == "f16":
            meta["encoding"] = "f16"
            halves = {n: np.asarray(a, dtype=np.float16) for n, a in self.weights.items()}
            return encode_tensors(halves, meta)
        return encode_tensors(self.weights, meta)

    @classmethod
    def from_bytes(cls, payload: bytes, *, max_bytes: int) -> ModelVersion:
        p = decode_tensors(payload, max_bytes=max_bytes)
        m = p.metadata
        _check_header(m, "model")
        sha = m.get("graph_sha256", "")
        if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
            raise ProtocolError(f"metadata 'graph_sha256' is not a sha256 hex digest: {sha!r}")
        return cls(
            task=_meta_name(m, "task"),
            version=_meta_int(m, "version"),
            weights=_model_weights(p.tensors, m),
            graph_sha256=sha,
            parent=_meta_int(m, "parent") if "parent" in m else None,
            updates=_meta_int(m, "updates") if "updates" in m else 0,
            examples=_meta_int(m, "examples") if "examples" in m else 0,
            time=_meta_float(m, "time", 0.0, 1e11) or 0.0,
            generation=_meta_int(m, "generation") if "generation" in m else 0,
            encoding=m.get("encoding", "f32"),
            clip=_meta_float(m, "clip", 1e-9, 1e9),
        )


def _model_weights(tensors: Mapping[str, NDArray[np.generic]], meta: Mapping[str, str]) -> Weights:
    """A model's weights as float32: F32 tensors, or F16 ones (metadata encoding f16) widened."""
    enc = meta.get("encoding", "f32")
    if enc == "f32":
        return _float32(tensors, "model")
    if enc != "f16":
        raise ProtocolError(f"model metadata 'encoding' must be f32 or f16, got {enc[:32]!r}")
    out: Weights = {}
    for name, arr in tensors.items():
        if arr.dtype != np.float16:
            raise ProtocolError(f"model tensor {name!r} has dtype {arr.dtype}, expected float16")
        out[name] = arr.astype(np.float32)
    if not out:
        raise ProtocolError("model carries no tensors")
    return out


def _meta_encoding(meta: Mapping[str, str]) -> str:
    raw = meta.get("encoding", "f32")
    if raw not in ("f32", "f16", "int8"):
        raise ProtocolError(f"metadata 'encoding' must be f32, f16 or int8, got {raw[:32]!r}")
    return raw


def _meta_rotation(meta: Mapping[str, str]) -> str:
    raw = meta.get("rotation", "none")
    if raw not in ("none", "hadamard"):
        raise ProtocolError(f"metadata 'rotation' must be none or hadamard, got {raw[:32]!r}")
    return raw


@dataclass(frozen=True)
class Update:
    """One device's clipped, noised weight delta against a base version."""

    task: str
    device: str
    update_id: str
    base_version: int
    num_examples: int
    delta: Weights
    train_loss: float | None = None
    eval_loss: float | None = None
    eval_accuracy: float | None = None
    extra: dict[str, str] = field(default_factory=dict)
    # How ``delta`` is encoded (fededge/protocol/encoding.py); f32 is omitted from the bytes.
    encoding: str = "f32"
    block: int = 0  # int8: elements per scale (0: one scale per tensor)
    rotation: str = "none"  # "hadamard": one tensor "rotated" (fededge/protocol/rotation.py)
    # Adaptive clipping: the centred, noised clipped-or-not bit (fededge/protocol/clipping.py).
    unclipped: float | None = None

    def to_bytes(self) -> bytes:
        meta = {
            "fededge": str(PROTOCOL_VERSION),
            "kind": "update",
            "task": self.task,
            "device": self.device,
            "update_id": self.update_id,
            "base_version": str(self.base_version),
            "num_examples": str(self.num_examples),
        }
        for key in ("train_loss", "eval_loss", "eval_accuracy"):
            value = getattr(self, key)
            if value is not None:
                meta[key] = repr(float(value))
        if self.encoding != "f32":
            meta["encoding"] = self.encoding
        if self.encoding == "int8":
            meta["block"] = str(self.block)
        if self.rotation != "none":
            meta["rotation"] = self.rotation
        if self.unclipped is not None:
            meta["unclipped"] = repr(float(self.unclipped))
        return encode_tensors(self.delta, meta)

    @classmethod
    def from_bytes(cls, payload: bytes | bytearray | memoryview, *, max_bytes: int) -> Update:
        if type(payload) is bytes or type(payload) is bytearray:  # (what clients hand over)
            fast = _written_update(payload, max_bytes)
            if fast is not None:
                return fast
        tensors, m = decode_parts(payload, max_bytes=max_bytes)
        fast = _plain_update(m, tensors)
        return fast if fast is not None else cls.from_fields(m, tensors)

    @classmethod
    def from_fields(cls, m: dict[str, str], tensors: dict[str, NDArray[np.generic]]) -> Update:
        """The update of decoded metadata and tensors (the general path, which also names
        what is wrong: ``from_bytes`` tries a faster one for plain updates first)."""
        _check_header(m, "update")
        return cls(
            task=_meta_name(m, "task"),
            device=_meta_name(m, "device"),
            update_id=_meta_name(m, "update_id"),
            base_version=_meta_int(m, "base_version"),
            num_examples=_meta_int(m, "num_examples", 1, 1 << 40),
            delta=_any_tensors(tensors),
            # Range checks of these are the aggregator's (reason "bad_metrics", with a receipt).
            train_loss=_meta_float(m, "train_loss", -math.inf, math.inf),
            eval_loss=_meta_float(m, "eval_loss", -math.inf, math.inf),
            eval_accuracy=_meta_float(m, "eval_accuracy", -math.inf, math.inf),
            encoding=_meta_encoding(m),
            block=_meta_int(m, "block", 0, 1 << 31) if m.get("encoding") == "int8" else 0,
            rotation=_meta_rotation(m),
            unclipped=_meta_float(m, "unclipped", -math.inf, math.inf),  # range: the aggregator's
        )


@dataclass(frozen=True)
class Graph:
    """The task's .tflite graph and its bundle spec, published retained once per task."""

    task: str
    tflite: bytes
    spec: dict[str, Any]

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.tflite).hexdigest()

    def to_bytes(self) -> bytes:
        meta = {
            "fededge": str(PROTOCOL_VERSION),
            "kind": "graph",
            "task": self.task,
            "sha256": self.sha256,
            "spec": json.dumps(self.spec, sort_keys=True, separators=(",", ":")),
        }
        return encode_tensors({"tflite": np.frombuffer(self.tflite, dtype=np.uint8)}, meta)

    @classmethod
    def from_bytes(cls, payload: bytes, *, max_bytes: int) -> Graph:
        p = decode_tensors(payload, max_bytes=max_bytes)
        m = p.metadata
        _check_header(m, "graph")
        arr = p.tensors.get("tflite")
        if arr is None or arr.dtype != np.uint8 or arr.ndim != 1 or len(p.tensors) != 1:
            raise ProtocolError("graph message must hold exactly one uint8 tensor 'tflite'")
        tflite = arr.tobytes()
        if hashlib.sha256(tflite).hexdigest() != m.get("sha256"):
            raise ProtocolError("graph sha256 in metadata does not match the graph bytes")
        try:
            spec = json.loads(m.get("spec", ""))
        except (ValueError, RecursionError) as e:
            raise ProtocolError(f"graph metadata 'spec' is not JSON: {str(e)[:200]}") from None
        if not isinstance(spec, dict):
            raise ProtocolError("graph metadata 'spec' is not a JSON object")
        return cls(task=_meta_name(m, "task"), tflite=tflite, spec=spec)


_PLAIN_UPDATE_KEYS = frozenset(
    ("fededge", "kind", "task", "device", "update_id", "base_version", "num_examples")
)
_PLAIN_UPDATE_METRICS = frozenset(("train_loss", "eval_loss", "eval_accuracy"))
_NAMES3_MATCH = re.compile(rf"{NAME_PATTERN}/{NAME_PATTERN}/{NAME_PATTERN}").fullmatch


def _plain_int(raw: str, hi: int) -> int | None:
    # The checks of _meta_int, for the fast path: None sends the update to the general path.
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 16:
        return None
    value = int(raw)
    return value if value < hi else None


def _plain_update(meta: dict[str, str], tensors: dict[str, NDArray[np.generic]]) -> Update | None:
    """The common update (f32, no options; metrics or not) checked in a few lines, else None.

    Accepts exactly what ``Update.from_bytes``'s general path accepts for these keys, and
    builds the same object; anything else (including every error) goes the general way, so
    the errors and their reasons are that path's.
    """
    keys = meta.keys()
    if keys != _PLAIN_UPDATE_KEYS and not (
        keys >= _PLAIN_UPDATE_KEYS and keys - _PLAIN_UPDATE_KEYS <= _PLAIN_UPDATE_METRICS
    ):
        return None
    if meta["fededge"] != "1" or meta["kind"] != "update":
        return None
    task, device, uid = meta["task"], meta["device"], meta["update_id"]
    if _NAMES3_MATCH(f"{task}/{device}/{uid}") is None:  # all three names ("/" is in none)
        return None
    base = _plain_int(meta["base_version"], 1 << 53)
    examples = _plain_int(meta["num_examples"], 1 << 40)
    if base is None or examples is None or examples < 1 or not tensors:
        return None
    inf = math.inf
    metrics = len(meta) > 7  # last, as on the general path: its errors are the same
    # A frozen dataclass's __init__ sets each of its 14 fields through object.__setattr__;
    # filling __dict__ at once builds the same object in a fifth of the time.
    u = object.__new__(Update)
    u.__dict__.update(
        task=task, device=device, update_id=uid, base_version=base, num_examples=examples,
        delta=tensors,
        train_loss=_meta_float(meta, "train_loss", -inf, inf) if metrics else None,
        eval_loss=_meta_float(meta, "eval_loss", -inf, inf) if metrics else None,
        eval_accuracy=_meta_float(meta, "eval_accuracy", -inf, inf) if metrics else None,
        extra={}, encoding="f32", block=0, rotation="none", unclipped=None,
    )  # fmt: skip
    return u


_VALUE = r'[^"\\\x00-\x1f]{0,64}'  # a metric's string (longer ones are refused anyway)
_U64 = struct.Struct("<Q")
# The header of a plain f32 update exactly as Update.to_bytes and encode_header write it:
# metadata keys sorted, the metrics optional, float32 tensors (tensors.F32_ENTRIES). The
# digits of the two integers are those _plain_int accepts; the names are checked by the pattern.
_WRITTEN_UPDATE = re.compile(
    rf'\{{"__metadata__":\{{"base_version":"([0-9]{{1,16}})","device":"({NAME_PATTERN})",'
    rf'(?:"eval_accuracy":"({_VALUE})",)?(?:"eval_loss":"({_VALUE})",)?'
    rf'"fededge":"1","kind":"update","num_examples":"([0-9]{{1,16}})",'
    rf'"task":"({NAME_PATTERN})",(?:"train_loss":"({_VALUE})",)?'
    rf'"update_id":"({NAME_PATTERN})"\}}({F32_ENTRIES})\}} *'
).fullmatch


def _written_update(payload: bytes | bytearray, max_bytes: int) -> Update | None:
    """``Update.from_bytes`` of a plain f32 update as devices write it, without parsing its
    header as JSON: one pattern match (``_WRITTEN_UPDATE``) instead of json's scanner,
    ``decode_parts`` and ``_plain_update``. The same Update; None for anything else, which
    includes everything those refuse, so the general path decides and names the error.
    """
    size = len(payload)
    if size > max_bytes or size < 8:
        return None
    (hlen,) = _U64.unpack_from(payload, 0)
    if hlen > MAX_HEADER_BYTES or hlen > size - 8:
        return None
    try:
        text = str(payload[8 : 8 + hlen], "utf-8")
    except UnicodeDecodeError:
        return None
    m = _WRITTEN_UPDATE(text)
    if m is None:
        return None
    base, device, eval_accuracy, eval_loss, examples, task, train_loss, uid, entries = m.groups()
    base_version, num_examples = int(base), int(examples)
    if base_version >= 1 << 53 or not 1 <= num_examples < 1 << 40:
        return None
    tensors = f32_tensors(payload, 8 + hlen, entries)
    if tensors is None:
        return None
    losses: list[float | None] = [None, None, None]
    if not (train_loss is None and eval_loss is None and eval_accuracy is None):
        for i, raw in enumerate((train_loss, eval_loss, eval_accuracy)):
            if raw is not None:
                # _meta_float(.., -inf, inf) of a string of at most 64 characters
                try:
                    value = float(raw)
                except ValueError:
                    return None
                if not math.isfinite(value):
                    return None
                losses[i] = value
    u = object.__new__(Update)  # as _plain_update builds it
    u.__dict__.update(
        task=task, device=device, update_id=uid, base_version=base_version,
        num_examples=num_examples, delta=tensors, train_loss=losses[0], eval_loss=losses[1],
        eval_accuracy=losses[2], extra={}, encoding="f32", block=0, rotation="none",
        unclipped=None,
    )  # fmt: skip
    return u


def flat_size(weights: Mapping[str, NDArray[Any]]) -> int:
    """Number of parameters in a set of named tensors."""
    return int(sum(a.size for a in weights.values()))
