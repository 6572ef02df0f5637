"""Adaptive clipping (Andrew et al. 2021): the clip in force, the noised bit, its encodings.

Shared by devices and the aggregator (no I/O, no dp-accounting). With a plan's
``target_unclipped_quantile`` the clip C is no longer the plan's ``clip_norm`` but the one the
aggregator publishes with each model version (``ModelVersion.clip``, signed with it); the plan's
``clip_norm`` is the starting value. Noise is sized from the clip in force: sigma = z * C.

Each device releases its bit b = 1 if its delta's norm was <= C (unclipped), centred and noised:
``(b - 1/2) + N(0, sigma_b^2)``, sigma_b = z / (2 sqrt(0.1)). Centred, the bit has sensitivity
1/2, which is what the accountant's ``(z**-2 + (2 sigma_b)**-2) ** -0.5`` assumes. Under secure
aggregation the bit travels as one extra entry ``k (b - 1/2)`` of the masked vector, with
``k = 2 sqrt(0.1) C``: the round's noise z C per entry is then exactly sigma_b in bit units, the
extended vector has norm <= C sqrt(1.1) (the round's clip), and only the sum is revealed.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    from fededge.protocol.messages import ModelVersion, Plan

# The bit noise is sized so the bit costs a tenth of the update's privacy (z_eff = z/sqrt(1.1)).
BIT_NOISE_SHARE = 0.1
# C <- C * exp(-eta * (unclipped fraction - target)), within [MIN_CLIP, MAX_CLIP].
CLIP_LEARNING_RATE = 0.2
MIN_CLIP, MAX_CLIP = 1e-6, 1e6
# An honest noised bit is within this many of its noise's standard deviations of +-1/2.
BIT_TAIL = 20.0


def adaptive(plan: Plan) -> bool:
    """Whether the plan asks for adaptive clipping."""
    return plan.target_unclipped_quantile is not None


def clip_in_force(plan: Plan, model: ModelVersion | None) -> float:
    """The clip devices use on ``model``: the one published with it, else the plan's."""
    if adaptive(plan) and model is not None and model.clip is not None:
        return model.clip
    return plan.clip_norm


def noise_sigma_at(plan: Plan, clip: float) -> float:
    """sigma = z * C at the clip in force (exactly the plan's ``noise_sigma`` at its own clip)."""
    if clip == plan.clip_norm:
        return plan.noise_sigma
    return plan.effective_noise_multiplier * clip


def bit_noise_stddev(z: float) -> float:
    """Standard deviation of the noise a device adds to its centred clipped-or-not bit."""
    return z / (2.0 * math.sqrt(BIT_NOISE_SHARE))


def noised_bit(plan: Plan, unclipped: bool, rng: np.random.Generator) -> float | None:
    """The release of a plaintext update: ``(b - 1/2) + N(0, sigma_b^2)``; None if not adaptive."""
    if not adaptive(plan):
        return None
    value = 0.5 if unclipped else -0.5
    sigma = bit_noise_stddev(plan.effective_noise_multiplier)
    return value + float(rng.normal(0.0, sigma)) if sigma > 0 else value


def max_abs_bit(plan: Plan) -> float:
    """The largest |release| the aggregator accepts (an honest one exceeds it with P < 1e-80)."""
    return 0.5 + BIT_TAIL * bit_noise_stddev(plan.effective_noise_multiplier)


def bit_entry_scale(clip: float) -> float:
    """k: the masked vector's extra entry is k * (b - 1/2) (see the module doc)."""
    return 2.0 * math.sqrt(BIT_NOISE_SHARE) * clip


def round_clip(plan: Plan, clip: float) -> float:
    """The clip of a secure round's vector: C, or C * sqrt(1.1) with the bit entry."""
    return clip * math.sqrt(1.0 + BIT_NOISE_SHARE) if adaptive(plan) else clip


def unclipped_fraction(centred_sum: float, count: float) -> float:
    """The (noised) fraction of unclipped updates from the sum of ``count`` centred releases."""
    return 0.5 + centred_sum / count


def adapt_clip(clip: float, unclipped: float, target: float) -> float:
    """Andrew et al.'s geometric update: C <- C * exp(-eta * (b - gamma)), bounded."""
    b = min(1.0, max(0.0, unclipped))
    new = clip * math.exp(-CLIP_LEARNING_RATE * (b - target))
    return min(MAX_CLIP, max(MIN_CLIP, new))


def next_clip(plan: Plan, clip: float, unclipped: float | None) -> float | None:
    """The clip published with the next version (None: the plan is not adaptive)."""
    gamma = plan.target_unclipped_quantile
    if gamma is None:
        return None
    return clip if unclipped is None else adapt_clip(clip, unclipped, gamma)


def stale_clip(plan: Plan, clip: float, staleness: int) -> float:
    """The largest clip a version ``staleness`` behind can have had: C moves by at most
    exp(eta) per version, so an honest stale update is bounded by this."""
    if not adaptive(plan) or staleness <= 0:
        return clip
    return clip * math.exp(CLIP_LEARNING_RATE * staleness)


def with_bit_entry(
    flat: npt.NDArray[np.float32], clip: float, unclipped: bool
) -> npt.NDArray[np.float32]:
    """A secure round's input: the flat clipped delta and the entry ``k (b - 1/2)`` last."""
    entry = bit_entry_scale(clip) * (0.5 if unclipped else -0.5)
    return np.append(flat, np.float32(entry)).astype(np.float32)
