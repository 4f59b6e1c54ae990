"""Parameter layout: moving between a model's named tensors and one flat vector.

Aggregators work on a stacked update matrix ``[n_clients, n_params]``; models, pruning masks and
SecretFlow's weight lists work per tensor. :class:`ParamLayout` is the single translation between
the two, and :func:`is_weight_tensor` the single rule for which tensors are "weights" (pruned by
``fed_avg_w_prune``, noised by FLAME) as opposed to biases and normalization parameters.

:func:`export_weights` and :func:`import_weights` are the single rule for what a model sends
through SecretFlow (its *weight list*): every ``state_dict`` entry in order, as numpy arrays of one
floating dtype, with 0-dimensional entries (BatchNorm's ``num_batches_tracked``) sent as shape
``(1,)``; SecretFlow's secure aggregation refuses integer and 0-d arrays. With ``skip_bn=True``
every tensor of every BatchNorm layer, wherever it sits in the model, stays local (FedBN).
"""

from dataclasses import dataclass
from typing import Dict, List, Mapping, Sequence, Set, Tuple, Union

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


def is_weight_tensor(name: str, shape: Sequence[int]) -> bool:
    """Whether a tensor is a layer weight (conv kernel or linear matrix).

    Biases, normalization scales/shifts and running statistics are 0- or 1-dimensional, so a
    weight is any tensor with at least two dimensions whose name does not mark it as a buffer.
    """
    leaf = name.rsplit(".", 1)[-1]
    return len(shape) >= 2 and leaf not in ("running_mean", "running_var", "num_batches_tracked")


def _both_single(a: Tuple[int, ...], b: Tuple[int, ...]) -> bool:
    """A 0-d entry travels as shape (1,): the two are the same single value."""
    return a in ((), (1,)) and b in ((), (1,))


@dataclass(frozen=True)
class ParamLayout:
    """Names, shapes and flat offsets of a model's tensors, in ``state_dict`` order.

    A model's weight list (:func:`export_weights`) holds the ``state_dict`` values in order, so a
    layout built from the same module (with the same ``skip_bn``) lines up with SecretFlow's weight
    lists entry for entry; :meth:`flatten` accepts a 0-d entry sent as shape ``(1,)``.
    """

    names: Tuple[str, ...]
    shapes: Tuple[Tuple[int, ...], ...]

    @classmethod
    def from_module(cls, module: nn.Module, skip_bn: bool = False) -> "ParamLayout":
        """Layout of a model's ``state_dict`` (without BatchNorm entries when ``skip_bn``)."""
        state = module.state_dict()
        names = transported_names(module, skip_bn)
        return cls(tuple(names), tuple(tuple(state[n].shape) for n in names))

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
            if tuple(t.shape) != shape and not _both_single(tuple(t.shape), shape):
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


# --- what a model sends through SecretFlow ---------------------------------------------------------


def batchnorm_state_names(module: nn.Module) -> Set[str]:
    """Names of the ``state_dict`` entries that belong to a BatchNorm layer, at any depth."""
    owners = {name for name, m in module.named_modules() if isinstance(m, _BatchNorm)}
    return {n for n in module.state_dict() if n.rpartition(".")[0] in owners}


def transported_names(module: nn.Module, skip_bn: bool = False) -> List[str]:
    """The ``state_dict`` names in a model's weight list, in order (see :func:`export_weights`)."""
    names = list(module.state_dict().keys())
    if not skip_bn:
        return names
    local = batchnorm_state_names(module)
    return [n for n in names if n not in local]


def _numpy_dtype(tensors) -> np.dtype:
    """One floating dtype for the whole list (SecretFlow's secure sum needs a single dtype).

    float64 when every floating entry is float64 (a ``.double()`` model), else float32.
    """
    floating = [t.dtype for t in tensors if t.is_floating_point()]
    if floating and all(d == torch.float64 for d in floating):
        return np.dtype(np.float64)
    return np.dtype(np.float32)


def export_weights(module: nn.Module, skip_bn: bool = False) -> List[np.ndarray]:
    """A model's weight list for SecretFlow: state entries as numpy arrays of one float dtype.

    Args:
        module: The model.
        skip_bn: Leave out every BatchNorm layer's tensors (they stay local).

    Returns:
        Copies of the entries named by :func:`transported_names`, in that order; 0-d entries have
        shape ``(1,)``, integer buffers are converted to the float dtype.
    """
    state = module.state_dict()
    names = transported_names(module, skip_bn)
    dtype = _numpy_dtype(state[n] for n in names)
    out = []
    for name in names:
        tensor = state[name].detach().cpu()
        if not tensor.is_floating_point() or tensor.dtype not in (torch.float32, torch.float64):
            tensor = tensor.to(torch.float64)
        out.append(np.atleast_1d(tensor.numpy().astype(dtype, copy=True)))
    return out


def import_weights(
    module: nn.Module,
    weights: Union[Sequence, Mapping[str, object]],
    skip_bn: bool = False,
) -> None:
    """Load a weight list (or a name -> array mapping) into a model, in place.

    Each array is reshaped to its entry's shape (size-1 arrays fit 0-d entries) and converted to
    the entry's dtype (integer buffers are rounded).

    Args:
        module: The model.
        weights: Arrays in the order of :func:`transported_names` with the same ``skip_bn``, or a
            mapping from ``state_dict`` names to arrays (only those entries are loaded).
        skip_bn: Whether the list leaves out BatchNorm tensors.

    Raises:
        ValueError: The list has the wrong length, or an array the wrong number of elements.
        KeyError: A mapping names an entry the model does not have.
    """
    state = module.state_dict()
    if isinstance(weights, Mapping):
        unknown = sorted(set(weights) - set(state))
        if unknown:
            raise KeyError(f"the model has no state entries named {unknown}")
        items = list(weights.items())
    else:
        names = transported_names(module, skip_bn)
        weights = list(weights)
        if len(weights) != len(names):
            bn_hint = (
                " (the sender and this model disagree on skip_bn?)"
                if batchnorm_state_names(module)
                else ""
            )
            raise ValueError(
                f"got {len(weights)} weight arrays for a model with {len(names)} "
                f"{'non-BatchNorm ' if skip_bn else ''}state entries{bn_hint}"
            )
        items = list(zip(names, weights))
    with torch.no_grad():
        for name, array in items:
            target = state[name]
            value = torch.as_tensor(np.asarray(array))
            if value.numel() != target.numel():
                raise ValueError(
                    f"{name}: expected {tuple(target.shape)} ({target.numel()} values), got "
                    f"{tuple(value.shape)}"
                )
            value = value.reshape(target.shape)
            if value.is_floating_point() and not target.is_floating_point():
                value = value.round()
            target.copy_(value.to(dtype=target.dtype, device=target.device))
