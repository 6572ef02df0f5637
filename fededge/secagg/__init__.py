"""Secure aggregation (SecAgg+, Bell et al. 2020): crypto, quantisation, round state machines."""

from fededge.secagg.device import DeviceRound
from fededge.secagg.graph import Stage, check_stage
from fededge.secagg.messages import TO_ALL, TO_SERVER, Outgoing, RoundConfig, decode_payload, encode
from fededge.secagg.quantize import FixedPoint, max_scale, mean_error_bound, warmup
from fededge.secagg.server import ServerRound

__all__ = [
    "TO_ALL",
    "TO_SERVER",
    "DeviceRound",
    "FixedPoint",
    "Outgoing",
    "RoundConfig",
    "ServerRound",
    "Stage",
    "check_stage",
    "decode_payload",
    "encode",
    "max_scale",
    "mean_error_bound",
    "warmup",
]
