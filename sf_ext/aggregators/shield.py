"""Shield: sf-ext's own robust rule, built from where the scorecard shows the others break.

The published rules fail in three recurring ways (``experiments/robustness/scorecard``):

- **identical rows**: the statistically optimized attacks (IPM, LIE, min-max, min-sum, Fang's
  Krum attack, the adaptive attack on matrix mapping) send one vector from every attacker; the
  copies sit at distance 0 from each other, which *lowers* their anomaly score under distance- and
  density-based rules (matrix mapping keeps IPM attackers, Krum picks them);
- **scaled rows**: a large update dominates any mean; rules that only select (matrix mapping) let
  a scaled row through when its direction looks ordinary;
- **heterogeneous benign clients**: majority clustering (FLAME, XMAM) and below-the-mean rules
  drop a quarter to two thirds of honest clients every round when the data are non-IID.

Shield combines one signal against each, all computed from the ``n x n`` Gram matrix of the
updates (no copy of the update matrix, one pass over it for the Gram and one for the sum):

1. **Clip** every update to the median update norm (as FLAME does): no row can outweigh another.
2. **Consensus direction**: the geometric median of the clipped updates (smoothed Weiszfeld,
   robust while attackers are a minority), and each client's cosine to it.
3. **Drop** (a) clients pointing away from the consensus (cosine below ``min_cosine``) or far
   below the others (a robust z-score below ``-direction_z`` on the cosines: median and MAD);
   (b) every member of a group of near-identical updates (pairwise cosine above
   ``duplicate_cosine``): honest clients train on different data and never agree to the last
   digit, while colluding attackers who compute one optimal vector do (FoolsGold's sybil
   signal, here without history).
4. **Fallback that never keeps everyone by default**: if the checks drop more than half of the
   clients, keep the ``n // 2 + 1`` non-duplicate clients closest in direction to the consensus
   (a majority is then still required, so an attacker minority cannot take over through the
   fallback).
5. Average the kept clipped updates (equal weights, as FLAME; ``weight_by_samples`` opts in).

Known limits, stated: attackers who add independent noise to their shared vector evade the
duplicate check (then only the direction and norm checks apply); a backdoor update that points
with the benign consensus and stays within the median norm is bounded, not removed.

What the server learns: every client's plaintext update (its norm, its direction relative to the
others) and the kept set.
"""

import math
from typing import Optional, Tuple

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

MAD_SCALE = 1.4826  # MAD of a normal sample, in standard deviations


def _geometric_median_weights(gram: torch.Tensor, iterations: int = 100, nu: float = 1e-8):
    """Weiszfeld coefficients ``beta`` of the geometric median ``sum_i beta_i x_i`` of the rows
    behind ``gram`` (their Gram matrix)."""
    n = gram.shape[0]
    beta = torch.full((n,), 1.0 / n, dtype=torch.float64)
    diag = gram.diagonal()
    previous = math.inf
    for _ in range(iterations):
        g_beta = gram @ beta
        dist = (beta.dot(g_beta) - 2.0 * g_beta + diag).clamp(min=0.0).sqrt()
        objective = float(dist.sum())
        weights = 1.0 / dist.clamp(min=nu * max(float(diag.max()), 1e-300) ** 0.5)
        beta = weights / weights.sum()
        if abs(previous - objective) <= 1e-9 * max(objective, 1e-300):
            break
        previous = objective
    return beta


@torch.no_grad()
def shield(
    updates,
    num_samples=None,
    *,
    min_cosine: float = 0.0,
    direction_z: float = 3.0,
    duplicate_cosine: float = 0.99,
    fallback: bool = True,
    weight_by_samples: bool = False,
) -> Tuple[torch.Tensor, AggregationReport]:
    """Median-norm clipping, consensus-direction and duplicate checks, then the mean.

    Args:
        updates: ``[n_clients, n_params]`` float updates (client weights minus the global model).
        num_samples: ``[n]`` sample counts (used with ``weight_by_samples``).
        min_cosine: Drop clients whose cosine to the consensus direction is below this.
        direction_z: Drop clients whose cosine lies more than this many robust standard
            deviations (1.4826 MAD) below the median cosine; ``inf`` disables the check.
        duplicate_cosine: Drop every member of a group whose pairwise cosine exceeds this;
            ``> 1`` disables the check.
        fallback: When more than half would be dropped, keep the ``n // 2 + 1`` non-duplicates
            closest to the consensus instead (False: keep whatever passed, possibly nobody).
        weight_by_samples: Sample-weighted mean of the kept updates instead of equal weights.

    Returns:
        The aggregate and a report; ``weights[i]`` is the coefficient of client ``i``'s raw
        update (share times clip factor), ``scores[i] = 1 - cos(u_i, consensus)``, and
        ``details`` holds the per-client ``cosine``, ``duplicate`` and ``dropped_by`` reasons.
    """
    if not -1.0 <= float(min_cosine) <= 1.0:
        raise ValueError(f"min_cosine must lie in [-1, 1], got {min_cosine}")
    if not float(direction_z) > 0:
        raise ValueError(f"direction_z must be positive, got {direction_z}")
    matrix = as_update_matrix(updates)
    num_clients, num_params = matrix.shape
    counts = sample_counts(num_samples, num_clients)
    gram = gram_matrix(matrix)
    unusable, overflowed = screen_rows(matrix, gram.diagonal())
    details = {
        "min_cosine": float(min_cosine),
        "direction_z": float(direction_z),
        "duplicate_cosine": float(duplicate_cosine),
        **screening_details(overflowed),
    }
    usable = (~unusable).nonzero().flatten()
    n = usable.numel()
    if n == 0:
        return nothing_usable("shield", num_clients, num_params, unusable, details, True)
    sub = gram[usable][:, usable]
    norms = sub.diagonal().clamp(min=0.0).sqrt()
    median_norm = float(torch.quantile(norms, 0.5))
    clip = torch.where(norms > median_norm, median_norm / norms.clamp(min=1e-300), 1.0)
    clipped = clip[:, None] * sub * clip[None, :]  # Gram of the clipped updates
    beta = _geometric_median_weights(clipped)
    consensus_sq = float(beta @ clipped @ beta)
    toward = clipped @ beta  # <clipped_i, consensus>
    clipped_norms = clipped.diagonal().clamp(min=0.0).sqrt()
    denom = clipped_norms * max(consensus_sq, 0.0) ** 0.5
    cosine = torch.where(denom > 0, toward / denom.clamp(min=1e-300), torch.zeros_like(toward))

    unit = torch.where(norms > 0, 1.0 / norms.clamp(min=1e-300), torch.zeros_like(norms))
    pairwise = unit[:, None] * sub * unit[None, :]
    pairwise.fill_diagonal_(-2.0)
    duplicate = (pairwise > float(duplicate_cosine)).any(dim=1)

    center = float(cosine.median())
    mad = float((cosine - center).abs().median()) * MAD_SCALE
    low = center - float(direction_z) * mad if mad > 0 else -math.inf
    off_direction = (cosine < float(min_cosine)) | (cosine < low)
    keep = ~(off_direction | duplicate)
    used_fallback = False
    if fallback and int(keep.sum()) < n // 2 + 1:
        # Too much flagged: a majority is still required, picked by direction among the
        # non-duplicates (duplicates stay out).
        ranked = torch.where(duplicate, torch.full_like(cosine, -math.inf), cosine)
        order = torch.sort(ranked, descending=True, stable=True).indices
        candidates = [i for i in order.tolist() if not bool(duplicate[i])][: n // 2 + 1]
        keep = torch.zeros(n, dtype=torch.bool)
        keep[candidates] = True
        used_fallback = True

    kept = torch.zeros(num_clients, dtype=torch.bool)
    kept[usable[keep]] = True
    shares = normalized(counts if weight_by_samples else torch.ones(num_clients), kept)
    weights = shares * scatter(clip, usable, num_clients, 0.0)
    reasons = []
    for i in range(n):
        why = []
        if bool(duplicate[i]):
            why.append("duplicate")
        if bool(cosine[i] < float(min_cosine)):
            why.append("opposes consensus")
        elif bool(cosine[i] < low):
            why.append("direction outlier")
        reasons.append(why)
    details.update(
        median_norm=median_norm,
        clip_factors=scatter(clip, usable, num_clients, 0.0).tolist(),
        cosine=scatter(cosine, usable, num_clients, float("nan")).tolist(),
        cosine_threshold=max(low, float(min_cosine)),
        duplicate=scatter(duplicate.double(), usable, num_clients, 0.0).bool().tolist(),
        dropped_by={int(usable[i]): r for i, r in enumerate(reasons) if r},
        fallback=used_fallback,
        kept_fraction=int(keep.sum()) / n,
    )
    report = AggregationReport(
        method="shield",
        weights=weights,
        scores=scatter(1.0 - cosine, usable, num_clients, float("inf")),
        non_finite=unusable,
        details=details,
        selects=True,
    )
    if not bool(kept.any()):
        return torch.zeros(num_params, dtype=torch.float32), report
    return weighted_row_sum(matrix, weights), report
