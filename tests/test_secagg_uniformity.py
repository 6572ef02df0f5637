"""A single masked input is statistically indistinguishable from uniform noise."""

from __future__ import annotations

import math

import numpy as np

from fededge.secagg.graph import Stage
from fededge.secagg.messages import MaskedInput, Message
from fededge.testing.secagg import Simulation, make_config

D = 100_000


def chi_square_critical(dof: int, z: float = 4.75) -> float:
    """Upper critical value of chi-square (Wilson-Hilferty), z = 4.75 is p ~ 1e-6."""
    a = 2.0 / (9.0 * dof)
    return dof * (1.0 - a + z * math.sqrt(a)) ** 3


def chi_square(counts: np.ndarray) -> float:
    expected = counts.sum() / counts.size
    return float(((counts - expected) ** 2 / expected).sum())


def byte_and_word_statistics(words: np.ndarray) -> list[float]:
    raw = words.astype("<u4").view(np.uint8).reshape(-1, 4)
    stats = [chi_square(np.bincount(raw[:, b], minlength=256)) for b in range(4)]  # each byte lane
    stats.append(chi_square(np.bincount((words >> 24).astype(np.int64), minlength=256)))  # top byte
    stats.append(
        chi_square(np.bincount((words % 1021).astype(np.int64), minlength=1021))
    )  # residues
    return stats


def test_one_masked_input_looks_uniform() -> None:
    devices = [f"dev{i}" for i in range(5)]
    cfg = make_config("uniformity", devices, D, threshold=3, neighbours=4)
    rng = np.random.default_rng(11)
    # Highly structured updates: all-equal small values would fail any test unmasked.
    inputs = {
        d: (np.full(D, 0.001, np.float32) + rng.standard_normal(D).astype(np.float32) * 1e-5, 10.0)
        for d in devices
    }
    captured: dict[str, np.ndarray] = {}

    def capture(to: str, msg: Message) -> list[Message]:
        if isinstance(msg, MaskedInput):
            captured[msg.device] = msg.vector.copy()
        return [msg]

    sim = Simulation(cfg, inputs, {Stage.UNMASK: ["dev4"]}, seed=b"fixed seed", tamper=capture)
    sim.run()
    assert sim.server.stage == Stage.DONE
    words = captured["dev0"]
    limits = [chi_square_critical(255)] * 5 + [chi_square_critical(1020)]
    for stat, limit in zip(byte_and_word_statistics(words), limits, strict=True):
        assert stat < limit
    # The same statistics flag the unmasked encoding at once: the test has power.
    plain = cfg.scale * 0.001 * np.ones(D)
    unmasked = plain.astype(np.int64).astype(np.uint32)
    assert any(
        s > limit for s, limit in zip(byte_and_word_statistics(unmasked), limits, strict=True)
    )
    # And masked inputs of different devices are uncorrelated.
    a, b = captured["dev0"].astype(np.float64), captured["dev1"].astype(np.float64)
    assert abs(np.corrcoef(a, b)[0, 1]) < 5 / math.sqrt(D)
