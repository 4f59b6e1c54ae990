"""DnC, divide and conquer (Shejwalkar and Houmansadr, NDSS 2021).

Defaults as FLPoison's ``DnC`` (@368c9403): ``niters = 5``, ``b`` = 20 % of the coordinates,
``c = 1``; Blades and several forks use ``b = 10000``, one iteration (``subsample=10000,
niters=1``). Each of ``niters`` iterations draws a random subset of ``b`` coordinates, centers the clients'
restricted updates on their mean, takes the top right singular vector ``v`` of the centered
matrix and scores every client by its squared projection ``<x_i - mu, v>^2``. The ``c * f``
highest-scoring clients are removed; the clients that survive *every* iteration are averaged.
Poisoning that must move the mean far enough to matter leaves a common direction, which the top
singular vector exposes.

Checked against numpy's SVD on the same centered matrix (the removed set) in the unit tests.

What the server learns: every client's plaintext update.
"""

import math
from typing import Optional, Tuple

import torch

from sf_ext.aggregators._linalg import weighted_row_sum
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


@torch.no_grad()
def dnc(
    updates,
    num_samples=None,
    *,
    f: Optional[int] = None,
    niters: int = 5,
    subsample: Optional[int] = None,
    subsample_fraction: float = 0.2,
    filter_fraction: float = 1.0,
    generator: Optional[torch.Generator] = None,
) -> Tuple[torch.Tensor, AggregationReport]:
    """DnC: spectral outlier removal on random coordinate subsets, then the mean of the rest.

    Args:
        updates: ``[n_clients, n_params]`` float updates.
        num_samples: Accepted for the common signature; the kept updates are averaged equally.
        f: Assumed number of attackers (default ``(n - 1) // 2``); screened clients count
            towards it.
        niters: Iterations (random subsets); a client must survive all of them.
        subsample: Coordinates per subset ``b`` (all of them when ``b >= n_params``); overrides
            ``subsample_fraction``.
        subsample_fraction: ``b`` as a share of the coordinates when ``subsample`` is None.
        filter_fraction: ``c``: each iteration removes ``ceil(c * f)`` clients.
        generator: Random source of the coordinate subsets.

    Returns:
        The aggregate and a report; ``scores[i]`` is client ``i``'s largest outlier score over
        the iterations, normalized by the median score.
    """
    matrix = as_update_matrix(updates)
    num_clients, num_params = matrix.shape
    sample_counts(num_samples, num_clients)
    niters = check_int_option("niters", niters, minimum=1)
    if subsample is None:
        if not 0 < float(subsample_fraction) <= 1:
            raise ValueError(f"subsample_fraction must lie in (0, 1], got {subsample_fraction}")
        subsample = max(1, int(float(subsample_fraction) * num_params))
    subsample = check_int_option("subsample", subsample, minimum=1)
    if not 0 <= float(filter_fraction):
        raise ValueError(f"filter_fraction must be >= 0, got {filter_fraction}")
    f = (num_clients - 1) // 2 if f is None else check_int_option("f", f)
    if f >= num_clients:
        raise ValueError(f"DnC needs f < n, got f={f} for n={num_clients}")
    norms = torch.linalg.vector_norm(matrix, dim=1).to(torch.float64)
    unusable, overflowed = screen_rows(matrix, norms)
    usable = (~unusable).nonzero().flatten()
    num_usable = usable.numel()
    f_eff = max(f - int(unusable.sum()), 0)
    removed = min(int(math.ceil(float(filter_fraction) * f_eff)), max(num_usable - 1, 0))
    details = {
        "f": f,
        "f_effective": f_eff,
        "removed_per_iter": removed,
        "niters": niters,
        "subsample": subsample,
        "filter_fraction": float(filter_fraction),
    }
    details.update(screening_details(overflowed))
    if num_usable == 0:
        return nothing_usable("dnc", num_clients, num_params, unusable, details, selects=True)
    rows = matrix[usable] if num_usable < num_clients else matrix
    survive = torch.ones(num_usable, dtype=torch.bool)
    worst = torch.zeros(num_usable, dtype=torch.float64)
    for _ in range(niters):
        if subsample >= num_params:
            block = rows.double()
        else:
            cols = torch.randperm(num_params, generator=generator)[:subsample]
            block = rows[:, cols].double()
        centered = block - block.mean(dim=0, keepdim=True)
        _, _, vh = torch.linalg.svd(centered, full_matrices=False)
        scores = (centered @ vh[0]) ** 2
        scale = float(scores.median())
        worst = torch.maximum(worst, scores / scale if scale > 0 else scores)
        if removed:
            order = torch.sort(scores, descending=True, stable=True).indices
            survive[order[:removed]] = False
    kept = torch.zeros(num_clients, dtype=torch.bool)
    kept[usable[survive]] = True
    weights = normalized(torch.ones(num_clients, dtype=torch.float64), kept)
    report = AggregationReport(
        method="dnc",
        weights=weights,
        scores=scatter(worst, usable, num_clients, float("inf")),
        non_finite=unusable,
        details=details,
        selects=True,
    )
    return weighted_row_sum(matrix, weights), report
