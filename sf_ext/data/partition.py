"""Splitting a dataset among federated clients.

Every function returns a list of ``(x_i, y_i)`` pairs, one per client, with rows of ``x`` and
``y`` kept together, every sample used exactly once, and the result fixed by ``seed``.
"""

from typing import List, Optional, Sequence, Tuple

import numpy as np

Arrays = Tuple[np.ndarray, np.ndarray]

# Tolerance when checking that fractions add up to one (they are usually typed as decimals).
FRACTION_SUM_TOLERANCE = 1e-6
DIRICHLET_MAX_TRIES = 1000


def _check_aligned(x: np.ndarray, y: np.ndarray) -> None:
    if len(x) != len(y):
        raise ValueError(f"x and y must have the same length, got {len(x)} and {len(y)}")


def _check_num_clients(num_clients: int, num_samples: int) -> None:
    if not isinstance(num_clients, (int, np.integer)) or num_clients < 1:
        raise ValueError(f"num_clients must be an integer >= 1, got {num_clients!r}")
    if num_clients > num_samples:
        raise ValueError(
            f"num_clients ({num_clients}) exceeds the number of samples ({num_samples})"
        )


def _take(x: np.ndarray, y: np.ndarray, index_groups: Sequence[np.ndarray]) -> List[Arrays]:
    return [(x[idx], y[idx]) for idx in index_groups]


def partition_indices_iid(num_samples: int, num_clients: int, seed: int = 0) -> List[np.ndarray]:
    """Shuffle ``range(num_samples)`` and cut it into ``num_clients`` near-equal parts."""
    _check_num_clients(num_clients, num_samples)
    order = np.random.default_rng(seed).permutation(num_samples)
    return [np.sort(part) for part in np.array_split(order, num_clients)]


def iid_partition(x: np.ndarray, y: np.ndarray, num_clients: int, seed: int = 0) -> List[Arrays]:
    """Split ``(x, y)`` uniformly at random into ``num_clients`` parts of near-equal size."""
    _check_aligned(x, y)
    return _take(x, y, partition_indices_iid(len(y), num_clients, seed))


def partition_indices_dirichlet(
    labels: np.ndarray,
    num_clients: int,
    alpha: float,
    seed: int = 0,
    min_size: int = 10,
) -> List[np.ndarray]:
    """Label-skewed split: for each class, client shares are drawn from ``Dirichlet(alpha)``.

    Small ``alpha`` gives each client few classes; large ``alpha`` approaches an IID split.
    Draws are repeated until every client has at least ``min_size`` samples.

    Raises:
        ValueError: ``alpha <= 0``, ``num_clients < 1``, ``min_size < 0``, or ``min_size`` that
            cannot be met (``num_clients * min_size`` exceeds the samples, or no draw met it).
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D class indices, got shape {labels.shape}")
    if not np.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha!r}")
    _check_num_clients(num_clients, len(labels))
    if min_size < 0:
        raise ValueError(f"min_size must be >= 0, got {min_size}")
    if num_clients * min_size > len(labels):
        raise ValueError(
            f"min_size={min_size} for {num_clients} clients needs {num_clients * min_size} "
            f"samples, only {len(labels)} available"
        )
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    for _ in range(DIRICHLET_MAX_TRIES):
        groups: List[List[np.ndarray]] = [[] for _ in range(num_clients)]
        for label in classes:
            members = rng.permutation(np.flatnonzero(labels == label))
            shares = rng.dirichlet(np.full(num_clients, float(alpha)))
            cuts = (np.cumsum(shares)[:-1] * len(members)).astype(int)
            for client, part in enumerate(np.split(members, cuts)):
                groups[client].append(part)
        indices = [np.sort(np.concatenate(g)) for g in groups]
        if min(len(i) for i in indices) >= min_size:
            return indices
    raise ValueError(
        f"no Dirichlet draw gave every client >= min_size={min_size} samples in "
        f"{DIRICHLET_MAX_TRIES} tries; lower min_size or raise alpha (alpha={alpha})"
    )


def dirichlet_partition(
    x: np.ndarray,
    y: np.ndarray,
    num_clients: int,
    alpha: float,
    seed: int = 0,
    min_size: int = 10,
) -> List[Arrays]:
    """Non-IID split of ``(x, y)`` with per-class Dirichlet(``alpha``) client shares.

    ``y`` may be class indices ``[N]`` or one-hot ``[N, K]`` (the class is its argmax).
    See :func:`partition_indices_dirichlet` for the parameters.
    """
    _check_aligned(x, y)
    y = np.asarray(y)
    labels = y.argmax(axis=1) if y.ndim == 2 else y
    return _take(x, y, partition_indices_dirichlet(labels, num_clients, alpha, seed, min_size))


def _check_fractions(fractions: Sequence[float]) -> np.ndarray:
    fractions = np.asarray(list(fractions), dtype=np.float64)
    if fractions.ndim != 1 or len(fractions) == 0:
        raise ValueError(f"fractions must be a non-empty sequence of numbers, got {fractions!r}")
    if not np.all(np.isfinite(fractions)) or np.any(fractions < 0):
        raise ValueError(f"fractions must be finite and >= 0, got {fractions.tolist()}")
    if abs(fractions.sum() - 1.0) > FRACTION_SUM_TOLERANCE:
        raise ValueError(
            f"fractions must sum to 1, got {fractions.tolist()} (sum {fractions.sum()})"
        )
    return fractions


def fraction_sizes(num_samples: int, fractions: Sequence[float]) -> List[int]:
    """Integer part sizes proportional to ``fractions`` that add up to ``num_samples`` exactly.

    Rounding leftovers go to the parts with the largest remainders (largest-remainder method).
    """
    fractions = _check_fractions(fractions)
    exact = fractions * num_samples
    sizes = np.floor(exact).astype(int)
    leftover = num_samples - int(sizes.sum())
    # Stable sort so ties go to earlier parts, keeping the result deterministic.
    for part in np.argsort(-(exact - sizes), kind="stable")[:leftover]:
        sizes[part] += 1
    return sizes.tolist()


def split_by_fractions(
    x: np.ndarray,
    y: np.ndarray,
    fractions: Sequence[float],
    seed: Optional[int] = 0,
) -> List[Arrays]:
    """Shuffle ``(x, y)`` and split it into parts sized by ``fractions`` (e.g. ``[0.4, 0.6]``).

    Args:
        fractions: Non-negative numbers summing to 1, one per part.
        seed: Shuffle seed; ``None`` keeps the original order (contiguous slices).
    """
    _check_aligned(x, y)
    sizes = fraction_sizes(len(y), fractions)
    order = np.arange(len(y)) if seed is None else np.random.default_rng(seed).permutation(len(y))
    bounds = np.cumsum(sizes)[:-1]
    return _take(x, y, [np.sort(part) for part in np.split(order, bounds)])
