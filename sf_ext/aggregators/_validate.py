"""Input checks and NaN/inf screening shared by every aggregator.

Screening never scans the update matrix on its own: each aggregator already computes one per-client
statistic in a pass it needs anyway (row sums, row norms or the Gram diagonal). A row holding NaN or
inf always makes that statistic non-finite, so only the rows it flags are checked exactly.
"""

from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from sf_ext.aggregators.report import AggregationReport


class NonFiniteAggregate(ValueError):
    """A rule without screening met NaN/inf updates, or its result overflowed float32.

    Callers that keep training through attacks (the simulator) catch exactly this to mark the run
    diverged; every other ``ValueError`` (a configuration mistake) still stops them.
    """


def as_update_matrix(updates) -> torch.Tensor:
    """The stacked updates as a contiguous float32 ``[n_clients, n_params]`` tensor.

    Args:
        updates: A 2-D tensor or array, or a sequence of equally long 1-D client vectors.

    Raises:
        ValueError: Empty client list, no parameters, a wrong number of dimensions or client
            vectors of different lengths.
        TypeError: Non-floating-point updates.
    """
    if isinstance(updates, (list, tuple)):
        if len(updates) == 0:
            raise ValueError("no client updates to aggregate (empty client list)")
        rows = [_as_tensor(u) for u in updates]
        shapes = {tuple(r.shape) for r in rows}
        if len(shapes) != 1:
            raise ValueError(f"client updates have mismatched shapes: {sorted(shapes)}")
        if rows[0].dim() != 1:
            raise ValueError(
                f"each client update must be a flat vector, got shape {tuple(rows[0].shape)}"
            )
        for row in rows:
            _check_float(row.dtype)
        updates = torch.stack([r.to(torch.float32) for r in rows])
    else:
        updates = torch.as_tensor(updates)
    if updates.dim() != 2:
        raise ValueError(
            f"updates must be a [n_clients, n_params] matrix, got shape {tuple(updates.shape)}"
        )
    if updates.shape[0] == 0:
        raise ValueError("no client updates to aggregate (empty client list)")
    if updates.shape[1] == 0:
        raise ValueError("client updates have no parameters")
    _check_float(updates.dtype)
    # A float32 contiguous input passes through without a copy: the matrix can be gigabytes.
    return updates.detach().to(torch.float32).contiguous()


def _as_tensor(values) -> torch.Tensor:
    return values if isinstance(values, torch.Tensor) else torch.as_tensor(np.asarray(values))


def _check_float(dtype: torch.dtype) -> None:
    if not dtype.is_floating_point:
        raise TypeError(f"updates must be floating point (float32 preferred), got {dtype}")


def sample_counts(num_samples, num_clients: int) -> torch.Tensor:
    """Validated per-client sample counts as float64 ``[n]`` (all ones when None)."""
    if num_samples is None:
        return torch.ones(num_clients, dtype=torch.float64)
    counts = torch.as_tensor(np.asarray(num_samples, dtype=np.float64)).reshape(-1)
    if counts.numel() != num_clients:
        raise ValueError(
            f"num_samples has {counts.numel()} entries for {num_clients} client updates"
        )
    if not torch.isfinite(counts).all() or (counts < 0).any():
        raise ValueError(f"num_samples must be finite and non-negative, got {counts.tolist()}")
    if counts.sum() <= 0:
        raise ValueError("num_samples sum to zero: no client has any weight")
    return counts


def screen_rows(
    updates: torch.Tensor, row_stat: Optional[torch.Tensor] = None
) -> Tuple[torch.Tensor, List[int]]:
    """Which client rows cannot be used: they hold NaN/inf, or their statistic overflowed float32.

    Args:
        updates: The ``[n, d]`` update matrix.
        row_stat: A per-row statistic computed from every entry of the row (sum, norm, squared
            norm); computed here as the row sum when omitted.

    Returns:
        ``(unusable, overflowed)``: a bool ``[n]`` mask and the indices of rows whose entries are
        all finite but whose statistic overflowed (these are screened too: their norms and pairwise
        products are meaningless in float32).
    """
    if row_stat is None:
        row_stat = updates.sum(dim=1)
    unusable = ~torch.isfinite(row_stat.reshape(-1))
    flagged = unusable.nonzero().flatten().tolist()
    overflowed = [int(i) for i in flagged if bool(torch.isfinite(updates[i]).all())]
    return unusable.cpu(), overflowed


def screening_details(overflowed: List[int]) -> Dict[str, Any]:
    return {"overflow_rows": overflowed} if overflowed else {}


def normalized(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``values`` restricted to ``mask``, scaled to sum to one (equal shares if they sum to 0)."""
    out = torch.where(mask, values.to(torch.float64), torch.zeros((), dtype=torch.float64))
    total = out.sum()
    if total > 0:
        return out / total
    count = int(mask.sum())
    return mask.to(torch.float64) / max(count, 1)


def check_int_option(name: str, value, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def nothing_usable(
    method: str,
    num_clients: int,
    num_params: int,
    unusable: torch.Tensor,
    details: Dict[str, Any],
    selects: bool = False,
) -> Tuple[torch.Tensor, AggregationReport]:
    """Result of a robust aggregator when every update was screened: a zero update (the global
    model stays as it is) rather than an exception that would stop training."""
    details = dict(details, all_screened=True)
    report = AggregationReport(
        method=method,
        weights=torch.zeros(num_clients, dtype=torch.float64),
        scores=torch.full((num_clients,), float("inf"), dtype=torch.float64),
        non_finite=unusable.clone(),
        details=details,
        selects=selects,
    )
    return torch.zeros(num_params, dtype=torch.float32), report


def scatter(values: torch.Tensor, index: torch.Tensor, size: int, fill: float) -> torch.Tensor:
    """Spread per-usable-client values back to all ``size`` clients (``fill`` elsewhere)."""
    out = torch.full((size,), fill, dtype=torch.float64)
    out[index] = values.to(torch.float64)
    return out
