"""Centered clipping (Karimireddy, He and Jaggi, "Learning from history for Byzantine robust
optimization", ICML 2021).

Starting from a center ``v`` (the previous round's aggregate: the server's momentum), each
iteration moves ``v`` by the mean of the clients' offsets from it, every offset clipped to L2 norm
``tau``::

    v <- v + (1/n) sum_i (x_i - v) * min(1, tau / |x_i - v|)

A Byzantine client moves the result by at most ``tau / n`` per iteration, however large its
update. Defaults as the official code (epfml/byzantine-robust-optimizer, ``Clipping(tau=100,
n_iter=1)``; FLPoison the same). ``tau`` is in the units of the updates: the official value was
chosen for momentum vectors of gradients; for model updates of norm ~1 a value near the benign
spread (e.g. 1) is what makes the rule bite, and the scorecard states the value it uses. The center is state the caller keeps across rounds (``ServerContext.state``); the first
round starts from zero.

Checked against the official update rule written out in numpy (two iterations, then one more
round from the remembered center) in the unit tests.

What the server learns: every client's plaintext update; it remembers the previous aggregate.
"""

from typing import Any, Dict, Tuple

import torch

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

STATE_KEY = "centered_clipping_center"


@torch.no_grad()
def centered_clipping(
    updates,
    num_samples=None,
    *,
    state: Dict[str, Any],
    tau: float = 100.0,
    iterations: int = 1,
) -> Tuple[torch.Tensor, AggregationReport]:
    """Centered clipping around the previous aggregate.

    Args:
        updates: ``[n_clients, n_params]`` float updates.
        num_samples: Accepted for the common signature; the rule is unweighted.
        state: The caller's per-run dict; the center is kept under ``"centered_clipping_center"``
            and replaced by this round's result.
        tau: Clipping radius around the center.
        iterations: Clipping iterations per round.

    Returns:
        The aggregate and a report; ``weights[i]`` is ``clip_i / n`` of the last iteration (the
        coefficient of ``x_i - v``), ``scores[i]`` the distance of client ``i`` to the final
        center.
    """
    tau = float(tau)
    if not tau > 0:
        raise ValueError(f"tau must be positive, got {tau}")
    iterations = check_int_option("iterations", iterations, minimum=1)
    matrix = as_update_matrix(updates)
    num_clients, num_params = matrix.shape
    sample_counts(num_samples, num_clients)
    norms = torch.linalg.vector_norm(matrix, dim=1).to(torch.float64)
    unusable, overflowed = screen_rows(matrix, norms)
    details = {"tau": tau, "iterations": iterations, **screening_details(overflowed)}
    usable = (~unusable).nonzero().flatten()
    if usable.numel() == 0:
        return nothing_usable("centered_clipping", num_clients, num_params, unusable, details)
    center = state.get(STATE_KEY)
    if center is None or center.numel() != num_params or not bool(torch.isfinite(center).all()):
        center = torch.zeros(num_params, dtype=torch.float32)
    rows = matrix[usable] if usable.numel() < num_clients else matrix
    count = rows.shape[0]
    for _ in range(iterations):
        offsets = rows - center
        distance = torch.linalg.vector_norm(offsets, dim=1).to(torch.float64)
        clip = torch.where(distance > tau, tau / distance.clamp(min=1e-300), 1.0)
        center = center + (clip.to(torch.float32) / count) @ offsets
    distance = torch.linalg.vector_norm(rows - center, dim=1).to(torch.float64)
    state[STATE_KEY] = center.clone()
    details.update(num_clipped=int((clip < 1).sum()), clip_factors=clip.tolist())
    report = AggregationReport(
        method="centered_clipping",
        weights=scatter(clip / count, usable, num_clients, 0.0),
        scores=scatter(distance, usable, num_clients, float("inf")),
        non_finite=unusable,
        details=dict(details, weights_meaning="clip factor / n of the offset from the center"),
    )
    return center, report
