"""The adaptive attack against matrix mapping (section 4 of the matrix-mapping paper).

Threat model (the paper's 4.2, Fang et al.'s partial knowledge): the f attackers of a round
collude. Each trains honestly first; a leader collects their clean updates, maps them through the
network exactly as the server would (:func:`sf_ext.aggregators.matrix_mapping.map_updates`) and
scores them with the server's own anomaly score
(:func:`sf_ext.aggregators.matrix_mapping.anomaly_scores`). The crafted update follows the general
adaptive framework (the paper's eq. 13): start from the attackers' mean clean update ``mu`` and
move against the estimated direction of the global update, ``s = sign(mu)``::

    malicious(lambda) = mu - lambda * s,      0 <= lambda < lambda_max = 200

``lambda`` is the largest value (halving from 200, then bisection) for which the leader's anomaly
score, computed on the 2f-model distribution (the f clean updates plus the f identical malicious
ones), stays below the server's threshold (the mean score). Every attacker then sends that update.

Note on the search direction: the paper's text says lambda is halved when the leader's score is
below the mean and doubled otherwise, which would shrink the attack exactly when it is undetected;
we read it as the usual search (shrink while detected, keep the largest undetected value), as in
Fang et al. Note also that with f >= 2 identical copies in the 2f-model distribution the leader's
score is always below the mean (the copies are at distance 0 from each other), so the paper's
reading always ends at lambda = 200. ``reference="single"`` scores one malicious copy against the
f clean updates instead, which makes the search meaningful (and the attack stealthier).
"""

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import nn

from sf_ext.params import ParamLayout

__all__ = ["adaptive_matrix_mapping", "AdaptiveResult", "leader_passes"]


@dataclass
class AdaptiveResult:
    """The crafted updates and how the search went."""

    updates: torch.Tensor
    lam: float
    leader_score: float
    threshold: float
    evaluations: int


def leader_passes(
    clean: torch.Tensor,
    malicious: torch.Tensor,
    model: nn.Module,
    input_shape: Sequence[int],
    layout: Optional[ParamLayout] = None,
    reference: str = "paper",
):
    """Whether the leader's malicious update scores below the mean on the attackers' distribution.

    Returns ``(passes, leader_score, threshold)``.
    """
    from sf_ext.aggregators.matrix_mapping import anomaly_scores, map_updates

    copies = clean.shape[0] if reference == "paper" else 1
    stacked = torch.cat([clean, malicious.reshape(1, -1).expand(copies, -1)]).to(torch.float32)
    outputs = map_updates(model, stacked, input_shape, layout).to(torch.float64)
    if not bool(torch.isfinite(outputs[-1]).all()):
        return False, float("inf"), float("nan")
    scores = anomaly_scores(outputs)
    threshold = float(scores.mean())
    leader = float(scores[-1])
    return leader < threshold, leader, threshold


@torch.no_grad()
def adaptive_matrix_mapping(
    updates: torch.Tensor,
    attackers,
    *,
    model: nn.Module,
    input_shape: Sequence[int],
    layout: Optional[ParamLayout] = None,
    num_samples=None,
    lambda_max: float = 200.0,
    lambda_min: float = 1e-8,
    rel_tol: float = 0.05,
    max_iter: int = 60,
    reference: str = "paper",
    return_details: bool = False,
):
    """Replace the attackers' rows by the adaptive attack's crafted update.

    Args:
        updates: ``[n, d]`` honest updates of the round (only the attackers' rows are read).
        attackers: Boolean mask ``[n]``.
        model: The network (the same structure the server maps updates through).
        input_shape: One training input's shape, e.g. ``(1, 28, 28)``.
        layout: Flat layout of the updates (default: the model's).
        num_samples: Unused (accepted for the common calling convention).
        lambda_max: Upper end of the search interval (the paper's 200, exclusive).
        lambda_min: Below this the search gives up and sends the clean mean (lambda = 0).
        rel_tol: Relative precision of the final bisection.
        max_iter: Most score evaluations of the search (each maps ``2f`` or ``f + 1`` updates);
            a search where no lambda passes scores the clean mean once more.
        reference: ``"paper"`` (f clean + f malicious copies) or ``"single"`` (f clean + 1).
        return_details: Also return an :class:`AdaptiveResult`.
    """
    if reference not in ("paper", "single"):
        raise ValueError(f"reference must be 'paper' or 'single', got {reference!r}")
    mask = torch.as_tensor(attackers, dtype=torch.bool).reshape(-1)
    if mask.numel() != updates.shape[0]:
        raise ValueError(f"attacker mask has {mask.numel()} entries for {updates.shape[0]} clients")
    out = updates.clone()
    if not bool(mask.any()):
        result = AdaptiveResult(out, 0.0, float("nan"), float("nan"), 0)
        return (out, result) if return_details else out
    clean = updates[mask].to(torch.float32)
    mean = clean.mean(dim=0)
    direction = torch.sign(mean)

    evaluations = 0

    def check(lam: float):
        nonlocal evaluations
        evaluations += 1
        return leader_passes(clean, mean - lam * direction, model, input_shape, layout, reference)

    # Halve from just inside lambda_max (excluded) until the leader passes: useful values can be
    # orders of magnitude below 200 (the sign vector has norm sqrt(d)), so a linear bisection
    # over [0, 200) would never resolve them. Then refine between the passing lambda and the
    # failing one above it.
    lam, failing = lambda_max * (1 - 1e-6), None
    passed, score, threshold = check(lam)
    while not passed and lam > lambda_min and evaluations < max_iter:
        failing, lam = lam, lam / 2
        passed, score, threshold = check(lam)
    if not passed:
        lam = 0.0
        _, score, threshold = check(0.0)
    elif failing is not None:
        low, high = lam, failing
        while (high - low) > rel_tol * low and evaluations < max_iter:
            mid = (low + high) / 2
            ok, mid_score, mid_threshold = check(mid)
            if ok:
                low, score, threshold = mid, mid_score, mid_threshold
            else:
                high = mid
        lam = low
    crafted = (mean - lam * direction).to(updates.dtype)
    out[mask] = crafted
    result = AdaptiveResult(out, float(lam), float(score), float(threshold), evaluations)
    return (out, result) if return_details else out
