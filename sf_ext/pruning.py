"""Magnitude pruning masks: the one implementation used by ``fed_avg_w_prune`` and the DLG audit.

A mask is a boolean tensor per *weight* tensor (see :func:`sf_ext.params.is_weight_tensor`);
biases and normalization parameters are never pruned. Pruning keeps an exact number of entries
(``round(keep_fraction * size)``, chosen by magnitude with :func:`torch.topk`), so the kept
fraction follows a schedule exactly rather than drifting with percentile ties, and an entry once
pruned is never revived.
"""

import numbers
from typing import Dict, Mapping, Optional

import torch
from torch import nn

from sf_ext._cli import InvalidParameterError
from sf_ext.params import is_weight_tensor

Masks = Dict[str, torch.Tensor]
SCOPES = ("layer", "global")


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def validate_prune_params(prune_percent: float, prune_end_rate: float) -> None:
    """Raise ``InvalidParameterError`` (a ``ValueError``) naming the parameter when a pruning
    schedule is impossible.

    ``prune_percent`` is the percentage *pruned* per epoch, ``prune_end_rate`` the fraction
    *kept* at the end.
    """
    if not _is_number(prune_percent) or not 0 < prune_percent < 100:
        raise InvalidParameterError(
            f"prune_percent must be in (0, 100) (percent of alive weights pruned per epoch), "
            f"got {prune_percent!r}"
        )
    if not _is_number(prune_end_rate) or not 0 < prune_end_rate <= 1:
        raise InvalidParameterError(
            f"prune_end_rate must be in (0, 1] (final fraction of weights kept), got {prune_end_rate!r}"
        )


def scheduled_kept_fraction(epochs_done: int, prune_percent: float, prune_end_rate: float) -> float:
    """Kept fraction after ``epochs_done`` pruning steps: ``max(end, (1 - p/100) ** e)``."""
    return max(prune_end_rate, (1.0 - prune_percent / 100.0) ** epochs_done)


def weight_tensors(source) -> Dict[str, torch.Tensor]:
    """The prunable tensors of a module (its parameters) or of a name->tensor mapping."""
    items = source.named_parameters() if isinstance(source, nn.Module) else source.items()
    return {n: t for n, t in items if is_weight_tensor(n, tuple(t.shape))}


def full_masks(source) -> Masks:
    """All-true masks for every weight tensor of ``source`` (a module or a name->tensor mapping)."""
    return {n: torch.ones_like(t, dtype=torch.bool) for n, t in weight_tensors(source).items()}


def magnitude_prune(
    tensors: Mapping[str, torch.Tensor],
    masks: Optional[Masks],
    keep_fraction: float,
    scope: str = "layer",
) -> Masks:
    """Shrink ``masks`` so that ``keep_fraction`` of the entries stay, largest magnitudes first.

    Args:
        tensors: name -> tensor; only weight tensors are considered (others are ignored).
        masks: current masks (``None``: nothing pruned yet). Entries already pruned stay pruned.
        keep_fraction: fraction of each layer's entries (``"layer"``) or of all weight entries
            (``"global"``) that remain after this call, in (0, 1].
        scope: ``"layer"`` ranks magnitudes within each tensor, ``"global"`` across all of them.

    Returns:
        New boolean masks (the inputs are not modified).
    """
    if scope not in SCOPES:
        raise InvalidParameterError(f"scope must be one of {SCOPES}, got {scope!r}")
    if not _is_number(keep_fraction) or not 0 < keep_fraction <= 1:
        raise InvalidParameterError(f"keep_fraction must be in (0, 1], got {keep_fraction!r}")
    weights = weight_tensors(tensors)
    masks = full_masks(weights) if masks is None else masks
    missing = sorted(set(weights) - set(masks))
    if missing:
        raise KeyError(f"no mask for weight tensors {missing}")
    for name, weight in weights.items():
        _check_mask(name, masks[name], weight)

    # Pruned entries score -1 so they are never chosen back while alive ones remain.
    scores = {
        n: torch.where(
            masks[n], w.detach().abs().float(), torch.full_like(w, -1.0, dtype=torch.float)
        )
        for n, w in weights.items()
    }
    if scope == "layer":
        return {n: _keep_top(scores[n], masks[n], keep_fraction) for n in weights}
    flat_scores = torch.cat([s.reshape(-1) for s in scores.values()])
    flat_masks = torch.cat([masks[n].reshape(-1) for n in weights])
    flat_new = _keep_top(flat_scores, flat_masks, keep_fraction)
    out, start = {}, 0
    for n, w in weights.items():
        out[n] = flat_new[start : start + w.numel()].view(w.shape)
        start += w.numel()
    return out


def _check_mask(name: str, mask, tensor: torch.Tensor) -> None:
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"mask for {name!r} must be a boolean tensor, got {_describe(mask)}")
    if mask.shape != tensor.shape:
        raise ValueError(
            f"mask for {name!r} has shape {tuple(mask.shape)}, its tensor {tuple(tensor.shape)}"
        )


def _describe(value) -> str:
    dtype = getattr(value, "dtype", None)
    return f"{type(value).__name__}" + (f" of {dtype}" if dtype is not None else "")


def _keep_top(scores: torch.Tensor, mask: torch.Tensor, keep_fraction: float) -> torch.Tensor:
    keep = min(int(round(keep_fraction * scores.numel())), int(mask.sum()))
    new = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    if keep > 0:
        new[torch.topk(scores.reshape(-1), keep, sorted=False).indices] = True
    return new.view(scores.shape)


def apply_masks(target, masks: Masks) -> None:
    """Zero the pruned entries in place, in a module's parameters or a name->tensor mapping."""
    tensors = dict(target.named_parameters()) if isinstance(target, nn.Module) else target
    with torch.no_grad():
        for name, mask in masks.items():
            if name not in tensors:
                raise KeyError(f"mask for {name!r} has no matching tensor")
            _check_mask(name, mask, tensors[name])
            tensors[name].mul_(mask.to(device=tensors[name].device, dtype=tensors[name].dtype))


def kept_fraction(masks: Masks) -> float:
    """Fraction of weight entries that are kept, over all masks."""
    total = sum(m.numel() for m in masks.values())
    return float(sum(int(m.sum()) for m in masks.values()) / total) if total else 1.0


def masked_tensors(tensors: Mapping[str, torch.Tensor], keep_fraction: float, scope: str = "layer"):
    """Prune a set of tensors once (as a client's upload would be) and return ``(pruned, masks)``.

    Used by the DLG audit to prune a gradient or weight update with the same rule as
    ``fed_avg_w_prune``. Non-weight tensors are returned unchanged.
    """
    masks = magnitude_prune(tensors, None, keep_fraction, scope)
    pruned = {
        n: (t * masks[n].to(t.dtype) if n in masks else t.clone()) for n, t in tensors.items()
    }
    return pruned, masks


__all__ = [
    "Masks",
    "MaskedWeights",
    "apply_masks",
    "full_masks",
    "kept_fraction",
    "magnitude_prune",
    "masked_tensors",
    "scheduled_kept_fraction",
    "validate_prune_params",
    "weight_tensors",
]


class MaskedWeights(list):
    """A client's upload under pruning: SecretFlow's weight list plus the masks that produced it.

    It *is* the weight list (``list`` of numpy arrays in ``state_dict`` order), so every SecretFlow
    code path that handles plain weights handles it too; ``masks`` holds, per entry, a boolean
    array of the same shape (``None`` for tensors that are never pruned). Mask-aware aggregators
    such as :class:`sf_ext.aggregators.SecurePruneAggregator` read it on the client's device.
    """

    def __init__(self, weights, masks):
        super().__init__(weights)
        if len(masks) != len(weights):
            raise ValueError(f"{len(masks)} masks for {len(weights)} weight arrays")
        self.masks = list(masks)

    def __reduce__(self):
        # list subclasses pickle their items but not attributes set in __init__ by default order.
        return (MaskedWeights, (list(self), self.masks))
