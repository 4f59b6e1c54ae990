"""Matrix mapping (Liu, Zhang, Wang, Xie, Zhang: a Byzantine-robust FL algorithm based on matrix
mapping), section 3 of the paper.

1. Map: load each client's *update* (not its model) as the parameters of the network, feed one
   all-ones input of the training input's shape, and take the softmax output.
2. Screen: drop clients whose output holds NaN or inf.
3. Detect: a client's anomaly score is the mean L2 distance of its output to the other clients'
   outputs; clients scoring below the mean score are kept.
4. Aggregate the kept updates with sample weights.

``variant="xmam"`` replaces step 3 by the authors' public code: PCA of the outputs to 3 dimensions,
HDBSCAN (``min_cluster_size=2``), keep the largest cluster.

Detection costs one forward pass of one input per client and nothing else in ``d``: the update rows
are handed to :func:`torch.func.functional_call` as views (no copy into the module), batched over
clients with :func:`torch.func.vmap`.
"""

from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, vmap

from sf_ext.aggregators._linalg import weighted_row_sum
from sf_ext.aggregators._validate import (
    as_update_matrix,
    check_int_option,
    normalized,
    nothing_usable,
    sample_counts,
    scatter,
    screen_rows,
    screening_details,
)
from sf_ext.aggregators.flame import majority_cluster
from sf_ext.aggregators.report import AggregationReport
from sf_ext.params import ParamLayout

VARIANTS = ("paper", "xmam")


def _parameter_views(
    model: nn.Module, layout: ParamLayout, rows: torch.Tensor
) -> Dict[str, torch.Tensor]:
    """Per-parameter ``[clients, *shape]`` views of the update rows.

    Buffers (BatchNorm running statistics) stay the module's own: a difference of two running
    variances is not a variance, and the paper loads the update as the network's *weights*.
    """
    parameter_names = {name for name, _ in model.named_parameters()}
    views = {}
    for (name, span), shape in zip(layout.slices().items(), layout.shapes):
        if name in parameter_names:
            views[name] = rows[:, span].view(rows.shape[0], *shape)
    missing = parameter_names - set(views)
    if missing:
        raise ValueError(f"layout lacks the model's parameters {sorted(missing)}")
    return views


def map_updates(
    model: nn.Module,
    updates: torch.Tensor,
    input_shape: Sequence[int],
    layout: Optional[ParamLayout] = None,
    apply_softmax: bool = True,
    client_batch: int = 64,
) -> Tuple[torch.Tensor, bool]:
    """Softmax output of the network on one all-ones input, once per update row.

    Args:
        model: Network whose ``state_dict`` layout matches the update vectors.
        updates: ``[n, d]`` float32 updates.
        input_shape: Shape of one training input without the batch dimension, e.g. (1, 28, 28).
        layout: Layout of the vectors (default: the model's ``state_dict`` layout).
        apply_softmax: Apply softmax to the network output (False when the model ends in one).
        client_batch: Clients evaluated per vectorized call.

    Returns:
        ``(outputs, vectorized)``: float64 ``[n, classes]`` and whether ``vmap`` was used (it
        falls back to a loop over clients for modules it cannot batch).
    """
    layout = layout or ParamLayout.from_module(model)
    if layout.num_params != updates.shape[1]:
        raise ValueError(
            f"the model's layout has {layout.num_params} values, updates have {updates.shape[1]}"
        )
    probe = torch.ones((1, *tuple(int(s) for s in input_shape)), dtype=torch.float32)

    def forward(params: Dict[str, torch.Tensor]) -> torch.Tensor:
        return functional_call(model, params, (probe,)).reshape(-1)

    was_training = model.training
    model.eval()
    try:
        outputs, vectorized = [], True
        for start in range(0, updates.shape[0], client_batch):
            views = _parameter_views(model, layout, updates[start : start + client_batch])
            if vectorized:
                try:
                    outputs.append(vmap(forward)(views))
                    continue
                except (RuntimeError, NotImplementedError, ValueError):
                    vectorized = False
            count = next(iter(views.values())).shape[0]
            outputs.append(
                torch.stack([forward({k: v[i] for k, v in views.items()}) for i in range(count)])
            )
    finally:
        model.train(was_training)
    logits = torch.cat(outputs).to(torch.float64)
    return (torch.softmax(logits, dim=1) if apply_softmax else logits), vectorized


def anomaly_scores(outputs: torch.Tensor) -> torch.Tensor:
    """Mean L2 distance of each output to the others' (0 for a single client)."""
    count = outputs.shape[0]
    if count < 2:
        return torch.zeros(count, dtype=torch.float64)
    return torch.cdist(outputs, outputs).sum(dim=1) / (count - 1)


def _xmam_keep(outputs: np.ndarray) -> np.ndarray:
    count = outputs.shape[0]
    if count < 3:
        return np.ones(count, dtype=bool)
    from sklearn.decomposition import PCA  # deferred: scikit-learn is slow to import

    coords = PCA(n_components=min(3, count, outputs.shape[1])).fit_transform(outputs)
    distances = np.linalg.norm(coords[:, None, :] - coords[None, :, :], axis=-1)
    labels, majority = majority_cluster(distances, 2, min_samples=2, allow_single_cluster=False)
    if majority is None:  # every point is noise: the public code then keeps them all
        return np.ones(count, dtype=bool)
    return labels == majority


@torch.no_grad()
def matrix_mapping(
    updates,
    num_samples=None,
    *,
    model: nn.Module,
    input_shape: Sequence[int],
    variant: str = "paper",
    layout: Optional[ParamLayout] = None,
    apply_softmax: bool = True,
    client_batch: int = 64,
) -> Tuple[torch.Tensor, AggregationReport]:
    """Matrix-mapping detection followed by a sample-weighted mean of the kept updates.

    Args:
        updates: ``[n_clients, n_params]`` float updates (client weights minus the global model).
        num_samples: ``[n]`` sample counts (equal weights when None).
        model: Network whose ``state_dict`` layout matches the update vectors (any instance:
            only its structure and buffers are used).
        input_shape: Shape of one training input without the batch dimension.
        variant: ``"paper"`` (keep scores below the mean) or ``"xmam"`` (PCA + HDBSCAN).
        layout: Layout of the vectors (default ``ParamLayout.from_module(model)``).
        apply_softmax: Apply softmax to the model output (False if the model ends in softmax).
        client_batch: Clients evaluated per vectorized forward call.

    Returns:
        The aggregated update and a report; ``scores`` are the anomaly scores (``inf`` for
        screened clients), ``details["outputs"]`` the mapped probability vectors.
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    client_batch = check_int_option("client_batch", client_batch, minimum=1)
    matrix = as_update_matrix(updates)
    num_clients, num_params = matrix.shape
    counts = sample_counts(num_samples, num_clients)
    unusable, overflowed = screen_rows(matrix)
    details = {"variant": variant, **screening_details(overflowed)}
    if bool(unusable.all()):
        return nothing_usable("matrix_mapping", num_clients, num_params, unusable, details)

    # Screened rows go through the network too (views cost nothing); their outputs are ignored.
    outputs, vectorized = map_updates(
        model, matrix, input_shape, layout, apply_softmax, client_batch
    )
    finite_output = torch.isfinite(outputs).all(dim=1)
    valid = (~unusable) & finite_output
    details.update(
        vectorized=vectorized,
        non_finite_output=((~unusable) & ~finite_output).nonzero().flatten().tolist(),
        outputs=outputs.tolist(),
    )
    index = valid.nonzero().flatten()
    if index.numel() == 0:
        return nothing_usable("matrix_mapping", num_clients, num_params, unusable, details)

    scores = anomaly_scores(outputs[index])
    if variant == "paper":
        threshold = float(scores.mean())
        keep = scores < threshold
        if not bool(keep.any()):  # all scores equal: nobody stands out, keep everyone
            keep = torch.ones_like(keep)
        details["threshold"] = threshold
    else:
        keep = torch.as_tensor(_xmam_keep(outputs[index].numpy()))
    kept = torch.zeros(num_clients, dtype=torch.bool)
    kept[index[keep]] = True
    weights = normalized(counts, kept)
    report = AggregationReport(
        method="matrix_mapping",
        kept=weights > 0,
        weights=weights,
        scores=scatter(scores, index, num_clients, float("inf")),
        non_finite=unusable,
        details=details,
    )
    return weighted_row_sum(matrix, weights), report
