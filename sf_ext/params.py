"""Parameter layout: moving between a model's named tensors and one flat vector.

Aggregators work on a stacked update matrix ``[n_clients, n_params]``; models, pruning masks and
SecretFlow's weight lists work per tensor. :class:`ParamLayout` is the single translation between
the two, and :func:`is_weight_tensor` the single rule for which tensors are "weights" (pruned by
``fed_avg_w_prune``, noised by FLAME) as opposed to biases and normalization parameters.
"""

from dataclasses import dataclass
from typing import Dict, List, Mapping, Sequence, Tuple

import numpy as np
import torch
from torch import nn


def is_weight_tensor(name: str, shape: Sequence[int]) -> bool:
    """Whether a tensor is a layer weight (conv kernel or linear matrix).

    Biases, normalization scales/shifts and running statistics are 0- or 1-dimensional, so a
    weight is any tensor with at least two dimensions whose name does not mark it as a buffer.
    """
    leaf = name.rsplit(".", 1)[-1]
    return len(shape) >= 2 and leaf not in ("running_mean", "running_var", "num_batches_tracked")


@dataclass(frozen=True)
class ParamLayout:
    """Names, shapes and flat offsets of a model's tensors, in ``state_dict`` order.

    SecretFlow's ``get_weights`` returns the ``state_dict`` values in order, so a layout built from
    the same module lines up with SecretFlow's weight lists entry for entry.
    """

    names: Tuple[str, ...]
    shapes: Tuple[Tuple[int, ...], ...]

    @classmethod
    def from_module(cls, module: nn.Module) -> "ParamLayout":
        state = module.state_dict()
        return cls(tuple(state.keys()), tuple(tuple(v.shape) for v in state.values()))

    @classmethod
    def from_arrays(cls, arrays: Sequence, names: Sequence[str] = None) -> "ParamLayout":
        names = names if names is not None else [f"param{i}" for i in range(len(arrays))]
        if len(names) != len(arrays):
            raise ValueError(f"{len(names)} names for {len(arrays)} arrays")
        return cls(tuple(names), tuple(tuple(np.shape(a)) for a in arrays))

    @property
    def sizes(self) -> List[int]:
        return [int(np.prod(s)) for s in self.shapes]

    @property
    def num_params(self) -> int:
        return int(sum(self.sizes))

    def slices(self) -> Dict[str, slice]:
        """Flat-vector slice of each tensor."""
        out, start = {}, 0
        for name, size in zip(self.names, self.sizes):
            out[name] = slice(start, start + size)
            start += size
        return out

    def weight_names(self) -> List[str]:
        return [n for n, s in zip(self.names, self.shapes) if is_weight_tensor(n, s)]

    def flatten(self, tensors) -> torch.Tensor:
        """Concatenate a list/tuple of arrays or a name->tensor mapping into one float32 vector."""
        if isinstance(tensors, Mapping):
            missing = [n for n in self.names if n not in tensors]
            if missing:
                raise KeyError(f"tensors missing from the mapping: {missing}")
            tensors = [tensors[n] for n in self.names]
        if len(tensors) != len(self.names):
            raise ValueError(f"expected {len(self.names)} tensors, got {len(tensors)}")
        parts = []
        for name, shape, t in zip(self.names, self.shapes, tensors):
            t = torch.as_tensor(np.asarray(t) if not isinstance(t, torch.Tensor) else t)
            if tuple(t.shape) != shape:
                raise ValueError(f"{name}: expected shape {shape}, got {tuple(t.shape)}")
            parts.append(t.detach().reshape(-1).to(torch.float32))
        return torch.cat(parts) if parts else torch.zeros(0)

    def unflatten(self, vector: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Split a flat vector back into a name->tensor mapping (views of ``vector``)."""
        if vector.numel() != self.num_params:
            raise ValueError(f"expected {self.num_params} values, got {vector.numel()}")
        return {
            name: vector[sl].view(shape)
            for (name, sl), shape in zip(self.slices().items(), self.shapes)
        }

    def unflatten_numpy(self, vector: torch.Tensor, dtype=np.float32) -> List[np.ndarray]:
        """Split a flat vector into SecretFlow's weight-list format (numpy arrays, state order)."""
        return [v.detach().cpu().numpy().astype(dtype) for v in self.unflatten(vector).values()]
