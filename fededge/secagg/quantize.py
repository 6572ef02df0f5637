"""Fixed-point encoding of weighted updates into Z_{2^k} and back, with checked kernel wrappers.

An update (weight w, delta) becomes the vector ``[w~, w~ * clip(delta)]`` with
``w~ = min(w, max_weight) / max_weight`` in [0, 1] and ``clip`` scaling delta to L2 norm <= C.
Each entry v is stochastically rounded to an integer q with E[q] = v * scale and |q - v*scale| < 1,
then reduced mod 2^k. Every |q| <= scale * B + 1 with B = max(C, 1), so the sum of n encoded
updates stays below 2^(k-1) in absolute value - and decodes exactly - whenever

    n * (scale * B + 1) <= 2^(k-1) - 1            (no-wrap condition; see :func:`max_scale`).

Decoding the sum gives S_w = sum w~_i and S_d = sum w~_i delta_i, each entry off by less than
eps = n / scale (rounding errors are unbiased, independent, each in (-1, 1) / scale). The weighted
mean S_d / S_w is then off by at most eps * (1 + C) / (S_w - eps) per coordinate
(:func:`mean_error_bound`).

Adaptive clipping adds nothing here: a device appends its bit as one more entry of delta
(``fededge.protocol.clipping.with_bit_entry``) and the round's clip covers it (C * sqrt(1.1)).

Kernels come from fededge.native (Numba, aggregator install), loaded only when asked for with
:func:`load_kernels` (the aggregator's :class:`ServerRound` and :func:`warmup` do): a device never
imports Numba, even where it is installed (it costs ~70 MiB of RSS, and the device unit forbids
W^X memory, so it could not run anyway), and uses the numpy versions here, which produce
bit-identical results.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from types import ModuleType

import numpy as np
import numpy.typing as npt

from fededge.errors import ConfigError

_kernels: ModuleType | None = None
_tried = False

U32 = npt.NDArray[np.uint32]
F64 = npt.NDArray[np.float64]
_HASH1 = np.uint32(0x7FEB352D)
_HASH2 = np.uint32(0x846CA68B)
_TWO_POW_M32 = 1.0 / 4294967296.0
_CHUNK = 1 << 16  # numpy fallback works in chunks to bound its temporaries


def load_kernels() -> bool:
    """Use the Numba kernels from now on if Numba is installed; whether they are in use.

    Idempotent and cheap after the first call. Only the aggregator side calls it.
    """
    global _kernels, _tried
    if not _tried:
        _tried = True
        try:
            _kernels = importlib.import_module("fededge.native.secagg")
        except ImportError:  # an install without Numba
            _kernels = None
    return _kernels is not None


def has_kernels() -> bool:
    """Whether the Numba kernels are in use (else the numpy fallbacks run)."""
    return _kernels is not None


def _check(name: str, a: object, dtype: type[np.generic], writeable: bool = False) -> None:
    if not isinstance(a, np.ndarray):
        raise ValueError(f"{name} must be a numpy array, got {type(a).__name__}")
    if a.dtype != np.dtype(dtype):
        raise ValueError(f"{name} must have dtype {np.dtype(dtype)}, got {a.dtype}")
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {a.shape}")
    if not a.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous")
    if writeable and not a.flags.writeable:
        raise ValueError(f"{name} must be writeable")


def _check_same(a_name: str, a: np.ndarray, b_name: str, b: np.ndarray) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{a_name} has shape {a.shape} but {b_name} has shape {b.shape}")


def _check_bits(bits: int) -> int:
    if not isinstance(bits, int) or not 8 <= bits <= 32:
        raise ValueError(f"bits must be an int in 8..32, got {bits!r}")
    return (1 << bits) - 1


def sum_squares(x: npt.NDArray[np.floating]) -> float:
    """Sum of squares of a float32/float64 vector, accumulated in float64."""
    if not isinstance(x, np.ndarray) or x.dtype not in (np.float32, np.float64):
        raise ValueError("x must be a float32 or float64 numpy array")
    _check("x", x, x.dtype.type)
    if _kernels is not None:
        return float(_kernels.sum_squares(x))
    return float(np.dot(x.astype(np.float64), x.astype(np.float64)))


def _hash32_np(x: npt.NDArray[np.uint32]) -> npt.NDArray[np.uint32]:
    x = x ^ (x >> np.uint32(16))
    x *= _HASH1  # uint32 arrays wrap modulo 2^32, as the kernel does
    x ^= x >> np.uint32(15)
    x *= _HASH2
    x ^= x >> np.uint32(16)
    return x


def quantize_into(
    x: npt.NDArray[np.floating], factor: float, key: int, start: int, bits: int, out: U32
) -> None:
    """out[i] = stochastic_round(x[i] * factor) mod 2^bits; randomness from (key, start + i).

    Unbiased: E[result] = x * factor exactly (up to the 2^-32 grid of the uniform draw); values
    saturate at the int32 range, which callers keep clear of (the no-wrap condition does).
    """
    mask = _check_bits(bits)
    if not isinstance(x, np.ndarray) or x.dtype not in (np.float32, np.float64):
        raise ValueError("x must be a float32 or float64 numpy array")
    _check("x", x, x.dtype.type)
    _check("out", out, np.uint32, writeable=True)
    _check_same("x", x, "out", out)
    if not math.isfinite(factor):
        raise ValueError(f"factor must be finite, got {factor}")
    if not 0 <= key < 1 << 64 or not 0 <= start < 1 << 32:
        raise ValueError("key must fit in 64 unsigned bits and start in 32")
    key_lo, key_hi = np.uint32(key & 0xFFFFFFFF), np.uint32(key >> 32)
    if _kernels is not None:
        _kernels.quantize(x, float(factor), key_lo, key_hi, np.uint32(start), np.uint32(mask), out)
        return
    for lo in range(0, x.shape[0], _CHUNK):
        hi = min(lo + _CHUNK, x.shape[0])
        c = np.arange(lo, hi, dtype=np.uint64).astype(np.uint32)  # wraps like the kernel
        c += np.uint32(start)
        c += key_lo
        u = _hash32_np(_hash32_np(c) ^ key_hi).astype(np.float64) * _TWO_POW_M32
        v = x[lo:hi].astype(np.float64) * factor + u
        np.clip(v, -2147483648.0, 2147483647.0, out=v)
        out[lo:hi] = np.floor(v).astype(np.int32).view(np.uint32) & np.uint32(mask)


def dequantize_into(acc: U32, bits: int, scale: float, out: F64) -> None:
    """out[i] = signed(acc[i]) / scale, reading acc as two's complement modulo 2^bits."""
    _check_bits(bits)
    _check("acc", acc, np.uint32)
    _check("out", out, np.float64, writeable=True)
    _check_same("acc", acc, "out", out)
    if not scale > 0 or not math.isfinite(scale):
        raise ValueError(f"scale must be positive and finite, got {scale}")
    if _kernels is not None:
        _kernels.dequantize(acc, np.int64(bits), 1.0 / scale, out)
        return
    v = acc.astype(np.int64)
    v[v >= 1 << (bits - 1)] -= 1 << bits
    out[:] = v.astype(np.float64) * (1.0 / scale)


def add_mod(acc: U32, x: U32, bits: int) -> None:
    """acc = (acc + x) mod 2^bits, in place."""
    mask = _check_bits(bits)
    _check("acc", acc, np.uint32, writeable=True)
    _check("x", x, np.uint32)
    _check_same("acc", acc, "x", x)
    if _kernels is not None:
        _kernels.add_mod(acc, x, np.int64(mask))
        return
    np.add(acc, x, out=acc)  # uint32 wraps modulo 2^32
    if bits < 32:
        np.bitwise_and(acc, np.uint32(mask), out=acc)


def sub_mod(acc: U32, x: U32, bits: int) -> None:
    """acc = (acc - x) mod 2^bits, in place."""
    mask = _check_bits(bits)
    _check("acc", acc, np.uint32, writeable=True)
    _check("x", x, np.uint32)
    _check_same("acc", acc, "x", x)
    if _kernels is not None:
        _kernels.sub_mod(acc, x, np.int64(mask))
        return
    np.subtract(acc, x, out=acc)
    if bits < 32:
        np.bitwise_and(acc, np.uint32(mask), out=acc)


def warmup() -> None:
    """Load the kernels and compile them (or load them from Numba's cache) now, not inside a
    round's deadline (aggregator side; a device has nothing to warm up)."""
    load_kernels()
    x = np.zeros(2, dtype=np.float32)
    words = np.zeros(2, dtype=np.uint32)
    sum_squares(x)
    sum_squares(x.astype(np.float64))
    quantize_into(x, 1.0, 0, 0, 32, words)
    quantize_into(x.astype(np.float64), 1.0, 0, 0, 32, words)
    dequantize_into(words, 32, 1.0, np.zeros(2))
    add_mod(words, words, 32)
    sub_mod(words, words, 32)


# Skellam(mu) = Poisson(mu) - Poisson(mu) has variance 2 mu. numpy's Poisson sampler is
# accurate to about mu = 1e12 (at 4.5e14 its variance is 20 % high); above it the noise is a
# rounded Gaussian, as close to a discrete Gaussian as float64 resolves at that width.
# DP rounds pick their scale so each device's noise is NOISE_UNITS integer units wide.
MAX_SKELLAM_MU = 1e12
NOISE_UNITS = 65536.0


def skellam_noise(stddev: float, size: int, rng: np.random.Generator) -> npt.NDArray[np.int64]:
    """Integer noise of standard deviation ``stddev`` (distributed DP, Agarwal et al. 2021).

    Skellam is closed under sums: the sum of n devices' noise is Skellam of n times the
    variance, exactly, which is what makes the sum of the survivors' inputs DP.
    """
    mu = stddev * stddev / 2.0
    if not (math.isfinite(mu) and 0 <= mu <= 1e30):
        raise ConfigError(f"integer noise of standard deviation {stddev:g} is out of range")
    if mu == 0:
        return np.zeros(size, dtype=np.int64)
    if mu > MAX_SKELLAM_MU:
        return np.rint(rng.normal(0.0, stddev, size)).astype(np.int64)
    return rng.poisson(mu, size).astype(np.int64) - rng.poisson(mu, size).astype(np.int64)


def noise_headroom(n_devices: int, noise_stddev: float) -> float:
    """What to add to max(clip, 1) in :func:`max_scale` so the survivors' summed noise (each
    device's of ``noise_stddev``, in delta units) does not wrap: 8 standard deviations of the
    sum, a per-coordinate failure probability below 1e-15."""
    return 8.0 * noise_stddev / math.sqrt(max(1, n_devices))


def dp_scale(n_devices: int, clip: float, bits: int, noise_stddev: float) -> float:
    """The scale of a round whose devices each add noise of ``noise_stddev`` (delta units):
    no wrap with the summed noise, and each device's noise NOISE_UNITS integers wide (an exact
    Skellam sample; rounding then adds under 1e-4 of the noise's variance)."""
    if not noise_stddev > 0:
        return max_scale(n_devices, clip, bits)
    room = max(clip, 1.0) + noise_headroom(n_devices, noise_stddev)
    return min(
        max_scale(n_devices, room, bits), float(math.floor(NOISE_UNITS / noise_stddev)) or 1.0
    )


def max_scale(n_devices: int, clip: float, bits: int) -> float:
    """The largest integer scale meeting the no-wrap condition for n devices (see module doc)."""
    _check_bits(bits)
    if n_devices < 1 or not clip > 0 or not math.isfinite(clip):
        raise ConfigError(f"need n_devices >= 1 and a positive clip, got {n_devices}, {clip}")
    # 2n instead of n leaves room for float rounding of the clip factor.
    scale = math.floor(((1 << (bits - 1)) - 1 - 2 * n_devices) / (n_devices * max(clip, 1.0)))
    if scale < 1:
        raise ConfigError(
            f"{bits} bits cannot hold the sum of {n_devices} updates clipped to {clip}"
        )
    return float(scale)


def no_wrap(n_devices: int, clip: float, scale: float, bits: int) -> bool:
    """Whether ``scale`` keeps the sum of n encoded updates from wrapping modulo 2^bits."""
    return 0 < scale <= max_scale(n_devices, clip, bits)


def mean_error_bound(n_devices: int, clip: float, scale: float, normalised_weight: float) -> float:
    """Worst-case per-coordinate error of the decoded weighted mean (see module doc)."""
    eps = n_devices / scale
    if normalised_weight <= eps:
        return math.inf
    return eps * (1.0 + clip) / (normalised_weight - eps)


@dataclass(frozen=True)
class FixedPoint:
    """The fixed-point parameters of one round: modulus bits, clip norm, scale and weight cap."""

    bits: int
    clip: float
    scale: float
    max_weight: float

    def __post_init__(self) -> None:
        _check_bits(self.bits)
        for name in ("clip", "scale", "max_weight"):
            value = getattr(self, name)
            if not value > 0 or not math.isfinite(value):
                raise ConfigError(f"{name} must be positive and finite, got {value}")

    def encode(
        self,
        delta: npt.NDArray[np.floating],
        weight: float,
        key: int,
        *,
        noise_stddev: float = 0.0,
        rng: np.random.Generator | None = None,
    ) -> U32:
        """The vector [w~, w~ * clip(delta)] in fixed point, length len(delta) + 1.

        ``noise_stddev`` > 0 (distributed DP, in delta units): Skellam noise of standard
        deviation ``noise_stddev * scale`` is added to the delta entries after quantisation (the
        weight entry carries none: DP rounds use uniform weights, w~ = 1).
        """
        if not math.isfinite(weight) or weight < 0:
            raise ValueError(f"weight must be finite and >= 0, got {weight}")
        norm = math.sqrt(sum_squares(delta))
        if not math.isfinite(norm):
            raise ValueError("delta contains NaN or infinity")
        w = min(weight, self.max_weight) / self.max_weight
        shrink = min(1.0, self.clip / norm) if norm > 0 else 1.0
        out = np.empty(delta.shape[0] + 1, dtype=np.uint32)
        quantize_into(np.array([w]), self.scale, key, 0, self.bits, out[:1])
        quantize_into(delta, w * shrink * self.scale, key, 1, self.bits, out[1:])
        if noise_stddev > 0:
            if rng is None:
                raise ValueError("noise needs an rng")
            noise = skellam_noise(noise_stddev * self.scale, delta.shape[0], rng)
            add_mod(out[1:], (noise % (1 << self.bits)).astype(np.uint32), self.bits)
        return out

    def decode(self, acc: U32) -> tuple[F64, float]:
        """(sum of weight * clipped delta, total weight) from an unmasked sum of encodings."""
        values = np.empty(acc.shape[0], dtype=np.float64)
        dequantize_into(acc, self.bits, self.scale, values)
        values *= self.max_weight
        return values[1:], float(values[0])
