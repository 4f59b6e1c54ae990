"""Local training of one round's clients, batched with ``torch.func`` or one after the other.

Both paths run the same arithmetic: plain SGD (optional momentum and weight decay) on a
sample-weighted cross-entropy, through ``functional_call`` on one shared module, so that the
batched path is a drop-in replacement for the loop. The batched path stacks the ``k`` clients'
parameters along a leading axis and takes every client's step at once with
``vmap(grad(loss))``; clients with fewer local steps are masked out once they are done. Data stay
in one shared tensor: each client is a list of row indices into it.

Per-client knobs (:class:`ClientPlan`): its index list, learning rate, number of epochs and an
optional L2 ball around the starting (global) model to project onto every few steps (PGD).
"""

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from sf_ext.attacks.targeted import ball_scale
from sf_ext.params import ParamLayout

__all__ = [
    "ClientPlan",
    "LocalTrainer",
    "minibatch_schedule",
    "model_supports_batching",
]


@dataclass
class ClientPlan:
    """What one client does in a round.

    Attributes:
        indices: Rows of the shared training tensors this client trains on.
        lr: Learning rate of this round.
        epochs: Passes over ``indices`` (ignored when ``steps`` is set).
        steps: Fixed number of local minibatch steps instead of epochs.
        pgd_radius: Project the model onto the L2 ball of this radius around the starting model
            every ``pgd_every`` steps and after the last one; ``None`` disables it.
        pgd_every: Projection period in steps.
    """

    indices: np.ndarray
    lr: float
    epochs: int = 1
    steps: Optional[int] = None
    pgd_radius: Optional[float] = None
    pgd_every: int = 10


def minibatch_schedule(
    indices: np.ndarray, batch_size: int, epochs: int, steps: Optional[int], rng
) -> List[np.ndarray]:
    """The client's minibatches: reshuffled every epoch, last partial batch kept.

    With ``steps`` set, epochs are repeated until that many batches exist and the list is cut.
    """
    indices = np.asarray(indices, dtype=np.int64)
    if len(indices) == 0:
        return []
    per_epoch = math.ceil(len(indices) / batch_size)
    n_epochs = epochs if steps is None else math.ceil(steps / per_epoch)
    batches = []
    for _ in range(n_epochs):
        order = indices[rng.permutation(len(indices))]
        batches.extend(order[i : i + batch_size] for i in range(0, len(order), batch_size))
    return batches if steps is None else batches[:steps]


def model_supports_batching(model: nn.Module) -> bool:
    """``vmap`` training needs a model without buffers (no BatchNorm running statistics)."""
    return not any(True for _ in model.buffers())


class LocalTrainer:
    """Trains a round's clients from the global model; returns their flat weights ``[k, d]``.

    Args:
        model: Module used as the architecture (its own parameter values are ignored).
        train_x: Shared training inputs (clean data and any poisoned rows), ``[n, ...]``.
        train_y: Shared labels ``[n]``.
        batch_size: Local minibatch size.
        momentum: SGD momentum (0 = plain SGD).
        weight_decay: L2 penalty added to the gradient.
        device: Device the training runs on (the shared tensors are moved there once).
    """

    def __init__(
        self,
        model: nn.Module,
        train_x: torch.Tensor,
        train_y: torch.Tensor,
        batch_size: int = 32,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        device: str = "cpu",
    ):
        self.device = torch.device(device)
        self.model = model.to(self.device).train()
        self.layout = ParamLayout.from_module(self.model)
        self.param_names = [n for n, _ in self.model.named_parameters()]
        self.train_x = torch.as_tensor(train_x).to(self.device)
        self.train_y = torch.as_tensor(train_y, dtype=torch.int64).to(self.device)
        self.batch_size = int(batch_size)
        self.momentum = float(momentum)
        self.weight_decay = float(weight_decay)
        self.can_batch = model_supports_batching(self.model)
        # Dropout draws an independent mask per client, as separate training would.
        self._batched_grad = vmap(grad(self._loss), in_dims=(0, 0, 0, 0), randomness="different")
        self._single_grad = grad(self._loss)

    # -- shared pieces -------------------------------------------------------------------------

    def _loss(self, params, x, y, w):
        logits = functional_call(self.model, params, (x,))
        per_sample = F.cross_entropy(logits, y, reduction="none")
        # Padding rows carry weight 0; clamp keeps an all-padding batch at loss 0, not NaN.
        return (per_sample * w).sum() / w.sum().clamp_min(1.0)

    def _apply_step(self, params, grads, velocity, lr):
        """One SGD step; ``lr`` broadcasts (a scalar, or ``[k]`` with 0 for idle clients)."""
        out = {}
        for name, p in params.items():
            g = grads[name]
            if self.weight_decay:
                g = g + self.weight_decay * p
            if self.momentum:
                velocity[name] = self.momentum * velocity[name] + g
                g = velocity[name]
            out[name] = p - _expand(lr, p) * g
        return out

    def _schedules(self, plans: Sequence[ClientPlan], rng) -> List[List[np.ndarray]]:
        return [
            minibatch_schedule(p.indices, self.batch_size, p.epochs, p.steps, rng) for p in plans
        ]

    def _flat(self, params: Dict[str, torch.Tensor], buffers: Dict[str, torch.Tensor], k: int):
        merged = {**buffers, **params}
        return torch.cat(
            [merged[n].reshape(k, -1).to(torch.float32) for n in self.layout.names], dim=1
        )

    def _start(self, global_vec: torch.Tensor):
        tensors = self.layout.unflatten(global_vec.to(self.device))
        state = self.model.state_dict()
        params = {n: tensors[n].to(state[n].dtype) for n in self.param_names}
        buffers = {n: tensors[n].to(state[n].dtype) for n in self.layout.names if n not in params}
        return params, buffers

    # -- the two paths -------------------------------------------------------------------------

    def train(
        self, global_vec: torch.Tensor, plans: Sequence[ClientPlan], rng, batched: bool = True
    ) -> torch.Tensor:
        """Train every planned client from ``global_vec``; returns their weights ``[k, d]``.

        ``rng`` (a numpy Generator) drives the minibatch shuffles, drawn in client order before
        any training, so both paths see identical batches.
        """
        if not plans:
            return torch.zeros(0, self.layout.num_params)
        schedules = self._schedules(plans, rng)
        if batched and self.can_batch:
            return self._train_batched(global_vec, plans, schedules)
        return self._train_sequential(global_vec, plans, schedules)

    def _train_sequential(self, global_vec, plans, schedules) -> torch.Tensor:
        start_params, start_buffers = self._start(global_vec)
        rows = []
        for plan, batches in zip(plans, schedules):
            params = {n: p.clone() for n, p in start_params.items()}
            # functional_call updates buffers (BatchNorm statistics) in place: one copy per client.
            buffers = {n: b.clone() for n, b in start_buffers.items()}
            velocity = {n: torch.zeros_like(p) for n, p in params.items()}
            radius = torch.tensor(
                [math.inf if plan.pgd_radius is None else plan.pgd_radius], device=self.device
            )
            for step, idx in enumerate(batches):
                idx_t = torch.as_tensor(idx, device=self.device)
                x, y = self.train_x[idx_t], self.train_y[idx_t]
                w = torch.ones(len(idx), device=self.device)
                if buffers:
                    grads = self._single_grad_with_buffers(params, buffers, x, y, w)
                else:
                    grads = self._single_grad(params, x, y, w)
                params = self._apply_step(params, grads, velocity, plan.lr)
                if plan.pgd_radius is not None and (step + 1) % plan.pgd_every == 0:
                    params = _project_dict(params, start_params, radius, single=True)
            if plan.pgd_radius is not None:
                params = _project_dict(params, start_params, radius, single=True)
            rows.append(self._flat(params, buffers, 1))
        return torch.cat(rows, dim=0)

    def _single_grad_with_buffers(self, params, buffers, x, y, w):
        # Plain autograd here: torch.func transforms refuse the in-place buffer updates.
        leaves = {n: p.detach().requires_grad_(True) for n, p in params.items()}
        logits = functional_call(self.model, {**leaves, **buffers}, (x,))
        per_sample = F.cross_entropy(logits, y, reduction="none")
        loss = (per_sample * w).sum() / w.sum().clamp_min(1.0)
        grads = torch.autograd.grad(loss, list(leaves.values()))
        return {n: g.detach() for n, g in zip(leaves, grads)}

    def _train_batched(self, global_vec, plans, schedules) -> torch.Tensor:
        k = len(plans)
        start_params, _ = self._start(global_vec)
        params = {n: p.unsqueeze(0).repeat(k, *([1] * p.ndim)) for n, p in start_params.items()}
        velocity = {n: torch.zeros_like(p) for n, p in params.items()}
        lrs = torch.tensor([p.lr for p in plans], dtype=torch.float32, device=self.device)
        radii = torch.tensor(
            [math.inf if p.pgd_radius is None else float(p.pgd_radius) for p in plans],
            device=self.device,
        )
        every = torch.tensor([p.pgd_every for p in plans], device=self.device)
        n_steps = torch.tensor([len(s) for s in schedules], device=self.device)
        total = int(n_steps.max()) if k else 0
        batch = self.batch_size
        for step in range(total):
            idx = np.zeros((k, batch), dtype=np.int64)
            weight = np.zeros((k, batch), dtype=np.float32)
            for i, batches in enumerate(schedules):
                if step < len(batches):
                    rows = batches[step]
                    idx[i, : len(rows)] = rows
                    weight[i, : len(rows)] = 1.0
            idx_t = torch.as_tensor(idx, device=self.device)
            x = self.train_x[idx_t]
            y = self.train_y[idx_t]
            w = torch.as_tensor(weight, device=self.device)
            grads = self._batched_grad(params, x, y, w)
            active = step < n_steps
            # Clients run steps [0, n_i) and then idle: a zero learning rate freezes them, and
            # their velocity no longer matters because they never become active again.
            params = self._apply_step(params, grads, velocity, lrs * active)
            due = active & torch.isfinite(radii) & ((step + 1) % every == 0)
            if bool(due.any()):
                params = _project_dict(params, start_params, torch.where(due, radii, math.inf))
        if bool(torch.isfinite(radii).any()):
            params = _project_dict(params, start_params, radii)
        return self._flat(params, {}, k)


def _expand(values, like: torch.Tensor):
    """Reshape a per-client vector ``[k]`` to broadcast against ``like`` ``[k, ...]``."""
    if not isinstance(values, torch.Tensor) or values.ndim == 0:
        return values
    return values.reshape(-1, *([1] * (like.ndim - 1)))


def _project_dict(params, centre, radius: torch.Tensor, single: bool = False):
    """Project parameter dicts onto L2 balls around ``centre``, one radius per client.

    ``params`` are stacked ``[k, ...]`` per name, or one client's tensors when ``single``.
    """
    deltas = {n: p - centre[n] for n, p in params.items()}
    if single:
        deltas = {n: d.unsqueeze(0) for n, d in deltas.items()}
    norms = sum(d.reshape(d.shape[0], -1).pow(2).sum(dim=1) for d in deltas.values()).sqrt()
    factor = ball_scale(norms, radius.to(norms))
    out = {}
    for n, d in deltas.items():
        scaled = d * _expand(factor.to(d.dtype), d)
        out[n] = centre[n] + (scaled.squeeze(0) if single else scaled)
    return out
