"""NDC: norm-difference clipping (Sun et al., 2019).

Every update ``u_i`` (client model minus global model) is scaled to an L2 norm of at most
``threshold`` (``u_i * min(1, threshold / |u_i|)``, threshold 2 as in the matrix-mapping paper),
then the clipped updates are averaged with sample weights. Clipping is a per-row factor, so the
whole rule is one norm pass plus one weighted sum: no clipped copy of the matrix is made.

Checked against the clipped weighted mean computed directly in the unit tests.

What the server learns: every client's plaintext update (and its norm).
"""

from typing import Tuple

import torch

from sf_ext.aggregators._linalg import weighted_row_sum
from sf_ext.aggregators._validate import (
    as_update_matrix,
    normalized,
    nothing_usable,
    sample_counts,
    screen_rows,
    screening_details,
)
from sf_ext.aggregators.report import AggregationReport


@torch.no_grad()
def norm_clipping(
    updates, num_samples=None, *, threshold: float = 2.0
) -> Tuple[torch.Tensor, AggregationReport]:
    """Sample-weighted mean of the updates clipped to L2 norm ``threshold``.

    Args:
        updates: ``[n_clients, n_params]`` float updates.
        num_samples: ``[n]`` sample counts (equal weights when None).
        threshold: Largest L2 norm an update may keep.

    Returns:
        The result and a report; ``weights[i]`` is the client's sample share times its clip
        factor (the coefficient of its raw update), ``scores[i]`` its update norm.
    """
    threshold = float(threshold)
    if not threshold > 0:
        raise ValueError(f"threshold must be positive, got {threshold}")
    matrix = as_update_matrix(updates)
    num_clients, num_params = matrix.shape
    counts = sample_counts(num_samples, num_clients)
    norms = torch.linalg.vector_norm(matrix, dim=1).to(torch.float64)
    unusable, overflowed = screen_rows(matrix, norms)
    details = {"threshold": threshold, **screening_details(overflowed)}
    if bool(unusable.all()):
        return nothing_usable("ndc", num_clients, num_params, unusable, details)
    usable_norms = torch.where(unusable, torch.ones((), dtype=torch.float64), norms)
    clip = torch.where(usable_norms > threshold, threshold / usable_norms, 1.0)
    clip = torch.where(unusable, torch.zeros((), dtype=torch.float64), clip)
    weights = normalized(counts, ~unusable) * clip
    details.update(clip_factors=clip.tolist(), num_clipped=int((clip < 1).sum()))
    report = AggregationReport(
        method="ndc",
        weights=weights,
        scores=torch.where(unusable, float("inf"), norms),
        non_finite=unusable,
        details=details,
        selects=False,
    )
    return weighted_row_sum(matrix, weights), report
