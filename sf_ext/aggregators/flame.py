"""FLAME (Nguyen et al., 2022) as implemented in the seed code.

1. Cluster the updates by cosine distance with HDBSCAN (``min_cluster_size = n // 2 + 1``,
   ``min_samples = 1``, ``allow_single_cluster = True``); keep the largest cluster, drop the rest
   and the noise points.
2. Clip every kept update to the median L2 norm of all usable updates.
3. Average the clipped kept updates (unweighted, as in FLAME; ``weight_by_samples`` opts in to
   sample weights).
4. Add Gaussian noise of std ``lambda * median_norm * std(layer)`` to weight tensors only (never
   biases or normalization parameters), where ``std(layer)`` is that of the new global model's layer
   when the caller passes the previous global parameters, else that of the aggregated update.

Cost: one Gram matrix. Norms are its diagonal, cosine distances its normalization, and HDBSCAN runs
on the precomputed ``n x n`` float64 distances instead of the raw ``d``-dimensional vectors.

Known cost of the defence: requiring a cluster of a strict majority drops benign clients whose
updates point elsewhere (on synthetic updates 25 to 45 % of benign clients); ``details`` records
``kept_fraction`` every round so that this is visible.
"""

from collections import Counter
from typing import Optional, Tuple

import numpy as np
import torch

from sf_ext.aggregators._linalg import cosine_distances, gram_matrix, weighted_row_sum
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
from sf_ext.aggregators.report import AggregationReport
from sf_ext.params import ParamLayout, is_weight_tensor

DEFAULT_NOISE_LAMBDA = 0.000012


def majority_cluster(
    distances: np.ndarray,
    min_cluster_size: int,
    min_samples: int = 1,
    allow_single_cluster: bool = True,
) -> Tuple[np.ndarray, Optional[int]]:
    """HDBSCAN on a precomputed distance matrix; returns the labels and the largest cluster's
    label (None when every point is noise). Fewer than 3 points form one cluster as they are."""
    count = distances.shape[0]
    if count < 3:
        return np.zeros(count, dtype=int), 0
    import hdbscan  # deferred: pulls in scikit-learn and joblib

    clusterer = hdbscan.HDBSCAN(
        metric="precomputed",
        min_cluster_size=max(int(min_cluster_size), 2),
        min_samples=int(min_samples),
        allow_single_cluster=allow_single_cluster,
    )
    labels = clusterer.fit(np.ascontiguousarray(distances, dtype=np.float64)).labels_
    sizes = Counter(int(label) for label in labels if label >= 0)
    if not sizes:
        return labels, None
    # Largest cluster; among equally large ones the lowest label, for determinism.
    majority = min(sizes, key=lambda label: (-sizes[label], label))
    return labels, majority


def _check_noise_inputs(noise_lambda, layout, global_params, num_params):
    if not noise_lambda >= 0:
        raise ValueError(f"noise_lambda must be >= 0, got {noise_lambda}")
    if layout is not None and layout.num_params != num_params:
        raise ValueError(
            f"layout describes {layout.num_params} parameters, updates have {num_params}"
        )
    if noise_lambda > 0 and layout is None:
        raise ValueError(
            "FLAME noise goes on weight tensors only, which needs layout=ParamLayout(...) "
            "(or pass noise_lambda=0 to disable the noise)"
        )
    if global_params is None:
        return None
    global_params = torch.as_tensor(global_params).detach().to(torch.float32).reshape(-1)
    if global_params.numel() != num_params:
        raise ValueError(
            f"global_params has {global_params.numel()} values, updates have {num_params}"
        )
    return global_params


def _add_noise(result, layout, global_params, scale, generator):
    """Adds ``N(0, (scale * std(layer))^2)`` to every weight tensor of ``result`` in place."""
    stds = {}
    for (name, span), shape in zip(layout.slices().items(), layout.shapes):
        if not is_weight_tensor(name, shape):
            continue
        layer = result[span]
        reference = layer if global_params is None else global_params[span] + layer
        sigma = scale * float(reference.std()) if reference.numel() > 1 else 0.0
        if sigma > 0:
            noise = torch.randn(layer.numel(), generator=generator, dtype=torch.float32)
            layer.add_(noise.mul_(sigma))
        stds[name] = sigma
    return stds


@torch.no_grad()
def flame(
    updates,
    num_samples=None,
    *,
    noise_lambda: float = DEFAULT_NOISE_LAMBDA,
    layout: Optional[ParamLayout] = None,
    global_params=None,
    generator: Optional[torch.Generator] = None,
    min_cluster_size: Optional[int] = None,
    min_samples: int = 1,
    weight_by_samples: bool = False,
) -> Tuple[torch.Tensor, AggregationReport]:
    """FLAME: majority cosine cluster, median-norm clipping, weight-only Gaussian noise.

    Args:
        updates: ``[n_clients, n_params]`` float updates (client weights minus the global model).
        num_samples: ``[n]`` sample counts, used only with ``weight_by_samples=True``.
        noise_lambda: Noise level ``lambda``; 0 disables the noise.
        layout: Tensor layout of the flat vectors; required when ``noise_lambda > 0``.
        global_params: Previous global model as a flat vector; when given, ``std(layer)`` is
            taken from the new global model (previous plus aggregated update).
        generator: Random source of the noise (for reproducible rounds).
        min_cluster_size: HDBSCAN's minimum cluster size (default ``n_usable // 2 + 1``).
        min_samples: HDBSCAN's ``min_samples``.
        weight_by_samples: Average the kept updates with sample weights instead of equally.

    Returns:
        The noised aggregated update and a report; ``weights[i]`` is the coefficient of update
        ``i`` (share times clip factor), ``scores[i]`` its median cosine distance to the other
        usable updates. ``details`` holds ``cluster_labels`` (-1 noise, -2 screened),
        ``median_norm``, ``clip_factors``, ``kept_fraction`` and the per-layer ``noise_std``.
    """
    matrix = as_update_matrix(updates)
    num_clients, num_params = matrix.shape
    counts = sample_counts(num_samples, num_clients)
    noise_lambda = float(noise_lambda)
    global_params = _check_noise_inputs(noise_lambda, layout, global_params, num_params)
    min_samples = check_int_option("min_samples", min_samples, minimum=1)

    gram = gram_matrix(matrix)
    unusable, overflowed = screen_rows(matrix, gram.diagonal())
    usable = (~unusable).nonzero().flatten()
    num_usable = usable.numel()
    if min_cluster_size is None:
        min_cluster_size = num_usable // 2 + 1
    min_cluster_size = check_int_option("min_cluster_size", min_cluster_size, minimum=1)
    details = {
        "min_cluster_size": min_cluster_size,
        "noise_lambda": noise_lambda,
        **screening_details(overflowed),
    }
    if num_usable == 0:
        return nothing_usable("flame", num_clients, num_params, unusable, details)

    sub_gram = gram[usable][:, usable]
    distances = cosine_distances(sub_gram)
    labels, majority = majority_cluster(distances.numpy(), min_cluster_size, min_samples)
    in_cluster = torch.as_tensor(labels == majority) if majority is not None else None

    norms = sub_gram.diagonal().clamp(min=0.0).sqrt()
    median_norm = float(torch.quantile(norms, 0.5))
    clip = torch.where(norms > median_norm, median_norm / norms.clamp(min=1e-300), 1.0)

    kept = torch.zeros(num_clients, dtype=torch.bool)
    if in_cluster is not None:
        kept[usable[in_cluster]] = True
    shares = normalized(counts if weight_by_samples else torch.ones(num_clients), kept)
    weights = shares * scatter(clip, usable, num_clients, 0.0)

    # Suspicion: how far a client sits from the bulk of the others in direction.
    off_diagonal = distances.clone()
    off_diagonal.fill_diagonal_(float("nan"))
    scores = off_diagonal.nanmedian(dim=1).values if num_usable > 1 else torch.zeros(1)

    details.update(
        cluster_labels=scatter(torch.as_tensor(labels), usable, num_clients, -2).long().tolist(),
        majority_label=majority,
        median_norm=median_norm,
        clip_factors=scatter(clip, usable, num_clients, 0.0).tolist(),
        kept_fraction=int(kept.sum()) / num_usable,
    )
    if not bool(kept.any()):
        details["no_majority_cluster"] = True
        result = torch.zeros(num_params, dtype=torch.float32)
    else:
        result = weighted_row_sum(matrix, weights)
        if noise_lambda > 0:
            details["noise_reference"] = "new_global" if global_params is not None else "update"
            details["noise_std"] = _add_noise(
                result, layout, global_params, noise_lambda * median_norm, generator
            )
    report = AggregationReport(
        method="flame",
        kept=weights > 0,
        weights=weights,
        scores=scatter(scores, usable, num_clients, float("inf")),
        non_finite=unusable,
        details=details,
    )
    return result, report
