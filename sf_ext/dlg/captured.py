"""On-disk format of a captured client round, and its loader (no SecretFlow needed).

A capture folder holds ``capture.pt`` (tensors, read with :func:`torch.load`) and ``meta.json``
(the same scalar facts, readable by people). :class:`CapturedRound` rebuilds the client's model at
the moment it drew its first batch and recomputes that batch's gradient, which must equal the
recorded one: that is the check that the capture is what the client really computed.
"""

import importlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Union

import numpy as np
import torch
from torch import nn

from sf_ext.dlg.gradients import gradient_from_update, observe_gradient, soft_cross_entropy

CAPTURE_FILE = "capture.pt"
META_FILE = "meta.json"
FORMAT_VERSION = 1


def class_path(cls: type) -> str:
    """``module:qualname`` of the user's model class (SecretFlow wrappers are looked through)."""
    for klass in cls.__mro__:
        if "secretflow" in klass.__module__ or klass.__module__.startswith("torch"):
            continue
        if klass.__module__ == "sf_ext.models.secretflow_adapter":
            continue
        return f"{klass.__module__}:{klass.__qualname__}"
    return f"{cls.__module__}:{cls.__qualname__}"


def import_class(path: str) -> type:
    module_name, qualname = path.split(":", 1)
    target: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        target = getattr(target, part)
    return target


def _to_tensor(value) -> Optional[torch.Tensor]:
    if value is None:
        return None
    return torch.as_tensor(np.asarray(value) if not isinstance(value, torch.Tensor) else value)


@dataclass
class CapturedRound:
    """What one client computed and sent in one FL round.

    Attributes:
        meta: Scalars: strategy, party, epoch, step, optimizer name and learning rate, model class
            and constructor keywords, batch size, ...
        param_names: ``model.named_parameters()`` names, the order of :attr:`gradient`.
        state_names: ``state_dict`` names, the order of SecretFlow's weight lists.
        start_state: The client's ``state_dict`` when it drew its first batch of the round (after
            loading the global weights and, under pruning, applying its mask).
        x: The first batch's inputs, as the client's model received them.
        y: The first batch's targets, as the client's loss received them.
        gradient: Gradient of the loss on ``(x, y)`` at ``start_state``, per parameter, as it stood
            when the optimizer stepped.
        global_weights: The weights the client received for this round (state order; the client's
            own weights at an epoch's first step, where SecretFlow passes none).
        sent: The weight list the client returned to the aggregator (state order).
        sent_masks: Under ``fed_avg_w_prune``, the mask per sent tensor (``None``: never pruned);
            ``None`` for unpruned strategies.
        loss: The client's loss module (``None``: batch-mean cross entropy).
    """

    meta: Dict[str, Any]
    param_names: List[str]
    state_names: List[str]
    start_state: Dict[str, torch.Tensor]
    x: torch.Tensor
    y: torch.Tensor
    gradient: List[torch.Tensor]
    global_weights: List[torch.Tensor]
    sent: List[torch.Tensor]
    sent_masks: Optional[List[Optional[torch.Tensor]]] = None
    loss: Optional[Callable] = None
    path: Optional[Path] = field(default=None, compare=False)

    # --- model ----------------------------------------------------------------------------
    def build_model(self, model_fn: Optional[Callable[[], nn.Module]] = None) -> nn.Module:
        """The client's model at the start of the round (weights from :attr:`start_state`).

        Args:
            model_fn: Builds an untrained model of the right architecture. ``None``: import the
                class recorded in ``meta["model_class"]`` and call it with ``meta["model_kwargs"]``.
        """
        if model_fn is None:
            cls = import_class(self.meta["model_class"])
            model = cls(**self.meta.get("model_kwargs", {}))
        else:
            model = model_fn()
        model.load_state_dict({k: v.clone() for k, v in self.start_state.items()})
        return model

    def loss_fn(self) -> Callable:
        return self.loss if self.loss is not None else soft_cross_entropy

    def recompute_gradient(self, model: Optional[nn.Module] = None) -> List[torch.Tensor]:
        """Gradient of the recorded loss on the recorded batch at the recorded weights."""
        model = self.build_model() if model is None else model
        return observe_gradient(model, self.x, self.y, self.loss_fn())

    # --- what the attacker sees -----------------------------------------------------------
    def _state_to_params(self, tensors: List[Optional[torch.Tensor]]) -> List:
        by_name = dict(zip(self.state_names, tensors))
        return [by_name.get(name) for name in self.param_names]

    def update(self) -> List[torch.Tensor]:
        """Sent weights minus the client's starting weights, per parameter.

        Under ``fed_avg_w_prune`` the start is the masked global model, which the server can form
        itself (it holds the global model, and the zeros of an upload show the mask).
        """
        sent = [_to_tensor(s).float() for s in self.sent]
        start = [self.start_state[name].float() for name in self.state_names]
        return self._state_to_params([s - b for s, b in zip(sent, start)])

    def update_as_gradient(self, lr: Optional[float] = None) -> List[torch.Tensor]:
        """:meth:`update` read as a gradient: ``-update / lr`` (default: the recorded ``lr``).

        Exact for one plain SGD step (``aggregate_freq=1``, no momentum); otherwise an
        approximation whose direction the cosine attack can still use.
        """
        lr = self.meta.get("lr") if lr is None else lr
        return gradient_from_update(self.update(), lr)

    def masks(self) -> List[Optional[torch.Tensor]]:
        """Per-parameter kept masks of the upload (``None`` entries: not pruned)."""
        if self.sent_masks is None:
            return [None] * len(self.param_names)
        return self._state_to_params(
            [None if m is None else _to_tensor(m).bool() for m in self.sent_masks]
        )

    @property
    def input_shape(self):
        return tuple(self.x.shape)

    @property
    def labels(self) -> torch.Tensor:
        """Class indices of the batch (one-hot targets are decoded)."""
        return self.y.argmax(dim=-1) if self.y.dim() > 1 else self.y.long()


def save_capture(record: Dict[str, Any], out_dir: Union[str, Path]) -> Path:
    """Write a capture (the dictionary a capture strategy returns) to ``out_dir``.

    Returns:
        The folder written (created if needed).
    """
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    payload = dict(record)
    payload["format_version"] = FORMAT_VERSION
    torch.save(payload, folder / CAPTURE_FILE)
    meta = dict(record.get("meta", {}))
    meta["format_version"] = FORMAT_VERSION
    meta["x_shape"] = list(np.shape(record["x"]))
    meta["y_shape"] = list(np.shape(record["y"]))
    meta["files"] = [CAPTURE_FILE, META_FILE]
    (folder / META_FILE).write_text(json.dumps(meta, indent=2, default=str) + "\n")
    return folder


def load_capture(path: Union[str, Path]) -> CapturedRound:
    """Read a capture folder (or its ``capture.pt``) written by :func:`save_capture`."""
    path = Path(path)
    file = path / CAPTURE_FILE if path.is_dir() else path
    if not file.exists():
        raise FileNotFoundError(f"no {CAPTURE_FILE} at {path}")
    data = torch.load(file, map_location="cpu")
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(f"{file}: capture format {version!r}, this reader knows {FORMAT_VERSION}")
    masks = data.get("sent_masks")
    return CapturedRound(
        meta=dict(data["meta"]),
        param_names=list(data["param_names"]),
        state_names=list(data["state_names"]),
        start_state={k: _to_tensor(v) for k, v in data["start_state"].items()},
        x=_to_tensor(data["x"]).float(),
        y=_to_tensor(data["y"]),
        gradient=[_to_tensor(g) for g in data["gradient"]],
        global_weights=[_to_tensor(w) for w in data["global_weights"]],
        sent=[_to_tensor(s) for s in data["sent"]],
        sent_masks=None if masks is None else [_to_tensor(m) for m in masks],
        loss=data.get("loss"),
        path=file.parent,
    )


__all__ = [
    "CAPTURE_FILE",
    "CapturedRound",
    "META_FILE",
    "class_path",
    "import_class",
    "load_capture",
    "save_capture",
]
