"""RFA: the sample-weighted geometric median by the smoothed Weiszfeld algorithm (Pillutla et
al., 2019), with the matrix-mapping paper's settings: smoothing ``nu = 0.1``, tolerance
``eps = 1e-5`` on the relative change of the objective, at most 500 iterations.

Every Weiszfeld iterate is a convex combination ``z = sum_i beta_i u_i`` of the updates, so the
distances ``|z - u_i|`` need only the Gram matrix: ``|z|^2 - 2 (G beta)_i + G_ii``. The default
solver therefore computes one Gram matrix and iterates on ``n x n`` numbers; the ``"direct"`` solver
makes two passes over the data per iteration instead (cheaper when few iterations are needed and
``n`` is large).

Checked in the unit tests: no small step from the result lowers the weighted sum of distances,
and both solvers agree.

What the server learns: every client's plaintext update and its distance to the median.
"""

from typing import Callable, Tuple

import torch

from sf_ext.aggregators._linalg import gram_matrix, weighted_row_sum
from sf_ext.aggregators._validate import (
    as_update_matrix,
    normalized,
    nothing_usable,
    sample_counts,
    scatter,
    screen_rows,
    screening_details,
)
from sf_ext.aggregators.report import AggregationReport

SOLVERS = ("gram", "direct")


def _gram_distances(gram: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    diag = gram.diagonal()

    def distances(beta: torch.Tensor) -> torch.Tensor:
        g_beta = gram @ beta
        return (beta.dot(g_beta) - 2.0 * g_beta + diag).clamp(min=0.0).sqrt()

    return distances


def _direct_distances(matrix, usable, sq_norms) -> Callable[[torch.Tensor], torch.Tensor]:
    num_clients = matrix.shape[0]

    def distances(beta: torch.Tensor) -> torch.Tensor:
        point = weighted_row_sum(matrix, scatter(beta, usable, num_clients, 0.0))
        dots = (matrix @ point).to(torch.float64)[usable]
        sq = sq_norms - 2.0 * dots + float(point.double().dot(point.double()))
        return sq.clamp(min=0.0).sqrt()

    return distances


@torch.no_grad()
def geometric_median(
    updates,
    num_samples=None,
    *,
    nu: float = 0.1,
    eps: float = 1e-5,
    max_iter: int = 500,
    solver: str = "gram",
) -> Tuple[torch.Tensor, AggregationReport]:
    """Smoothed Weiszfeld geometric median of the usable updates.

    Each iteration reweights client ``i`` by ``alpha_i / max(nu, |z - u_i|)`` (``alpha`` the sample
    shares) and stops once ``|F(z_old) - F(z_new)| <= eps * F(z_new)`` for the objective
    ``F(z) = sum_i alpha_i |z - u_i|``.

    Args:
        updates: ``[n_clients, n_params]`` float updates.
        num_samples: ``[n]`` sample counts (equal weights when None).
        nu: Smoothing: distances below ``nu`` count as ``nu``.
        eps: Relative tolerance on the objective.
        max_iter: Iteration cap.
        solver: ``"gram"`` (one Gram matrix, iterations on ``n x n``) or ``"direct"`` (two passes
            over the data per iteration).

    Returns:
        The geometric median and a report; ``weights`` are the final Weiszfeld coefficients,
        ``scores`` the distances to the median, ``details["iterations"]`` the iteration count.
    """
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    if not nu > 0 or not eps > 0 or int(max_iter) < 1:
        raise ValueError(f"need nu > 0, eps > 0 and max_iter >= 1, got {nu}, {eps}, {max_iter}")
    matrix = as_update_matrix(updates)
    num_clients, num_params = matrix.shape
    counts = sample_counts(num_samples, num_clients)
    if solver == "gram":
        gram = gram_matrix(matrix)
        row_stat = gram.diagonal()
    else:
        row_stat = torch.linalg.vector_norm(matrix, dim=1).to(torch.float64) ** 2
    unusable, overflowed = screen_rows(matrix, row_stat)
    details = {"nu": nu, "eps": eps, "solver": solver, **screening_details(overflowed)}
    usable = (~unusable).nonzero().flatten()
    if usable.numel() == 0:
        return nothing_usable("rfa", num_clients, num_params, unusable, details)
    alpha = normalized(counts, ~unusable)[usable]
    if solver == "gram":
        distances = _gram_distances(gram[usable][:, usable])
    else:
        distances = _direct_distances(matrix, usable, row_stat[usable])

    beta = alpha.clone()
    dist = distances(beta)
    objective = float(alpha.dot(dist))
    iterations, converged = 0, False
    while iterations < int(max_iter):
        reweighted = alpha / dist.clamp(min=nu)
        beta = reweighted / reweighted.sum()
        dist = distances(beta)
        new_objective = float(alpha.dot(dist))
        iterations += 1
        if abs(objective - new_objective) <= eps * new_objective:
            objective, converged = new_objective, True
            break
        objective = new_objective

    weights = scatter(beta, usable, num_clients, 0.0)
    details.update(iterations=iterations, converged=converged, objective=objective)
    report = AggregationReport(
        method="rfa",
        weights=weights,
        scores=scatter(dist, usable, num_clients, float("inf")),
        non_finite=unusable,
        details=details,
        selects=False,
    )
    return weighted_row_sum(matrix, weights), report
