"""Compressed update encodings (plan ``update_encoding``; docs/protocol.md, "Update encodings").

An update's metadata ``encoding`` says how its tensors carry the delta (absent: ``f32``):

* ``f32``: each tensor ``NAME`` is F32 with the model's shape (protocol v1 as before).
* ``f16``: each tensor ``NAME`` is F16 (IEEE binary16, little-endian) with the model's shape.
* ``int8``: each tensor ``NAME`` is I8 with the model's shape, plus ``NAME:scale``, F32 of shape
  ``[ceil(size / B)]`` where ``B`` is metadata ``block`` (``0``: one scale per tensor, B = size).
  Element i decodes to ``scale[i // B] * q[i]``. ``q`` is in [-127, 127].

Quantisation is unbiased: ``scale = max|x| / 127`` per block, ``q = floor(x / scale + u)`` with
``u ~ U[0, 1)``, so E[scale * q] = x. The encoder then guarantees that the decoded update's L2
norm does not exceed the float32 delta's (it shrinks the scales, or for f16 the values, by the
last few ulps when rounding pushed it above): an honest update passes the same norm bound.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
from numpy.typing import NDArray

ENCODINGS = ("f32", "f16", "int8")
SCALE_SUFFIX = ":scale"


def blocks(size: int, block: int) -> tuple[int, int]:
    """(elements per scale, number of scales) of a tensor of ``size`` under metadata ``block``."""
    b = block if block > 0 else max(size, 1)
    return b, -(-size // b)


def _norm64(parts: list[NDArray[np.float64]]) -> float:
    return math.sqrt(sum(float(np.dot(p, p)) for p in parts))


def encode_delta(
    delta: Mapping[str, NDArray[np.float32]],
    encoding: str,
    block: int = 0,
    rng: np.random.Generator | None = None,
) -> dict[str, NDArray[Any]]:
    """The tensors of an update carrying ``delta`` (float32) in ``encoding``."""
    if encoding == "f32":
        return dict(delta)
    flat = {n: np.asarray(a, dtype=np.float32).reshape(-1) for n, a in delta.items()}
    target = _norm64([a.astype(np.float64) for a in flat.values()])
    if encoding == "f16":
        x = {n: a.astype(np.float64) for n, a in flat.items()}
        factor = 1.0
        while True:
            h = {n: (a * factor).astype(np.float16) for n, a in x.items()}
            got = _norm64([a.astype(np.float64) for a in h.values()])
            if got <= target or factor == 0.0:
                break
            factor = 0.0 if factor < 1e-3 else factor * (target / got) * (1 - 2.0**-11)
        return {n: h[n].reshape(np.shape(delta[n])) for n in delta}
    if encoding != "int8":
        raise ValueError(f"unknown update encoding {encoding!r}")
    rng = rng if rng is not None else np.random.default_rng()
    qs: dict[str, NDArray[np.int8]] = {}
    scales: dict[str, NDArray[np.float32]] = {}
    for n, a in flat.items():
        b, nb = blocks(a.size, block)
        padded = np.zeros(nb * b, dtype=np.float64)
        padded[: a.size] = a
        m = np.abs(padded.reshape(nb, b)).max(axis=1) if nb else np.zeros(0)
        s = (m / 127.0).astype(np.float32)
        s64 = np.repeat(s.astype(np.float64), b)[: a.size]
        with np.errstate(divide="ignore", invalid="ignore"):
            y = np.where(s64 > 0, a / s64, 0.0)
        q = np.floor(y + rng.random(a.size))
        qs[n] = np.clip(q, -127, 127).astype(np.int8)
        scales[n] = s
    while True:  # shrink the scales until the decoded norm is within the float32 delta's
        dec = [
            np.repeat(scales[n].astype(np.float64), blocks(flat[n].size, block)[0])[: flat[n].size]
            * qs[n]
            for n in flat
        ]
        got = _norm64(dec)
        if got <= target:
            break
        f = (target / got) * (1 - 2.0**-20)
        scales = {n: (s.astype(np.float64) * f).astype(np.float32) for n, s in scales.items()}
    out: dict[str, NDArray[Any]] = {}
    for n in delta:
        out[n] = qs[n].reshape(np.shape(delta[n]))
        out[n + SCALE_SUFFIX] = scales[n]
    return out


def decode_delta(
    tensors: Mapping[str, NDArray[np.generic]], encoding: str, block: int = 0
) -> dict[str, NDArray[np.float64]]:
    """Decoded float64 values of an encoded update (a reference: the aggregator never does this;
    it folds encoded tensors with fused kernels)."""
    out: dict[str, NDArray[np.float64]] = {}
    for n, a in tensors.items():
        if n.endswith(SCALE_SUFFIX):
            continue
        if encoding == "int8":
            s = np.asarray(tensors[n + SCALE_SUFFIX], dtype=np.float64)
            b, _ = blocks(a.size, block)
            out[n] = (np.repeat(s, b)[: a.size] * a.reshape(-1).astype(np.float64)).reshape(a.shape)
        else:
            out[n] = np.asarray(a, dtype=np.float64)
    return out
