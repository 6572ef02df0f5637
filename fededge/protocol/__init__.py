"""Wire protocol v1: topics, JSON control messages and safetensors tensor messages (no I/O)."""

from fededge.protocol.messages import (
    PROTOCOL_VERSION,
    AggregatorLease,
    AggregatorStatus,
    BatchAck,
    DeviceStatus,
    Graph,
    ModelVersion,
    Plan,
    Receipt,
    Update,
    VersionMetrics,
    decode_json,
)
from fededge.protocol.tensors import TensorPayload, decode_tensors, encode_tensors
from fededge.protocol.topics import Topics

__all__ = [
    "PROTOCOL_VERSION",
    "AggregatorLease",
    "AggregatorStatus",
    "BatchAck",
    "DeviceStatus",
    "Graph",
    "ModelVersion",
    "Plan",
    "Receipt",
    "TensorPayload",
    "Topics",
    "Update",
    "VersionMetrics",
    "decode_json",
    "decode_tensors",
    "encode_tensors",
]
