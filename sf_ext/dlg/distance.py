"""Distances between a dummy's gradient (or simulated update) and what the attacker observed.

Per-tensor normalization matters: with PyTorch's default initialization the classifier's gradient
carries ~1e5 to 1e7 times the first convolution's squared norm, so a distance over all tensors
joined sees only the last layer. ``l2-layer`` and ``cosine-layer`` give every tensor the same
say, which is what lets an attack use the early layers, where the input is encoded.
"""

import math
from typing import List, Optional, Sequence

import torch

from sf_ext.dlg.options import DISTANCES


class TensorDistance:
    """Distance from candidate tensors to fixed observed tensors, optionally on kept entries only.

    Args:
        targets: Observed tensors (``None`` entries are not compared).
        masks: Boolean masks per tensor (``None`` entry: compare the whole tensor). Entries outside
            the mask are ignored on both sides (the mask-aware attacker).
        distance: ``"l2"`` (sum of squared differences, DLG), ``"l2-layer"`` (each tensor's
            squared error divided by its observed squared norm), ``"cosine"`` (one minus the
            cosine similarity of all tensors joined, Inverting Gradients) or ``"cosine-layer"``
            (mean over tensors of one minus their cosine similarity).

    Attributes:
        reference: The distance of an all-zero candidate (1 for the cosine distances): the scale
            against which "a large loss" is judged.
    """

    def __init__(
        self,
        targets: Sequence[Optional[torch.Tensor]],
        masks: Optional[Sequence[Optional[torch.Tensor]]] = None,
        distance: str = "l2",
    ):
        if distance not in DISTANCES:
            raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}")
        masks = [None] * len(targets) if masks is None else list(masks)
        if len(masks) != len(targets):
            raise ValueError(f"{len(masks)} masks for {len(targets)} tensors")
        self.distance = distance
        #: Positions of the compared tensors in the candidate list.
        self.indices: List[int] = []
        self.targets: List[torch.Tensor] = []
        self.masks: List[Optional[torch.Tensor]] = []
        for i, (target, mask) in enumerate(zip(targets, masks)):
            if target is None:
                continue
            target = target.detach()
            if mask is not None:
                mask = mask.to(device=target.device, dtype=target.dtype)
                if tuple(mask.shape) != tuple(target.shape):
                    raise ValueError(
                        f"mask {i}: shape {tuple(mask.shape)} != {tuple(target.shape)}"
                    )
                target = target * mask
            self.indices.append(i)
            self.targets.append(target)
            self.masks.append(mask)
        if not self.indices:
            raise ValueError("nothing to compare: every observed tensor is None")
        norms_sq = [float((t * t).sum()) for t in self.targets]
        self.target_norm = math.sqrt(sum(norms_sq))
        self._norms = [math.sqrt(n) for n in norms_sq]
        # l2-layer: an all-zero observed tensor keeps weight 1 (nothing to normalize by).
        if distance == "l2-layer":
            self.weights = [1.0 / n if n > 0 else 1.0 for n in norms_sq]
        else:
            self.weights = [1.0] * len(norms_sq)
        # cosine-layer: tensors with no observed signal cannot say anything about direction.
        self._cos_layers = [j for j, n in enumerate(norms_sq) if n > 0]
        if distance in ("l2", "l2-layer"):
            self.reference = sum(w * n for w, n in zip(self.weights, norms_sq))
        else:
            self.reference = 1.0

    def select(self, candidates: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        """The compared entries of a full candidate list, in the order of :attr:`targets`."""
        return [candidates[i] for i in self.indices]

    def __call__(self, candidates: Sequence[torch.Tensor], selected: bool = False) -> torch.Tensor:
        """Distance of ``candidates`` (one tensor per observed tensor, or already :meth:`select`-ed
        when ``selected``) to the observation."""
        values = list(candidates) if selected else self.select(candidates)
        if self.distance in ("l2", "l2-layer"):
            total = 0.0
            for g, t, m, w in zip(values, self.targets, self.masks, self.weights):
                diff = g - t if m is None else (g - t) * m
                total = total + (diff * diff).sum() * w
            return total
        if self.distance == "cosine":
            dot, norm_sq = 0.0, 0.0
            for g, t, m in zip(values, self.targets, self.masks):
                g = g if m is None else g * m
                dot = dot + (g * t).sum()
                norm_sq = norm_sq + (g * g).sum()
            # eps keeps the loss finite at an all-zero candidate.
            return 1.0 - dot / (torch.sqrt(norm_sq) * self.target_norm + 1e-12)
        total = 0.0
        for j in self._cos_layers:
            g, t, m = values[j], self.targets[j], self.masks[j]
            g = g if m is None else g * m
            cos = (g * t).sum() / (torch.sqrt((g * g).sum()) * self._norms[j] + 1e-12)
            total = total + (1.0 - cos)
        return total / max(1, len(self._cos_layers))


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference between neighbouring pixels (anisotropic total variation)."""
    dy = (x[..., 1:, :] - x[..., :-1, :]).abs().mean()
    dx = (x[..., :, 1:] - x[..., :, :-1]).abs().mean()
    return dx + dy


__all__ = ["DISTANCES", "TensorDistance", "total_variation"]
