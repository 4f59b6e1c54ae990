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

1. **Norm**: drop updates longer than ``norm_bound`` (3) times the median norm (SignGuard's
   bound), and **clip** every other one to the median norm (as FLAME does): no row outweighs
   another.
2. **Near-duplicates**: drop every member of a group of near-identical updates: a pairwise
   cosine above ``duplicate_cosine`` (0.9) *and* above ``typical + 0.8 (1 - typical)``, where
   ``typical`` is the round's median pairwise cosine. Honest clients train on different data and
   rarely agree closely (at most 0.77 in the scorecard's settings; but early rounds of IID
   training with large client datasets can put every honest pair above 0.9, which the relative
   part absorbs), while colluding attackers who compute one optimal vector (IPM, LIE, min-max,
   Fang's attacks, the adaptive attack) or train on one poisoned set (edge-case and PGD
   backdoors) sat at 0.96 to 1 (FoolsGold's sybil signal, here without history).
   ``details["max_pairwise_cosine_kept"]`` and ``details["duplicate_threshold"]`` show the margin
   every round.
3. **Direction outliers**: the consensus direction is the geometric median of the clipped
   updates that passed checks 1 and 2 (so a tight attacker group cannot become the consensus;
   smoothed Weiszfeld, robust while attackers are a minority); drop clients whose cosine to it
   lies more than ``direction_z`` (3) robust standard deviations (1.4826 MAD, at least 0.05)
   below the median cosine; skipped with fewer than 5 candidates (no robust spread). No absolute cosine threshold by default: with non-IID data honest updates often point
   away from the consensus after the first rounds (``min_cosine`` opts in).
4. **Fallback that never keeps everyone by default**: if the checks drop more than half of the
   clients, keep the ``n // 2 + 1`` clients closest in direction to the consensus among those
   that are neither duplicates nor oversized (a majority is still required, so an attacker
   minority cannot take over through the fallback).
5. Average the kept clipped updates (equal weights, as FLAME; ``weight_by_samples`` opts in).

Known limits, stated: attackers who add independent noise to their shared vector evade the
duplicate check, and attackers who stay within the norm bound and the benign spread of
directions (a sign flip of norm 1x, a stealthy backdoor) are not removed: clipping bounds what
each of them can do (a minority of clipped updates can slow training, not take it over).

Checked in the unit tests on planted rounds (sign flip, same value, x10 scaling, NaN, IPM's
identical rows, heterogeneous benign groups) and the consensus against the geometric median's
definition; measured across the scorecard (experiments/robustness/README.md).

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
MIN_SPREAD = 0.05  # floor of the robust spread of the cosines (tiny MADs flag noise)
MIN_DIRECTION_CLIENTS = 5
TIGHTNESS = 0.8  # a near-duplicate pair closes 80 % of the gap from a typical pair to 1


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
    norm_bound: float = 3.0,
    min_cosine: float = -1.0,
    direction_z: float = 3.0,
    duplicate_cosine: float = 0.9,
    fallback: bool = True,
    weight_by_samples: bool = False,
) -> Tuple[torch.Tensor, AggregationReport]:
    """Median-norm clipping, consensus-direction and duplicate checks, then the mean.

    Args:
        updates: ``[n_clients, n_params]`` float updates (client weights minus the global model).
        num_samples: ``[n]`` sample counts (used with ``weight_by_samples``).
        norm_bound: Drop clients whose update norm exceeds this multiple of the median norm
            (SignGuard's upper bound, 3); ``inf`` disables the check.
        min_cosine: Drop clients whose cosine to the consensus direction is below this (-1, the
            default, disables it: with non-IID data honest updates often point away from the
            consensus after the first rounds).
        direction_z: Drop clients whose cosine lies more than this many robust standard
            deviations (1.4826 MAD) below the median cosine; ``inf`` disables the check.
        duplicate_cosine: Drop every member of a group whose pairwise cosine exceeds this
            (0.9: honest updates in the scorecard's settings never exceeded 0.77, coordinated
            attackers sat at 0.96 to 1); ``> 1`` disables the check.
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
    if not float(norm_bound) > 1:
        raise ValueError(f"norm_bound must be > 1, got {norm_bound}")
    if not float(direction_z) > 0:
        raise ValueError(f"direction_z must be positive, got {direction_z}")
    matrix = as_update_matrix(updates)
    num_clients, num_params = matrix.shape
    counts = sample_counts(num_samples, num_clients)
    gram = gram_matrix(matrix)
    unusable, overflowed = screen_rows(matrix, gram.diagonal())
    details = {
        "norm_bound": float(norm_bound),
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
    oversized = norms > float(norm_bound) * median_norm

    unit = torch.where(norms > 0, 1.0 / norms.clamp(min=1e-300), torch.zeros_like(norms))
    pairwise = unit[:, None] * sub * unit[None, :]
    off = ~torch.eye(n, dtype=torch.bool)
    typical = float(pairwise[off].median()) if n > 1 else 0.0
    # Near-duplicate: closer than the floor, and far closer than this round's typical pair
    # (early rounds of IID training can make every honest pair similar).
    duplicate_threshold = max(float(duplicate_cosine), typical + (1.0 - typical) * TIGHTNESS)
    pairwise.fill_diagonal_(-2.0)
    duplicate = (pairwise > duplicate_threshold).any(dim=1)

    # The consensus is taken over the clients that passed the first two checks, so that a tight
    # group of coordinated attackers cannot become the consensus themselves.
    candidates = ~(oversized | duplicate)
    if int(candidates.sum()) == 0:
        candidates = torch.ones(n, dtype=torch.bool)
    clipped = clip[:, None] * sub * clip[None, :]  # Gram of the clipped updates
    index = candidates.nonzero().flatten()
    beta = torch.zeros(n, dtype=torch.float64)
    beta[index] = _geometric_median_weights(clipped[index][:, index])
    consensus_sq = float(beta @ clipped @ beta)
    toward = clipped @ beta  # <clipped_i, consensus>
    clipped_norms = clipped.diagonal().clamp(min=0.0).sqrt()
    denom = clipped_norms * max(consensus_sq, 0.0) ** 0.5
    cosine = torch.where(denom > 0, toward / denom.clamp(min=1e-300), torch.zeros_like(toward))

    center = float(cosine[index].median())
    spread = max(float((cosine[index] - center).abs().median()) * MAD_SCALE, MIN_SPREAD)
    # A robust spread needs a few clients: with fewer than MIN_DIRECTION_CLIENTS the direction
    # check is skipped rather than run on noise.
    enough = index.numel() >= MIN_DIRECTION_CLIENTS
    low = center - float(direction_z) * spread if enough else -math.inf
    off_direction = (cosine < float(min_cosine)) | (cosine < low)
    keep = ~(off_direction | duplicate | oversized)
    used_fallback = False
    if fallback and int(keep.sum()) < n // 2 + 1:
        # Too much flagged: a majority is still required, picked by direction among the
        # clients that are neither near-duplicates nor oversized.
        excluded = duplicate | oversized
        ranked = torch.where(excluded, torch.full_like(cosine, -math.inf), cosine)
        order = torch.sort(ranked, descending=True, stable=True).indices
        chosen = [i for i in order.tolist() if not bool(excluded[i])][: n // 2 + 1]
        keep = torch.zeros(n, dtype=torch.bool)
        keep[chosen] = True
        used_fallback = True

    kept = torch.zeros(num_clients, dtype=torch.bool)
    kept[usable[keep]] = True
    shares = normalized(counts if weight_by_samples else torch.ones(num_clients), kept)
    weights = shares * scatter(clip, usable, num_clients, 0.0)
    reasons = []
    for i in range(n):
        why = []
        if bool(duplicate[i]):
            why.append("near-duplicate")
        if bool(oversized[i]):
            why.append("norm above bound")
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
        duplicate_threshold=duplicate_threshold,
        typical_pairwise_cosine=typical,
        dropped_by={int(usable[i]): r for i, r in enumerate(reasons) if r},
        fallback=used_fallback,
        kept_fraction=int(keep.sum()) / n,
        max_pairwise_cosine_kept=(
            float(pairwise[keep][:, keep].max()) if int(keep.sum()) > 1 else None
        ),
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
