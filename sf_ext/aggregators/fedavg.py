"""FedAvg: the sample-weighted mean of the updates (no defence)."""

from typing import Tuple

import torch

from sf_ext.aggregators._validate import NonFiniteAggregate, as_update_matrix, sample_counts
from sf_ext.aggregators.report import AggregationReport


@torch.no_grad()
def fedavg(updates, num_samples=None) -> Tuple[torch.Tensor, AggregationReport]:
    """Sample-weighted mean ``sum_i n_i u_i / sum_i n_i``.

    FedAvg has no defence, so a non-finite update is an error rather than something to screen:
    the check costs nothing in the normal case because NaN/inf always propagate into the mean,
    and only then are the rows inspected to name the culprit.

    Args:
        updates: ``[n_clients, n_params]`` float updates.
        num_samples: ``[n]`` sample counts (equal weights when None).

    What the server learns: every client's plaintext update and sample count.

    Raises:
        NonFiniteAggregate: A client's update holds NaN/inf (the message names its index), or the
            mean overflowed float32 (a ``ValueError``).
    """
    matrix = as_update_matrix(updates)
    coeffs = sample_counts(num_samples, matrix.shape[0])
    coeffs = coeffs / coeffs.sum()
    result = coeffs.to(torch.float32) @ matrix
    if not bool(torch.isfinite(result).all()):
        bad = [i for i in range(matrix.shape[0]) if not bool(torch.isfinite(matrix[i]).all())]
        if bad:
            raise NonFiniteAggregate(
                f"client update {bad[0]} contains NaN or inf (non-finite clients: {bad}); "
                "FedAvg cannot screen them, use a robust aggregator"
            )
        raise NonFiniteAggregate(
            "the weighted mean overflowed float32 (update values are too large)"
        )
    num_clients = matrix.shape[0]
    report = AggregationReport(
        method="fedavg",
        weights=coeffs,
        scores=None,
        non_finite=torch.zeros(num_clients, dtype=torch.bool),
    )
    return result, report
