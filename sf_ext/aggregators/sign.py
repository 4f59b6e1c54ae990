"""RSA sign aggregation (Li et al., 2019) as configured in the matrix-mapping paper.

Only the direction of each coordinate counts: the global update is
``step_t * sum_i sign(u_i)`` with ``step_t = 5e-5 * 0.998^t`` for round ``t``, so no client moves a
coordinate by more than ``step_t``. The round counter is state of the caller and is passed in.

The matrix is read once, in cache-sized column blocks: the signs, their column sums, each client's
agreement with the result and the screening row sums all come from the same block.

Checked against ``step * sum(sign(u_i))`` computed directly in the unit tests.

What the server learns: every client's plaintext update (it only uses the signs).
"""

from typing import Optional, Tuple

import torch

from sf_ext.aggregators._linalg import SIGN_BLOCK_ELEMENTS, column_blocks, row_block
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


def rsa_step(round_index: int, base_step: float = 5e-5, decay: float = 0.998) -> float:
    """The paper's RSA step size for round ``round_index`` (counted from 0)."""
    return float(base_step) * float(decay) ** int(round_index)


def _sign_pass(matrix: torch.Tensor, rows: Optional[torch.Tensor], num_rows: int):
    sign_sum = torch.empty(matrix.shape[1], dtype=torch.float32)
    agreement = torch.zeros(num_rows, dtype=torch.float64)
    row_sums = torch.zeros(num_rows, dtype=torch.float64)
    ones = torch.ones(num_rows, dtype=torch.float32)
    buffer = None  # one reused block buffer: fresh temporaries per block cost page faults
    for cols in column_blocks(num_rows, matrix.shape[1], SIGN_BLOCK_ELEMENTS):
        block = row_block(matrix, rows, cols)
        if buffer is None:
            buffer = torch.empty_like(block)
        signs = buffer[:, : block.shape[1]]
        torch.sign(block, out=signs)
        column = torch.mv(signs.T, ones, out=sign_sum[cols])
        agreement += torch.mv(signs, torch.sign(column)).to(torch.float64)
        row_sums += block.sum(dim=1).to(torch.float64)
    return sign_sum, agreement, row_sums


@torch.no_grad()
def sign_aggregate(
    updates,
    num_samples=None,
    *,
    round_index: int = 0,
    step: Optional[float] = None,
    base_step: float = 5e-5,
    decay: float = 0.998,
) -> Tuple[torch.Tensor, AggregationReport]:
    """RSA: ``step * sum_i sign(u_i)`` over the usable updates.

    Args:
        updates: ``[n_clients, n_params]`` float updates.
        num_samples: Accepted for the common signature; RSA sums signs unweighted.
        round_index: Round counter ``t`` (kept by the caller) for ``base_step * decay^t``.
        step: Explicit step size, overriding the schedule.
        base_step: Step at round 0.
        decay: Per-round decay of the step.

    Returns:
        The result and a report; ``weights[i]`` is the step (the coefficient of
        ``sign(u_i)``), ``scores[i]`` the fraction of coordinates where the client's sign
        opposes the result's (zeros count half).
    """
    matrix = as_update_matrix(updates)
    num_clients, num_params = matrix.shape
    sample_counts(num_samples, num_clients)
    round_index = check_int_option("round_index", round_index)
    step = rsa_step(round_index, base_step, decay) if step is None else float(step)
    if not step > 0:
        raise ValueError(f"the RSA step must be positive, got {step}")
    details = {"step": step, "round_index": round_index}
    details["weights_meaning"] = "coefficient of sign(update) in the result"

    sign_sum, agreement, row_sums = _sign_pass(matrix, None, num_clients)
    unusable, overflowed = screen_rows(matrix, row_sums)
    details.update(screening_details(overflowed))
    usable = (~unusable).nonzero().flatten()
    if usable.numel() == 0:
        return nothing_usable("rsa", num_clients, num_params, unusable, details)
    if usable.numel() < num_clients:
        # Rare path: NaN spoils the column sums, so redo the pass on the usable rows only.
        sign_sum, agreement, _ = _sign_pass(matrix, usable, usable.numel())
    else:
        agreement = agreement[usable]
    disagreement = (1.0 - agreement / num_params) / 2.0
    weights = scatter(torch.full((usable.numel(),), step), usable, num_clients, 0.0)
    report = AggregationReport(
        method="rsa",
        weights=weights,
        scores=scatter(disagreement, usable, num_clients, float("inf")),
        non_finite=unusable,
        details=details,
        selects=False,
    )
    return sign_sum.mul_(step), report
