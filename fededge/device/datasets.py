"""Demo and test data: scikit-learn's bundled digits and a non-IID Dirichlet partitioner.

scikit-learn is imported lazily: it is a demo/test dependency, not a device one.
"""

from __future__ import annotations

import numpy as np


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """The 1,797 8x8 digits as (x float32 [n, 64] scaled to [0, 1], y int32 [n])."""
    from sklearn.datasets import load_digits as _load

    d = _load()
    return (d.data / 16.0).astype(np.float32), d.target.astype(np.int32)


def train_test_split(
    x: np.ndarray, y: np.ndarray, test_fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Shuffle with ``rng`` and split into (x_train, y_train, x_test, y_test)."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    order = rng.permutation(len(x))
    cut = len(x) - round(len(x) * test_fraction)
    tr, te = order[:cut], order[cut:]
    return x[tr], y[tr], x[te], y[te]


def dirichlet_partition(
    labels: np.ndarray,
    n_parts: int,
    alpha: float,
    rng: np.random.Generator,
    *,
    min_size: int = 1,
    max_tries: int = 100,
) -> list[np.ndarray]:
    """Split example indices into ``n_parts`` non-IID parts, per class by Dirichlet(alpha) shares.

    Small ``alpha`` gives each part few classes; large ``alpha`` approaches an IID split. Draws
    are repeated (at most ``max_tries`` times) until every part has at least ``min_size``
    examples. Every index appears in exactly one part; each part is sorted.
    """
    labels = np.asarray(labels)
    if n_parts < 1 or not alpha > 0 or min_size < 0:
        raise ValueError(
            f"need n_parts >= 1, alpha > 0, min_size >= 0 (got {n_parts}, {alpha}, {min_size})"
        )
    if n_parts * min_size > len(labels):
        raise ValueError(f"{len(labels)} examples cannot give {n_parts} parts of {min_size}")
    for _ in range(max_tries):
        parts: list[list[np.ndarray]] = [[] for _ in range(n_parts)]
        for cls in np.unique(labels):
            idx = rng.permutation(np.flatnonzero(labels == cls))
            shares = rng.dirichlet(np.full(n_parts, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(np.int64)
            for part, chunk in zip(parts, np.split(idx, cuts), strict=True):
                part.append(chunk)
        out = [np.sort(np.concatenate(p)).astype(np.int64) for p in parts]
        if min(len(p) for p in out) >= min_size:
            return out
    raise ValueError(
        f"no Dirichlet(alpha={alpha}) split gave every one of {n_parts} parts {min_size} examples "
        f"in {max_tries} tries; raise alpha or lower min_size"
    )
