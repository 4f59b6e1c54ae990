"""Labels of a client's batch, read off the output layer's gradient (or update).

With softmax cross entropy and a batch-mean loss, the output bias gradient of one local step is

    g_c = mean_i p_ic - n_c / B          (p_i: the item's softmax output, n_c: items of class c)

so a class that occurs has ``g_c`` pulled down by ``1/B`` per item. Two rules use that:

* ``"sign"`` (iDLG, Zhao et al. 2020): the classes with negative ``g_c`` are present. Exact for one
  item; for a batch it misses classes whose items the model already predicts well and cannot
  count repeats.
* ``"count"`` (in the spirit of LLG+, Wainakh et al. 2022): estimate ``mean_i p_ic`` by the mean
  softmax output of the same model on probe inputs (random images of the input's shape, or a few
  public images), then solve for the counts ``n_c = B * (p_hat_c - g_c)``, rounded so that they are
  non-negative and sum to the number of items. Summed over ``K`` local SGD steps of ``B`` items the
  same rule gives the counts of all ``K * B`` items. Repeated and missing classes come out as they
  are; it is exact as long as ``B * |p_hat_c - mean_i p_ic| < 1/2``, which holds for a model early in
  training, whose outputs hardly depend on the input.

Without an output bias, the row sums of the output weight's gradient play the role of ``g``,
scaled by the mean feature sum of the probe inputs (features after ReLU/sigmoid are non-negative).
"""

from typing import Optional, Sequence, Tuple

import torch
from torch import nn

from sf_ext.dlg.gradients import GradientLike, align_to_parameters

LABEL_METHODS = ("count", "sign")


def _output_layer(model: nn.Module, grads) -> Tuple[int, Optional[int]]:
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
    return weight_idx, bias_idx if has_bias else None


class _FeatureTap:
    """Records the input of the output layer during one forward pass."""

    def __init__(self, model: nn.Module, weight_idx: int):
        param = list(model.parameters())[weight_idx]
        self.module = next(
            m for m in model.modules() if any(p is param for p in m.parameters(recurse=False))
        )
        self.features = None

    def __enter__(self):
        self.handle = self.module.register_forward_hook(self._hook)
        return self

    def _hook(self, module, inputs, output):
        self.features = inputs[0].detach()

    def __exit__(self, *exc):
        self.handle.remove()


def probe_outputs(
    model: nn.Module,
    input_shape: Sequence[int],
    probe: Optional[torch.Tensor] = None,
    num_probe: int = 64,
    seed: int = 0,
) -> Tuple[torch.Tensor, float]:
    """Mean softmax output and mean output-layer feature sum of ``model`` on probe inputs.

    Args:
        model: The attacked model.
        input_shape: Shape of one item (``[C, H, W]``) or of a batch (its first entry is dropped).
        probe: Inputs to use (e.g. a few public images); default ``num_probe`` uniform random
            images in ``[0, 1]``.
        num_probe: Number of random probe images.
        seed: Seed of the random probe images.
    """
    item_shape = tuple(input_shape)[-3:] if len(input_shape) >= 3 else tuple(input_shape)
    device = next(model.parameters()).device
    if probe is None:
        gen = torch.Generator().manual_seed(int(seed))
        probe = torch.rand((num_probe,) + item_shape, generator=gen)
    probe = torch.as_tensor(probe).float().to(device)
    grads = [p for p in model.parameters()]
    weight_idx, _ = _output_layer(model, grads)
    with torch.no_grad(), _FeatureTap(model, weight_idx) as tap:
        logits = model(probe)
    probs = torch.softmax(logits.float(), dim=-1).mean(dim=0).cpu()
    feature_sum = (
        float(tap.features.flatten(1).sum(dim=1).mean()) if tap.features is not None else 1.0
    )
    return probs, feature_sum


def round_counts(estimate: torch.Tensor, total: int) -> torch.Tensor:
    """Non-negative integer counts summing to ``total``, closest to a real-valued estimate
    (largest-remainder rounding of the clipped estimate)."""
    if total < 0:
        raise ValueError(f"total must be >= 0, got {total}")
    real = estimate.detach().double().clamp(min=0.0)
    counts = real.floor().long()
    deficit = total - int(counts.sum())
    remainder = real - counts.double()
    if deficit > 0:
        order = torch.argsort(remainder, descending=True)
        for i in range(deficit):
            counts[order[i % len(order)]] += 1
    elif deficit < 0:
        # Take items away where the estimate was least sure (smallest remainder), never below 0.
        order = torch.argsort(remainder)
        i = 0
        while deficit < 0:
            c = order[i % len(order)]
            if counts[c] > 0:
                counts[c] -= 1
                deficit += 1
            i += 1
    return counts


def labels_from_counts(counts: torch.Tensor) -> torch.Tensor:
    """Class indices, each repeated by its count, in class order."""
    return torch.repeat_interleave(torch.arange(len(counts)), counts.long())


def recover_label_counts(
    model: nn.Module,
    observed: GradientLike,
    items: int,
    batch_size: Optional[int] = None,
    input_shape: Optional[Sequence[int]] = None,
    probe: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Count of each class among the ``items`` images behind an observed gradient (``"count"``).

    Args:
        model: The attacked model at the weights the gradient was computed at.
        observed: Gradient per parameter: one batch's mean-loss gradient, or the sum of ``K`` such
            gradients over ``K`` local steps (``items = K * batch_size``).
        items: Number of images behind ``observed``.
        batch_size: Images per local step (default ``items``: one step).
        input_shape: Shape of one input image (for the random probe).
        probe: Inputs on which the model's mean output is estimated (see :func:`probe_outputs`).

    Returns:
        Long tensor ``[num_classes]`` of counts summing to ``items``.
    """
    if items < 1:
        raise ValueError(f"items must be >= 1, got {items}")
    batch_size = items if batch_size is None else int(batch_size)
    grads = align_to_parameters(model, observed)
    weight_idx, bias_idx = _output_layer(model, grads)
    if probe is None and input_shape is None:
        raise ValueError("give input_shape (shape of one image) or probe inputs")
    probs, feature_sum = probe_outputs(model, input_shape or tuple(probe.shape[1:]), probe)
    if bias_idx is not None:
        g = grads[bias_idx].detach().double().cpu()
    else:
        g = grads[weight_idx].detach().double().sum(dim=-1).cpu() / max(feature_sum, 1e-12)
    estimate = items * probs.double() - batch_size * g
    return round_counts(estimate, items)


def infer_labels(
    model: nn.Module,
    observed: GradientLike,
    batch_size: int = 1,
    method: str = "count",
    steps: int = 1,
    input_shape: Optional[Sequence[int]] = None,
    probe: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Labels of the ``steps * batch_size`` items behind an observed gradient.

    One item: the class with the most negative output-bias gradient (iDLG's rule, exact). More:
    ``method="count"`` (default) counts each class (:func:`recover_label_counts`) and returns
    the labels in class order; ``method="sign"`` returns the classes with negative gradient, most
    negative first, repeated to fill the batch (the earlier rule, kept as a baseline).

    Args:
        model: The attacked model; its last observed 2-D parameter is the output layer.
        observed: Gradient aligned with ``model.parameters()`` (or a name mapping); for several
            local steps, the sum of their gradients.
        batch_size: Items per local step.
        method: ``"count"`` or ``"sign"``.
        steps: Local steps behind ``observed``.
        input_shape: Shape of one input, ``[C, H, W]`` (``"count"`` needs it unless ``probe``
            is given).
        probe: Probe inputs for ``"count"``.

    Returns:
        Long tensor ``[steps * batch_size]``.
    """
    if method not in LABEL_METHODS:
        raise ValueError(f"label method must be one of {LABEL_METHODS}, got {method!r}")
    items = int(batch_size) * int(steps)
    if items < 1:
        raise ValueError(f"batch_size * steps must be >= 1, got {items}")
    grads = align_to_parameters(model, observed)
    weight_idx, bias_idx = _output_layer(model, grads)
    if bias_idx is not None:
        scores = grads[bias_idx].detach().float().cpu()
    else:
        scores = grads[weight_idx].detach().float().sum(dim=-1).cpu()
    if items == 1:
        return torch.argsort(scores)[:1].long()
    if method == "sign":
        order = torch.argsort(scores)
        present = [int(c) for c in order if scores[c] < 0] or [int(order[0])]
        return torch.tensor([present[i % len(present)] for i in range(items)], dtype=torch.long)
    if input_shape is None and probe is None:
        raise ValueError("the count rule needs input_shape=(C, H, W) of one item, or probe inputs")
    counts = recover_label_counts(model, grads, items, batch_size, input_shape, probe)
    return labels_from_counts(counts)


def label_counts(labels: Sequence[int], num_classes: int) -> torch.Tensor:
    """Counts per class of a label list."""
    return torch.bincount(torch.as_tensor(labels).long().reshape(-1), minlength=num_classes)


__all__ = [
    "LABEL_METHODS",
    "infer_labels",
    "label_counts",
    "labels_from_counts",
    "probe_outputs",
    "recover_label_counts",
    "round_counts",
]
