"""Privacy accounting on the aggregator: epsilon at delta for the versions published so far.

Devices pay nothing for this: only the aggregator imports Google's ``dp-accounting`` (the
aggregator extra). What is accounted (docs/privacy.md states it precisely):

* **Neighbouring relation**: user level, add/remove one device's data. Each device contributes
  at most one update per version (the plan's ``max_updates_per_device`` must be 1, else no
  epsilon is claimed), clipped to L2 norm ``C``, so one version is a Gaussian mechanism of
  sensitivity ``C`` and noise multiplier ``z`` (noise standard deviation ``z * C``).
* **Sampling**: none assumed (q = 1 every version). Asynchronous participation is not Poisson
  sampling - who takes part depends on who is online and when, which a device does not choose
  at random - so no amplification by sampling is claimed. Every version is charged as if every
  device took part in it, which is conservative for devices that did not.
* **Where the noise is**: plaintext updates carry each device's own noise ``z * C``, so the
  bound holds even against the aggregator, which sees each update (and for the published
  versions, which are post-processing). Under secure aggregation with distributed noise the sum
  of at least ``t`` survivors carries noise ``z * C`` (each device adds ``z * C / sqrt(t)``), so
  the bound holds for the sum, which is all the aggregator sees.
* **Adaptive clipping** (Andrew et al. 2021): each device also releases its clipped-or-not bit
  with Gaussian noise ``bit_noise_stddev(z)``; the two releases together are a Gaussian
  mechanism of multiplier ``(z**-2 + (2 sigma_b)**-2) ** -0.5`` (their Theorem 1).

Versions compose with the RDP accountant (Mironov 2017) over the default orders.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from functools import lru_cache

# Adaptive clipping lives in fededge.protocol.clipping (devices share it); re-exported here.
from fededge.protocol.clipping import BIT_NOISE_SHARE as BIT_NOISE_SHARE
from fededge.protocol.clipping import CLIP_LEARNING_RATE as CLIP_LEARNING_RATE
from fededge.protocol.clipping import MAX_CLIP as MAX_CLIP
from fededge.protocol.clipping import MIN_CLIP as MIN_CLIP
from fededge.protocol.clipping import adapt_clip as adapt_clip
from fededge.protocol.clipping import bit_noise_stddev as bit_noise_stddev
from fededge.protocol.clipping import noise_sigma_at
from fededge.protocol.messages import Plan


def accounted_multiplier(plan: Plan) -> float:
    """The Gaussian noise multiplier one version is charged at (0: no privacy claimed)."""
    z = plan.effective_noise_multiplier
    if z <= 0 or plan.max_updates_per_device != 1:
        return 0.0
    if plan.target_unclipped_quantile is not None:
        return float((z**-2 + (2.0 * bit_noise_stddev(z)) ** -2) ** -0.5)
    return z


def secure_noise_stddev(plan: Plan, clip: float | None = None) -> float:
    """Each device's share of the noise in a secure round, sigma / sqrt(t) at the clip in
    force (the device's fededge.device.training.secure_noise_stddev: the aggregator sizes its
    rounds with it)."""
    sa = plan.secure_aggregation
    sigma = plan.noise_sigma if clip is None else noise_sigma_at(plan, clip)
    return 0.0 if sa is None else sigma / math.sqrt(sa.threshold)


@lru_cache(maxsize=256)
def epsilon_of(events: tuple[tuple[float, int], ...], delta: float) -> float:
    """Epsilon at ``delta`` of Gaussian mechanisms (multiplier, count) composed, q = 1.

    ``inf`` if any counted version had no noise.
    """
    if any(z <= 0 and n > 0 for z, n in events):
        return math.inf
    import dp_accounting  # the aggregator extra; devices never import this module
    from dp_accounting.rdp import rdp_privacy_accountant

    accountant = rdp_privacy_accountant.RdpAccountant()
    for z, n in events:
        if n > 0:
            accountant.compose(
                dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(z), n)
            )
    return float(accountant.get_epsilon(delta))


@dataclass
class Ledger:
    """What the versions published so far cost: runs of (multiplier, count), durable as JSON.

    Runs, not one entry per version, so the file stays small however long the task runs.
    """

    events: list[list[float]] = field(default_factory=list)  # [[z, count], ...]
    stopped: str | None = None  # why no more versions are published

    @property
    def versions(self) -> int:
        return int(sum(n for _, n in self.events))

    def key(self, extra: float | None = None) -> tuple[tuple[float, int], ...]:
        runs = [(float(z), int(n)) for z, n in self.events]
        if extra is not None:
            if runs and runs[-1][0] == extra:
                runs[-1] = (extra, runs[-1][1] + 1)
            else:
                runs.append((extra, 1))
        return tuple(runs)

    def epsilon(self, delta: float) -> float:
        return epsilon_of(self.key(), delta) if self.events else 0.0

    def epsilon_after(self, z: float, delta: float) -> float:
        """Epsilon if one more version is charged at multiplier ``z``."""
        return epsilon_of(self.key(z), delta)

    def charge(self, z: float) -> None:
        self.events = [[a, b] for a, b in self.key(z)]

    def to_bytes(self) -> bytes:
        return json.dumps({"events": self.events, "stopped": self.stopped}).encode()

    @classmethod
    def from_bytes(cls, raw: bytes | None) -> Ledger:
        """Parse the ledger file; a missing file is an empty ledger. A corrupt one raises
        ValueError: losing what was spent would under-report epsilon."""
        if not raw:
            return cls()
        obj = json.loads(raw)
        events = obj.get("events") if isinstance(obj, dict) else None
        if not isinstance(events, list) or not all(
            isinstance(e, list)
            and len(e) == 2
            and isinstance(e[0], (int, float))
            and type(e[1]) is int
            and e[0] >= 0
            and e[1] >= 0
            for e in events
        ):
            raise ValueError("privacy ledger is corrupt")
        stopped = obj.get("stopped")
        return cls(
            [[float(z), int(n)] for z, n in events], stopped if isinstance(stopped, str) else None
        )


def finite_or_none(x: float) -> float | None:
    """JSON messages carry no infinity: an unbounded epsilon is reported as absent."""
    return x if math.isfinite(x) else None
