"""A client's local training, written as a differentiable function of its data.

A FedAvg client does not upload a gradient: it runs ``K`` optimizer steps (SGD, SGD with momentum,
Adam, ...) on ``K`` batches and uploads the weights it ends at. To invert that upload an attacker
simulates the same steps on dummy data and differentiates through them (Dimitrov et al. 2022, "Data
Leakage in Federated Averaging"). :func:`simulate_update` does this with ``torch.func``; the update
rules follow PyTorch's ``torch.optim.SGD`` and ``torch.optim.Adam`` exactly (same defaults, same
bias correction), so with the real data and the real starting state it reproduces the client's
update to float rounding (the tests check this against ``torch.optim``).

Adam's first step from a fresh state moves every weight by ``lr * g / (|g| + eps)``: about
``lr * sign(g)``, a function of the data with almost zero derivative. For the attack,
``soft_sign`` replaces the denominator ``sqrt(v)`` by ``sqrt(v + c^2)`` with ``c = soft_sign *
mean(sqrt(v))`` per tensor: a smooth, saturating stand-in whose signs agree with Adam's; compared
with a scale-free (cosine) distance it gives the optimizer a usable direction. ``soft_sign=0``
simulates Adam exactly.
"""

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.func import functional_call

from sf_ext.dlg.gradients import soft_cross_entropy

OPTIMIZERS = ("sgd", "adam")
# torch.optim class name -> our name
_CLASS_NAMES = {"SGD": "sgd", "Adam": "adam"}


@dataclass
class OptimizerSpec:
    """The client's local optimizer as the attacker models it (PyTorch semantics).

    Attributes:
        name: ``"sgd"`` or ``"adam"``.
        lr: Learning rate.
        momentum, dampening, nesterov: SGD's momentum settings.
        weight_decay: L2 penalty added to the gradient (both optimizers).
        betas, eps: Adam's moment decay rates and denominator constant.
        state: Optimizer state at the start of the round, one dict per parameter
            (``momentum_buffer`` for SGD; ``step``, ``exp_avg``, ``exp_avg_sq`` for Adam).
            ``None``: a fresh optimizer, as on a client's first round. A server does not see
            the state of later rounds; a capture records it for upper-bound experiments.
    """

    name: str
    lr: float
    momentum: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    betas: Tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    state: Optional[List[Dict[str, torch.Tensor]]] = field(default=None, repr=False)

    def __post_init__(self):
        if self.name not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.name!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum!r}")
        self.betas = (float(self.betas[0]), float(self.betas[1]))

    @classmethod
    def from_hyperparameters(
        cls, optimizer: str, hyperparameters: Dict[str, Any], state=None
    ) -> "OptimizerSpec":
        """Build from an optimizer class name (``"SGD"``, ``"Adam"``, or ours) and its
        ``param_groups[0]`` values (as a capture records them)."""
        name = _CLASS_NAMES.get(optimizer, str(optimizer).lower())
        if name not in OPTIMIZERS:
            raise ValueError(
                f"cannot simulate optimizer {optimizer!r}; supported: {', '.join(_CLASS_NAMES)}"
            )
        h = dict(hyperparameters)
        for flag in ("amsgrad", "maximize"):
            if h.get(flag):
                raise ValueError(f"cannot simulate {optimizer} with {flag}=True")
        keys = {"lr", "momentum", "dampening", "nesterov", "weight_decay", "betas", "eps"}
        kwargs = {k: v for k, v in h.items() if k in keys and v is not None}
        if "betas" in kwargs:
            kwargs["betas"] = tuple(kwargs["betas"])
        if name == "adam":
            for k in ("momentum", "dampening", "nesterov"):
                kwargs.pop(k, None)
        return cls(name=name, state=state, **kwargs)

    @classmethod
    def from_optimizer(cls, optimizer: torch.optim.Optimizer, with_state: bool = False):
        """Build from a live ``torch.optim`` optimizer (one parameter group)."""
        group = optimizer.param_groups[0]
        state = None
        if with_state:
            state = [
                {k: v.detach().clone() if torch.is_tensor(v) else v for k, v in s.items()}
                for s in (optimizer.state.get(p, {}) for p in group["params"])
            ]
            if all(not s for s in state):
                state = None
        hyper = {k: v for k, v in group.items() if k != "params"}
        return cls.from_hyperparameters(type(optimizer).__name__, hyper, state)

    def without_state(self) -> "OptimizerSpec":
        """The same optimizer from a fresh state (what a server can assume)."""
        return OptimizerSpec(
            self.name,
            self.lr,
            self.momentum,
            self.dampening,
            self.nesterov,
            self.weight_decay,
            self.betas,
            self.eps,
            None,
        )

    def describe(self) -> str:
        if self.name == "sgd":
            extra = f", momentum {self.momentum:g}" if self.momentum else ""
        else:
            extra = f", betas {self.betas[0]:g}/{self.betas[1]:g}"
        state = "fresh state" if self.state is None else "recorded state"
        return f"{self.name.upper()} lr {self.lr:g}{extra} ({state})"


def _initial_state(spec: OptimizerSpec, params: Sequence[torch.Tensor]):
    if spec.state is None:
        if spec.name == "sgd":
            return [{"momentum_buffer": None} for _ in params]
        return [{"step": 0, "exp_avg": None, "exp_avg_sq": None} for _ in params]
    if len(spec.state) != len(params):
        raise ValueError(f"optimizer state has {len(spec.state)} entries for {len(params)} params")
    out = []
    for s, p in zip(spec.state, params):
        entry = {}
        for k, v in s.items():
            if torch.is_tensor(v) and v.dim() > 0:
                entry[k] = v.to(p.device, p.dtype)
            else:
                entry[k] = int(float(v)) if k == "step" else v
        if spec.name == "adam":
            entry.setdefault("step", 0)
            entry.setdefault("exp_avg", None)
            entry.setdefault("exp_avg_sq", None)
        else:
            entry.setdefault("momentum_buffer", None)
        out.append(entry)
    return out


def _sgd_step(spec: OptimizerSpec, p, g, s) -> Tuple[torch.Tensor, Dict]:
    if spec.weight_decay:
        g = g + spec.weight_decay * p
    if spec.momentum:
        buf = s["momentum_buffer"]
        buf = g if buf is None else spec.momentum * buf + (1 - spec.dampening) * g
        s = {"momentum_buffer": buf}
        g = g + spec.momentum * buf if spec.nesterov else buf
    return p - spec.lr * g, s


def _adam_step(spec: OptimizerSpec, p, g, s, soft_sign: float) -> Tuple[torch.Tensor, Dict]:
    beta1, beta2 = spec.betas
    if spec.weight_decay:
        g = g + spec.weight_decay * p
    step = s["step"] + 1
    m = (1 - beta1) * g if s["exp_avg"] is None else beta1 * s["exp_avg"] + (1 - beta1) * g
    v = (
        (1 - beta2) * g * g
        if s["exp_avg_sq"] is None
        else (beta2 * s["exp_avg_sq"] + (1 - beta2) * g * g)
    )
    m_hat = m / (1 - beta1**step)
    # sqrt has an infinite derivative at 0; the tiny floor changes nothing above float rounding.
    v_hat = v / (1 - beta2**step)
    if soft_sign > 0:
        # sqrt(v + c^2) with c a fixed share of the tensor's typical sqrt(v): the ratio m / denom
        # becomes a smooth saturating function (like tanh) instead of a sign.
        c = soft_sign * torch.sqrt(v_hat.detach() + 1e-30).mean()
        v_hat = v_hat + c * c
    denominator = torch.sqrt(v_hat + 1e-30) + spec.eps
    return p - spec.lr * m_hat / denominator, {"step": step, "exp_avg": m, "exp_avg_sq": v}


def simulate_update(
    model: nn.Module,
    batches: Sequence[Tuple[torch.Tensor, torch.Tensor]],
    optimizer: OptimizerSpec,
    start: Optional[Sequence[torch.Tensor]] = None,
    loss_fn: Callable = soft_cross_entropy,
    masks: Optional[Sequence[Optional[torch.Tensor]]] = None,
    create_graph: bool = True,
    soft_sign: float = 0.0,
) -> List[torch.Tensor]:
    """Weights after local training minus the starting weights, one tensor per parameter.

    Args:
        model: The client's architecture (its parameters are the start unless ``start`` is given;
            they are not modified).
        batches: ``(x, y)`` per local step, in order; ``y`` class indices or probabilities.
        optimizer: The client's optimizer and its state at the start.
        start: Starting weights per parameter (default: the model's current parameters).
        loss_fn: The client's batch loss.
        masks: Boolean masks held during training (``fed_avg_w_prune`` re-applies its mask after
            every step: masked entries stay zero).
        create_graph: Keep the graph so the result can be differentiated w.r.t. the batches.
        soft_sign: See the module docstring (Adam only; 0 is exact).

    Returns:
        The update per parameter (differentiable w.r.t. the inputs when ``create_graph``).
    """
    names = [n for n, _ in model.named_parameters()]
    base = [p.detach() for p in model.parameters()] if start is None else list(start)
    if len(base) != len(names):
        raise ValueError(f"start has {len(base)} tensors for {len(names)} parameters")
    masks = [None] * len(names) if masks is None else list(masks)
    float_masks = [None if m is None else m.to(b.device, b.dtype) for m, b in zip(masks, base)]
    params = [b.detach().clone().requires_grad_(True) for b in base]
    start_values = [p.detach() for p in params]
    state = _initial_state(optimizer, params)
    buffers = dict(model.named_buffers())
    for x, y in batches:
        out = functional_call(model, {**dict(zip(names, params)), **buffers}, (x,))
        loss = loss_fn(out, y)
        grads = torch.autograd.grad(loss, params, create_graph=create_graph, allow_unused=True)
        new_params, new_state = [], []
        for p, g, s, m in zip(params, grads, state, float_masks):
            g = torch.zeros_like(p) if g is None else g
            if optimizer.name == "sgd":
                p_new, s_new = _sgd_step(optimizer, p, g, s)
            else:
                p_new, s_new = _adam_step(optimizer, p, g, s, soft_sign)
            if m is not None:
                p_new = p_new * m
            new_params.append(p_new)
            new_state.append(s_new)
        params, state = new_params, new_state
    return [p - s for p, s in zip(params, start_values)]


def equivalent_gradient_sum(update: Sequence[torch.Tensor], optimizer: OptimizerSpec, steps: int):
    """Read a ``steps``-step update as a sum of per-step gradients (for label counting).

    Exact for plain SGD (``-update / lr``); for SGD with momentum from a fresh state it divides by
    the total weight a constant gradient gets, ``sum_k (1 - mu^k) / (1 - mu)``, and scales to
    ``steps`` gradients. Adam's update carries almost only signs: ``None`` is returned.
    """
    if optimizer.name == "adam":
        return None
    mu = optimizer.momentum
    if mu:
        weight = sum((1 - mu ** (k + 1)) / (1 - mu) for k in range(steps))
    else:
        weight = float(steps)
    scale = -float(steps) / (optimizer.lr * weight)
    return [None if u is None else u.detach() * scale for u in update]


__all__ = ["OPTIMIZERS", "OptimizerSpec", "equivalent_gradient_sum", "simulate_update"]
