"""Gradient-inversion attacks: DLG, iDLG, Inverting Gradients and optimizer-aware multi-step.

All reconstruct a client's inputs by optimizing dummy inputs until what they would produce matches
what the attacker observed:

* :func:`dlg` (Zhu et al., 2019): dummy input and soft label, L-BFGS, gradient distance.
* :func:`idlg` (Zhao et al., 2020): labels read off the output layer first
  (:func:`sf_ext.dlg.labels.infer_labels`), then L-BFGS on the input only.
* :func:`inverting_gradients` (Geiping et al., 2020): cosine distance plus total variation, Adam
  with signed gradients, input kept in ``[0, 1]``, restarts.
* :func:`multistep` (in the style of Dimitrov et al., 2022, "Data Leakage in Federated
  Averaging"): the observation is a weight *update* after ``K`` local steps of SGD, SGD with
  momentum or Adam; the attack simulates those steps on dummy batches
  (:func:`sf_ext.dlg.local_training.simulate_update`) and matches the simulated update. With
  several :class:`ClientModel` entries it attacks an aggregate (the weighted sum of several
  clients' updates that a server holds under secure aggregation).

The first three take a gradient; a one-step SGD update reads as one through
:func:`sf_ext.dlg.gradients.gradient_from_update`, and :func:`multistep` with one plain SGD step is
the same attack as :func:`inverting_gradients`. Every attack compares tensors with the distance in
its :class:`~sf_ext.dlg.options.AttackOptions` (per-layer normalized ``l2-layer`` and
``cosine-layer`` included), on all entries (naive attacker, ``masks=None``) or only on the kept
entries of a pruned observation (mask-aware attacker).

Every attack returns an :class:`AttackResult`. A diverged run (non-finite loss or input) stops,
keeps the last finite input and says so in ``status``; it never returns a NaN image.
"""

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from sf_ext.dlg.distance import TensorDistance, total_variation
from sf_ext.dlg.gradients import GradientLike, align_to_parameters, soft_cross_entropy
from sf_ext.dlg.labels import infer_labels, labels_from_counts, recover_label_counts
from sf_ext.dlg.local_training import OptimizerSpec, equivalent_gradient_sum, simulate_update
from sf_ext.dlg.options import AttackOptions, options_from

STATUS_COMPLETED = "completed"  # ran all iterations
STATUS_STOPPED = "stopped"  # the optimizer stopped moving (later steps would change nothing)
STATUS_PLATEAU = "plateau"  # a start stalled at a high loss and was abandoned for a new one
STATUS_DIVERGED = "diverged"  # non-finite loss or input; the last finite input is returned


@dataclass
class AttackResult:
    """Outcome of one gradient-inversion run.

    Attributes:
        attack: Attack name (``"dlg"``, ``"idlg"``, ``"ig"``, ``"multistep"``).
        reconstruction: Reconstructed inputs ``[N, C, H, W]`` (detached, CPU). Raw optimizer
            values: DLG's input is unconstrained, so clamp to ``[0, 1]`` before display or metrics.
        label: Recovered class index per reconstructed item, ``[N]``.
        loss_history: Matching loss after each iteration (of the returned start).
        snapshots: ``(iteration, inputs)`` pairs taken every ``snapshot_every`` iterations.
        status: How the returned start ended: ``"completed"``, ``"stopped"`` (L-BFGS stopped
            moving), ``"plateau"`` (stalled at a high loss and abandoned) or ``"diverged"``.
        iterations: Iterations actually run (all starts together for L-BFGS).
        final_loss: Matching loss of ``reconstruction``.
        wall_time_s: Wall-clock seconds of the attack.
        message: Human-readable note (why it stopped).
        details: Attack-specific extras (soft label, per-restart losses, inferred labels, ...).
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

    @property
    def seconds_per_iteration(self) -> float:
        return self.wall_time_s / max(1, self.iterations)


class GradientMatcher:
    """Distance between the gradient a dummy batch produces and the observed gradient.

    Args:
        model: The model the client trained (its current weights are the ones attacked).
        observed: Observed gradient, one tensor per parameter (``None``: not observed, ignored).
        masks: Optional boolean masks per parameter; when given, only kept entries are compared
            (the mask-aware attacker). ``None`` entries compare the whole tensor.
        distance: See :class:`sf_ext.dlg.distance.TensorDistance`.
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
        self.model = model
        self.loss_fn = loss_fn
        params = list(model.parameters())
        targets = align_to_parameters(model, observed, dtype=params[0].dtype)
        self.distance = TensorDistance(targets, align_to_parameters(model, masks), distance)
        self.params = self.distance.select(params)
        #: The distance of an all-zero dummy gradient: what "a large loss" is relative to.
        self.reference_loss = self.distance.reference
        for p in self.params:
            p.requires_grad_(True)

    def dummy_gradient(self, x: torch.Tensor, target: torch.Tensor, create_graph: bool = True):
        loss = self.loss_fn(self.model(x), target)
        return torch.autograd.grad(loss, self.params, create_graph=create_graph)

    def __call__(self, x: torch.Tensor, target: torch.Tensor, create_graph: bool = True):
        """Gradient distance of dummy input ``x`` with label ``target`` (indices or soft labels)."""
        return self.distance(self.dummy_gradient(x, target, create_graph), selected=True)


def _normalize_shape(input_shape: Sequence[int]) -> Tuple[int, ...]:
    shape = tuple(int(s) for s in input_shape)
    if len(shape) == 3:  # a single image without batch dimension
        shape = (1,) + shape
    if len(shape) < 2 or shape[0] < 1:
        raise ValueError(f"input_shape must include a batch dimension >= 1, got {input_shape!r}")
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


# --- L-BFGS (DLG, iDLG) ------------------------------------------------------------------------
@dataclass
class _Attempt:
    """One L-BFGS start: its best iterate and how it ended."""

    loss: float
    x: torch.Tensor
    logits: Optional[torch.Tensor]
    status: str
    message: str
    steps: int


@dataclass
class _LbfgsRun:
    """What every start of one L-BFGS inversion shares."""

    matcher: GradientMatcher
    shape: Tuple[int, ...]
    num_classes: int
    fixed_label: Optional[torch.Tensor]
    options: AttackOptions
    gen: torch.Generator
    device: torch.device
    bad_loss: float
    history: List[float] = field(default_factory=list)
    snapshots: List[Tuple[int, torch.Tensor]] = field(default_factory=list)


def _lbfgs_attempt(run: _LbfgsRun, budget: int, offset: int, plateau_window: int) -> _Attempt:
    """Run L-BFGS from a fresh random dummy for at most ``budget`` steps.

    Iterations are counted from ``offset`` so that several attempts share one timeline. With
    ``plateau_window > 0`` the start is abandoned when its best loss is above ``run.bad_loss`` and
    has not halved over the last ``plateau_window`` steps, provided at least ``plateau_window``
    steps of budget remain for another start.
    """
    matcher, opts = run.matcher, run.options
    x = torch.randn(run.shape, generator=run.gen).to(run.device).requires_grad_(True)
    variables = [x]
    label_logits = None
    if run.fixed_label is None:
        label_logits = torch.randn((run.shape[0], run.num_classes), generator=run.gen)
        label_logits = label_logits.to(run.device).requires_grad_(True)
        variables.append(label_logits)
    optimizer = torch.optim.LBFGS(variables, **(opts.lbfgs_options or {}))

    def target():
        return run.fixed_label if label_logits is None else F.softmax(label_logits, dim=-1)

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
            run.history.append(loss_before)  # the loss after the previous step
        steps = it + 1
        if (offset + it) % opts.snapshot_every == 0:
            run.snapshots.append((offset + it, x.detach().cpu().clone()))
        best_by_step.append(best_loss)
        if (
            plateau_window > 0
            and it >= plateau_window
            and budget - steps >= plateau_window
            and best_loss > run.bad_loss
            and best_loss > 0.5 * best_by_step[it - plateau_window]
        ):
            # Successful starts fall by orders of magnitude within tens of steps; one that has
            # not even halved its loss for a whole window is stuck in a poor basin.
            status = STATUS_PLATEAU
            message = f"start abandoned on a plateau after {offset + it + 1} steps"
            break
        moved = not all(torch.equal(v.detach(), old) for v, old in zip(variables, before))
        stuck_steps = 0 if moved or it == 0 else stuck_steps + 1
        if stuck_steps >= 2 and opts.stop_when_stuck:
            # Two L-BFGS steps in a row left every variable unchanged: from the second one on its
            # curvature memory is fixed too, so every later step would repeat it exactly;
            # stopping changes nothing but the wall time.
            status = STATUS_STOPPED
            message = f"L-BFGS stopped moving after {offset + it + 1} steps"
            break
    if status != STATUS_DIVERGED:
        final = float(matcher(x, target(), create_graph=False).detach())
        if math.isfinite(final):
            run.history.append(final)
            if final <= best_loss:
                best_loss, (best_x, best_logits) = final, snapshot()[:2]
    return _Attempt(best_loss, best_x, best_logits, status, message, steps)


def _lbfgs_inversion(
    attack: str,
    matcher: GradientMatcher,
    shape: Tuple[int, ...],
    num_classes: int,
    fixed_label: Optional[torch.Tensor],
    options: AttackOptions,
    device: torch.device,
) -> AttackResult:
    """L-BFGS on the dummy input (and soft label when ``fixed_label`` is None), restarting from a
    new random dummy while a start stops or diverges at a high loss and steps remain."""
    start = time.perf_counter()
    run = _LbfgsRun(
        matcher=matcher,
        shape=shape,
        num_classes=num_classes,
        fixed_label=None if fixed_label is None else fixed_label.to(device),
        options=options,
        gen=_generator(options.seed),
        device=device,
        # What "stuck at a bad point" means, relative to the size of what is matched.
        bad_loss=options.restart_above * matcher.reference_loss,
    )
    attempts: List[_Attempt] = []
    used = 0
    while used < options.iters:
        window = options.plateau_window if len(attempts) < options.restarts else 0
        attempt = _lbfgs_attempt(run, options.iters - used, used, window)
        attempts.append(attempt)
        used += max(1, attempt.steps)
        good = math.isfinite(attempt.loss) and attempt.loss <= run.bad_loss
        if good or attempt.status == STATUS_COMPLETED or len(attempts) > options.restarts:
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
        "distance": matcher.distance.distance,
    }
    if run.fixed_label is None:
        soft = F.softmax(best.logits, dim=-1).cpu()
        label = soft.argmax(dim=-1)
        details["soft_label"] = soft
    else:
        label = run.fixed_label.detach().cpu()
    return AttackResult(
        attack=attack,
        reconstruction=best.x.cpu(),
        label=label,
        loss_history=run.history,
        snapshots=run.snapshots,
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
    masks: Optional[GradientLike] = None,
    options: Optional[AttackOptions] = None,
    loss_fn: Callable = soft_cross_entropy,
    **overrides,
) -> AttackResult:
    """Deep Leakage from Gradients: optimize a dummy input and soft label with L-BFGS.

    Args:
        model: The attacked model with the weights the gradient was computed at.
        observed: Observed gradient, one tensor per ``model.parameters()`` entry (or name mapping).
        input_shape: ``[B, C, H, W]`` (or ``[C, H, W]`` for one image).
        num_classes: Size of the soft label.
        masks: Kept-entry masks per parameter for the mask-aware attacker (``None``: naive).
        options: How to search (:class:`~sf_ext.dlg.options.AttackOptions`; defaults: 300
            L-BFGS steps shared by up to 4 starts, ``l2`` distance). The best start (lowest
            matching loss, which the attacker can see) is returned; ``restarts=0`` is the original
            single-start DLG.
        loss_fn: The client's training loss (see :class:`GradientMatcher`).
        **overrides: Fields of ``options`` to change for this call (e.g. ``iters=20, seed=0``).

    Returns:
        :class:`AttackResult`; the reconstruction is the iterate with the lowest matching loss.
    """
    opts = options_from(options, overrides).resolved("dlg")
    shape = _normalize_shape(input_shape)
    matcher = GradientMatcher(model, observed, masks, opts.distance, loss_fn)
    return _lbfgs_inversion(
        "dlg", matcher, shape, num_classes, None, opts, _device_of(model, opts.device)
    )


def _chosen_labels(
    model, observed, shape, label, label_method
) -> Tuple[torch.Tensor, torch.Tensor]:
    inferred = infer_labels(
        model, observed, shape[0], method=label_method, input_shape=shape[1:]
    ).reshape(-1)
    chosen = inferred if label is None else torch.as_tensor(label).long().reshape(shape[0])
    return inferred, chosen


def idlg(
    model: nn.Module,
    observed: GradientLike,
    input_shape: Sequence[int],
    num_classes: int,
    masks: Optional[GradientLike] = None,
    label: Optional[torch.Tensor] = None,
    options: Optional[AttackOptions] = None,
    loss_fn: Callable = soft_cross_entropy,
    **overrides,
) -> AttackResult:
    """Improved DLG: labels from :func:`~sf_ext.dlg.labels.infer_labels`, then L-BFGS on the input.

    Arguments as in :func:`dlg`; ``label`` overrides the inferred labels (e.g. a known label);
    ``options.label_method`` chooses the batch rule (``"count"`` or ``"sign"``).
    ``details["inferred_label"]`` holds what the gradient revealed.
    """
    opts = options_from(options, overrides).resolved("idlg")
    shape = _normalize_shape(input_shape)
    inferred, chosen = _chosen_labels(model, observed, shape, label, opts.label_method)
    matcher = GradientMatcher(model, observed, masks, opts.distance, loss_fn)
    result = _lbfgs_inversion(
        "idlg", matcher, shape, num_classes, chosen, opts, _device_of(model, opts.device)
    )
    result.details["inferred_label"] = inferred
    return result


# --- first-order searches (Inverting Gradients, multi-step) ------------------------------------
def _first_order_search(
    attack: str,
    objective: Callable[[torch.Tensor], Tuple[torch.Tensor, torch.Tensor]],
    shape: Tuple[int, ...],
    labels: torch.Tensor,
    options: AttackOptions,
    device: torch.device,
    details: Dict[str, object],
) -> AttackResult:
    """Adam on the dummy input with restarts; ``objective(x, progress) -> (match, total)``, where
    ``total`` adds the image prior and ``progress`` runs from 0 to 1 over a restart. The restart
    with the lowest final objective wins."""
    start = time.perf_counter()
    gen = _generator(options.seed)
    iters = options.iters
    milestones = [int(iters * f) for f in (3 / 8, 5 / 8, 7 / 8)]
    trials = []
    for restart in range(max(1, options.restarts)):
        init = (
            torch.rand(shape, generator=gen) if options.boxed else torch.randn(shape, generator=gen)
        )
        x = init.to(device).requires_grad_(True)
        optimizer = torch.optim.Adam([x], lr=options.lr)
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, gamma=0.1)
        history: List[float] = []
        snapshots: List[Tuple[int, torch.Tensor]] = []
        status, message, done = STATUS_COMPLETED, f"ran {iters} Adam steps", 0
        last_finite = x.detach().clone()
        best = (math.inf, last_finite, math.inf)
        for it in range(iters):
            optimizer.zero_grad()
            match, total = objective(x, it / iters)
            (grad,) = torch.autograd.grad(total, [x])
            value = float(total.detach())
            if not math.isfinite(value) or not _all_finite(grad):
                with torch.no_grad():
                    x.copy_(last_finite)
                status = STATUS_DIVERGED
                message = f"restart {restart} diverged at step {it}; kept the last finite input"
                break
            if value < best[0]:
                best = (value, x.detach().clone(), float(match.detach()))
            if it % options.snapshot_every == 0:
                snapshots.append((it, x.detach().cpu().clone()))
            x.grad = grad.sign() if options.signed else grad
            optimizer.step()
            scheduler.step()
            if options.boxed:
                with torch.no_grad():
                    x.clamp_(0.0, 1.0)
            last_finite = x.detach().clone()
            history.append(float(match.detach()))
            done = it + 1
        match, total = objective(x, 1.0)
        final = float(total.detach())
        if math.isfinite(final) and final <= best[0]:
            best = (final, x.detach().clone(), float(match.detach()))
        trials.append((best, history, snapshots, status, message, done))

    ranked = sorted(trials, key=lambda t: t[0][0] if math.isfinite(t[0][0]) else math.inf)
    (best_total, best_x, best_match), history, snapshots, status, message, done = ranked[0]
    details = {
        **details,
        "restart_losses": [t[0][0] for t in trials],
        "match_loss": best_match,
        "input_abs_max": float(best_x.abs().max()),
    }
    return AttackResult(
        attack=attack,
        reconstruction=best_x.detach().cpu(),
        label=labels.detach().cpu(),
        loss_history=history,
        snapshots=snapshots,
        status=status if math.isfinite(best_total) else STATUS_DIVERGED,
        iterations=sum(t[5] for t in trials),
        final_loss=best_total,
        wall_time_s=time.perf_counter() - start,
        message=message + (f" (best of {len(trials)} restarts)" if len(trials) > 1 else ""),
        details=details,
    )


def inverting_gradients(
    model: nn.Module,
    observed: GradientLike,
    input_shape: Sequence[int],
    num_classes: int,
    masks: Optional[GradientLike] = None,
    label: Optional[torch.Tensor] = None,
    options: Optional[AttackOptions] = None,
    loss_fn: Callable = soft_cross_entropy,
    **overrides,
) -> AttackResult:
    """Inverting-Gradients style attack: cosine distance + total variation, Adam, restarts.

    The labels come from :func:`~sf_ext.dlg.labels.infer_labels` unless given. Each restart
    starts from a uniform random input, runs Adam (signed gradients by default, learning rate
    divided by 10 at 3/8, 5/8 and 7/8 of the run) and keeps the input in ``[0, 1]`` when
    ``boxed``; the restart with the lowest final objective wins. The distance defaults to
    ``cosine-layer`` (each tensor's cosine counts equally); ``distance="cosine"`` is the original
    single cosine over all tensors joined.

    Arguments as in :func:`idlg` (defaults: 1000 Adam steps, 2 restarts, lr 0.1, TV 1e-4).

    Returns:
        :class:`AttackResult` of the winning restart; ``details["restart_losses"]`` lists all.
    """
    opts = options_from(options, overrides).resolved("ig")
    shape = _normalize_shape(input_shape)
    dev = _device_of(model, opts.device)
    inferred, chosen = _chosen_labels(model, observed, shape, label, opts.label_method)
    chosen = chosen.to(dev)
    matcher = GradientMatcher(model, observed, masks, opts.distance, loss_fn)

    def objective(x, progress):
        match = matcher(x, chosen)
        return match, (match + opts.tv_weight * total_variation(x) if opts.tv_weight else match)

    return _first_order_search(
        "ig",
        objective,
        shape,
        chosen,
        opts,
        dev,
        {"inferred_label": inferred, "distance": opts.distance},
    )


@dataclass
class ClientModel:
    """What the attacker assumes about one client whose update is in the observation.

    Attributes:
        batch_size: Items per local step.
        steps: Local optimizer steps in the round.
        weight: How the client's update enters the observation: a number (e.g. ``n_i / N`` in a
            FedAvg mean) or one tensor (or ``None`` for 1) per parameter (per-coordinate weights
            of a mask-aware average).
        train_masks: Masks the client holds during training (``fed_avg_w_prune``), per parameter.
        labels: The client's ``steps * batch_size`` labels, if known (else recovered).
        name: Label for reports.
    """

    batch_size: int
    steps: int = 1
    weight: Union[float, Sequence[Optional[torch.Tensor]]] = 1.0
    train_masks: Optional[Sequence[Optional[torch.Tensor]]] = None
    labels: Optional[torch.Tensor] = None
    name: str = "client"

    @property
    def items(self) -> int:
        return self.batch_size * self.steps

    def __post_init__(self):
        if self.batch_size < 1 or self.steps < 1:
            raise ValueError(
                f"batch_size and steps must be >= 1, got {self.batch_size} and {self.steps}"
            )


def _weights_per_param(weight, count: int) -> List[Optional[torch.Tensor]]:
    if isinstance(weight, (int, float)):
        return [float(weight)] * count
    weight = list(weight)
    if len(weight) != count:
        raise ValueError(f"{len(weight)} weights for {count} parameters")
    return [1.0 if w is None else w for w in weight]


def _multistep_labels(
    model: nn.Module,
    update: List[Optional[torch.Tensor]],
    clients: Sequence[ClientModel],
    optimizer: OptimizerSpec,
    item_shape: Tuple[int, ...],
    label_method: str,
) -> Tuple[torch.Tensor, str]:
    """Labels for every client's items: given, or counted from the observed update.

    The observation is read as a sum of per-step gradients (:func:`equivalent_gradient_sum`):
    clients with scalar weights ``n_i / N`` that all run ``K`` steps make it ``K`` gradients of
    the union's mean loss, so the union's counts follow; they are dealt to the clients in turn.
    Adam's update has lost the magnitudes, so the classes whose output bias moved up (negative
    gradient) are taken as present (the ``sign`` rule).
    """
    if all(c.labels is not None for c in clients):
        return torch.cat([torch.as_tensor(c.labels).long().reshape(-1) for c in clients]), "given"
    total = sum(c.items for c in clients)
    steps = max(c.steps for c in clients)
    as_gradient = equivalent_gradient_sum(update, optimizer, steps)
    if as_gradient is None or label_method == "sign":
        source = update if as_gradient is None else as_gradient
        flipped = [None if u is None else -u for u in source] if as_gradient is None else source
        labels = infer_labels(model, flipped, total, method="sign")
        how = "sign"
    else:
        counts = recover_label_counts(
            model, as_gradient, total, batch_size=total // steps, input_shape=item_shape
        )
        labels = labels_from_counts(counts)
        # Deal sorted labels round-robin so every client gets a spread of classes.
        order = torch.argsort(torch.arange(total) % len(clients), stable=True)
        dealt = torch.empty_like(labels)
        dealt[order] = labels
        labels, how = dealt, "count"
    return labels, how


def multistep(
    model: nn.Module,
    update: GradientLike,
    input_shape: Sequence[int],
    num_classes: int,
    optimizer: OptimizerSpec,
    steps: int = 1,
    masks: Optional[GradientLike] = None,
    label: Optional[torch.Tensor] = None,
    options: Optional[AttackOptions] = None,
    loss_fn: Callable = soft_cross_entropy,
    clients: Optional[Sequence[ClientModel]] = None,
    **overrides,
) -> AttackResult:
    """Optimizer-aware inversion of a weight update after ``steps`` local steps.

    The dummy holds every item the client trained on in the round (``steps`` batches of
    ``input_shape[0]``); each iteration simulates the client's local training on it with the
    client's optimizer (:func:`~sf_ext.dlg.local_training.simulate_update`: SGD, momentum, Adam,
    the training masks re-applied after every step) and compares the simulated update with the
    observed one (default ``cosine-layer``, plus total variation). The batch partition of the
    items is taken in order; labels are counted from the output-bias update when not given.

    Args:
        model: The architecture with the weights the round started from.
        update: Observed weights after the round minus the starting weights, per parameter (or
            for ``clients``: the observed combination of their updates).
        input_shape: One local batch, ``[B, C, H, W]``.
        num_classes: Number of classes.
        optimizer: The client's optimizer (state ``None``: fresh, as in a first round).
        steps: Local steps in the round.
        masks: Kept entries of the observation for the mask-aware attacker (``None``: all); they
            are also held during the simulated training unless ``clients`` say otherwise.
        label: Labels of all ``steps * B`` items, if known.
        options: How to search (defaults: 1000 Adam steps, 2 restarts, ``cosine-layer``).
        loss_fn: The client's loss.
        clients: For an aggregate: one :class:`ClientModel` per client whose update is in the
            observation (batch size, steps, weight in the combination, training masks). Default:
            one client with ``input_shape[0]``, ``steps``, weight 1 and ``masks``.
        **overrides: Fields of ``options`` for this call.

    Returns:
        :class:`AttackResult` with all items reconstructed, clients in order.
        ``details`` has the label source, the optimizer simulated and per-client item ranges.
    """
    opts = options_from(options, overrides).resolved("multistep")
    shape = _normalize_shape(input_shape)
    item_shape = shape[1:]
    dev = _device_of(model, opts.device)
    params = list(model.parameters())
    observed = align_to_parameters(model, update, dtype=params[0].dtype)
    mask_list = align_to_parameters(model, masks)
    if clients is None:
        clients = [ClientModel(shape[0], steps, 1.0, mask_list, label, name="client")]
    clients = list(clients)
    if label is not None:
        labels, label_source = torch.as_tensor(label).long().reshape(-1), "given"
    else:
        labels, label_source = _multistep_labels(
            model, observed, clients, optimizer, item_shape, opts.label_method
        )
    labels = labels.to(dev)
    total = sum(c.items for c in clients)
    if labels.numel() != total:
        raise ValueError(f"{labels.numel()} labels for {total} items")
    distance = TensorDistance(observed, mask_list, opts.distance)
    start = [p.detach() for p in params]
    weights = [_weights_per_param(c.weight, len(params)) for c in clients]
    client_masks = [
        None if c.train_masks is None else align_to_parameters(model, c.train_masks)
        for c in clients
    ]
    ranges, offset = [], 0
    for c in clients:
        ranges.append((offset, offset + c.items))
        offset += c.items

    def simulate(x: torch.Tensor, soft_sign: float) -> List[torch.Tensor]:
        combined: List[Optional[torch.Tensor]] = [None] * len(params)
        for c, (lo, hi), w, m in zip(clients, ranges, weights, client_masks):
            batches = [
                (
                    x[lo + k * c.batch_size : lo + (k + 1) * c.batch_size],
                    labels[lo + k * c.batch_size : lo + (k + 1) * c.batch_size],
                )
                for k in range(c.steps)
            ]
            delta = simulate_update(
                model,
                batches,
                optimizer,
                start=start,
                loss_fn=loss_fn,
                masks=m,
                soft_sign=soft_sign,
            )
            for i, (d, wi) in enumerate(zip(delta, w)):
                term = d * wi
                combined[i] = term if combined[i] is None else combined[i] + term
        return combined

    def objective(x, progress):
        # Adam: start from a smooth stand-in and sharpen it to the exact update by 3/4 of the run.
        soft = opts.soft_sign * max(0.0, 1.0 - progress / 0.75) ** 2
        match = distance(simulate(x, soft))
        return match, (match + opts.tv_weight * total_variation(x) if opts.tv_weight else match)

    return _first_order_search(
        "multistep",
        objective,
        (total,) + item_shape,
        labels,
        opts,
        dev,
        {
            "label_source": label_source,
            "optimizer": optimizer.describe(),
            "clients": [(c.name, lo, hi) for c, (lo, hi) in zip(clients, ranges)],
            "distance": opts.distance,
        },
    )


#: Attack name -> function. Gradient attacks take ``(model, observed, input_shape, num_classes,
#: masks=..., options=..., loss_fn=...)``; ``multistep`` also needs ``optimizer`` (and ``steps``).
ATTACKS: Dict[str, Callable[..., AttackResult]] = {
    "dlg": dlg,
    "idlg": idlg,
    "ig": inverting_gradients,
    "multistep": multistep,
}


def run_attack(name: str, model: nn.Module, observed, input_shape, num_classes, **kwargs):
    """Run the attack called ``name`` (one of :data:`ATTACKS`)."""
    if name not in ATTACKS:
        raise ValueError(f"unknown attack {name!r}; choose from {sorted(ATTACKS)}")
    return ATTACKS[name](model, observed, input_shape, num_classes, **kwargs)


__all__ = [
    "ATTACKS",
    "AttackResult",
    "ClientModel",
    "GradientMatcher",
    "STATUS_COMPLETED",
    "STATUS_PLATEAU",
    "STATUS_STOPPED",
    "STATUS_DIVERGED",
    "dlg",
    "idlg",
    "infer_labels",
    "inverting_gradients",
    "multistep",
    "run_attack",
    "total_variation",
]
