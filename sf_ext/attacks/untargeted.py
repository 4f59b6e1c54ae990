"""Untargeted (convergence-prevention) attacks on a stacked update matrix.

Every function here has the form ``fn(updates, attackers, **options) -> updates`` where
``updates`` is the ``[n_clients, n_params]`` float32 matrix of the round's *honest* updates (client
weights minus the global model), ``attackers`` a boolean mask ``[n_clients]``, and the result a new
matrix in which only the attackers' rows have been replaced. Benign rows are returned untouched, so
the caller can hand the result straight to an aggregator.

Knowledge model of the statistical attacks (LIE, min-max, min-sum, IPM): ``knowledge="attackers"``
estimates the benign distribution from the attackers' own honest updates (partial knowledge),
``knowledge="all"`` from every honest update in the round, ``knowledge="benign"`` from the benign
clients' updates only (the omniscient attacker of Xie et al.'s IPM).
"""

import math
from typing import Optional

import torch

__all__ = [
    "sign_flip",
    "same_value",
    "gaussian_noise",
    "little_is_enough",
    "lie_z_max",
    "min_max",
    "min_sum",
    "inner_product_manipulation",
]


def _check(updates: torch.Tensor, attackers) -> torch.Tensor:
    if updates.ndim != 2:
        raise ValueError(f"updates must be [n_clients, n_params], got shape {tuple(updates.shape)}")
    mask = torch.as_tensor(attackers, dtype=torch.bool, device=updates.device).reshape(-1)
    if mask.numel() != updates.shape[0]:
        raise ValueError(f"attacker mask has {mask.numel()} entries for {updates.shape[0]} clients")
    return mask


def _reference(updates: torch.Tensor, mask: torch.Tensor, knowledge: str) -> torch.Tensor:
    """Honest updates the colluding attackers use to estimate the benign distribution."""
    if knowledge == "attackers":
        ref = updates[mask]
    elif knowledge == "all":
        ref = updates
    elif knowledge == "benign":
        ref = updates[~mask]
    else:
        raise ValueError(f"knowledge must be 'attackers', 'all' or 'benign', got {knowledge!r}")
    if ref.shape[0] == 0:
        raise ValueError("no honest updates to estimate the benign distribution from")
    return ref


def _with_rows(updates: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    out = updates.clone()
    out[mask] = rows.to(updates.dtype)
    return out


def sign_flip(updates: torch.Tensor, attackers, scale: float = -4.0) -> torch.Tensor:
    """Send ``scale`` times the honest update (the paper's sign flip: -4x)."""
    mask = _check(updates, attackers)
    return _with_rows(updates, mask, updates[mask] * scale)


def same_value(
    updates: torch.Tensor,
    attackers,
    value: float = 100.0,
    global_params: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Every parameter of the attacker's upload set to ``value``.

    With ``global_params`` the *model* is set to ``value`` (the update becomes ``value - global``,
    which is what a client uploading weights all equal to 100 produces); without it the update
    itself is filled with ``value``.
    """
    mask = _check(updates, attackers)
    rows = torch.full((int(mask.sum()), updates.shape[1]), float(value), dtype=updates.dtype)
    if global_params is not None:
        rows = rows - global_params.reshape(1, -1).to(updates.dtype)
    return _with_rows(updates, mask, rows)


def gaussian_noise(
    updates: torch.Tensor,
    attackers,
    std: float = 1.0,
    mean: float = 0.0,
    additive: bool = False,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Replace (or, with ``additive=True``, perturb) the attackers' updates with N(mean, std^2)."""
    mask = _check(updates, attackers)
    shape = (int(mask.sum()), updates.shape[1])
    noise = torch.randn(shape, generator=generator, dtype=updates.dtype) * std + mean
    rows = updates[mask] + noise if additive else noise
    return _with_rows(updates, mask, rows)


def lie_z_max(n_clients: int, n_attackers: int) -> float:
    """Baruch et al.'s z: the largest shift that still leaves a majority "behind" the attackers.

    ``s = floor(n/2 + 1) - f`` benign clients must be further from the mean than the attackers, so
    ``z = Phi^-1((n - s) / n)``.
    """
    if not 0 < n_attackers < n_clients:
        raise ValueError(f"need 0 < n_attackers < n_clients, got {n_attackers}, {n_clients}")
    supporters = math.floor(n_clients / 2 + 1) - n_attackers
    quantile = (n_clients - supporters) / n_clients
    quantile = min(max(quantile, 1e-6), 1 - 1e-6)
    return float(torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(quantile)))


def little_is_enough(
    updates: torch.Tensor,
    attackers,
    z: Optional[float] = None,
    knowledge: str = "attackers",
) -> torch.Tensor:
    """ "A little is enough" (Baruch et al. 2019): every attacker sends ``mean - z * std``.

    Coordinate-wise mean and standard deviation of the reference updates; ``z`` defaults to
    :func:`lie_z_max` for the round's number of clients and attackers.
    """
    mask = _check(updates, attackers)
    n_att = int(mask.sum())
    if n_att == 0:
        return updates.clone()
    ref = _reference(updates, mask, knowledge)
    if z is None:
        z = lie_z_max(updates.shape[0], n_att)
    mean = ref.mean(dim=0)
    std = ref.std(dim=0, unbiased=False) if ref.shape[0] > 1 else torch.zeros_like(mean)
    return _with_rows(updates, mask, (mean - z * std).expand(n_att, -1))


def _perturbation(mean: torch.Tensor, ref: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "unit_vec":
        return -mean / mean.norm().clamp_min(1e-12)
    if kind == "sign":
        return -torch.sign(mean)
    if kind == "std":
        return -(ref.std(dim=0, unbiased=False) if ref.shape[0] > 1 else torch.zeros_like(mean))
    raise ValueError(f"perturbation must be 'unit_vec', 'sign' or 'std', got {kind!r}")


def _search_gamma(passes, gamma_init: float, tol: float, max_iter: int) -> float:
    """Largest gamma in [0, inf) with ``passes(gamma)``, by doubling then bisection."""
    if passes(gamma_init):
        low, high = gamma_init, gamma_init * 2
        while passes(high) and high < 1e12:
            low, high = high, high * 2
    else:
        low, high = 0.0, gamma_init
    for _ in range(max_iter):
        if high - low <= tol:
            break
        mid = (low + high) / 2
        if passes(mid):
            low = mid
        else:
            high = mid
    return low


def _optimized_attack(updates, attackers, perturbation, knowledge, gamma_init, tol, max_iter, crit):
    mask = _check(updates, attackers)
    n_att = int(mask.sum())
    if n_att == 0:
        return updates.clone(), 0.0
    ref = _reference(updates, mask, knowledge).to(torch.float64)
    mean = ref.mean(dim=0)
    direction = _perturbation(mean, ref, perturbation)
    ref_dist = torch.cdist(ref, ref)
    passes = crit(ref, ref_dist)
    gamma = _search_gamma(lambda g: passes(mean + g * direction), gamma_init, tol, max_iter)
    malicious = (mean + gamma * direction).to(updates.dtype)
    return _with_rows(updates, mask, malicious.expand(n_att, -1)), gamma


def min_max(
    updates: torch.Tensor,
    attackers,
    perturbation: str = "std",
    knowledge: str = "attackers",
    gamma_init: float = 10.0,
    tol: float = 1e-5,
    max_iter: int = 100,
    return_gamma: bool = False,
):
    """Min-max attack (Shejwalkar and Houmansadr, NDSS 2021).

    The malicious update is ``mean + gamma * p`` (``p`` the inverse unit vector, inverse sign or
    inverse standard deviation of the reference updates) with the largest ``gamma`` whose maximum
    distance to any reference update stays within the largest pairwise distance among them.
    """

    def crit(ref, ref_dist):
        bound = ref_dist.max()
        return lambda m: bool((ref - m).norm(dim=1).max() <= bound)

    out, gamma = _optimized_attack(
        updates, attackers, perturbation, knowledge, gamma_init, tol, max_iter, crit
    )
    return (out, gamma) if return_gamma else out


def min_sum(
    updates: torch.Tensor,
    attackers,
    perturbation: str = "std",
    knowledge: str = "attackers",
    gamma_init: float = 10.0,
    tol: float = 1e-5,
    max_iter: int = 100,
    return_gamma: bool = False,
):
    """Min-sum attack (same paper): the malicious update's summed squared distance to the reference
    updates stays within the largest such sum of any reference update."""

    def crit(ref, ref_dist):
        bound = (ref_dist**2).sum(dim=1).max()
        return lambda m: bool(((ref - m) ** 2).sum() <= bound)

    out, gamma = _optimized_attack(
        updates, attackers, perturbation, knowledge, gamma_init, tol, max_iter, crit
    )
    return (out, gamma) if return_gamma else out


def inner_product_manipulation(
    updates: torch.Tensor, attackers, eps: float = 0.1, knowledge: str = "benign"
) -> torch.Tensor:
    """Inner product manipulation (Xie, Koyejo and Gupta, UAI 2019): every attacker sends
    ``-eps`` times the mean of the benign updates.

    A small ``eps`` (0.1, the paper's and FLPoison's default; FLPoison's benchmark uses 0.5) keeps
    the attackers inside the benign spread and turns the inner product of the aggregate with the
    true mean negative for median-like rules; a large one (100) overwhelms the mean. The
    attackers are omniscient by default (``knowledge="benign"``).
    """
    mask = _check(updates, attackers)
    n_att = int(mask.sum())
    if n_att == 0:
        return updates.clone()
    ref = _reference(updates, mask, knowledge)
    crafted = -float(eps) * ref.to(torch.float64).mean(dim=0)
    return _with_rows(updates, mask, crafted.expand(n_att, -1))
