"""Fang et al.'s local model poisoning attacks tailored to an aggregation rule ("Local Model
Poisoning Attacks to Byzantine-Robust Federated Learning", USENIX Security 2020).

Both craft updates against ``s``, the sign of the direction the global model would move without
the attack (the sign of the mean benign update), and both come in the paper's two knowledge
settings: ``knowledge="benign"`` (full knowledge: the attackers see the benign updates) and
``knowledge="attackers"`` (partial knowledge: their own honest updates stand in for the benign
ones).

- :func:`fang_krum` (against Krum / Multi-Krum / Bulyan): every attacker sends ``-lambda * s``;
  ``lambda`` starts at the paper's upper bound (full knowledge) or at 1 (partial, as FLPoison's
  ``FangAttack``) and is halved until Krum, run on what the attackers know plus their crafted
  copies, selects a crafted update, or ``lambda`` falls below ``stop``.
- :func:`fang_trim` (against trimmed mean and median): per coordinate, values beyond the benign
  extreme on the side opposite to ``s``: in ``[w_max, b w_max]`` (or ``[w_max / b, w_max]`` when
  ``w_max <= 0``) where ``s_j = -1``, in ``[w_min / b, w_min]`` (or ``[b w_min, w_min]``) where
  ``s_j = +1``, ``b = 2``, drawn uniformly per attacker and coordinate; with partial knowledge
  ``[mu + 3 sigma, mu + 4 sigma]`` or ``[mu - 4 sigma, mu - 3 sigma]`` from the attackers' own
  updates.

Everything is in update space (client model minus global model), where ``w_Re = 0``; FLPoison's
port applies the Krum attack to whole models under FedAvg, which changes what the sign means.
"""

import math
from dataclasses import dataclass
from typing import Optional

import torch

from sf_ext.aggregators._linalg import gram_matrix, squared_distances
from sf_ext.attacks.untargeted import _check, _reference, _with_rows

__all__ = ["fang_krum", "fang_trim", "FangResult", "krum_lambda_bound"]


@dataclass
class FangResult:
    """What the Krum attack's search found."""

    lam: float
    success: bool
    evaluations: int


def _krum_choice(rows: torch.Tensor, f: int) -> int:
    """Index of the row Krum selects (sum of squared distances to the n - f - 2 nearest)."""
    n = rows.shape[0]
    dist = squared_distances(gram_matrix(rows.to(torch.float32)))
    neighbours = max(min(n - f - 2, n - 1), 1)
    scores = torch.sort(dist, dim=1).values[:, 1 : neighbours + 1].sum(dim=1)
    return int(torch.argmin(scores))


def krum_lambda_bound(benign: torch.Tensor, n_clients: int, n_attackers: int) -> float:
    """Fang et al.'s upper bound on lambda (update space, ``w_Re = 0``).

    With m clients, c attackers and d parameters::

        1 / ((m - 2c - 1) sqrt(d)) * min_i sum_{l in nearest m - c - 2} |u_l - u_i|
            + 1 / sqrt(d) * max_i |u_i|
    """
    m, c = n_clients, n_attackers
    d = benign.shape[1]
    dist = squared_distances(gram_matrix(benign.to(torch.float32))).clamp(min=0).sqrt()
    k = max(min(m - c - 2, benign.shape[0] - 1), 1)
    nearest = torch.sort(dist, dim=1).values[:, 1 : k + 1].sum(dim=1)
    denominator = max(m - 2 * c - 1, 1)
    first = float(nearest.min()) / (denominator * math.sqrt(d))
    second = float(benign.double().norm(dim=1).max()) / math.sqrt(d)
    return first + second


@torch.no_grad()
def fang_krum(
    updates: torch.Tensor,
    attackers,
    knowledge: str = "benign",
    stop: float = 1e-5,
    perturb_norm: float = 0.0,
    generator: Optional[torch.Generator] = None,
    return_details: bool = False,
):
    """Fang et al.'s attack on Krum: every attacker sends ``-lambda * sign(mean benign)``.

    Args:
        updates: ``[n, d]`` honest updates of the round.
        attackers: Boolean mask ``[n]``.
        knowledge: ``"benign"`` (full knowledge, lambda from the paper's bound) or
            ``"attackers"`` (partial knowledge, lambda from 1, as FLPoison).
        stop: Smallest lambda tried.
        perturb_norm: Attackers after the first add uniform noise of at most this L2 norm (the
            paper's epsilon-close supporters); 0 sends identical copies, as the public code.
        generator: Random source of the perturbations.
        return_details: Also return a :class:`FangResult`.
    """
    mask = _check(updates, attackers)
    c = int(mask.sum())
    out = updates.clone()
    if c == 0:
        result = FangResult(0.0, False, 0)
        return (out, result) if return_details else out
    ref = _reference(updates, mask, knowledge).to(torch.float32)
    direction = torch.sign(ref.double().mean(dim=0)).to(torch.float32)
    n = updates.shape[0]
    evaluations, success = 0, False
    if knowledge == "benign":
        lam = krum_lambda_bound(ref, n, c)
        while True:
            crafted = (-lam * direction).expand(c, -1)
            evaluations += 1
            if _krum_choice(torch.cat([ref, crafted]), c) >= ref.shape[0]:
                success = True
                break
            if lam <= stop:
                break
            lam /= 2
    else:
        # Partial knowledge (FLPoison's loop): k simulated copies next to the attackers' own
        # honest updates, k = 1 .. c - 1, lambda halved from 1 until Krum picks a copy.
        lam = 1.0
        for k in range(1, max(c, 2)):
            lam = 1.0
            while True:
                crafted = (-lam * direction).expand(k, -1)
                evaluations += 1
                if _krum_choice(torch.cat([ref, crafted]), k) >= ref.shape[0]:
                    success = True
                    break
                if lam <= stop:
                    break
                lam /= 2
            if success:
                break
    rows = (-lam * direction).expand(c, -1).clone()
    if perturb_norm > 0 and c > 1:
        noise = torch.rand(c - 1, rows.shape[1], generator=generator) * 2 - 1
        scale = perturb_norm * torch.rand(c - 1, 1, generator=generator)
        rows[1:] += noise / noise.norm(dim=1, keepdim=True).clamp_min(1e-12) * scale
    out = _with_rows(updates, mask, rows)
    result = FangResult(float(lam), success, evaluations)
    return (out, result) if return_details else out


@torch.no_grad()
def fang_trim(
    updates: torch.Tensor,
    attackers,
    knowledge: str = "benign",
    b: float = 2.0,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Fang et al.'s attack on trimmed mean and median (see the module docstring).

    Args:
        updates: ``[n, d]`` honest updates of the round.
        attackers: Boolean mask ``[n]``.
        knowledge: ``"benign"`` (full: benign extremes) or ``"attackers"`` (partial: the
            attackers' mean and standard deviation).
        b: Range factor of the full-knowledge attack (> 1).
        generator: Random source of the uniform draws.
    """
    mask = _check(updates, attackers)
    c = int(mask.sum())
    if c == 0:
        return updates.clone()
    if not b > 1:
        raise ValueError(f"b must be > 1, got {b}")
    ref = _reference(updates, mask, knowledge).to(torch.float64)
    s = torch.sign(ref.mean(dim=0))
    u = torch.rand(c, ref.shape[1], generator=generator, dtype=torch.float64)
    if knowledge == "benign":
        w_max = ref.max(dim=0).values
        w_min = ref.min(dim=0).values
        # s = -1: push up, beyond the largest benign value; s = +1: push down, below the least.
        up_low = torch.where(w_max > 0, w_max, w_max / b)
        up_high = torch.where(w_max > 0, b * w_max, w_max)
        down_low = torch.where(w_min > 0, w_min / b, b * w_min)
        down_high = torch.where(w_min > 0, w_min, w_min)
        low = torch.where(s < 0, up_low, down_low)
        high = torch.where(s < 0, up_high, down_high)
    else:
        mu = ref.mean(dim=0)
        sigma = ref.std(dim=0, unbiased=True) if ref.shape[0] > 1 else torch.zeros_like(mu)
        low = torch.where(s < 0, mu + 3 * sigma, mu - 4 * sigma)
        high = torch.where(s < 0, mu + 4 * sigma, mu - 3 * sigma)
    rows = low + u * (high - low)
    return _with_rows(updates, mask, rows)
