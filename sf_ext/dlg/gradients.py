"""What the attacker observes: a client's gradient (or weight update), optionally pruned.

Everything here works on lists of tensors aligned with ``model.parameters()``. Pruning goes through
:func:`sf_ext.pruning.masked_tensors`, the per-layer mask code ``fed_avg_w_prune`` uses, so biases
are never pruned and exactly ``round(keep * size)`` entries of each weight tensor are kept; here
the ranking is by gradient magnitude (the strategy ranks weights).
"""

from typing import List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sf_ext.pruning import kept_fraction, masked_tensors

TensorLike = Union[torch.Tensor, np.ndarray]
GradientLike = Union[Sequence[Optional[TensorLike]], Mapping[str, TensorLike]]


def parameter_names(model: nn.Module) -> List[str]:
    """Names of ``model.parameters()`` in iteration order."""
    return [name for name, _ in model.named_parameters()]


def align_to_parameters(
    model: nn.Module, tensors: Optional[GradientLike], dtype: Optional[torch.dtype] = None
) -> List[Optional[torch.Tensor]]:
    """Turn a list or a name->tensor mapping into a list aligned with ``model.parameters()``.

    Args:
        model: The model whose parameters define the order and shapes.
        tensors: A sequence with one entry per parameter (``None`` allowed), a mapping from
            parameter name to tensor (missing names become ``None``), or ``None``.
        dtype: Cast every tensor to this dtype (``None``: keep it).

    Returns:
        One tensor (or ``None``) per parameter, on the parameter's device.
    """
    params = list(model.named_parameters())
    if tensors is None:
        return [None] * len(params)
    if isinstance(tensors, Mapping):
        unknown = sorted(set(tensors) - {n for n, _ in params})
        if unknown:
            raise KeyError(f"tensors for names that are not parameters of the model: {unknown}")
        tensors = [tensors.get(n) for n, _ in params]
    tensors = list(tensors)
    if len(tensors) != len(params):
        raise ValueError(f"expected {len(params)} tensors (one per parameter), got {len(tensors)}")
    out = []
    for (name, param), tensor in zip(params, tensors):
        if tensor is None:
            out.append(None)
            continue
        tensor = torch.as_tensor(tensor).detach().to(param.device)
        if dtype is not None:
            tensor = tensor.to(dtype)
        if tuple(tensor.shape) != tuple(param.shape):
            raise ValueError(
                f"{name}: expected shape {tuple(param.shape)}, got {tuple(tensor.shape)}"
            )
        out.append(tensor)
    return out


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Batch-mean cross entropy for class indices or per-class probabilities.

    Equals ``nn.CrossEntropyLoss()`` for both target kinds, which is what clients train with.
    """
    if target.dtype in (torch.int64, torch.int32, torch.int16, torch.uint8):
        return F.cross_entropy(logits, target.long())
    return torch.sum(-target * F.log_softmax(logits, dim=-1), dim=-1).mean()


def observe_gradient(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn=soft_cross_entropy
) -> List[torch.Tensor]:
    """The gradient a client computes on batch ``(x, y)``: one tensor per parameter, detached."""
    params = list(model.parameters())
    loss = loss_fn(model(x), y)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g.detach().clone() for p, g in zip(params, grads)]


def gradient_from_update(update: GradientLike, lr: Optional[float] = None) -> List[torch.Tensor]:
    """Read a weight update (new minus old weights) as a gradient.

    One SGD step moves the weights by ``-lr * gradient``, so ``-update / lr`` is that gradient.
    Without ``lr`` the result is only proportional to it, which is all the cosine-distance attack
    needs; the L2-distance attacks (DLG, iDLG) need the scale.
    """
    scale = -1.0 / lr if lr else -1.0
    items = update.values() if isinstance(update, Mapping) else update
    return [None if u is None else torch.as_tensor(u).detach() * scale for u in items]


def prune_gradient(
    model: nn.Module, gradient: GradientLike, keep_fraction: float, scope: str = "layer"
) -> Tuple[List[torch.Tensor], List[Optional[torch.Tensor]]]:
    """Magnitude-prune an observed gradient per layer (gradient pruning, the DLG paper's defence).

    It uses the same mask code as ``fed_avg_w_prune`` (per-layer, exact counts, biases never
    pruned) but ranks the *gradient's* magnitudes. ``fed_avg_w_prune`` ranks the *weights'*
    magnitudes, so its upload zeroes entries whatever their gradient; attack a captured upload
    (``source="update"`` in a sweep) to see what the strategy really sends.

    Args:
        model: Model the gradient belongs to (its parameter names decide which tensors are weights).
        gradient: One tensor per parameter (or a name->tensor mapping).
        keep_fraction: Fraction of each weight tensor kept, in (0, 1]; 1 keeps everything.
        scope: ``"layer"`` or ``"global"`` ranking, as in :func:`sf_ext.pruning.magnitude_prune`.

    Returns:
        ``(pruned, masks)``: the zero-filled gradient and one boolean mask per parameter
        (``None`` for biases and other tensors that are never pruned).
    """
    names = parameter_names(model)
    aligned = align_to_parameters(model, gradient)
    named = {n: g for n, g in zip(names, aligned) if g is not None}
    pruned, masks = masked_tensors(named, keep_fraction, scope)
    return [pruned.get(n) for n in names], [masks.get(n) for n in names]


def masks_kept_fraction(masks: Sequence[Optional[torch.Tensor]]) -> float:
    """Kept fraction over the weight entries that have a mask (1.0 when there are none)."""
    return kept_fraction({str(i): m for i, m in enumerate(masks) if m is not None})


def rate_to_keep_fraction(prune_rate_percent: float) -> float:
    """Percent of weight entries zeroed (a sweep's ``pruned_percent``) to the kept fraction."""
    if not 0 <= prune_rate_percent < 100:
        raise ValueError(f"pruning rate must be in [0, 100), got {prune_rate_percent!r}")
    return 1.0 - prune_rate_percent / 100.0


__all__ = [
    "GradientLike",
    "align_to_parameters",
    "gradient_from_update",
    "masks_kept_fraction",
    "observe_gradient",
    "parameter_names",
    "prune_gradient",
    "rate_to_keep_fraction",
    "soft_cross_entropy",
]
