"""SignGuard (Xu, Huang, Zhang, Li, Chen: "SignGuard: Byzantine-robust federated learning through
collaborative malicious gradient filtering", ICDCS 2022), as its official code
(``signguard_multiclass``, JianXu95/SignGuard @e1fcafcc) runs it:

1. Norm filter: keep clients with ``lower < |g_i| / med < upper`` (strict; 0.1 and 3.0), ``med``
   the median norm.
2. Sign statistics on one contiguous block of ``int(0.1 * d)`` coordinates at a random offset:
   per client the fractions of positive, zero and negative entries; each feature column divided by
   its maximum over clients (+1e-8).
3. MeanShift clustering of those features (bandwidth ``estimate_bandwidth(quantile=0.5,
   n_samples=50)``, ``bin_seeding=True``, ``cluster_all=False``); keep the largest cluster (the
   unassigned label -1 does not vote).
4. Clients passing both filters are averaged after clipping every update to norm
   ``min(|g_i|, med)``, ``med`` the lower median of all norms (torch's median).

Departures, stated: NaN/inf updates are screened first (the official code zeroes NaN entries);
when MeanShift assigns nobody, the result is a zero update (the official code would fail).
FLPoison's port defaults to DBSCAN(eps=0.05, min_samples=3); ``clustering="dbscan"`` gives it.

Checked in the unit tests: the norm filter and the lower-median clipping against direct
computations, and the sign clustering on a constructed split of sign profiles.

What the server learns: every client's plaintext update (norms and sign statistics are computed
in the clear).
"""

from collections import Counter
from typing import Optional, Tuple

import numpy as np
import torch

from sf_ext.aggregators._linalg import weighted_row_sum
from sf_ext.aggregators._validate import (
    as_update_matrix,
    nothing_usable,
    sample_counts,
    scatter,
    screen_rows,
    screening_details,
)
from sf_ext.aggregators.report import AggregationReport

CLUSTERINGS = ("meanshift", "dbscan")


def sign_features(matrix: torch.Tensor, fraction: float, generator=None) -> np.ndarray:
    """Fractions of positive, zero and negative entries in one random contiguous block of
    ``int(fraction * d)`` coordinates, each column normalized by its maximum."""
    d = matrix.shape[1]
    width = max(1, int(fraction * d))
    start = int(torch.randint(0, max(d - width, 0) + 1, (1,), generator=generator))
    block = matrix[:, start : start + width]
    pos = (block > 0).double().mean(dim=1)
    zero = (block == 0).double().mean(dim=1)
    neg = (block < 0).double().mean(dim=1)
    feats = torch.stack([pos, zero, neg], dim=1).numpy()
    return feats / (feats.max(axis=0, keepdims=True) + 1e-8)


def _cluster(features: np.ndarray, clustering: str) -> np.ndarray:
    if features.shape[0] < 2:
        return np.zeros(features.shape[0], dtype=int)
    if clustering == "meanshift":
        from sklearn.cluster import MeanShift, estimate_bandwidth

        bandwidth = estimate_bandwidth(features, quantile=0.5, n_samples=50)
        if not bandwidth > 0:  # every feature vector identical: one cluster
            return np.zeros(features.shape[0], dtype=int)
        return (
            MeanShift(bandwidth=bandwidth, bin_seeding=True, cluster_all=False)
            .fit(features)
            .labels_
        )
    from sklearn.cluster import DBSCAN

    return DBSCAN(eps=0.05, min_samples=3).fit(features).labels_


@torch.no_grad()
def signguard(
    updates,
    num_samples=None,
    *,
    lower: float = 0.1,
    upper: float = 3.0,
    sign_fraction: float = 0.1,
    clustering: str = "meanshift",
    generator: Optional[torch.Generator] = None,
) -> Tuple[torch.Tensor, AggregationReport]:
    """SignGuard: norm filter plus sign-statistics clustering, then the mean of clipped updates.

    Args:
        updates: ``[n_clients, n_params]`` float updates.
        num_samples: Accepted for the common signature; SignGuard averages equally.
        lower: Lower bound of ``|g_i| / median`` (strict).
        upper: Upper bound of ``|g_i| / median`` (strict).
        sign_fraction: Share of the coordinates in the sign-statistics block.
        clustering: ``"meanshift"`` (official) or ``"dbscan"`` (FLPoison's default).
        generator: Random source of the block offset.

    Returns:
        The aggregate and a report; ``weights[i]`` is the coefficient of client ``i``'s raw
        update (``clip_i / |kept|``), ``scores[i]`` its norm ratio to the median.
    """
    if clustering not in CLUSTERINGS:
        raise ValueError(f"clustering must be one of {CLUSTERINGS}, got {clustering!r}")
    if not 0 <= lower < upper:
        raise ValueError(f"need 0 <= lower < upper, got {lower}, {upper}")
    if not 0 < sign_fraction <= 1:
        raise ValueError(f"sign_fraction must lie in (0, 1], got {sign_fraction}")
    matrix = as_update_matrix(updates)
    num_clients, num_params = matrix.shape
    sample_counts(num_samples, num_clients)
    norms = torch.linalg.vector_norm(matrix, dim=1).to(torch.float64)
    unusable, overflowed = screen_rows(matrix, norms)
    details = {"lower": lower, "upper": upper, **screening_details(overflowed)}
    usable = (~unusable).nonzero().flatten()
    if usable.numel() == 0:
        return nothing_usable("signguard", num_clients, num_params, unusable, details, True)
    rows = matrix[usable] if usable.numel() < num_clients else matrix
    usable_norms = norms[usable]
    median = float(usable_norms.median())  # torch's lower median, as the official code
    ratio = usable_norms / median if median > 0 else torch.ones_like(usable_norms)
    by_norm = (ratio > lower) & (ratio < upper)
    labels = _cluster(sign_features(rows, sign_fraction, generator), clustering)
    votes = Counter(int(label) for label in labels if label >= 0)
    if votes:
        majority = max(votes, key=lambda label: (votes[label], -label))
        by_sign = torch.as_tensor(labels == majority)
    else:
        majority, by_sign = None, torch.zeros(usable.numel(), dtype=torch.bool)
    benign = by_norm & by_sign
    clip = torch.where(usable_norms > median, median / usable_norms.clamp(min=1e-300), 1.0)
    count = int(benign.sum())
    coeffs = torch.where(benign, clip / max(count, 1), torch.zeros((), dtype=torch.float64))
    weights = scatter(coeffs, usable, num_clients, 0.0)
    details.update(
        median_norm=median,
        clip_factors=scatter(clip, usable, num_clients, 0.0).tolist(),
        passed_norm=scatter(by_norm.double(), usable, num_clients, 0.0).bool().tolist(),
        sign_labels=scatter(torch.as_tensor(labels), usable, num_clients, -2).long().tolist(),
        majority_label=majority,
    )
    report = AggregationReport(
        method="signguard",
        weights=weights,
        scores=scatter(ratio, usable, num_clients, float("inf")),
        non_finite=unusable,
        details=details,
        selects=True,
    )
    if count == 0:
        return torch.zeros(num_params, dtype=torch.float32), report
    return weighted_row_sum(matrix, weights), report
