"""Record what SecretFlow clients really compute and send, and what the server really holds.

Three pieces work together:

* Capture strategies, registered with SecretFlow as ``fed_avg_w_capture`` and
  ``fed_avg_w_prune_capture``: the built-in ``fed_avg_w`` and sf-ext's ``fed_avg_w_prune`` with a
  recorder added. Training is unchanged (same data order, same optimizer steps, same upload); when
  armed for a round, the client records its model state and optimizer state as it draws its first
  batch, every batch of the round, the first batch's gradient as the optimizer sees it, the
  weights it received and the weights it sends (with its pruning masks). They also accept one
  defence for the frontier experiments, ``update_keep`` (keep only that share of each tensor's
  update entries, largest magnitude first, and send start + pruned update; 1.0: off).
* Recording aggregators (:func:`recording_aggregator`): SecretFlow's ``PlainAggregator`` and
  ``SecureAggregator`` and sf-ext's ``SecurePruneAggregator``, unchanged, except that when armed
  they also keep what the server ends up holding: every upload (plain), the weighted mean
  (secure), the two secure sums (secure prune), and the sample counts.
* :class:`RoundCapture`, a driver-side ``FLModel.fit`` callback that arms the clients and the
  aggregator for chosen rounds and writes each round to a folder (see
  :mod:`sf_ext.dlg.captured`).

What a capture of a pruned round shows: ``fed_avg_w_prune`` prunes at the end of each local
epoch, *before* that round's upload. A round that ends an epoch therefore trains with the old
mask and sends with the new one (after the first epoch with ``prune_percent=50`` the upload keeps
50 % of the weights; a round ending epoch 1 keeps 25 %). The masks rank *weight* magnitudes, as
the strategy does; :func:`sf_ext.dlg.gradients.prune_gradient` (used by the DLG sweeps) ranks
*gradient* magnitudes instead.

This module imports SecretFlow; ``import sf_ext.dlg`` does not import it.
"""

import copy
import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from secretflow.device import PYU, reveal
from secretflow.security.aggregation import PlainAggregator, SecureAggregator
from secretflow_fl.ml.nn.callbacks.callback import Callback
from secretflow_fl.ml.nn.fl.backend.torch.strategy.fed_avg_w import FedAvgW
from secretflow_fl.ml.nn.fl.strategy_dispatcher import _strategy_dispatcher, register_strategy

from sf_ext.aggregators.secure_prune import SecurePruneAggregator
from sf_ext.dlg.captured import (
    ROUND_FILE,
    ServerRecord,
    class_path,
    save_capture,
    save_server_record,
)
from sf_ext.strategies.fed_avg_w_prune import FedAvgWPrune

CAPTURE_SUFFIX = "_capture"


def _numpy_list(weights) -> Optional[List[np.ndarray]]:
    if weights is None:
        return None
    return [np.array(w, copy=True) for w in weights]


def _hyperparameters(optimizer: torch.optim.Optimizer) -> Dict[str, Any]:
    group = optimizer.param_groups[0]
    out = {}
    for key, value in group.items():
        if key == "params":
            continue
        if isinstance(value, (int, float, bool, str)) or value is None:
            out[key] = value
        elif isinstance(value, (tuple, list)) and all(isinstance(v, (int, float)) for v in value):
            out[key] = list(value)
    return out


def _keep_largest_update(update: np.ndarray, keep: float) -> np.ndarray:
    flat = np.abs(update).reshape(-1)
    count = int(round(keep * flat.size))
    if count >= flat.size:
        return update
    out = np.zeros_like(update)
    if count <= 0:
        return out
    idx = np.argpartition(flat, flat.size - count)[flat.size - count :]
    np.put(out, idx, update.reshape(-1)[idx])
    return out


class CaptureMixin:
    """Adds a one-round recorder (and the ``update_keep`` defence) to a SecretFlow torch strategy.

    Put it first in the bases.
    """

    def __init__(self, builder_base, *args, update_keep: float = 1.0, **kwargs):
        if not 0 < float(update_keep) <= 1:
            raise ValueError(f"update_keep must be in (0, 1], got {update_keep!r}")
        super().__init__(builder_base, *args, **kwargs)
        self.update_keep = float(update_keep)
        self._capture_armed = False
        self._capture: Optional[Dict[str, Any]] = None
        self._capture_wants_gradient = False
        model_fn = getattr(builder_base, "model_fn", None)
        self._capture_model_class = class_path(model_fn) if isinstance(model_fn, type) else None
        self._capture_model_kwargs = dict(getattr(builder_base, "kwargs", {}) or {})
        for optimizer in self._capture_optimizers():
            # Runs after backward and before the update: p.grad is the batch's gradient here.
            optimizer.register_step_pre_hook(self._record_gradient)

    def _capture_optimizers(self) -> List[torch.optim.Optimizer]:
        optimizers = self.model.optimizers()
        if optimizers is None:
            return []
        return [optimizers] if isinstance(optimizers, torch.optim.Optimizer) else list(optimizers)

    # --- remote controls (called by RoundCapture through the worker proxy) -----------------
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

    def _optimizer_state(self) -> Optional[List[Dict[str, Any]]]:
        optimizers = self._capture_optimizers()
        if not optimizers:
            return None
        state = optimizers[0].state
        params = list(self.model.parameters())
        out = []
        for p in params:
            entry = state.get(p, {})
            out.append(
                {k: v.detach().cpu().clone() if torch.is_tensor(v) else v for k, v in entry.items()}
            )
        return None if all(not e for e in out) else out

    def next_batch(self, stage="train"):
        x, y, s_w = super().next_batch(stage)
        record = self._capture
        if stage == "train" and record is not None and "sent" not in record:
            if not record["batches"]:
                record["start_state"] = {
                    k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()
                }
                record["optimizer_state"] = self._optimizer_state()
                masks = getattr(self, "masks", None)
                if isinstance(masks, dict):
                    record["train_masks"] = [
                        masks[n].cpu().clone() if n in masks else None
                        for n, _ in self.model.named_parameters()
                    ]
                record["meta"]["batch_size"] = int(x.shape[0])
                self._capture_wants_gradient = True
            record["batches"].append((x.detach().cpu().clone(), y.detach().cpu().clone()))
            if s_w is not None:
                record["meta"]["sample_weights"] = True
        return x, y, s_w

    def train_step(
        self,
        weights: np.ndarray,
        cur_steps: int,
        train_steps: int,
        **kwargs,
    ) -> Tuple[np.ndarray, int]:
        """The wrapped strategy's ``train_step``; records the round when armed and applies
        ``update_keep`` to the upload when it is below 1."""
        armed, self._capture_armed = self._capture_armed, False
        if armed:
            own = None if weights is not None else _numpy_list(self.get_weights(return_numpy=True))
            optimizers = self._capture_optimizers()
            self._capture = {
                "meta": {
                    "strategy_class": type(self).__name__,
                    "cur_steps": int(cur_steps),
                    "train_steps": int(train_steps),
                    "model_class": self._capture_model_class,
                    "model_kwargs": copy.deepcopy(self._capture_model_kwargs),
                    "loss_class": type(self.model.loss).__name__ if self.model.loss else None,
                    "optimizer": type(optimizers[0]).__name__ if optimizers else None,
                    "optimizer_hyperparameters": (
                        _hyperparameters(optimizers[0]) if optimizers else {}
                    ),
                    "update_keep": self.update_keep,
                    "dp": kwargs.get("dp_strategy") is not None,
                },
                "global_weights": _numpy_list(weights) if weights is not None else own,
                "param_names": [n for n, _ in self.model.named_parameters()],
                "state_names": list(self.model.state_dict().keys()),
                "loss": self.model.loss,
                "batches": [],
            }
            if hasattr(self, "get_kept_fraction"):
                self._capture["meta"]["kept_fraction_before"] = float(self.get_kept_fraction())
        start = None
        if self.update_keep < 1 or armed:
            start = _numpy_list(
                weights if weights is not None else self.get_weights(return_numpy=True)
            )
        sent, num_sample = super().train_step(weights, cur_steps, train_steps, **kwargs)
        if self.update_keep < 1:
            masks = getattr(sent, "masks", None)
            for i, (w, s) in enumerate(zip(sent, start)):
                kept = s + _keep_largest_update(np.asarray(w) - s, self.update_keep)
                sent[i] = kept if masks is None or masks[i] is None else kept * masks[i]
        if armed:
            record = self._capture
            record["sent"] = _numpy_list(sent)
            masks = getattr(sent, "masks", None)
            record["sent_masks"] = (
                None
                if masks is None
                else [None if m is None else np.array(m, dtype=bool) for m in masks]
            )
            record["meta"]["num_samples"] = int(num_sample)
            record["meta"]["local_steps"] = len(record["batches"])
            if hasattr(self, "get_kept_fraction"):
                record["meta"]["kept_fraction"] = float(self.get_kept_fraction())
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


# --- the server's side ----------------------------------------------------------------------
def _revealed_list(value) -> List[torch.Tensor]:
    return [torch.as_tensor(np.array(v, copy=True)) for v in reveal(value)]


def _revealed_weights(weights) -> List[float]:
    if weights is None:
        return []
    return [float(reveal(w)) if hasattr(w, "device") else float(w) for w in weights]


class _ServerRecorder:
    """Keeps what the server held in the next aggregation after :meth:`arm`."""

    kind = "plain"

    def arm(self) -> None:
        self._armed = True
        self._record: Optional[ServerRecord] = None

    def take(self) -> Optional[ServerRecord]:
        record, self._record = getattr(self, "_record", None), None
        return record

    def _armed_now(self) -> bool:
        armed = getattr(self, "_armed", False)
        self._armed = False
        return armed


def _plain_mask_aware_mean(*uploads, weights):
    """Sample-weighted mean of weight lists, per coordinate over the clients that kept it
    (:func:`sf_ext.aggregators.masking.mean_over_keepers`); uploads without masks
    (``fed_avg_w``) give the plain weighted mean.
    """
    from sf_ext.aggregators.masking import MaskAwareAggregate, mean_over_keepers

    shares = None if weights is None else torch.as_tensor(np.asarray(weights, dtype=np.float64))
    result = []
    for index, elements in enumerate(zip(*uploads)):
        rows = torch.as_tensor(np.stack([np.asarray(e, dtype=np.float64) for e in elements]))
        masks = [getattr(u, "masks", None) for u in uploads]
        if all(m is None or m[index] is None for m in masks):
            keep = None
        else:
            keep = torch.as_tensor(
                np.stack(
                    [
                        np.ones(rows.shape[1:]) if m is None or m[index] is None else m[index]
                        for m in masks
                    ]
                ).astype(np.float64)
            )
        mean = mean_over_keepers(rows, keep, shares).numpy()
        result.append(mean.astype(np.asarray(elements[0]).dtype))
    return MaskAwareAggregate(result, "RecordingPlainAggregator")


class RecordingPlainAggregator(_ServerRecorder, PlainAggregator):
    """A plaintext aggregator; when armed, keeps every client's upload.

    The server sees every client's upload in plaintext. Unlike SecretFlow's ``PlainAggregator`` it
    is mask-aware: a ``fed_avg_w_prune`` upload (:class:`~sf_ext.pruning.MaskedWeights`) is
    averaged per coordinate over the clients that kept it, as ``SecurePruneAggregator`` does, so
    "pruning without secure aggregation" trains the same model as with it. Uploads without masks
    give SecretFlow's sample-weighted mean.
    """

    kind = "plain"
    mask_aware = True

    def average(self, data, axis=None, weights=None):
        if self._armed_now():
            self._record = ServerRecord(
                kind=self.kind,
                parties=[d.device.party for d in data],
                weights=_revealed_weights(weights),
                tensors={d.device.party: _revealed_list(d) for d in data},
            )
        if axis not in (None, 0):
            raise ValueError(
                f"RecordingPlainAggregator averages over clients only, got axis={axis}"
            )
        data = [d.to(self.device) for d in data]
        if isinstance(weights, (list, tuple)):
            weights = [w.to(self.device) if hasattr(w, "to") else w for w in weights]
        return self.device(_plain_mask_aware_mean)(*data, weights=weights)


class RecordingSecureAggregator(_ServerRecorder, SecureAggregator):
    """SecretFlow's ``SecureAggregator``; when armed, keeps the mean the server decodes."""

    kind = "secure"

    def average(self, data, axis=None, weights=None):
        armed = self._armed_now()
        result = super().average(data, axis=axis, weights=weights)
        if armed:
            self._record = ServerRecord(
                kind=self.kind,
                parties=[d.device.party for d in data],
                weights=_revealed_weights(weights),
                tensors={"average": _revealed_list(result)},
            )
        return result


class _RecordingSum(SecureAggregator):
    """Sits between ``SecurePruneAggregator`` and ``SecureAggregator`` in the method order, so the
    secure sums ``SecurePruneAggregator.average`` asks its parent for pass through here."""

    def sum(self, data, axis=None):
        result = super().sum(data, axis=axis)
        if getattr(self, "_sums", None) is not None:
            self._sums.append(_revealed_list(result))
        return result


class RecordingSecurePruneAggregator(_ServerRecorder, SecurePruneAggregator, _RecordingSum):
    """sf-ext's ``SecurePruneAggregator``; when armed, keeps both secure sums it decodes."""

    kind = "secure_prune"

    def average(self, data, axis=0, weights=None):
        self._sums: Optional[List] = [] if self._armed_now() else None
        result = super().average(data, axis=axis, weights=weights)
        if self._sums is not None:
            if len(self._sums) != 2:
                raise RuntimeError(f"expected 2 secure sums, recorded {len(self._sums)}")
            self._record = ServerRecord(
                kind=self.kind,
                parties=[d.device.party for d in data],
                weights=_revealed_weights(weights),
                tensors={"numerator": self._sums[0], "count": self._sums[1]},
            )
        self._sums = None
        return result


AGGREGATOR_KINDS = ("plain", "secure", "secure_prune")


def recording_aggregator(kind: str, server: PYU, clients: Sequence[PYU]):
    """A recording aggregator: ``"plain"``, ``"secure"`` or ``"secure_prune"``."""
    if kind == "plain":
        return RecordingPlainAggregator(server)
    if kind == "secure":
        return RecordingSecureAggregator(server, list(clients))
    if kind == "secure_prune":
        return RecordingSecurePruneAggregator(server, list(clients))
    raise ValueError(f"aggregator must be one of {AGGREGATOR_KINDS}, got {kind!r}")


class RoundCapture(Callback):
    """``FLModel.fit`` callback that records chosen rounds of chosen clients (and the server).

    The FL model must use a capture strategy (``fed_avg_w_capture`` or
    ``fed_avg_w_prune_capture``, see :func:`register_capture_strategies`).

    Args:
        parties: Clients to record (PYUs or party names).
        rounds: ``(epoch, step)`` pairs (0-based; ``step`` is the step within the epoch at which a
            round starts, a multiple of ``aggregate_freq``).
        out_dir: Folder for the rounds; each goes to ``out_dir/e<epoch>_s<step>``.
        aggregator: A recording aggregator (:func:`recording_aggregator`) to record the server's
            side too (``None``: clients only).
        meta: Extra facts written into every client's ``meta`` and ``round.json`` (e.g. the
            dataset name).

    Attributes:
        saved: Round folders written so far.
    """

    def __init__(
        self,
        parties: Sequence[Union[PYU, str]],
        rounds: Sequence[Tuple[int, int]],
        out_dir: Union[str, Path],
        aggregator: Optional[_ServerRecorder] = None,
        meta: Optional[Dict[str, Any]] = None,
    ):
        super().__init__()
        self.meta = dict(meta or {})
        self.parties = [p.party if isinstance(p, PYU) else str(p) for p in parties]
        self.rounds = {(int(e), int(s)) for e, s in rounds}
        self.out_dir = Path(out_dir)
        self.aggregator = aggregator
        self.saved: List[Path] = []
        self._epoch: Optional[int] = None
        self._armed: Optional[Tuple[int, int]] = None

    def _worker(self, party: str):
        for device, worker in (self._workers or {}).items():
            if getattr(device, "party", None) == party:
                return worker
        raise ValueError(f"no FL worker for party {party!r}")

    def on_epoch_begin(self, epoch=None, logs=None):
        self._epoch = epoch

    def on_train_batch_begin(self, batch):
        if (self._epoch, batch) not in self.rounds:
            return
        for party in self.parties:
            worker = self._worker(party)
            if not hasattr(worker, "arm_capture"):
                raise TypeError(
                    "the FL strategy cannot record; use strategy='fed_avg_w_capture' or "
                    "'fed_avg_w_prune_capture' (after register_capture_strategies())"
                )
            reveal(worker.arm_capture())
        if self.aggregator is not None:
            self.aggregator.arm()
        self._armed = (self._epoch, batch)

    def on_train_batch_end(self, batch):
        if self._armed is None:
            return
        epoch, step = self._armed
        self._armed = None
        folder = self.out_dir / f"e{epoch}_s{step}"
        for party in self.parties:
            record = reveal(self._worker(party).take_capture())
            if record is None or "gradient" not in record:
                raise RuntimeError(f"client {party!r} returned no complete capture")
            record["meta"].update({**self.meta, "party": party, "epoch": epoch, "step": step})
            save_capture(record, folder / party)
        server = self.aggregator.take() if self.aggregator is not None else None
        if server is not None:
            save_server_record(server, folder)
        info = {
            **self.meta,
            "epoch": epoch,
            "step": step,
            "clients": self.parties,
            "aggregator": None if server is None else server.kind,
        }
        (folder / ROUND_FILE).write_text(json.dumps(info, indent=2) + "\n")
        self.saved.append(folder)


__all__ = [
    "AGGREGATOR_KINDS",
    "CAPTURE_SUFFIX",
    "CaptureMixin",
    "FedAvgWCapture",
    "FedAvgWPruneCapture",
    "RecordingPlainAggregator",
    "RecordingSecureAggregator",
    "RecordingSecurePruneAggregator",
    "RoundCapture",
    "recording_aggregator",
    "register_capture_strategies",
]
