"""On-device training: local SGD epochs, then a clipped, noised weight delta to publish.

No TensorFlow and no Numba here: the maths runs in the LiteRT graph and numpy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fededge.device.runtime import ModelRuntime
from fededge.protocol.clipping import noise_sigma_at
from fededge.protocol.messages import Plan


@dataclass(frozen=True)
class LocalUpdate:
    """What one local training run produced: the delta to publish and its metrics."""

    delta: dict[str, np.ndarray]
    num_examples: int
    train_loss: float
    delta_norm: float  # global L2 norm before clipping
    clip_scale: float  # factor applied by clipping (1.0 when not clipped)
    eval_loss: float | None = None
    eval_accuracy: float | None = None
    unclipped: float | None = None  # adaptive clipping: the noised bit (protocol/clipping.py)


def update_noise_stddev(plan: Plan, clip: float | None = None) -> float:
    """The Gaussian noise one device adds to its clipped delta in float (docs/privacy.md).

    Plaintext plans: the whole sigma = z * C (``noise_multiplier``, or the old absolute
    ``noise_stddev``), so each update is private even to the aggregator; C is ``clip``, the
    clip in force (adaptive clipping), else the plan's. Secure aggregation: none here;
    :func:`secure_noise_stddev` is added as integer noise after quantisation.
    """
    if plan.secure_aggregation is not None:
        return 0.0
    return plan.noise_sigma if clip is None else noise_sigma_at(plan, clip)


def secure_noise_stddev(plan: Plan, clip: float | None = None) -> float:
    """Each device's share of the distributed-DP noise in a secure round: sigma / sqrt(t), so
    the sum of at least t = ``threshold`` survivors carries sigma (at the clip in force); the
    aggregator sees only that sum. 0 for plaintext plans."""
    sa = plan.secure_aggregation
    sigma = plan.noise_sigma if clip is None else noise_sigma_at(plan, clip)
    return 0.0 if sa is None else sigma / math.sqrt(sa.threshold)


def reported_examples(num_examples: int, plan: Plan) -> int:
    """The example count a device discloses: exact, or in DP mode rounded up to a power of two
    (a check-in then does not reveal the exact number of examples)."""
    if not plan.dp or num_examples <= 1:
        return num_examples
    return 1 << (num_examples - 1).bit_length()


def global_norm(tensors: dict[str, np.ndarray]) -> float:
    """L2 norm over all tensors together, accumulated in float64."""
    return math.sqrt(
        sum(float(np.dot(t.ravel().astype(np.float64), t.ravel())) for t in tensors.values())
    )


def clip_and_noise(
    delta: dict[str, np.ndarray],
    clip_norm: float | None,
    noise_stddev: float,
    rng: np.random.Generator,
) -> tuple[dict[str, np.ndarray], float, float]:
    """Scale ``delta`` to global L2 norm <= ``clip_norm``, then add N(0, noise_stddev²) noise.

    The clipped delta's norm (float64 sum of squares) is guaranteed <= ``clip_norm``; the noisy
    one is not: expect about sqrt(clip_norm² + noise_stddev² · parameters). Returns (new delta,
    norm before clipping, scale applied). ``clip_norm=None`` skips clipping. Noise is drawn
    per tensor in name order, so a seeded ``rng`` gives reproducible updates.
    """
    if clip_norm is not None and not clip_norm > 0:
        raise ValueError(f"clip_norm must be > 0 or None, got {clip_norm}")
    if not noise_stddev >= 0:
        raise ValueError(f"noise_stddev must be >= 0, got {noise_stddev}")
    norm = global_norm(delta)
    scale = 1.0 if clip_norm is None or norm <= clip_norm else clip_norm / norm
    clipped = {n: (d.astype(np.float64) * scale).astype(np.float32) for n, d in delta.items()}
    # Rounding to float32 can leave the norm a few ulps above the bound: shrink until it holds.
    shrink = 2.0**-22
    while clip_norm is not None and global_norm(clipped) > clip_norm:
        clipped = {n: (d * (1.0 - shrink)).astype(np.float32) for n, d in clipped.items()}
        scale *= 1.0 - shrink
        shrink *= 4.0
    out: dict[str, np.ndarray] = {}
    for name in sorted(clipped):
        d = clipped[name]
        if noise_stddev > 0:
            d = (d.astype(np.float64) + rng.normal(0.0, noise_stddev, size=d.shape)).astype(
                np.float32
            )
        out[name] = d
    return {n: out[n] for n in delta}, norm, scale


def local_update(
    runtime: ModelRuntime,
    base_weights: dict[str, np.ndarray],
    x: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    clip_norm: float | None,
    noise_stddev: float,
    rng: np.random.Generator,
    evaluate_first: bool = False,
) -> LocalUpdate:
    """Train ``base_weights`` on (x, y) and return the clipped, noised delta with its metrics.

    Each epoch shuffles with ``rng`` and walks the data in batches of ``batch_size``; the last,
    partial batch is trained at its own size (the graphs have a dynamic batch dimension), so
    every example counts once per epoch. ``train_loss`` is the example-weighted mean of the batch
    losses of the last epoch (each measured before its step).
    """
    n = len(x)
    if n == 0 or len(y) != n:
        raise ValueError(f"need a non-empty x and y of equal length, got {len(x)} and {len(y)}")
    if epochs < 1 or batch_size < 1 or not learning_rate > 0:
        raise ValueError(
            f"epochs ({epochs}) and batch_size ({batch_size}) must be >= 1 and "
            f"learning_rate ({learning_rate}) > 0"
        )
    x = np.ascontiguousarray(x, dtype=np.float32)
    y = np.ascontiguousarray(y, dtype=np.int32 if runtime.spec.task.integer_labels else np.float32)
    base = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in base_weights.items()}
    eval_loss = eval_acc = None
    if evaluate_first:
        # The update message carries an accuracy only: tasks without one report their loss.
        m = runtime.metrics(x, y, base)
        eval_loss, eval_acc = m["loss"], m.get("accuracy")
    weights = base
    loss_sum = 0.0
    for _ in range(epochs):
        order = rng.permutation(n)
        loss_sum = 0.0
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            loss, weights = runtime.train_step(x[idx], y[idx], learning_rate, weights)
            loss_sum += loss * len(idx)
    raw = {k: weights[k] - base[k] for k in runtime.spec.weight_names}
    delta, norm, scale = clip_and_noise(raw, clip_norm, noise_stddev, rng)
    return LocalUpdate(delta, n, loss_sum / n, norm, scale, eval_loss, eval_acc)
