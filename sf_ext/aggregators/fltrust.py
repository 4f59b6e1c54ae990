"""FLTrust (Cao, Fang, Liu and Gong, NDSS 2021).

The server keeps a small clean *root dataset* (100 samples in the paper) and, every round, trains
its own update ``g0`` from the global model on it with the clients' local procedure. Each client's
trust score is ``TS_i = ReLU(cos(g_i, g0))``; its update is rescaled to ``g0``'s norm, and the
result is the trust-weighted mean::

    g = sum_i TS_i * (|g0| / |g_i|) * g_i / sum_i TS_i        (0 when every TS_i is 0)

Updates pointing away from the server's (cosine <= 0) get no weight; magnitude attacks are
neutralized by the rescaling. The root update comes from the caller (the simulator trains it;
the SecretFlow adapter trains it on the server PYU) through ``ServerContext.root_update``.

Checked against the paper's formula written out in numpy in the unit tests.

What the server learns: every client's plaintext update and its trust score; it also needs its
own clean root data.
"""

from typing import Tuple

import torch

from sf_ext.aggregators._linalg import weighted_row_sum
from sf_ext.aggregators._validate import (
    as_update_matrix,
    nothing_usable,
    sample_counts,
    scatter,
    screen_rows,
    screening_details,
)
from sf_ext.aggregators.report import AggregationReport


@torch.no_grad()
def fltrust(updates, num_samples=None, *, root_update) -> Tuple[torch.Tensor, AggregationReport]:
    """Trust-weighted mean of norm-rescaled updates against the server's root update.

    Args:
        updates: ``[n_clients, n_params]`` float updates.
        num_samples: Accepted for the common signature; FLTrust weights by trust, not samples.
        root_update: ``[n_params]`` update the server trained on its root dataset this round.

    Returns:
        The aggregate and a report; ``weights[i]`` is the coefficient of client ``i``'s raw
        update (``TS_i |g0| / |g_i| / sum TS``), ``scores[i] = 1 - cos(g_i, g0)``,
        ``details["trust"]`` the trust scores.

    Raises:
        ValueError: ``root_update`` has the wrong size or is not finite.
    """
    matrix = as_update_matrix(updates)
    num_clients, num_params = matrix.shape
    sample_counts(num_samples, num_clients)
    root = torch.as_tensor(root_update).detach().to(torch.float32).reshape(-1)
    if root.numel() != num_params:
        raise ValueError(f"root_update has {root.numel()} values, updates have {num_params}")
    if not bool(torch.isfinite(root).all()):
        raise ValueError("root_update holds NaN or inf (the server's own training diverged)")
    dots = (matrix @ root).to(torch.float64)
    norms = torch.linalg.vector_norm(matrix, dim=1).to(torch.float64)
    unusable, overflowed = screen_rows(matrix, norms * dots.abs().clamp(min=1.0))
    root_norm = float(root.double().norm())
    details = {"root_norm": root_norm, **screening_details(overflowed)}
    usable = (~unusable).nonzero().flatten()
    if usable.numel() == 0:
        return nothing_usable("fltrust", num_clients, num_params, unusable, details, selects=True)
    denom = norms[usable] * root_norm
    cosine = torch.where(denom > 0, dots[usable] / denom.clamp(min=1e-300), 0.0)
    trust = cosine.clamp(min=0.0)
    total = float(trust.sum())
    scale = torch.where(norms[usable] > 0, root_norm / norms[usable].clamp(min=1e-300), 0.0)
    coeffs = trust * scale / total if total > 0 else torch.zeros_like(trust)
    weights = scatter(coeffs, usable, num_clients, 0.0)
    details.update(
        trust=scatter(trust, usable, num_clients, 0.0).tolist(),
        all_distrusted=total == 0,
        clip_factors=scatter(scale, usable, num_clients, 0.0).tolist(),
    )
    report = AggregationReport(
        method="fltrust",
        weights=weights,
        scores=scatter(1.0 - cosine, usable, num_clients, float("inf")),
        non_finite=unusable,
        details=details,
        selects=True,
    )
    return weighted_row_sum(matrix, weights), report
