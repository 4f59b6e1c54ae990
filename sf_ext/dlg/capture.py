"""Record what a SecretFlow client really computes and sends in one FL round.

Two pieces work together:

* Capture strategies, registered with SecretFlow as ``fed_avg_w_capture`` and
  ``fed_avg_w_prune_capture``: the built-in ``fed_avg_w`` and sf-ext's ``fed_avg_w_prune`` with a
  recorder added. Training is unchanged (same data order, same optimizer steps, same upload); when
  armed for a round, the client records its model state as it draws its first batch, that batch,
  the batch's gradient as the optimizer sees it, the weights it received and the weights it sends
  (with its pruning masks).
* :class:`ClientCapture`, a driver-side ``FLModel.fit`` callback that arms one client for one
  round, fetches the record after the round and writes it under an output folder (default
  ``./runs/``) with :func:`sf_ext.dlg.captured.save_capture`.

Usage::

    import secretflow as sf
    from sf_ext.dlg.capture import ClientCapture, register_capture_strategies

    register_capture_strategies()
    fl_model = FLModel(..., strategy="fed_avg_w_prune_capture", ...)
    capture = ClientCapture(alice, out_dir="runs", epoch=1, step=0)
    fl_model.fit(..., callbacks=[capture])
    round_ = load_capture(capture.saved[0])

This module imports SecretFlow; ``import sf_ext.dlg`` does not import it.
"""

import copy
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np
import torch
from secretflow.device import PYU, reveal
from secretflow_fl.ml.nn.callbacks.callback import Callback
from secretflow_fl.ml.nn.fl.backend.torch.strategy.fed_avg_w import FedAvgW
from secretflow_fl.ml.nn.fl.strategy_dispatcher import _strategy_dispatcher, register_strategy

from sf_ext.dlg.captured import class_path, save_capture
from sf_ext.strategies.fed_avg_w_prune import FedAvgWPrune

CAPTURE_SUFFIX = "_capture"


def _numpy_list(weights) -> Optional[List[np.ndarray]]:
    if weights is None:
        return None
    return [np.array(w, copy=True) for w in weights]


def _scalar_hyperparameters(optimizer: torch.optim.Optimizer) -> Dict[str, Any]:
    group = optimizer.param_groups[0]
    return {
        k: v for k, v in group.items() if k != "params" and isinstance(v, (int, float, bool, str))
    }


class CaptureMixin:
    """Adds a one-round recorder to a SecretFlow torch strategy (put it first in the bases)."""

    def __init__(self, builder_base, *args, **kwargs):
        super().__init__(builder_base, *args, **kwargs)
        self._capture_armed = False
        self._capture: Optional[Dict[str, Any]] = None
        self._capture_wants_gradient = False
        model_fn = getattr(builder_base, "model_fn", None)
        self._capture_model_class = class_path(model_fn) if isinstance(model_fn, type) else None
        self._capture_model_kwargs = dict(getattr(builder_base, "kwargs", {}) or {})
        optimizers = self.model.optimizers()
        optimizers = [optimizers] if isinstance(optimizers, torch.optim.Optimizer) else optimizers
        for optimizer in optimizers or []:
            # Runs after backward and before the update: p.grad is the batch's gradient here.
            optimizer.register_step_pre_hook(self._record_gradient)

    # --- remote controls (called by ClientCapture through the worker proxy) ----------------
    def arm_capture(self) -> bool:
        """Record the next ``train_step`` call (one FL round)."""
        self._capture_armed = True
        self._capture = None
        return True

    def take_capture(self) -> Optional[Dict[str, Any]]:
        """Hand over (and forget) the last finished record; ``None`` if there is none."""
        record, self._capture = self._capture, None
        if record is not None and "sent" not in record:
            return None  # armed but the round has not finished
        return record

    # --- recording -------------------------------------------------------------------------
    def _record_gradient(self, optimizer, args, kwargs) -> None:
        if not self._capture_wants_gradient:
            return
        self._capture_wants_gradient = False
        self._capture["gradient"] = [
            torch.zeros_like(p).cpu() if p.grad is None else p.grad.detach().cpu().clone()
            for p in self.model.parameters()
        ]
        self._capture["meta"]["optimizer"] = type(optimizer).__name__
        self._capture["meta"].update(_scalar_hyperparameters(optimizer))

    def next_batch(self, stage="train"):
        x, y, s_w = super().next_batch(stage)
        record = self._capture
        if stage == "train" and record is not None and "x" not in record:
            record["x"] = x.detach().cpu().clone()
            record["y"] = y.detach().cpu().clone()
            record["sample_weight"] = None if s_w is None else s_w.detach().cpu().clone()
            record["start_state"] = {
                k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()
            }
            record["meta"]["batch_size"] = int(x.shape[0])
            self._capture_wants_gradient = True
        return x, y, s_w

    def train_step(
        self,
        weights: np.ndarray,
        cur_steps: int,
        train_steps: int,
        **kwargs,
    ) -> Tuple[np.ndarray, int]:
        """The wrapped strategy's ``train_step``, recording the round when armed."""
        if not self._capture_armed:
            return super().train_step(weights, cur_steps, train_steps, **kwargs)
        self._capture_armed = False
        own = None if weights is not None else _numpy_list(self.get_weights(return_numpy=True))
        self._capture = {
            "meta": {
                "strategy_class": type(self).__name__,
                "cur_steps": int(cur_steps),
                "train_steps": int(train_steps),
                "model_class": self._capture_model_class,
                "model_kwargs": copy.deepcopy(self._capture_model_kwargs),
                "loss_class": type(self.model.loss).__name__ if self.model.loss else None,
            },
            "global_weights": _numpy_list(weights) if weights is not None else own,
            "param_names": [n for n, _ in self.model.named_parameters()],
            "state_names": list(self.model.state_dict().keys()),
            "loss": self.model.loss,
        }
        sent, num_sample = super().train_step(weights, cur_steps, train_steps, **kwargs)
        self._capture["sent"] = _numpy_list(sent)
        masks = getattr(sent, "masks", None)
        self._capture["sent_masks"] = (
            None
            if masks is None
            else [None if m is None else np.array(m, dtype=bool) for m in masks]
        )
        self._capture["meta"]["num_samples"] = int(num_sample)
        if hasattr(self, "get_kept_fraction"):
            self._capture["meta"]["kept_fraction"] = float(self.get_kept_fraction())
        return sent, num_sample


class FedAvgWCapture(CaptureMixin, FedAvgW):
    """``fed_avg_w`` with a one-round recorder (see :class:`CaptureMixin`)."""


class FedAvgWPruneCapture(CaptureMixin, FedAvgWPrune):
    """``fed_avg_w_prune`` with a one-round recorder (see :class:`CaptureMixin`)."""


def register_capture_strategies() -> List[str]:
    """Register ``fed_avg_w_capture`` and ``fed_avg_w_prune_capture`` (idempotent).

    Call it in every process that builds an ``FLModel`` (one per party in production mode).

    Returns:
        The registered strategy names.
    """
    names = []
    for name, cls in (
        ("fed_avg_w" + CAPTURE_SUFFIX, FedAvgWCapture),
        ("fed_avg_w_prune" + CAPTURE_SUFFIX, FedAvgWPruneCapture),
    ):
        if f"{name}_torch" not in _strategy_dispatcher._ops:
            register_strategy(strategy_name=name, backend="torch")(cls)
        names.append(name)
    return names


class ClientCapture(Callback):
    """``FLModel.fit`` callback that records one client's round and saves it to disk.

    The FL model must use a capture strategy (``fed_avg_w_capture`` or
    ``fed_avg_w_prune_capture``, see :func:`register_capture_strategies`).

    Args:
        party: The client to record (its ``PYU`` or party name).
        out_dir: Base folder for captures (created if needed); default ``./runs``.
        epoch: Epoch of the round to record (0-based).
        step: Step within the epoch at which the round starts (0-based, a multiple of
            ``aggregate_freq``).
        name: Sub-folder name (default ``capture_<party>_e<epoch>_s<step>``).

    Attributes:
        saved: Folders written so far.
    """

    def __init__(
        self,
        party: Union[PYU, str],
        out_dir: Union[str, Path] = "runs",
        epoch: int = 0,
        step: int = 0,
        name: Optional[str] = None,
    ):
        super().__init__()
        self.party = party.party if isinstance(party, PYU) else str(party)
        self.out_dir = Path(out_dir)
        self.epoch = int(epoch)
        self.step = int(step)
        self.name = name or f"capture_{self.party}_e{self.epoch}_s{self.step}"
        self.saved: List[Path] = []
        self._current_epoch: Optional[int] = None
        self._armed = False

    def _worker(self):
        for device, worker in (self._workers or {}).items():
            if getattr(device, "party", None) == self.party:
                return worker
        raise ValueError(f"no FL worker for party {self.party!r}")

    def on_epoch_begin(self, epoch=None, logs=None):
        self._current_epoch = epoch

    def on_train_batch_begin(self, batch):
        if self._current_epoch != self.epoch or batch != self.step:
            return
        worker = self._worker()
        if not hasattr(worker, "arm_capture"):
            raise TypeError(
                "the FL strategy cannot record; use strategy='fed_avg_w_capture' or "
                "'fed_avg_w_prune_capture' (after register_capture_strategies())"
            )
        reveal(worker.arm_capture())
        self._armed = True

    def on_train_batch_end(self, batch):
        if not self._armed:
            return
        self._armed = False
        record = reveal(self._worker().take_capture())
        if record is None or "gradient" not in record:
            raise RuntimeError(f"client {self.party!r} returned no complete capture")
        record["meta"].update({"party": self.party, "epoch": self.epoch, "step": self.step})
        self.saved.append(save_capture(record, self.out_dir / self.name))


def run_capture(
    strategy: str = "fed_avg_w_prune",
    out_dir: Union[str, Path] = "runs",
    name: Optional[str] = None,
    dataset: str = "fashion-mnist",
    data_root: Optional[Union[str, Path]] = None,
    model: str = "dlg-lenet",
    samples: int = 32,
    batch_size: int = 1,
    epochs: int = 2,
    capture_epoch: int = 1,
    capture_step: int = 0,
    optimizer: str = "sgd",
    lr: float = 0.01,
    prune_percent: float = 50.0,
    prune_end_rate: float = 0.1,
    seed: int = 0,
    party: str = "alice",
) -> Path:
    """Run a small two-client ``FLModel.fit`` in SecretFlow debug mode and capture one round.

    Clients ``alice`` and ``bob`` split ``samples`` training images evenly; ``charlie`` is the
    server. ``fed_avg_w`` uses a ``PlainAggregator``, ``fed_avg_w_prune`` sf-ext's
    ``SecurePruneAggregator``. With ``fed_avg_w_prune`` each client prunes ``prune_percent`` % of
    its alive weights at every epoch's end, so a round in epoch ``e`` is sent with
    ``max(prune_end_rate, (1 - prune_percent / 100) ** e)`` of the weights kept.

    Args:
        strategy: ``"fed_avg_w"`` or ``"fed_avg_w_prune"`` (the capture variant is used).
        out_dir: Base output folder; the capture goes to ``out_dir / name``.
        name: Capture folder name (default from strategy, epoch and step).
        dataset, data_root: Data to train on (see :func:`sf_ext.data.load_dataset`).
        model: Model name in :data:`sf_ext.models.MODELS`.
        samples: Training images in total (split over the two clients).
        batch_size: Local batch size.
        epochs: Epochs to train (at least ``capture_epoch + 1``).
        capture_epoch, capture_step: The round to record.
        optimizer: ``"sgd"`` (one round's update is ``-lr`` times the gradient) or ``"adam"``.
        lr: Learning rate.
        prune_percent, prune_end_rate: ``fed_avg_w_prune`` schedule.
        seed: Seed of the data split and model initialization.
        party: The client recorded.

    Returns:
        The capture folder.
    """
    import secretflow as sf
    from secretflow.security.aggregation import PlainAggregator
    from secretflow_fl.ml.nn import FLModel
    from secretflow_fl.ml.nn.core.torch import TorchModel, optim_wrapper
    from torch import nn

    from sf_ext.aggregators import SecurePruneAggregator
    from sf_ext.data import dataset_spec, federated_dataset
    from sf_ext.models import as_secretflow_module, model_class

    if strategy not in ("fed_avg_w", "fed_avg_w_prune"):
        raise ValueError(f"strategy must be fed_avg_w or fed_avg_w_prune, got {strategy!r}")
    if epochs <= capture_epoch:
        raise ValueError(f"epochs ({epochs}) must exceed capture_epoch ({capture_epoch})")
    optimizers = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam}
    if optimizer not in optimizers:
        raise ValueError(f"optimizer must be one of {sorted(optimizers)}, got {optimizer!r}")
    register_capture_strategies()
    spec = dataset_spec(dataset)
    sf.init(["alice", "bob", "charlie"], debug_mode=True)
    try:
        alice, bob, charlie = sf.PYU("alice"), sf.PYU("bob"), sf.PYU("charlie")
        clients = [alice, bob]
        (train_x, train_y), _ = federated_dataset(
            dataset, {alice: 0.5, bob: 0.5}, root=data_root, seed=seed, limit=samples
        )
        torch_model = TorchModel(
            model_fn=as_secretflow_module(model_class(model)),
            loss_fn=nn.CrossEntropyLoss,
            optim_fn=optim_wrapper(optimizers[optimizer], lr=lr),
            # No metrics: SecretFlow computes them with TensorFlow, which a capture does not need.
            metrics=[],
            in_channels=spec.in_channels,
            image_size=spec.image_size,
            num_classes=spec.num_classes,
        )
        extra: Dict[str, Any] = {}
        if strategy == "fed_avg_w_prune":
            aggregator = SecurePruneAggregator(charlie, clients)
            extra = {"prune_percent": prune_percent, "prune_end_rate": prune_end_rate}
        else:
            aggregator = PlainAggregator(charlie)
        fl_model = FLModel(
            server=charlie,
            device_list=clients,
            model=torch_model,
            aggregator=aggregator,
            strategy=strategy + CAPTURE_SUFFIX,
            backend="torch",
            random_seed=seed,
            **extra,
        )
        recorder = ClientCapture(
            party,
            out_dir=out_dir,
            epoch=capture_epoch,
            step=capture_step,
            name=name or f"{strategy}_e{capture_epoch}_s{capture_step}",
        )
        fl_model.fit(
            train_x,
            train_y,
            batch_size=batch_size,
            epochs=epochs,
            aggregate_freq=1,
            verbose=0,
            callbacks=[recorder],
            random_seed=seed,
        )
    finally:
        sf.shutdown()
    if not recorder.saved:
        raise RuntimeError("the requested round was not reached; check epochs and capture_step")
    return recorder.saved[0]


__all__ = [
    "CAPTURE_SUFFIX",
    "CaptureMixin",
    "ClientCapture",
    "FedAvgWCapture",
    "FedAvgWPruneCapture",
    "register_capture_strategies",
    "run_capture",
]
