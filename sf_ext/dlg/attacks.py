"""Gradient-inversion attacks: DLG, iDLG and an Inverting-Gradients style attack.

All three reconstruct a client's input from the gradient it computed (or from its weight update,
see :func:`sf_ext.dlg.gradients.gradient_from_update`) by optimizing a dummy input until the
dummy's gradient matches the observed one:

* :func:`dlg` (Zhu et al., 2019): dummy input and soft label, L-BFGS, squared gradient distance.
* :func:`idlg` (Zhao et al., 2020): the label is read off the last layer's gradient first, then
  DLG runs on the input only.
* :func:`inverting_gradients` (Geiping et al., 2020): cosine gradient distance plus total
  variation, Adam with signed gradients, input kept in ``[0, 1]``, several restarts.

Against pruning, ``masks`` switches between the two attackers: ``None`` is the naive attacker (it
matches the zero-filled pruned gradient on every entry), a mask list is the mask-aware attacker (it
matches kept entries only, so the zeros the client never computed do not pull the dummy away).

Every attack returns an :class:`AttackResult`. A diverged run (non-finite loss or input) stops,
keeps the last finite input and says so in ``status``; it never returns a NaN image.
"""

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from sf_ext.dlg.gradients import GradientLike, align_to_parameters, soft_cross_entropy

STATUS_COMPLETED = "completed"  # ran all iterations
STATUS_STOPPED = "stopped"  # the optimizer stopped moving (later steps would change nothing)
STATUS_PLATEAU = "plateau"  # a start stalled at a high loss and was abandoned for a new one
STATUS_DIVERGED = "diverged"  # non-finite loss or input; the last finite input is returned
DISTANCES = ("l2", "l2-layer", "cosine")


@dataclass
class AttackResult:
    """Outcome of one gradient-inversion run.

    Attributes:
        attack: Attack name (``"dlg"``, ``"idlg"``, ``"ig"``).
        reconstruction: Reconstructed input ``[B, C, H, W]`` (detached, CPU). Raw optimizer values:
            DLG's input is unconstrained, so clamp to ``[0, 1]`` before display or metrics.
        label: Recovered class index per batch item, ``[B]``.
        loss_history: Gradient-matching loss after each iteration.
        snapshots: ``(iteration, input)`` pairs taken every ``snapshot_every`` iterations.
        status: How the returned start ended: ``"completed"`` (used the remaining budget),
            ``"stopped"`` (L-BFGS stopped moving, at a good or a bad point: see ``final_loss``),
            ``"plateau"`` (stalled at a high loss and abandoned) or ``"diverged"`` (non-finite).
        iterations: Iterations actually run.
        final_loss: Gradient-matching loss of ``reconstruction``.
        wall_time_s: Wall-clock seconds of the attack.
        message: Human-readable note (why it stopped).
        details: Attack-specific extras (soft label, per-restart losses, ...).
    """

    attack: str
    reconstruction: torch.Tensor
    label: torch.Tensor
    loss_history: List[float]
    snapshots: List[Tuple[int, torch.Tensor]]
    status: str
    iterations: int
    final_loss: float
    wall_time_s: float
    message: str = ""
    details: Dict[str, object] = field(default_factory=dict)

    @property
    def diverged(self) -> bool:
        return self.status == STATUS_DIVERGED


class GradientMatcher:
    """Distance between the gradient a dummy batch produces and the observed gradient.

    Args:
        model: The model the client trained (its current weights are the ones attacked).
        observed: Observed gradient, one tensor per parameter (``None``: not observed, ignored).
        masks: Optional boolean masks per parameter; when given, only kept entries are compared
            (the mask-aware attacker). ``None`` entries compare the whole tensor.
        distance: ``"l2"`` (sum of squared differences, DLG), ``"l2-layer"`` (each tensor's
            squared difference divided by the squared norm of its observed gradient, so layers
            with small gradients, typically the first convolutions of a model with default
            initialization, count as much as the classifier) or ``"cosine"`` (one minus the
            cosine similarity of the concatenated gradients, Inverting Gradients).
        loss_fn: The client's training loss ``loss_fn(logits, target)``; batch-mean cross entropy by
            default (class indices or probabilities).
    """

    def __init__(
        self,
        model: nn.Module,
        observed: GradientLike,
        masks: Optional[GradientLike] = None,
        distance: str = "l2",
        loss_fn: Callable = soft_cross_entropy,
    ):
        if distance not in DISTANCES:
            raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}")
        self.model = model
        self.distance = distance
        self.loss_fn = loss_fn
        params = list(model.parameters())
        targets = align_to_parameters(model, observed, dtype=params[0].dtype)
        mask_list = align_to_parameters(model, masks)
        # Only parameters with an observed gradient take part; others cost nothing.
        self.indices = [i for i, t in enumerate(targets) if t is not None]
        if not self.indices:
            raise ValueError("the observed gradient has no tensors")
        self.params = [params[i] for i in self.indices]
        self.masks = [
            None if mask_list[i] is None else mask_list[i].to(targets[i].dtype)
            for i in self.indices
        ]
        # The mask-aware attacker never looks at pruned entries of the target either.
        self.targets = [
            targets[i] if m is None else targets[i] * m for i, m in zip(self.indices, self.masks)
        ]
        norms_sq = [float((t * t).sum()) for t in self.targets]
        self.target_norm = math.sqrt(sum(norms_sq))
        # Per-tensor weights of the squared error; an all-zero observed tensor keeps weight 1.
        self.weights = [1.0 / n if distance == "l2-layer" and n > 0 else 1.0 for n in norms_sq]
        #: The distance of an all-zero dummy gradient: what "a large loss" is relative to.
        self.reference_loss = sum(w * n for w, n in zip(self.weights, norms_sq))
        for p in self.params:
            p.requires_grad_(True)

    def dummy_gradient(self, x: torch.Tensor, target: torch.Tensor, create_graph: bool = True):
        loss = self.loss_fn(self.model(x), target)
        return torch.autograd.grad(loss, self.params, create_graph=create_graph)

    def __call__(self, x: torch.Tensor, target: torch.Tensor, create_graph: bool = True):
        """Gradient distance of dummy input ``x`` with label ``target`` (indices or soft labels)."""
        grads = self.dummy_gradient(x, target, create_graph)
        if self.distance != "cosine":
            total = 0.0
            for g, t, m, w in zip(grads, self.targets, self.masks, self.weights):
                diff = g - t if m is None else (g - t) * m
                total = total + (diff * diff).sum() * w
            return total
        dot, norm_sq = 0.0, 0.0
        for g, t, m in zip(grads, self.targets, self.masks):
            g = g if m is None else g * m
            dot = dot + (g * t).sum()
            norm_sq = norm_sq + (g * g).sum()
        # eps keeps the loss finite at an all-zero dummy gradient.
        return 1.0 - dot / (norm_sq.sqrt() * self.target_norm + 1e-12)


def infer_labels(model: nn.Module, observed: GradientLike, batch_size: int = 1) -> torch.Tensor:
    """Recover labels from the last linear layer's gradient (iDLG's analytic rule).

    With softmax cross entropy, the output-layer bias gradient of an item is ``p - onehot(y)``:
    negative only at the true class. The bias is never pruned by ``fed_avg_w_prune``, so this also
    works on pruned uploads. Without a bias, the row sums of the weight gradient carry the same
    sign when the layer's inputs are non-negative (sigmoid/ReLU features), as in iDLG.

    For ``batch_size > 1`` the classes with negative bias gradient are the labels present; they are
    returned most negative first and repeated to fill the batch (counts per class are not
    recoverable this way).

    Args:
        model: The attacked model; its last 2-D parameter is taken as the output layer.
        observed: Observed gradient aligned with ``model.parameters()`` (or a name mapping).
        batch_size: Number of labels to return.

    Returns:
        Long tensor ``[batch_size]``.
    """
    grads = align_to_parameters(model, observed)
    params = list(model.parameters())
    weight_idx = max(
        (i for i, p in enumerate(params) if p.dim() == 2 and grads[i] is not None), default=None
    )
    if weight_idx is None:
        raise ValueError("no observed gradient for a 2-D (linear) layer to read labels from")
    num_classes = params[weight_idx].shape[0]
    bias_idx = weight_idx + 1
    has_bias = (
        bias_idx < len(params)
        and params[bias_idx].dim() == 1
        and params[bias_idx].shape[0] == num_classes
        and grads[bias_idx] is not None
    )
    if has_bias:
        scores = grads[bias_idx].detach().float().cpu()
    else:
        scores = grads[weight_idx].detach().float().sum(dim=-1).cpu()
    order = torch.argsort(scores)
    if batch_size == 1:
        return order[:1].long()
    present = [int(c) for c in order if scores[c] < 0] or [int(order[0])]
    return torch.tensor([present[i % len(present)] for i in range(batch_size)], dtype=torch.long)


def _normalize_shape(input_shape: Sequence[int]) -> Tuple[int, ...]:
    shape = tuple(int(s) for s in input_shape)
    if len(shape) == 3:  # a single image without batch dimension
        shape = (1,) + shape
    if len(shape) < 2:
        raise ValueError(f"input_shape must include a batch dimension, got {input_shape!r}")
    return shape


def _device_of(model: nn.Module, device) -> torch.device:
    if device is not None:
        return torch.device(device)
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


def _generator(seed: Optional[int]) -> torch.Generator:
    gen = torch.Generator()
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(int(seed))
    return gen


def _all_finite(*tensors: torch.Tensor) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


@dataclass
class _Attempt:
    """One L-BFGS start: its best iterate and how it ended."""

    loss: float
    x: torch.Tensor
    logits: Optional[torch.Tensor]
    status: str
    message: str
    steps: int


def _lbfgs_attempt(
    matcher: GradientMatcher,
    shape: Tuple[int, ...],
    num_classes: int,
    fixed_label: Optional[torch.Tensor],
    budget: int,
    offset: int,
    snapshot_every: int,
    gen: torch.Generator,
    device: torch.device,
    lbfgs_options: Optional[dict],
    stop_when_stuck: bool,
    history: List[float],
    snapshots: List[Tuple[int, torch.Tensor]],
    bad_loss: float = math.inf,
    plateau_window: int = 0,
) -> _Attempt:
    """Run L-BFGS from a fresh random dummy for at most ``budget`` steps.

    ``history`` and ``snapshots`` are appended to, with iterations counted from ``offset`` so that
    several attempts share one timeline. With ``plateau_window > 0`` the start is abandoned when
    its best loss is above ``bad_loss`` and has not halved over the last ``plateau_window`` steps,
    provided at least ``plateau_window`` steps of budget remain for another start.
    """
    x = torch.randn(shape, generator=gen).to(device).requires_grad_(True)
    variables = [x]
    label_logits = None
    if fixed_label is None:
        label_logits = torch.randn((shape[0], num_classes), generator=gen).to(device)
        label_logits.requires_grad_(True)
        variables.append(label_logits)
    optimizer = torch.optim.LBFGS(variables, **(lbfgs_options or {}))

    def target():
        return fixed_label if label_logits is None else F.softmax(label_logits, dim=-1)

    def closure():
        optimizer.zero_grad()
        loss = matcher(x, target())
        # Differentiate w.r.t. the dummies only: the model's own parameter gradients are unused.
        grads = torch.autograd.grad(loss, variables)
        for var, grad in zip(variables, grads):
            var.grad = grad
        return loss

    def snapshot():
        return [v.detach().clone() for v in variables] + [None] * (2 - len(variables))

    best_loss, (best_x, best_logits) = math.inf, snapshot()
    status, message, steps, stuck_steps = STATUS_COMPLETED, f"ran {budget} L-BFGS steps", 0, 0
    best_by_step: List[float] = []
    for it in range(budget):
        before = snapshot()
        loss_before = float(optimizer.step(closure))  # loss at the input the step started from
        if math.isfinite(loss_before) and loss_before < best_loss:
            best_loss, best_x, best_logits = loss_before, before[0], before[1]
        if not math.isfinite(loss_before) or not _all_finite(*variables):
            status = STATUS_DIVERGED
            message = f"L-BFGS diverged at step {offset + it} (non-finite loss or input)"
            steps = it
            break
        if it > 0:
            history.append(loss_before)  # the loss after the previous step
        steps = it + 1
        if (offset + it) % snapshot_every == 0:
            snapshots.append((offset + it, x.detach().cpu().clone()))
        best_by_step.append(best_loss)
        if (
            plateau_window > 0
            and it >= plateau_window
            and budget - steps >= plateau_window
            and best_loss > bad_loss
            and best_loss > 0.5 * best_by_step[it - plateau_window]
        ):
            # Successful starts fall by orders of magnitude within tens of steps; one that has
            # not even halved its loss for a whole window is stuck in a poor basin.
            status = STATUS_PLATEAU
            message = f"start abandoned on a plateau after {offset + it + 1} steps"
            break
        moved = not all(torch.equal(v.detach(), old) for v, old in zip(variables, before))
        stuck_steps = 0 if moved or it == 0 else stuck_steps + 1
        if stuck_steps >= 2 and stop_when_stuck:
            # Two L-BFGS steps in a row left every variable unchanged: from the second one on its
            # curvature memory is fixed too, so every later step would repeat it exactly;
            # stopping changes nothing but the wall time.
            status = STATUS_STOPPED
            message = f"L-BFGS stopped moving after {offset + it + 1} steps"
            break
    if status != STATUS_DIVERGED:
        final = float(matcher(x, target(), create_graph=False).detach())
        if math.isfinite(final):
            history.append(final)
            if final <= best_loss:
                best_loss, (best_x, best_logits) = final, snapshot()[:2]
    return _Attempt(best_loss, best_x, best_logits, status, message, steps)


def _lbfgs_inversion(
    attack: str,
    matcher: GradientMatcher,
    shape: Tuple[int, ...],
    num_classes: int,
    fixed_label: Optional[torch.Tensor],
    iters: int,
    snapshot_every: int,
    seed: Optional[int],
    device: torch.device,
    lbfgs_options: Optional[dict],
    stop_when_stuck: bool,
    restarts: int,
    restart_above: float,
    plateau_window: int,
) -> AttackResult:
    """L-BFGS on the dummy input (and soft label when ``fixed_label`` is None), restarting from a
    new random dummy while a start stops or diverges at a high loss and steps remain."""
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    start = time.perf_counter()
    gen = _generator(seed)
    fixed_label = None if fixed_label is None else fixed_label.to(device)
    # What "stuck at a bad point" means, relative to the size of what is matched.
    bad_loss = restart_above * matcher.reference_loss
    history: List[float] = []
    snapshots: List[Tuple[int, torch.Tensor]] = []
    attempts: List[_Attempt] = []
    used = 0
    while used < iters:
        attempt = _lbfgs_attempt(
            matcher,
            shape,
            num_classes,
            fixed_label,
            iters - used,
            used,
            snapshot_every,
            gen,
            device,
            lbfgs_options,
            stop_when_stuck,
            history,
            snapshots,
            bad_loss,
            plateau_window if len(attempts) < restarts else 0,
        )
        attempts.append(attempt)
        used += max(1, attempt.steps)
        good = math.isfinite(attempt.loss) and attempt.loss <= bad_loss
        if good or attempt.status == STATUS_COMPLETED or len(attempts) > restarts:
            break

    best = min(attempts, key=lambda a: a.loss if math.isfinite(a.loss) else math.inf)
    status, message = best.status, best.message
    if not math.isfinite(best.loss):
        status, message = STATUS_DIVERGED, "diverged: the gradient-matching loss was never finite"
    elif best.status == STATUS_DIVERGED:
        message += "; returned its last finite iterate"
    if len(attempts) > 1:
        message += f" (best of {len(attempts)} starts)"
    # A dummy that ran off to huge values saturates sigmoids and stalls: worth seeing in reports.
    details: Dict[str, object] = {
        "input_abs_max": float(best.x.abs().max()),
        "attempts": [(a.steps, a.loss, a.status) for a in attempts],
    }
    if fixed_label is None:
        soft = F.softmax(best.logits, dim=-1).cpu()
        label = soft.argmax(dim=-1)
        details["soft_label"] = soft
    else:
        label = fixed_label.detach().cpu()
    return AttackResult(
        attack=attack,
        reconstruction=best.x.cpu(),
        label=label,
        loss_history=history,
        snapshots=snapshots,
        status=status,
        iterations=used,
        final_loss=best.loss,
        wall_time_s=time.perf_counter() - start,
        message=message,
        details=details,
    )


def dlg(
    model: nn.Module,
    observed: GradientLike,
    input_shape: Sequence[int],
    num_classes: int,
    *,
    masks: Optional[GradientLike] = None,
    iters: int = 300,
    snapshot_every: int = 10,
    seed: Optional[int] = None,
    device=None,
    loss_fn: Callable = soft_cross_entropy,
    lbfgs_options: Optional[dict] = None,
    stop_when_stuck: bool = True,
    restarts: int = 3,
    restart_above: float = 1e-3,
    plateau_window: int = 50,
    distance: str = "l2",
) -> AttackResult:
    """Deep Leakage from Gradients: optimize a dummy input and soft label with L-BFGS.

    Args:
        model: The attacked model with the weights the gradient was computed at.
        observed: Observed gradient, one tensor per ``model.parameters()`` entry (or name mapping).
        input_shape: ``[B, C, H, W]`` (or ``[C, H, W]`` for one image).
        num_classes: Size of the soft label.
        masks: Kept-entry masks per parameter for the mask-aware attacker (``None``: naive).
        iters: L-BFGS steps (each step runs up to ``max_iter`` loss evaluations).
        snapshot_every: Keep the dummy input every this many steps.
        seed: Seed for the dummy initialization (standard normal, as in the original).
        device: Where to run (default: the model's device).
        loss_fn: The client's training loss (see :class:`GradientMatcher`).
        lbfgs_options: Keyword arguments for ``torch.optim.LBFGS`` (defaults as in the original).
        stop_when_stuck: End a start once two L-BFGS steps in a row leave every variable
            bit-for-bit unchanged (later steps would repeat them exactly).
        restarts: Extra random starts allowed when a start stops or diverges with its loss above
            ``restart_above`` times the distance of an all-zero dummy gradient. All starts share
            the ``iters`` budget and the best (lowest loss) is returned, so the attacker uses
            only what it can see. ``0`` is the original single-start DLG.
        restart_above: Relative loss above which a stopped start counts as failed.
        plateau_window: A start whose loss stays above that level and does not halve within
            this many steps is abandoned for a new one while restarts and budget remain
            (0: never).
        distance: ``"l2"`` (the original) or ``"l2-layer"`` (per-tensor normalized, see
            :class:`GradientMatcher`).

    Returns:
        :class:`AttackResult`; the reconstruction is the iterate with the lowest matching loss.
    """
    shape = _normalize_shape(input_shape)
    if distance == "cosine":
        raise ValueError("L-BFGS attacks match with 'l2' or 'l2-layer'; use inverting_gradients")
    matcher = GradientMatcher(model, observed, masks, distance, loss_fn)
    return _lbfgs_inversion(
        "dlg",
        matcher,
        shape,
        num_classes,
        None,
        iters,
        snapshot_every,
        seed,
        _device_of(model, device),
        lbfgs_options,
        stop_when_stuck,
        restarts,
        restart_above,
        plateau_window,
    )


def idlg(
    model: nn.Module,
    observed: GradientLike,
    input_shape: Sequence[int],
    num_classes: int,
    *,
    masks: Optional[GradientLike] = None,
    label: Optional[torch.Tensor] = None,
    iters: int = 300,
    snapshot_every: int = 10,
    seed: Optional[int] = None,
    device=None,
    loss_fn: Callable = soft_cross_entropy,
    lbfgs_options: Optional[dict] = None,
    stop_when_stuck: bool = True,
    restarts: int = 3,
    restart_above: float = 1e-3,
    plateau_window: int = 50,
    distance: str = "l2",
) -> AttackResult:
    """Improved DLG: labels from :func:`infer_labels`, then L-BFGS on the input only.

    Arguments as in :func:`dlg`; ``label`` overrides the inferred labels (e.g. a known label).
    ``details["inferred_label"]`` holds what the gradient revealed.
    """
    shape = _normalize_shape(input_shape)
    inferred = infer_labels(model, observed, shape[0])
    chosen = inferred if label is None else torch.as_tensor(label).long().reshape(shape[0])
    if distance == "cosine":
        raise ValueError("L-BFGS attacks match with 'l2' or 'l2-layer'; use inverting_gradients")
    matcher = GradientMatcher(model, observed, masks, distance, loss_fn)
    result = _lbfgs_inversion(
        "idlg",
        matcher,
        shape,
        num_classes,
        chosen,
        iters,
        snapshot_every,
        seed,
        _device_of(model, device),
        lbfgs_options,
        stop_when_stuck,
        restarts,
        restart_above,
        plateau_window,
    )
    result.details["inferred_label"] = inferred
    return result


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference between neighbouring pixels (anisotropic total variation)."""
    dy = (x[..., 1:, :] - x[..., :-1, :]).abs().mean()
    dx = (x[..., :, 1:] - x[..., :, :-1]).abs().mean()
    return dx + dy


def inverting_gradients(
    model: nn.Module,
    observed: GradientLike,
    input_shape: Sequence[int],
    num_classes: int,
    *,
    masks: Optional[GradientLike] = None,
    label: Optional[torch.Tensor] = None,
    iters: int = 1000,
    restarts: int = 2,
    lr: float = 0.1,
    tv_weight: float = 1e-4,
    boxed: bool = True,
    signed: bool = True,
    snapshot_every: int = 10,
    seed: Optional[int] = None,
    device=None,
    loss_fn: Callable = soft_cross_entropy,
) -> AttackResult:
    """Inverting-Gradients style attack: cosine distance + total variation, Adam, restarts.

    The label comes from :func:`infer_labels` unless given. Each restart starts from a fresh
    random input, runs Adam (with signed gradients, learning rate divided by 10 at 3/8, 5/8 and
    7/8 of the run) and keeps the input in ``[0, 1]`` when ``boxed``; the restart with the lowest
    final objective wins.

    Args:
        model, observed, input_shape, num_classes, masks, snapshot_every, device, loss_fn: As in
            :func:`dlg`.
        label: Known labels (``None``: inferred from the gradient).
        iters: Adam iterations per restart.
        restarts: Independent restarts.
        lr: Adam learning rate.
        tv_weight: Weight of the total-variation prior.
        boxed: Clamp the input to ``[0, 1]`` after every step.
        signed: Use the sign of the input gradient (as the original does).
        seed: Seed for the initializations.

    Returns:
        :class:`AttackResult` of the winning restart; ``details["restart_losses"]`` lists all.
    """
    start = time.perf_counter()
    shape = _normalize_shape(input_shape)
    dev = _device_of(model, device)
    inferred = infer_labels(model, observed, shape[0])
    chosen = (inferred if label is None else torch.as_tensor(label).long().reshape(shape[0])).to(
        dev
    )
    matcher = GradientMatcher(model, observed, masks, "cosine", loss_fn)
    gen = _generator(seed)
    milestones = [int(iters * f) for f in (3 / 8, 5 / 8, 7 / 8)]
    trials = []
    for restart in range(max(1, restarts)):
        init = torch.rand(shape, generator=gen) if boxed else torch.randn(shape, generator=gen)
        x = init.to(dev).requires_grad_(True)
        optimizer = torch.optim.Adam([x], lr=lr)
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, gamma=0.1)
        history: List[float] = []
        snapshots: List[Tuple[int, torch.Tensor]] = []
        status, message, done = STATUS_COMPLETED, f"ran {iters} Adam steps", 0
        last_finite = x.detach().clone()
        best = (math.inf, last_finite)
        for it in range(iters):
            optimizer.zero_grad()
            match = matcher(x, chosen)
            objective = match + tv_weight * total_variation(x) if tv_weight else match
            (grad,) = torch.autograd.grad(objective, [x])
            value = float(objective.detach())
            if not math.isfinite(value) or not _all_finite(grad):
                with torch.no_grad():
                    x.copy_(last_finite)
                status = STATUS_DIVERGED
                message = f"restart {restart} diverged at step {it}; kept the last finite input"
                break
            if value < best[0]:
                best = (value, x.detach().clone())
            x.grad = grad.sign() if signed else grad
            optimizer.step()
            scheduler.step()
            if boxed:
                with torch.no_grad():
                    x.clamp_(0.0, 1.0)
            last_finite = x.detach().clone()
            history.append(float(match.detach()))
            done = it + 1
            if it % snapshot_every == 0:
                snapshots.append((it, x.detach().cpu().clone()))
        final = float(
            (matcher(x, chosen, create_graph=False) + tv_weight * total_variation(x)).detach()
        )
        if math.isfinite(final) and final <= best[0]:
            best = (final, x.detach().clone())
        trials.append((best[0], best[1], history, snapshots, status, message, done))

    ranked = sorted(trials, key=lambda t: t[0] if math.isfinite(t[0]) else math.inf)
    best_loss, best_x, history, snapshots, status, message, done = ranked[0]
    return AttackResult(
        attack="ig",
        reconstruction=best_x.detach().cpu(),
        label=chosen.detach().cpu(),
        loss_history=history,
        snapshots=snapshots,
        status=status if math.isfinite(best_loss) else STATUS_DIVERGED,
        iterations=done,
        final_loss=best_loss,
        wall_time_s=time.perf_counter() - start,
        message=message,
        details={"restart_losses": [t[0] for t in trials], "inferred_label": inferred},
    )


#: Attack name -> function, all with the signature
#: ``fn(model, observed, input_shape, num_classes, *, masks, iters, snapshot_every, seed, device)``.
ATTACKS: Dict[str, Callable[..., AttackResult]] = {
    "dlg": dlg,
    "idlg": idlg,
    "ig": inverting_gradients,
}


def run_attack(name: str, model: nn.Module, observed, input_shape, num_classes, **options):
    """Run the attack called ``name`` (one of :data:`ATTACKS`)."""
    if name not in ATTACKS:
        raise ValueError(f"unknown attack {name!r}; choose from {sorted(ATTACKS)}")
    return ATTACKS[name](model, observed, input_shape, num_classes, **options)


__all__ = [
    "ATTACKS",
    "AttackResult",
    "GradientMatcher",
    "STATUS_COMPLETED",
    "STATUS_PLATEAU",
    "STATUS_STOPPED",
    "STATUS_DIVERGED",
    "dlg",
    "idlg",
    "infer_labels",
    "inverting_gradients",
    "run_attack",
    "total_variation",
]
