"""Bulyan (El Mhamdi, Guerraoui and Rouault, ICML 2018).

1. Selection: apply Krum repeatedly, each time moving the selected update out of the candidate
   set, until ``theta = n - 2f`` updates are selected.
2. Aggregation, per coordinate: among the ``theta`` selected values keep the ``beta = theta - 2f``
   closest to their median and average them.

Bulyan needs ``n >= 4f + 3``. All Krum scores come from one Gram matrix; the coordinate stage
works on column blocks of the selected rows.

Checked against a test-local re-derivation of the paper's definition (iterated Krum, then the
beta values closest to the median, in numpy). FLPoison's port differs: its beta equals the
selected count, so it reduces to the mean of the Krum-selected updates.

What the server learns: every client's plaintext update (pairwise distances and per-coordinate
order statistics need them) and sample counts.
"""

from typing import Any, Mapping, Optional, Tuple

import torch

from sf_ext.aggregators._linalg import column_blocks, gram_matrix, squared_distances
from sf_ext.aggregators._validate import (
    as_update_matrix,
    check_int_option,
    nothing_usable,
    sample_counts,
    scatter,
    screen_rows,
    screening_details,
)
from sf_ext.aggregators.report import AggregationReport

BLOCK_ELEMENTS = 1 << 22


def max_bulyan_f(num_clients: int) -> int:
    """The largest ``f`` with ``n >= 4f + 3``."""
    return max((num_clients - 3) // 4, 0)


def bulyan_tolerates(num_clients: int, options: Mapping[str, Any]) -> int:
    f = options.get("f")
    return max_bulyan_f(num_clients) if f is None else min(int(f), max_bulyan_f(num_clients))


def _krum_scores(dist: torch.Tensor, f: int) -> torch.Tensor:
    """Krum scores: summed squared distances to the ``m - f - 2`` nearest others."""
    m = dist.shape[0]
    neighbours = max(min(m - f - 2, m - 1), 1) if m > 1 else 0
    return torch.sort(dist, dim=1).values[:, 1 : neighbours + 1].sum(dim=1)


def _krum_pick(dist: torch.Tensor, candidates: list, f: int) -> int:
    """Index (into ``candidates``) of the Krum choice among ``candidates``."""
    scores = _krum_scores(dist[candidates][:, candidates], f)
    return int(torch.argmin(scores))  # first minimum: ties go to the lowest index


@torch.no_grad()
def bulyan(
    updates, num_samples=None, *, f: Optional[int] = None
) -> Tuple[torch.Tensor, AggregationReport]:
    """Bulyan: iterated Krum selection, then a coordinate-wise mean around the median.

    Args:
        updates: ``[n_clients, n_params]`` float updates.
        num_samples: Accepted for the common signature; Bulyan is unweighted.
        f: Assumed number of Byzantine clients (default ``(n - 3) // 4``, the most Bulyan
            tolerates). Clients screened for NaN/inf count towards ``f``.

    Returns:
        The aggregate and a report; ``weights[i]`` is the share of the result's coordinates
        client ``i``'s value enters (divided by ``beta``), 0 for clients Krum did not select;
        ``scores[i]`` its Krum score among all usable clients; ``details["selected"]`` lists the
        Krum-selected clients.

    Raises:
        ValueError: ``n < 4f + 3``.
    """
    matrix = as_update_matrix(updates)
    num_clients, num_params = matrix.shape
    sample_counts(num_samples, num_clients)
    f = max_bulyan_f(num_clients) if f is None else check_int_option("f", f)
    if num_clients < 4 * f + 3:
        raise ValueError(
            f"Bulyan needs n >= 4f + 3 clients (n >= {4 * f + 3} for f={f}), got n={num_clients}"
        )
    gram = gram_matrix(matrix)
    unusable, overflowed = screen_rows(matrix, gram.diagonal())
    usable = (~unusable).nonzero().flatten()
    f_eff = max(f - int(unusable.sum()), 0)
    num_usable = usable.numel()
    details = {"f": f, "f_effective": f_eff, **screening_details(overflowed)}
    if num_usable == 0:
        return nothing_usable("bulyan", num_clients, num_params, unusable, details, selects=True)

    dist = squared_distances(gram[usable][:, usable])
    theta = max(num_usable - 2 * f_eff, 1)
    first_scores = _krum_scores(dist, f_eff)
    remaining, chosen = list(range(num_usable)), []
    for _ in range(theta):
        pick = remaining[_krum_pick(dist, remaining, f_eff)]
        chosen.append(pick)
        remaining.remove(pick)
    beta = max(theta - 2 * f_eff, 1)
    rows = usable[torch.as_tensor(sorted(chosen))]

    result = torch.empty(num_params, dtype=torch.float32)
    picks = torch.zeros(rows.numel(), dtype=torch.float64)
    for cols in column_blocks(rows.numel(), num_params, BLOCK_ELEMENTS):
        block = matrix[rows, cols]
        median = torch.quantile(block.double(), 0.5, dim=0)  # midpoint median of theta values
        gap = (block.double() - median).abs()
        # The beta values closest to the median (ties to the lower row, deterministically).
        nearest = torch.sort(gap, dim=0, stable=True).indices[:beta]
        result[cols] = torch.gather(block, 0, nearest).mean(dim=0)
        picks += torch.bincount(nearest.reshape(-1), minlength=rows.numel()).to(torch.float64)
    shares = torch.zeros(num_usable, dtype=torch.float64)
    shares[torch.as_tensor(sorted(chosen))] = picks / (num_params * beta)
    weights = scatter(shares, usable, num_clients, 0.0)
    details.update(
        theta=theta,
        beta=beta,
        selected=rows.tolist(),
        weights_meaning="share of the coordinates at which the client's value enters, / beta",
    )
    report = AggregationReport(
        method="bulyan",
        weights=weights,
        scores=scatter(first_scores, usable, num_clients, float("inf")),
        non_finite=unusable,
        details=details,
        selects=True,
    )
    return result, report
