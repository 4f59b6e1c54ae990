"""On-disk format of a captured FL round, and its loader (no SecretFlow needed).

A *client capture* folder holds ``capture.pt`` (tensors, read with :func:`torch.load`) and
``meta.json`` (the same scalar facts, readable by people): what one client computed and sent in
one round. A *round* folder (written by :class:`sf_ext.dlg.capture.RoundCapture`) holds one client
capture per party in a sub-folder named after it, plus ``server.pt``: what the server held after
aggregating that round (every upload under plain aggregation; the weighted mean under
``SecureAggregator``; the two secure sums, numerators and per-coordinate counts, under
``SecurePruneAggregator``), and ``round.json``.

:class:`CapturedRound` rebuilds a client's model at the moment it drew its first batch and
recomputes that batch's gradient, which must equal the recorded one: the check that the capture
is what the client really computed.
"""

import importlib
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Union

import numpy as np
import torch
from torch import nn

from sf_ext.dlg.gradients import gradient_from_update, observe_gradient, soft_cross_entropy
from sf_ext.dlg.local_training import OptimizerSpec

CAPTURE_FILE = "capture.pt"
META_FILE = "meta.json"
SERVER_FILE = "server.pt"
ROUND_FILE = "round.json"
FORMAT_VERSION = 2


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
    """The class named by a ``module:qualname`` path."""
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
        meta: Scalars: strategy, party, epoch, step, local steps, optimizer name and its
            hyperparameters, model class and constructor keywords, batch size, sample count,
            kept fraction before and after the round, ...
        param_names: ``model.named_parameters()`` names, the order of :attr:`gradient`.
        state_names: ``state_dict`` names, the order of SecretFlow's weight lists.
        start_state: The client's ``state_dict`` when it drew its first batch of the round (after
            loading the global weights and, under pruning, applying its mask).
        batches: ``(x, y)`` of every local step of the round, as the model and loss received them.
        gradient: Gradient of the loss on the first batch at ``start_state``, per parameter, as it
            stood when the optimizer stepped.
        global_weights: The weights the client received for this round (state order; the client's
            own weights at an epoch's first step, where SecretFlow passes none).
        sent: The weight list the client returned to the aggregator (state order).
        sent_masks: Under ``fed_avg_w_prune``, the mask per sent tensor (``None``: never pruned);
            ``None`` for unpruned strategies.
        train_masks: Under ``fed_avg_w_prune``, the masks held during the round's local steps, per
            parameter (the upload's masks are smaller when the round ended an epoch).
        optimizer_state: The optimizer's state per parameter when the round started (``None``:
            fresh, as in the first round). A server never sees it.
        loss: The client's loss module (``None``: batch-mean cross entropy).
    """

    meta: Dict[str, Any]
    param_names: List[str]
    state_names: List[str]
    start_state: Dict[str, torch.Tensor]
    batches: List[tuple]
    gradient: List[torch.Tensor]
    global_weights: List[torch.Tensor]
    sent: List[torch.Tensor]
    sent_masks: Optional[List[Optional[torch.Tensor]]] = None
    train_masks: Optional[List[Optional[torch.Tensor]]] = None
    optimizer_state: Optional[List[Dict[str, Any]]] = None
    loss: Optional[Callable] = None
    path: Optional[Path] = field(default=None, compare=False)

    # --- the data ---------------------------------------------------------------------------
    @property
    def x(self) -> torch.Tensor:
        """Every item of the round, local steps in order."""
        return torch.cat([b[0] for b in self.batches])

    @property
    def y(self) -> torch.Tensor:
        return torch.cat([b[1] for b in self.batches])

    @property
    def labels(self) -> torch.Tensor:
        """Class indices of every item (one-hot targets are decoded)."""
        y = self.y
        return y.argmax(dim=-1) if y.dim() > 1 else y.long()

    @property
    def input_shape(self):
        """Shape of the first local batch, ``[B, C, H, W]``."""
        return tuple(self.batches[0][0].shape)

    @property
    def local_steps(self) -> int:
        return len(self.batches)

    @property
    def num_samples(self) -> int:
        return int(self.meta.get("num_samples", sum(len(b[0]) for b in self.batches)))

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
        """Gradient of the recorded loss on the first recorded batch at the recorded weights."""
        model = self.build_model() if model is None else model
        x, y = self.batches[0]
        return observe_gradient(model, x, y, self.loss_fn())

    def optimizer(self, with_state: bool = False) -> OptimizerSpec:
        """The client's optimizer; ``with_state`` adds its recorded state (an upper bound: the
        server does not know it)."""
        state = self.optimizer_state if with_state else None
        return OptimizerSpec.from_hyperparameters(
            self.meta["optimizer"], self.meta.get("optimizer_hyperparameters", {}), state
        )

    # --- what the client sent -------------------------------------------------------------
    def to_params(self, tensors: List[Optional[torch.Tensor]]) -> List:
        """A state-ordered list as a parameter-ordered one (buffers dropped)."""
        by_name = dict(zip(self.state_names, tensors))
        return [by_name.get(name) for name in self.param_names]

    def start_params(self) -> List[torch.Tensor]:
        return [self.start_state[name].float() for name in self.param_names]

    def sent_params(self) -> List[torch.Tensor]:
        return self.to_params([_to_tensor(s).float() for s in self.sent])

    def update(self) -> List[torch.Tensor]:
        """Sent weights minus the client's starting weights, per parameter.

        Under ``fed_avg_w_prune`` the start is the masked global model, which the server can form
        itself (it holds the global model; on the kept entries the start is the global value).
        """
        return [s - b for s, b in zip(self.sent_params(), self.start_params())]

    def update_as_gradient(self, lr: Optional[float] = None) -> List[torch.Tensor]:
        """:meth:`update` read as a gradient: ``-update / lr`` (default: the recorded ``lr``).

        Exact for one plain SGD step without momentum or weight decay. Any other round (Adam,
        momentum, several local steps) gets a ``UserWarning``: use the optimizer-aware attack
        (:func:`sf_ext.dlg.attacks.multistep`) there.
        """
        spec = self.optimizer()
        if spec.name != "sgd" or spec.momentum or spec.weight_decay or self.local_steps != 1:
            warnings.warn(
                f"reading a {spec.describe()} round of {self.local_steps} local step(s) as one SGD "
                "step: -update/lr is not its gradient; the optimizer-aware attack models it",
                stacklevel=2,
            )
        lr = spec.lr if lr is None else lr
        return gradient_from_update(self.update(), lr)

    def masks(self) -> List[Optional[torch.Tensor]]:
        """Per-parameter kept masks of the upload (``None`` entries: not pruned)."""
        if self.sent_masks is None:
            return [None] * len(self.param_names)
        return self.to_params(
            [None if m is None else _to_tensor(m).bool() for m in self.sent_masks]
        )

    def kept_fraction(self) -> float:
        """Kept share of the weight entries in the upload (1.0 when nothing is pruned)."""
        masks = [m for m in self.masks() if m is not None]
        if not masks:
            return 1.0
        return float(sum(int(m.sum()) for m in masks)) / sum(m.numel() for m in masks)


@dataclass
class ServerRecord:
    """What the server held after aggregating one round.

    Attributes:
        kind: ``"plain"`` (it received every upload), ``"secure"`` (the sample-weighted mean and
            the sample counts) or ``"secure_prune"`` (the secure sums ``sum_i n_i m_i w_i`` and
            ``sum_i n_i m_i``, and the sample counts).
        parties: Client names, in the order of ``weights``.
        weights: Sample counts per client (plaintext in SecretFlow).
        tensors: ``"plain"``: ``{party: upload}``; ``"secure"``: ``{"average": ...}``;
            ``"secure_prune"``: ``{"numerator": ..., "count": ...}``. State-ordered lists.
        global_weights: The global model the round started from (state order).
    """

    kind: str
    parties: List[str]
    weights: List[float]
    tensors: Dict[str, List[torch.Tensor]]
    global_weights: Optional[List[torch.Tensor]] = None


@dataclass
class Round:
    """A captured round: every recorded client and what the server held."""

    clients: Dict[str, CapturedRound]
    server: Optional[ServerRecord]
    meta: Dict[str, Any]
    path: Optional[Path] = None


def save_capture(record: Dict[str, Any], out_dir: Union[str, Path]) -> Path:
    """Write a client capture (the dictionary a capture strategy returns) to ``out_dir``.

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
    meta["batch_shapes"] = [list(np.shape(b[0])) for b in record["batches"]]
    meta["files"] = [CAPTURE_FILE, META_FILE]
    (folder / META_FILE).write_text(json.dumps(meta, indent=2, default=str) + "\n")
    return folder


def load_capture(path: Union[str, Path]) -> CapturedRound:
    """Read a client capture folder (or its ``capture.pt``) written by :func:`save_capture`."""
    path = Path(path)
    file = path / CAPTURE_FILE if path.is_dir() else path
    if not file.exists():
        raise FileNotFoundError(f"no {CAPTURE_FILE} at {path}")
    data = torch.load(file, map_location="cpu")
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(f"{file}: capture format {version!r}, this reader knows {FORMAT_VERSION}")

    def optional_list(key):
        values = data.get(key)
        return None if values is None else [_to_tensor(v) for v in values]

    return CapturedRound(
        meta=dict(data["meta"]),
        param_names=list(data["param_names"]),
        state_names=list(data["state_names"]),
        start_state={k: _to_tensor(v) for k, v in data["start_state"].items()},
        batches=[(_to_tensor(x).float(), _to_tensor(y)) for x, y in data["batches"]],
        gradient=[_to_tensor(g) for g in data["gradient"]],
        global_weights=[_to_tensor(w) for w in data["global_weights"]],
        sent=[_to_tensor(s) for s in data["sent"]],
        sent_masks=optional_list("sent_masks"),
        train_masks=optional_list("train_masks"),
        optimizer_state=data.get("optimizer_state"),
        loss=data.get("loss"),
        path=file.parent,
    )


def save_server_record(record: ServerRecord, folder: Union[str, Path]) -> Path:
    """Write what the server held (``server.pt``) into a round folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({"format_version": FORMAT_VERSION, **record.__dict__}, folder / SERVER_FILE)
    return folder / SERVER_FILE


def load_round(path: Union[str, Path]) -> Round:
    """Read a round folder written by :class:`sf_ext.dlg.capture.RoundCapture`."""
    folder = Path(path)
    info_file = folder / ROUND_FILE
    if not info_file.is_file():
        raise FileNotFoundError(f"no {ROUND_FILE} in {folder}: not a captured round")
    info = json.loads(info_file.read_text())
    clients = {party: load_capture(folder / party) for party in info["clients"]}
    server = None
    if (folder / SERVER_FILE).is_file():
        data = torch.load(folder / SERVER_FILE, map_location="cpu")
        data.pop("format_version", None)
        server = ServerRecord(**data)
    return Round(clients=clients, server=server, meta=info, path=folder)


__all__ = [
    "CAPTURE_FILE",
    "CapturedRound",
    "META_FILE",
    "ROUND_FILE",
    "Round",
    "SERVER_FILE",
    "ServerRecord",
    "class_path",
    "import_class",
    "load_capture",
    "load_round",
    "save_capture",
    "save_server_record",
]
