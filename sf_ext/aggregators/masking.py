"""Robust aggregation of pruned uploads: masks in, a per-coordinate average over keepers out.

Under ``fed_avg_w_prune`` a client uploads ``m_i * w_i`` (its pruned weights are exactly 0)
together with its mask ``m_i``. Averaging such uploads as plain weights drags every coordinate
some client pruned towards 0. The robust adapters therefore

1. hand the rule the **masked updates** ``e_i = m_i * (w_i - G)``: a pruned coordinate counts as
   "no change" for detection (FLAME then clusters the models ``G + e_i``, matrix mapping maps
   ``e_i``, Krum measures distances between the ``e_i``), and
2. renormalize the rule's result per coordinate over the clients that kept it
   (:func:`mask_aware_update`), as :class:`~sf_ext.aggregators.SecurePruneAggregator` does for the
   mean: for a *linear* rule (its result is ``sum_i s_i c_i e_i``, shares ``s_i`` and clip factors
   ``c_i``), coordinate ``j`` becomes ``sum_i s_i c_i m_ij u_ij / sum_i s_i m_ij``; the median and
   the trimmed mean are taken per coordinate over the clients that kept it
   (:func:`coordinatewise_over_keepers`); for Bulyan, RSA and centered clipping a pruned
   coordinate stays a "no change" vote (their coordinate stages mix selection and clipping in
   ways a per-coordinate keeper count does not carry over to). A coordinate that no kept client kept becomes 0 in
   the new global model (pruned everywhere), as in ``SecurePruneAggregator``.

FLAME's noise is part of its result and is scaled with the coordinate it sits on.

:class:`MaskAwareAggregate` marks a global weight list produced this way, so that
``fed_avg_w_prune`` can tell it from an average that treated pruned weights as zeros.
"""

from typing import Optional, Sequence, Tuple

import numpy as np
import torch

from sf_ext.aggregators.report import AggregationReport

__all__ = [
    "MaskAwareAggregate",
    "is_mask_aware",
    "mask_matrix",
    "mask_aware_update",
    "effective_shares",
    "coordinatewise_over_keepers",
    "mean_over_keepers",
]


def is_mask_aware(aggregator) -> bool:
    """Whether an aggregator averages pruned uploads per coordinate over their keepers
    (``SecurePruneAggregator`` and sf-ext's robust adapters declare ``mask_aware = True``)."""
    return bool(getattr(aggregator, "mask_aware", False))


class MaskAwareAggregate(list):
    """A global weight list from an aggregator that averages pruned weights correctly.

    It *is* the weight list (numpy arrays in ``state_dict`` order); ``aggregator`` names the
    aggregator that produced it.
    """

    def __init__(self, weights, aggregator: str):
        super().__init__(weights)
        self.aggregator = str(aggregator)

    def __reduce__(self):
        return (MaskAwareAggregate, (list(self), self.aggregator))


def mask_matrix(weight_lists: Sequence, layout) -> Optional[torch.Tensor]:
    """``[n, d]`` float32 keep-masks (1 kept, 0 pruned) of the clients' uploads, or None when no
    upload carries masks (plain weight lists)."""
    masks = [getattr(w, "masks", None) for w in weight_lists]
    if all(m is None for m in masks):
        return None
    rows = []
    for weights, client_masks in zip(weight_lists, masks):
        if client_masks is None:
            client_masks = [None] * len(weights)
        if len(client_masks) != len(weights):
            raise ValueError(f"{len(client_masks)} masks for {len(weights)} weight arrays")
        arrays = [
            np.ones(np.shape(w), np.float32) if m is None else np.asarray(m, np.float32)
            for w, m in zip(weights, client_masks)
        ]
        rows.append(layout.flatten(arrays))
    return torch.stack(rows)


def effective_shares(report: AggregationReport) -> torch.Tensor:
    """Each client's share in a linear rule's mean: its weight without the clip factor."""
    weights = report.weights
    clip = report.details.get("clip_factors")
    if clip is None:
        return weights.clone()
    clip = torch.as_tensor(clip, dtype=torch.float64)
    return torch.where(clip > 0, weights / clip.clamp(min=1e-300), torch.zeros_like(weights))


def mask_aware_update(
    result: torch.Tensor, report: AggregationReport, masks: torch.Tensor, linear: bool
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The rule's result renormalized per coordinate over the clients that kept it.

    Args:
        result: The rule's ``[d]`` update, computed on the masked updates ``m_i * u_i``.
        report: The rule's report (weights, clip factors).
        masks: ``[n, d]`` keep-masks (1 kept, 0 pruned).
        linear: Whether the rule is a weighted mean of (clipped) updates.

    Returns:
        ``(update, nobody)``: the renormalized ``[d]`` update and a bool ``[d]`` mask of the
        coordinates no kept client kept (the caller sets the new global model to 0 there).
    """
    masks = masks.to(torch.float32)
    if linear:
        shares = effective_shares(report).to(torch.float32)
        kept_share = shares @ masks
        total = float(shares.sum())
        nobody = kept_share <= 0
        scale = torch.where(
            nobody, torch.zeros_like(kept_share), total / kept_share.clamp(min=1e-30)
        )
        return result * scale, nobody
    kept = report.kept.to(torch.float32)
    nobody = (kept @ masks) <= 0
    return torch.where(nobody, torch.zeros_like(result), result), nobody


def coordinatewise_over_keepers(
    updates: torch.Tensor,
    masks: torch.Tensor,
    usable: torch.Tensor,
    method: str,
    f=None,
    trim_ratio: float = 0.1,
) -> torch.Tensor:
    """Median or trimmed mean of each coordinate over the usable clients that kept it.

    Args:
        updates: ``[n, d]`` updates.
        masks: ``[n, d]`` keep-masks.
        usable: bool ``[n]``, clients the rule did not screen out.
        method: ``"median"`` (lower median, as ``torch.median``) or ``"trimmed_mean"`` (per
            coordinate, ``f`` values from each end, capped so that one remains, or
            ``int(trim_ratio * keepers)``).

    Returns:
        ``[d]``: the statistic over the keepers, 0 where nobody kept the coordinate.
    """
    rows = updates[usable].to(torch.float32)
    keep = masks[usable] > 0
    count = keep.sum(dim=0)
    if method == "median":
        values = torch.where(keep, rows, torch.full_like(rows, float("nan")))
        result = torch.nanmedian(values, dim=0).values
        return torch.where(count > 0, result, torch.zeros_like(result))
    if method != "trimmed_mean":
        raise ValueError(f"no per-keeper form for {method!r}")
    ordered = torch.sort(torch.where(keep, rows, torch.full_like(rows, float("inf"))), dim=0).values
    if f is not None:
        trim = torch.clamp(torch.full_like(count, int(f)), max=torch.clamp((count - 1) // 2, min=0))
    else:
        trim = torch.floor(float(trim_ratio) * count.to(torch.float64)).to(count.dtype)
    position = torch.arange(rows.shape[0]).unsqueeze(1)
    take = (position >= trim) & (position < count - trim)
    total = torch.where(take, ordered, torch.zeros_like(ordered)).sum(dim=0)
    taken = take.sum(dim=0)
    return torch.where(taken > 0, total / taken.clamp(min=1), torch.zeros_like(total))


def mean_over_keepers(
    rows: torch.Tensor, masks: Optional[torch.Tensor], shares: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Weighted mean of each coordinate over the clients that kept it, in float64.

    The plaintext form of what :class:`~sf_ext.aggregators.SecurePruneAggregator` computes
    securely: ``sum_i s_i m_ij x_ij / sum_i s_i m_ij``, 0 where no client kept coordinate ``j``.

    Args:
        rows: ``[n, ...]`` client values (weights or updates).
        masks: ``[n, ...]`` keep-masks (1 kept, 0 pruned), or None (every client kept everything:
            the plain weighted mean).
        shares: ``[n]`` client weights (sample counts); None weighs the clients equally.

    Returns:
        A float64 tensor of ``rows.shape[1:]``.
    """
    rows = torch.as_tensor(rows, dtype=torch.float64)
    n = rows.shape[0]
    shares = (
        torch.ones(n, dtype=torch.float64)
        if shares is None
        else torch.as_tensor(shares, dtype=torch.float64).reshape(n)
    )
    keep = (
        torch.ones_like(rows)
        if masks is None
        else torch.as_tensor(masks, dtype=torch.float64).reshape(rows.shape)
    )
    weight = torch.tensordot(shares, keep, dims=1)
    total = torch.tensordot(shares, keep * rows, dims=1)
    kept = weight > 0
    return torch.where(kept, total / torch.where(kept, weight, torch.ones_like(weight)), 0.0)
