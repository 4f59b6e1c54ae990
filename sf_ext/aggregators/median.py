"""Coordinate-wise median and trimmed mean (Yin et al., 2018).

Selection along the client axis is the floor of both rules, so they call ``torch.median`` /
``torch.sort`` on column blocks of the matrix directly. Blocks keep the sort's temporaries (values
plus int64 indices, three times the block) small instead of three times the whole matrix, and are
no slower than one call on the full matrix.

Checked against numpy's sort/median on the same matrix (even and odd client counts, screened
rows inside blocks) in the unit tests.

What the server learns: every client's plaintext update.
"""

from typing import Optional, Tuple

import torch

from sf_ext.aggregators._linalg import column_blocks, row_block
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

SELECT_BLOCK_ELEMENTS = 1 << 22

_WEIGHTS_MEANING = "share of the coordinates at which the client's value enters the result"


def _screen(matrix: torch.Tensor):
    """Row norms (for the scores) double as the screening statistic: one pass over the data."""
    norms = torch.linalg.vector_norm(matrix, dim=1).to(torch.float64)
    unusable, overflowed = screen_rows(matrix, norms)
    usable = (~unusable).nonzero().flatten()
    rows = None if usable.numel() == matrix.shape[0] else usable
    return norms, unusable, overflowed, usable, rows


def _distance_scores(matrix, norms, usable, result) -> torch.Tensor:
    """``|u_i - result|`` for the usable rows, from row norms and one matrix-vector product."""
    dots = (matrix @ result).to(torch.float64)[usable]
    sq = norms[usable] ** 2 - 2.0 * dots + float(result.double().dot(result.double()))
    return sq.clamp(min=0.0).sqrt()


def _sorted_middle_mean(matrix, rows, num_usable: int, trim: int):
    """Mean of the sorted values ``trim .. num_usable - trim`` of each column, and how many
    coordinates each usable row contributed to."""
    result = torch.empty(matrix.shape[1], dtype=torch.float32)
    picks = torch.zeros(num_usable, dtype=torch.float64)
    for cols in column_blocks(num_usable, matrix.shape[1], SELECT_BLOCK_ELEMENTS):
        values, order = torch.sort(row_block(matrix, rows, cols), dim=0)
        middle = slice(trim, num_usable - trim)
        torch.mean(values[middle], dim=0, out=result[cols])
        picks += torch.bincount(order[middle].reshape(-1), minlength=num_usable).to(torch.float64)
    return result, picks


def _report(method, matrix, norms, unusable, usable, result, shares, details):
    num_clients = matrix.shape[0]
    weights = scatter(shares, usable, num_clients, 0.0)
    scores = _distance_scores(matrix, norms, usable, result)
    details = dict(details, weights_meaning=_WEIGHTS_MEANING)
    return AggregationReport(
        method=method,
        weights=weights,
        scores=scatter(scores, usable, num_clients, float("inf")),
        non_finite=unusable,
        details=details,
        selects=False,
    )


@torch.no_grad()
def coordinate_median(
    updates, num_samples=None, *, midpoint: bool = False
) -> Tuple[torch.Tensor, AggregationReport]:
    """Coordinate-wise median of the usable updates.

    Args:
        updates: ``[n_clients, n_params]`` float updates.
        num_samples: Accepted for the common signature; the median is unweighted.
        midpoint: For an even number of usable clients, average the two middle values (the
            textbook median) instead of taking the lower one (``torch.median``, the default).

    Returns:
        The median and a report; ``weights[i]`` is the share of coordinates where client ``i``
        supplied the median, ``scores[i]`` the L2 distance of its update to the median.
    """
    matrix = as_update_matrix(updates)
    num_clients, num_params = matrix.shape
    sample_counts(num_samples, num_clients)
    norms, unusable, overflowed, usable, rows = _screen(matrix)
    details = {"midpoint": bool(midpoint), **screening_details(overflowed)}
    num_usable = usable.numel()
    if num_usable == 0:
        return nothing_usable("median", num_clients, num_params, unusable, details)
    if midpoint and num_usable % 2 == 0:
        # The mean of the two middle values is the trimmed mean that drops all others.
        trim = num_usable // 2 - 1
        result, picks = _sorted_middle_mean(matrix, rows, num_usable, trim)
        shares = picks / (2.0 * num_params)
    else:
        result = torch.empty(num_params, dtype=torch.float32)
        picks = torch.zeros(num_usable, dtype=torch.float64)
        for cols in column_blocks(num_usable, num_params, SELECT_BLOCK_ELEMENTS):
            values, index = torch.median(row_block(matrix, rows, cols), dim=0)
            result[cols] = values
            picks += torch.bincount(index, minlength=num_usable).to(torch.float64)
        shares = picks / num_params
    report = _report("median", matrix, norms, unusable, usable, result, shares, details)
    return result, report


@torch.no_grad()
def trimmed_mean(
    updates, num_samples=None, *, f: Optional[int] = None, trim_ratio: float = 0.1
) -> Tuple[torch.Tensor, AggregationReport]:
    """Coordinate-wise trimmed mean: per coordinate, drop the ``k`` largest and ``k`` smallest
    values and average the rest.

    Args:
        updates: ``[n_clients, n_params]`` float updates.
        num_samples: Accepted for the common signature; the trimmed mean is unweighted.
        f: Values trimmed from each end (the assumed number of attackers); clients screened for
            NaN/inf count towards it. Takes precedence over ``trim_ratio``.
        trim_ratio: Fraction of the usable clients trimmed from each end when ``f`` is None.

    Raises:
        ValueError: ``n <= 2f`` or ``trim_ratio`` outside ``[0, 0.5)``.
    """
    matrix = as_update_matrix(updates)
    num_clients, num_params = matrix.shape
    sample_counts(num_samples, num_clients)
    if f is not None:
        f = check_int_option("f", f)
        if num_clients <= 2 * f:
            raise ValueError(f"trimmed mean needs n > 2f clients: got n={num_clients} for f={f}")
    elif not 0.0 <= float(trim_ratio) < 0.5:
        raise ValueError(f"trim_ratio must lie in [0, 0.5), got {trim_ratio}")
    norms, unusable, overflowed, usable, rows = _screen(matrix)
    num_usable = usable.numel()
    if f is not None:
        trim = max(f - int(unusable.sum()), 0)
    else:
        trim = int(float(trim_ratio) * num_usable)
    details = {"trim": trim, **screening_details(overflowed)}
    if num_usable == 0:
        return nothing_usable("trimmed_mean", num_clients, num_params, unusable, details)
    result, picks = _sorted_middle_mean(matrix, rows, num_usable, trim)
    shares = picks / (num_params * (num_usable - 2 * trim))
    report = _report("trimmed_mean", matrix, norms, unusable, usable, result, shares, details)
    return result, report
