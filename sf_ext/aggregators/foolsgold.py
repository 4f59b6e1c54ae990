"""FoolsGold (Fung, Yoon and Beschastnikh, "The Limitations of Federated Learning in Sybil
Settings", RAID 2020).

Sybils that push the same objective send updates more alike than honest clients' ever are.
FoolsGold keeps, per client, the sum of everything it has sent (its history), and each round:

1. ``cs = cosine_similarity(histories) - I``; ``v_i = max_j cs_ij``.
2. Pardoning: where ``v_i < v_j``, ``cs_ij *= v_i / v_j`` (an honest client that happens to
   resemble a sybil is not punished for it).
3. ``w_i = 1 - max_j cs_ij`` clipped to ``[0, 1]``, divided by its maximum, 1 replaced by 0.99.
4. Logit with confidence ``kappa``: ``w_i = kappa * (ln(w_i / (1 - w_i)) + 0.5)`` clipped to
   ``[0, 1]`` (``-inf`` and values above 1 clipped as in the original).
5. Aggregate ``sum_i w_i u_i``.

Histories are keyed by the client's id (``ServerContext.client_ids``) in the caller's
``state``, so clients sampled in different rounds keep their own history (as BackFed does).

Departure from the original, stated: the original applies ``sum_i w_i g_i`` to *gradients*
under a learning rate; on model updates that step grows with the number of clients, so the
weights are normalized to sum to one by default (BackFed's form, ``normalize=True``).
``normalize=False`` gives the original. The original's optional "indicative features"
(top-k output-layer weights) are not implemented.

Checked against the original's loops (pardoning and logit) written out in numpy.

What the server learns: every client's plaintext update, and it stores every client's summed
history across rounds.
"""

from typing import Any, Dict, Hashable, Sequence, Tuple

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

STATE_KEY = "foolsgold_history"


def foolsgold_weights(histories: torch.Tensor, kappa: float = 1.0) -> torch.Tensor:
    """FoolsGold's per-client weights from the ``[n, d]`` history matrix (float64)."""
    count = histories.shape[0]
    if count == 1:
        return torch.ones(1, dtype=torch.float64)
    h = histories.to(torch.float64)
    norms = torch.linalg.vector_norm(h, dim=1)
    unit = h / norms.clamp(min=1e-300).unsqueeze(1)
    cs = unit @ unit.T - torch.eye(count, dtype=torch.float64)
    maxcs = cs.max(dim=1).values
    # Pardoning: scale down i's similarity to j when j looks more like a sybil than i.
    ratio = maxcs.unsqueeze(1) / maxcs.unsqueeze(0)
    pardon = maxcs.unsqueeze(1) < maxcs.unsqueeze(0)
    cs = torch.where(pardon, cs * ratio, cs)
    wv = (1.0 - cs.max(dim=1).values).clamp(0.0, 1.0)
    top = float(wv.max())
    if top <= 0:
        return torch.zeros(count, dtype=torch.float64)
    wv = wv / top
    wv[wv == 1.0] = 0.99
    with torch.no_grad():
        logit = kappa * (torch.log(wv / (1.0 - wv)) + 0.5)
    logit = torch.where(torch.isinf(logit) & (logit > 0), torch.ones_like(logit), logit)
    return torch.nan_to_num(logit, nan=0.0, neginf=0.0).clamp(0.0, 1.0)


@torch.no_grad()
def foolsgold(
    updates,
    num_samples=None,
    *,
    client_ids: Sequence[Hashable],
    state: Dict[str, Any],
    kappa: float = 1.0,
    normalize: bool = True,
) -> Tuple[torch.Tensor, AggregationReport]:
    """FoolsGold: down-weight clients whose update histories are too alike.

    Args:
        updates: ``[n_clients, n_params]`` float updates.
        num_samples: Accepted for the common signature; FoolsGold ignores sample counts.
        client_ids: One id per row; histories are kept per id.
        state: The caller's per-run dict; histories live under ``"foolsgold_history"``.
        kappa: Confidence of the logit.
        normalize: Normalize the weights to sum to one (default; ``False`` = the original's
            unnormalized sum).

    Returns:
        The aggregate and a report; ``weights[i]`` is the coefficient of client ``i``'s update,
        ``scores[i]`` its largest (pardoned) cosine similarity to another client's history.
    """
    matrix = as_update_matrix(updates)
    num_clients, num_params = matrix.shape
    sample_counts(num_samples, num_clients)
    ids = list(client_ids)
    if len(ids) != num_clients:
        raise ValueError(f"{len(ids)} client_ids for {num_clients} client updates")
    if len(set(ids)) != len(ids):
        raise ValueError("client_ids must be distinct within a round")
    if not kappa > 0:
        raise ValueError(f"kappa must be positive, got {kappa}")
    norms = torch.linalg.vector_norm(matrix, dim=1).to(torch.float64)
    unusable, overflowed = screen_rows(matrix, norms)
    details = {"kappa": kappa, "normalize": normalize, **screening_details(overflowed)}
    usable = (~unusable).nonzero().flatten()
    if usable.numel() == 0:
        return nothing_usable("foolsgold", num_clients, num_params, unusable, details, True)
    history = state.setdefault(STATE_KEY, {})
    rows = []
    for i in usable.tolist():
        past = history.get(ids[i])
        total = matrix[i].clone() if past is None else past + matrix[i]
        history[ids[i]] = total
        rows.append(total)
    histories = torch.stack(rows)
    wv = foolsgold_weights(histories, kappa)
    h = histories.to(torch.float64)
    unit = h / torch.linalg.vector_norm(h, dim=1).clamp(min=1e-300).unsqueeze(1)
    similarity = (unit @ unit.T).fill_diagonal_(-1.0).max(dim=1).values
    if normalize:
        total = float(wv.sum())
        coeffs = wv / total if total > 0 else torch.zeros_like(wv)
    else:
        coeffs = wv
    weights = scatter(coeffs, usable, num_clients, 0.0)
    details.update(foolsgold_weights=scatter(wv, usable, num_clients, 0.0).tolist())
    report = AggregationReport(
        method="foolsgold",
        weights=weights,
        scores=scatter(similarity, usable, num_clients, float("inf")),
        non_finite=unusable,
        details=details,
        selects=True,
    )
    if not bool((weights > 0).any()):
        return torch.zeros(num_params, dtype=torch.float32), report
    return weighted_row_sum(matrix, weights), report
