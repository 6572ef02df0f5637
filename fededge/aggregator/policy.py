"""Acceptance rules for updates and their weights: pure functions of an update and the state."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from fededge.aggregator import codec
from fededge.errors import ProtocolError, SecAggError
from fededge.protocol import Plan, Update
from fededge.protocol.clipping import adaptive, max_abs_bit, noise_sigma_at, stale_clip
from fededge.protocol.rotation import ROTATED, padded_size
from fededge.protocol.vocab import RejectReason


@dataclass(frozen=True)
class Layout:
    """Names, shapes and offsets of the model's tensors in one flat float64 accumulator."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    offsets: tuple[int, ...]
    size: int

    @classmethod
    def of(cls, weights: Mapping[str, np.ndarray]) -> Layout:
        names = tuple(sorted(weights))
        shapes = tuple(tuple(int(d) for d in weights[n].shape) for n in names)
        offsets, pos = [], 0
        for shape in shapes:
            offsets.append(pos)
            pos += math.prod(shape)
        return cls(names, shapes, tuple(offsets), pos)

    def slices(self) -> list[tuple[str, slice]]:
        return [
            (n, slice(o, o + math.prod(s)))
            for n, s, o in zip(self.names, self.shapes, self.offsets, strict=True)
        ]


def norm_bound(plan: Plan, size: int, clip: float | None = None) -> float:
    """Largest L2 norm an honest update can have: the clip norm plus the noise's tail.

    A device clips its delta to C (``clip``, the clip in force: the plan's ``clip_norm`` unless
    clipping is adaptive) and then adds N(0, s^2) noise, s = z * C, to each of the ``d``
    coordinates; the noise norm follows a chi distribution with mean ~ s*sqrt(d) and standard
    deviation ~ s/sqrt(2), so s*(sqrt(d) + 10) is exceeded with negligible probability.
    """
    c = plan.clip_norm if clip is None else clip
    return c * (1 + 1e-5) + noise_sigma_at(plan, c) * (math.sqrt(size) + 10.0)


def weight_cap(plan: Plan) -> int:
    """The largest weight one update can have: ``max_weight``, else ``examples_per_update``.

    A device trains on ``examples_per_update`` examples; claiming more buys no more say.
    """
    return plan.max_weight if plan.max_weight is not None else plan.examples_per_update


def check_update(
    update: Update,
    *,
    task: str,
    device: str,
    current_version: int,
    plan: Plan,
    layout: Layout,
    clip: float | None = None,
    norms: Mapping[str, float] | None = None,
) -> tuple[float, float]:
    """Validate an update for the pending version; return (weight, L2 norm) or raise.

    ``clip`` is the clip in force on the current version (adaptive clipping), else the plan's.
    ``norms``: the tensor norms ``codec.prepare_update`` measured for this update, if any.
    Raises ProtocolError with one of the reasons documented in docs/protocol.md.
    """
    if update.task != task:
        raise ProtocolError(
            f"update is for task {update.task!r}, not {task!r}", reason=RejectReason.WRONG_TASK
        )
    if update.device != device:
        raise ProtocolError(
            f"update names device {update.device!r} but came from {device!r}",
            reason=RejectReason.WRONG_DEVICE,
        )
    if update.base_version > current_version:
        raise ProtocolError(
            f"base version {update.base_version} is newer than the current {current_version}",
            reason=RejectReason.UNKNOWN_VERSION,
        )
    staleness = current_version - update.base_version
    if staleness > plan.max_staleness:
        raise ProtocolError(
            f"base version {update.base_version} is {staleness} behind {current_version}; "
            f"max_staleness is {plan.max_staleness}",
            reason=RejectReason.STALE,
        )
    if not (
        update.train_loss is None and update.eval_loss is None and update.eval_accuracy is None
    ):
        for key, hi in (("train_loss", 1e6), ("eval_loss", 1e6), ("eval_accuracy", 1.0)):
            value = getattr(update, key)
            # Bounded, not just finite: the aggregator sums weighted values; 1e308 overflows.
            if value is not None and not 0.0 <= value <= hi:
                raise ProtocolError(
                    f"{key}={value!r} is outside [0, {hi:g}]", reason=RejectReason.BAD_METRICS
                )
    if plan.target_unclipped_quantile is not None:  # adaptive(plan): check_bit returns if not
        check_bit(update, plan)
    size = layout.size  # of the model: the norm bound's noise term counts its coordinates
    if update.rotation == "hadamard":  # one tensor of the padded size (issue 13)
        p = padded_size(size)
        layout = Layout((ROTATED,), ((p,),), (0,), p)
    expected = _expected_names(layout.names, update.encoding)
    if update.delta.keys() != expected:
        names = set(update.delta)
        missing = sorted(expected - names)[:5]
        extra = sorted(names - expected)[:5]
        raise ProtocolError(
            f"missing tensors {missing}, unexpected {extra}", reason=RejectReason.WRONG_NAMES
        )
    sq = 0.0
    for name, shape in zip(layout.names, layout.shapes, strict=True):
        n = codec.tensor_norm(update, name, shape, norms)  # of the decoded values (issue 13)
        if not math.isfinite(n):
            raise ProtocolError(
                f"tensor {name!r} contains NaN or Inf", reason=RejectReason.NON_FINITE
            )
        sq += n * n
    norm = math.sqrt(sq)
    c = clip or plan.clip_norm
    if staleness > 0:  # stale_clip is the identity on a current update
        c = stale_clip(plan, c, staleness)
    bound = _norm_bound(plan, size, c)
    if norm > bound:
        raise ProtocolError(
            f"update norm {norm:.6g} exceeds the bound {bound:.6g}",
            reason=RejectReason.NORM_TOO_LARGE,
        )
    weight = float(min(update.num_examples, _weight_cap(plan)))
    if staleness:
        weight *= (1.0 + staleness) ** (-plan.staleness_exponent)
    return weight, norm


# Per-update constants, remembered (check_update runs once per update on the aggregator's main
# thread): the tensor names an encoding carries, and the norm bound of the last plan, size and
# clip (plans are immutable; the entry keeps its plan alive, so identity cannot be reused).
_NAMES: dict[tuple[tuple[str, ...], str], frozenset[str]] = {}
_BOUND: tuple[Plan, int, float, float] | None = None
_CAP: tuple[Plan, int] | None = None


def _expected_names(names: tuple[str, ...], encoding: str) -> frozenset[str]:
    key = (names, encoding)
    found = _NAMES.get(key)
    if found is None:
        if len(_NAMES) >= 64:
            _NAMES.clear()
        found = _NAMES[key] = frozenset(codec.expected_names(names, encoding))
    return found


def _norm_bound(plan: Plan, size: int, clip: float) -> float:
    global _BOUND
    last = _BOUND
    if last is not None and last[0] is plan and last[1] == size and last[2] == clip:
        return last[3]
    bound = norm_bound(plan, size, clip)
    _BOUND = (plan, size, clip, bound)
    return bound


def _weight_cap(plan: Plan) -> int:
    """``min(plan.max_examples_weight, weight_cap(plan))``, the weight no update exceeds."""
    global _CAP
    last = _CAP
    if last is not None and last[0] is plan:
        return last[1]
    cap = min(plan.max_examples_weight, weight_cap(plan))
    _CAP = (plan, cap)
    return cap


def check_bit(update: Update, plan: Plan) -> None:
    """An adaptive plan needs each update's noised bit, within what honest noise produces; a
    bit sent under another plan is ignored (it may have been trained before a plan change)."""
    if not adaptive(plan):
        return
    if update.unclipped is None:
        raise ProtocolError(
            "the plan has target_unclipped_quantile: the update must carry 'unclipped'",
            reason=RejectReason.BAD_METRICS,
        )
    hi = max_abs_bit(plan)
    if not abs(update.unclipped) <= hi:
        raise ProtocolError(
            f"unclipped={update.unclipped!r} is outside [-{hi:.6g}, {hi:.6g}]",
            reason=RejectReason.BAD_METRICS,
        )


def check_secure_sum(
    sum_wd: np.ndarray,
    sum_w: float,
    *,
    survivors: int,
    clip: float,
    max_weight: float,
    scale: float,
    noise: float = 0.0,
) -> None:
    """Refuse an unmasked secure-aggregation sum that honest devices cannot have produced.

    ``sum_wd`` and ``sum_w`` are the decoded sums (fededge.secagg.quantize: each device adds
    ``w~ = min(w, max_weight) / max_weight`` in [0, 1] and ``w~ * delta`` with
    ``||delta|| <= clip``, both scaled back by ``max_weight``). For ``n`` survivors an honest
    sum has ``0 < S_w <= n`` and ``||S_d|| <= clip * S_w`` (triangle inequality), where
    ``S = sum / max_weight``; each decoded entry is off by less than ``eps = n / scale``, so
    the bounds are widened by that rounding. One device that encoded a weight above 1 or a
    delta above the clip norm (inputs nobody can check, they are masked) breaks them; the
    round must then be aborted, not published. Raises SecAggError naming the bound.
    """
    n = survivors
    if n < 1:
        raise SecAggError("a secure sum without survivors")
    eps = n / scale
    s_w = sum_w / max_weight
    if not (math.isfinite(s_w) and s_w > 0):
        raise SecAggError(f"total weight {s_w:.6g} (in units of max_weight) is not positive")
    if s_w > n + eps:
        raise SecAggError(
            f"total weight {s_w:.6g} exceeds {n} survivors x 1 (a device claimed more than "
            "max_weight)"
        )
    d = int(sum_wd.size)
    norm = float(np.linalg.norm(np.asarray(sum_wd, dtype=np.float64))) / max_weight
    bound = clip * (s_w + eps) + eps * math.sqrt(d)
    if noise > 0:  # distributed DP: each survivor's noise of std ``noise`` per entry
        bound += noise * math.sqrt(n) * (math.sqrt(d) + 8.0)  # chi_d tail, P < 1e-13
    if not (math.isfinite(norm) and norm <= bound):
        raise SecAggError(
            f"norm of the weighted sum {norm:.6g} exceeds clip x total weight "
            f"{bound:.6g} (a device sent a delta above the clip norm)"
        )
