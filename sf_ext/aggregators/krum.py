"""Krum and Multi-Krum (Blanchard et al., 2017).

Each client's score is the sum of squared Euclidean distances to its ``n - f - 2`` nearest other
updates; Krum returns the single update with the lowest score, Multi-Krum the sample-weighted mean
of the ``m`` lowest-scoring ones (``m = n - f`` by default). All distances come from one Gram
matrix.

Checked against a brute-force computation of the scores (all pairwise squared distances, sorted
per row) in the unit tests.

What the server learns: every client's plaintext update and all pairwise distances.
"""

from typing import Optional, Tuple

import torch

from sf_ext.aggregators._linalg import gram_matrix, squared_distances, weighted_row_sum
from sf_ext.aggregators._validate import (
    as_update_matrix,
    check_int_option,
    normalized,
    nothing_usable,
    sample_counts,
    scatter,
    screen_rows,
    screening_details,
)
from sf_ext.aggregators.report import AggregationReport


def max_tolerated_f(num_clients: int) -> int:
    """The largest ``f`` Krum accepts for ``num_clients`` clients (``n > 2f + 2``)."""
    return max((num_clients - 3) // 2, 0)


def _check_f(f: Optional[int], num_clients: int, method: str) -> int:
    if f is None:
        f = max_tolerated_f(num_clients)
    f = check_int_option("f", f)
    if num_clients <= 2 * f + 2:
        if num_clients < 3:
            hint = f"{method} needs at least 3 clients, whatever f"
        else:
            hint = f"with {num_clients} clients f can be at most {max_tolerated_f(num_clients)}"
        raise ValueError(
            f"{method} needs n > 2f + 2 clients (n >= {2 * f + 3} for f={f}), "
            f"got n={num_clients}: {hint}"
        )
    return f


def _krum_scores(
    updates: torch.Tensor, method: str, f: Optional[int]
) -> Tuple[torch.Tensor, torch.Tensor, int, dict, torch.Tensor]:
    """Screening plus Krum scores of the usable clients.

    Returns:
        ``(usable_index, scores, f_effective, details, unusable_mask)``; ``scores`` is aligned
        with ``usable_index``.
    """
    num_clients = updates.shape[0]
    f = _check_f(f, num_clients, method)
    gram = gram_matrix(updates)
    unusable, overflowed = screen_rows(updates, gram.diagonal())
    usable = (~unusable).nonzero().flatten()
    # Screened clients are attackers already removed, so fewer remain among the usable ones;
    # with n > 2f + 2 this keeps n_usable > 2 f_eff + 2 whenever f >= the number screened.
    f_eff = max(f - int(unusable.sum()), 0)
    num_usable = usable.numel()
    neighbours = num_usable - f_eff - 2
    if neighbours < 1:
        neighbours = max(num_usable - 1, 0)
    dist = squared_distances(gram[usable][:, usable])
    # Row-wise: drop the zero self-distance (the smallest entry), sum the nearest neighbours.
    nearest = torch.sort(dist, dim=1).values[:, 1 : neighbours + 1]
    scores = nearest.sum(dim=1)
    details = {"f": f, "f_effective": f_eff, "neighbours": neighbours}
    details.update(screening_details(overflowed))
    return usable, scores, f_eff, details, unusable


@torch.no_grad()
def krum(
    updates, num_samples=None, *, f: Optional[int] = None
) -> Tuple[torch.Tensor, AggregationReport]:
    """Krum: the single update closest to its ``n - f - 2`` nearest neighbours.

    Args:
        updates: ``[n_clients, n_params]`` float updates.
        num_samples: Accepted for the common signature; Krum selects one update and ignores it.
        f: Assumed number of Byzantine clients (default: the most Krum tolerates,
            ``(n - 3) // 2``). Clients screened for NaN/inf count towards ``f``.

    Raises:
        ValueError: ``n <= 2f + 2``.
    """
    matrix = as_update_matrix(updates)
    num_clients, num_params = matrix.shape
    sample_counts(num_samples, num_clients)
    usable, scores, _, details, unusable = _krum_scores(matrix, "Krum", f)
    if usable.numel() == 0:
        return nothing_usable("krum", num_clients, num_params, unusable, details, selects=True)
    chosen = int(usable[int(torch.argmin(scores))])
    weights = torch.zeros(num_clients, dtype=torch.float64)
    weights[chosen] = 1.0
    details["selected"] = [chosen]
    report = AggregationReport(
        method="krum",
        weights=weights,
        scores=scatter(scores, usable, num_clients, float("inf")),
        non_finite=unusable,
        details=details,
        selects=True,
    )
    return matrix[chosen].clone(), report


@torch.no_grad()
def multi_krum(
    updates, num_samples=None, *, f: Optional[int] = None, m: Optional[int] = None
) -> Tuple[torch.Tensor, AggregationReport]:
    """Multi-Krum: the sample-weighted mean of the ``m`` updates with the lowest Krum scores.

    Args:
        updates: ``[n_clients, n_params]`` float updates.
        num_samples: ``[n]`` sample counts weighting the selected updates (equal when None).
        f: Assumed number of Byzantine clients (default ``(n - 3) // 2``); screened clients
            count towards it.
        m: How many updates to average (default ``n_usable - f_effective``, i.e. ``n - f``).

    Raises:
        ValueError: ``n <= 2f + 2`` or an invalid ``m``.
    """
    matrix = as_update_matrix(updates)
    num_clients, num_params = matrix.shape
    counts = sample_counts(num_samples, num_clients)
    if m is not None:
        m = check_int_option("m", m, minimum=1)
    usable, scores, f_eff, details, unusable = _krum_scores(matrix, "Multi-Krum", f)
    if usable.numel() == 0:
        return nothing_usable(
            "multi_krum", num_clients, num_params, unusable, details, selects=True
        )
    m_eff = min(m if m is not None else usable.numel() - f_eff, usable.numel())
    m_eff = max(m_eff, 1)
    # Stable sort: equal scores keep client order, so ties resolve deterministically.
    order = torch.sort(scores, stable=True).indices[:m_eff]
    selected = torch.zeros(num_clients, dtype=torch.bool)
    selected[usable[order]] = True
    weights = normalized(counts, selected)
    details.update(m=m_eff, selected=usable[order].sort().values.tolist())
    report = AggregationReport(
        method="multi_krum",
        weights=weights,
        scores=scatter(scores, usable, num_clients, float("inf")),
        non_finite=unusable,
        details=details,
        selects=True,
    )
    return weighted_row_sum(matrix, weights), report
