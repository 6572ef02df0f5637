"""What the aggregator publishes for a stored model version (plan ``model_encoding``)."""

from __future__ import annotations

import dataclasses
import logging

import numpy as np

from fededge.protocol import ModelVersion

log = logging.getLogger(__name__)


def published_model(payload: bytes, encoding: str) -> bytes:
    """The bytes to publish for a stored (float32) model version under plan model_encoding.

    ``f16``: the same version with float16 tensors, about half the bytes; the float32 master
    copy (and the optimizer state) stay with the aggregator. A version whose weights do not fit
    in float16 (|w| > 65504) is published as float32, with a warning.
    """
    if encoding != "f16":
        return payload
    model = ModelVersion.from_bytes(payload, max_bytes=len(payload))
    half = dataclasses.replace(model, encoding="f16")
    # float16 rounds |w| < 65520 to at most 65504; anything larger becomes infinite.
    if not all(bool((np.abs(a) < 65520.0).all()) for a in model.weights.values()):
        log.warning("version %d has weights beyond float16: published as float32", model.version)
        return payload
    return half.to_bytes()
